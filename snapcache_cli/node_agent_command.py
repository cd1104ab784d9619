"""``snapcache node-agent``: serve this node's attached disks to containerd as a read-only registry mirror.

One per node. It answers containerd's pulls (through ``hosts.toml``, which it can keep up to date
with ``--containerd-hosts-dir``) from the OCI layouts of the disks under ``--disk-root``, checking
every blob's digest as it is served, and passes everything else through to the real registries.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.node_agent.server import NodeAgentApp, NodeAgentConfig
from snapcache.images import DEFAULT_REGISTRY
from snapcache_cli.client import CommandFailed
from snapcache_cli.serve import wait_for_signal

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:50055"


def register(subparsers: Any, *, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Add ``node-agent`` to the top-level subcommands."""
    command = subparsers.add_parser(
        "node-agent",
        parents=parents,
        help="serve the node's attached cache disks to containerd as a registry mirror",
        description="A read-only OCI registry mirror for containerd (hosts.toml): manifests and blobs "
        "from the disks under --disk-root, digests checked as they are served; everything else "
        "passed through to the image's registry. Runs until SIGTERM or SIGINT.",
    )
    command.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"mirror address (default {DEFAULT_LISTEN})",
    )
    command.add_argument(
        "--disk-root",
        type=Path,
        required=True,
        metavar="PATH",
        help="directory whose subdirectories are the attached disks (OCI image layouts)",
    )
    command.add_argument(
        "--upstream-plain-http",
        action="append",
        default=[],
        metavar="HOST",
        help="a registry reached over plain HTTP (repeatable)",
    )
    command.add_argument(
        "--default-registry",
        default=DEFAULT_REGISTRY,
        metavar="HOST",
        help=f"upstream of requests without ?ns= (default {DEFAULT_REGISTRY})",
    )
    command.add_argument(
        "--containerd-hosts-dir",
        type=Path,
        default=None,
        metavar="PATH",
        help="containerd's registry config_path: keep <registry>/hosts.toml there pointing at the mirror",
    )
    command.add_argument(
        "--mirror-url",
        default="",
        metavar="URL",
        help="the mirror's URL in hosts.toml (default http://<listen address>)",
    )
    command.add_argument(
        "--metrics-listen", default="", metavar="HOST:PORT", help="serve /metrics here (default: not served)"
    )
    command.add_argument(
        "--rescan-seconds",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often the disk root is read for attached and released disks (default 2)",
    )
    command.set_defaults(handler=run_node_agent, default_log_level="info")


def node_agent_config(args: argparse.Namespace) -> NodeAgentConfig:
    """The agent's configuration from its options."""
    return NodeAgentConfig(
        disk_root=Path(args.disk_root).expanduser().resolve(),
        listen=args.listen,
        upstream_plain_http=frozenset(args.upstream_plain_http),
        default_registry=args.default_registry,
        metrics_listen=args.metrics_listen,
        hosts_dir=(
            Path(args.containerd_hosts_dir).expanduser().resolve() if args.containerd_hosts_dir else None
        ),
        mirror_url=args.mirror_url,
        rescan_seconds=args.rescan_seconds,
    )


def run_node_agent(args: argparse.Namespace) -> int:
    """Start the agent, say where it serves, run until a signal, stop cleanly."""
    try:
        app = NodeAgentApp(node_agent_config(args))
    except ValueError as exc:
        raise CommandFailed(f"invalid configuration: {exc}", exit_code=2) from exc
    try:
        app.start()
    except OSError as exc:  # a port is taken
        app.stop()
        raise CommandFailed(f"cannot start: {exc}") from exc
    metrics = f"; metrics on :{app.metrics_port}" if app.metrics_port else ""
    print(
        f"snapcache node-agent: mirror on {app.mirror_url}, {len(app.catalogue.disk_ids)} disk(s) "
        f"under {app.config.disk_root}{metrics}",
        flush=True,
    )
    try:
        name = wait_for_signal()
        log.info("%s received; shutting down", name)
    finally:
        app.stop()
    log.info("stopped")
    return 0
