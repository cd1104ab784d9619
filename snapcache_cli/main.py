"""The ``snapcache`` command: argument parsing, logging set-up, and one place that reports failures.

Global options may be given before the subcommand or after it (``snapcache -o json cache list``
and ``snapcache cache list -o json`` both work): each leaf parser repeats them with suppressed
defaults, so a value given after the subcommand wins and one given before it is not reset.
Exit codes: 0 success, 1 a failed call or build, 2 a usage error (as argparse), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from snapcache_cli import cache_commands, demo, match_command, node_agent_command, operator_command, serve
from snapcache_cli.client import (
    DEFAULT_RPC_TIMEOUT_SECONDS,
    CommandFailed,
    RpcFailure,
    WaitTimeout,
    failure_lines,
)
from snapcache_cli.log_format import LEVELS, configure_logging

DEFAULT_REGISTRY = "127.0.0.1:50051"
_INTERRUPTED = 130


def _add_global_options(parser: argparse.ArgumentParser, *, with_defaults: bool) -> None:
    def default(value: object) -> object:
        return value if with_defaults else argparse.SUPPRESS

    group = parser.add_argument_group("global options")
    group.add_argument(
        "--registry",
        metavar="ADDRESS",
        default=default(os.environ.get("SNAPCACHE_REGISTRY") or DEFAULT_REGISTRY),
        help=f"cache registry gRPC address (env SNAPCACHE_REGISTRY, default {DEFAULT_REGISTRY})",
    )
    group.add_argument(
        "--tls-ca",
        metavar="PATH",
        default=default(os.environ.get("SNAPCACHE_TLS_CA", "")),
        help="talk TLS, verifying the server with this CA (env SNAPCACHE_TLS_CA; default plaintext)",
    )
    group.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=default(os.environ.get("SNAPCACHE_TLS_SERVER_NAME", "")),
        help="name expected in the server's certificate when ADDRESS's host is not in it "
        "(env SNAPCACHE_TLS_SERVER_NAME)",
    )
    group.add_argument(
        "--client-cert",
        metavar="PATH",
        default=default(os.environ.get("SNAPCACHE_CLIENT_CERT", "")),
        help="client certificate for mutual TLS (env SNAPCACHE_CLIENT_CERT; with --client-key)",
    )
    group.add_argument(
        "--client-key",
        metavar="PATH",
        default=default(os.environ.get("SNAPCACHE_CLIENT_KEY", "")),
        help="key of --client-cert (env SNAPCACHE_CLIENT_KEY)",
    )
    group.add_argument(
        "--token",
        metavar="TOKEN",
        default=default(os.environ.get("SNAPCACHE_TOKEN", "")),
        help="bearer token sent on every call (env SNAPCACHE_TOKEN; prefer it or --client-token-file: "
        "a command line is visible to other users)",
    )
    group.add_argument(
        "--client-token-file",
        metavar="PATH",
        default=default(os.environ.get("SNAPCACHE_TOKEN_FILE", "")),
        help="file holding the bearer token, read again when it changes (env SNAPCACHE_TOKEN_FILE)",
    )
    group.add_argument(
        "--rpc-timeout",
        type=cache_commands.positive_seconds,
        metavar="SECONDS",
        default=default(DEFAULT_RPC_TIMEOUT_SECONDS),
        help=f"deadline of each call (default {DEFAULT_RPC_TIMEOUT_SECONDS:g})",
    )
    group.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default=default("table"),
        help="human tables (default) or protobuf JSON",
    )
    group.add_argument(
        "--log-level",
        choices=LEVELS,
        default=default(None),
        help="default: info for serve, warning otherwise",
    )
    group.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=default("text"),
        help="text, or JSON lines for log collectors",
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; environment defaults are read now, not at import."""
    parser = argparse.ArgumentParser(
        prog="snapcache",
        description="Snapshot-backed container image caches: build once, mount instead of pulling.",
    )
    _add_global_options(parser, with_defaults=True)
    leaf_options = argparse.ArgumentParser(add_help=False)
    _add_global_options(leaf_options, with_defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.register(commands, parents=[leaf_options])
    cache_commands.register(commands, parents=[leaf_options])
    match_command.register(commands, parents=[leaf_options])
    demo.register(commands, parents=[leaf_options])
    operator_command.register(commands, parents=[leaf_options])
    node_agent_command.register(commands, parents=[leaf_options])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (2) and --help (0), already printed by argparse
        return exit_.code if isinstance(exit_.code, int) else 2
    configure_logging(args.log_level or getattr(args, "default_log_level", "warning"), args.log_format)
    try:
        code: int = args.handler(args)
    except (RpcFailure, WaitTimeout, CommandFailed) as failure:
        for line in failure_lines(failure):
            print(line, file=sys.stderr)
        return failure.exit_code if isinstance(failure, CommandFailed) else 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return _INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
