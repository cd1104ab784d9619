"""``snapcache operator``: keeps ImageCache resources and the cache registry in agreement until a signal.

Kubernetes access from ``--kubeconfig`` or ``--in-cluster`` (or, when neither is given,
``$SNAPCACHE_KUBECONFIG`` / ``$SNAPCACHE_KUBE_IN_CLUSTER`` as ``serve`` reads them); the registry
at the global ``--registry``. It starts even while the registry or the API server is away and
catches up once they answer. TLS and the token to the registry come from the global client
options (``--tls-ca``, ``--client-cert``/``--client-key``, ``--token``/``--client-token-file``);
the operator creates and deletes caches, so its token is a writer's.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.operator.server import OperatorApp, OperatorConfig
from snapcache_cli.client import CommandFailed, client_security
from snapcache_cli.serve import wait_for_signal

log = logging.getLogger(__name__)


def register(subparsers: Any, *, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Add ``operator`` to the top-level subcommands."""
    command = subparsers.add_parser(
        "operator",
        parents=parents,
        help="run the ImageCache operator (CRs -> cache registry -> CR status)",
        description="Create, rebuild and delete registry caches for ImageCache resources and write "
        "their status from the registry's change feed, until SIGTERM or SIGINT.",
    )
    access = command.add_mutually_exclusive_group()
    access.add_argument(
        "--kubeconfig",
        type=Path,
        default=None,
        metavar="PATH",
        help="kubeconfig of the cluster holding the ImageCaches (default $SNAPCACHE_KUBECONFIG)",
    )
    access.add_argument(
        "--in-cluster",
        action="store_true",
        help="use the pod's service account (default $SNAPCACHE_KUBE_IN_CLUSTER)",
    )
    command.add_argument(
        "--metrics-listen",
        default="",
        metavar="HOST:PORT",
        help="serve /metrics, /healthz and /readyz here (default: not served)",
    )
    command.set_defaults(handler=run_operator, default_log_level="info")


def operator_config(args: argparse.Namespace) -> OperatorConfig:
    """The operator's configuration from its options (and the environment's defaults)."""
    kubeconfig: Path | None = args.kubeconfig
    in_cluster: bool = args.in_cluster
    if kubeconfig is None and not in_cluster:
        if os.environ.get("SNAPCACHE_KUBECONFIG"):
            kubeconfig = Path(os.environ["SNAPCACHE_KUBECONFIG"])
        else:
            flag = os.environ.get("SNAPCACHE_KUBE_IN_CLUSTER", "").strip().lower()
            in_cluster = flag in ("1", "true", "yes")
    if kubeconfig is None and not in_cluster:
        raise CommandFailed(
            "the operator needs Kubernetes access: give --kubeconfig PATH or --in-cluster", exit_code=2
        )
    return OperatorConfig(
        registry_target=str(args.registry),
        kubeconfig=kubeconfig.expanduser().resolve() if kubeconfig is not None else None,
        in_cluster=in_cluster,
        metrics_listen=args.metrics_listen,
        registry_security=client_security(args),
    )


def run_operator(args: argparse.Namespace) -> int:
    """Start the operator, say what it follows, run until a signal, stop cleanly."""
    try:
        app = OperatorApp(operator_config(args))
    except ValueError as exc:
        raise CommandFailed(f"invalid configuration: {exc}", exit_code=2) from exc
    try:
        app.start()
    except OSError as exc:  # the metrics port is taken
        app.stop()
        raise CommandFailed(f"cannot start: {exc}") from exc
    metrics = f"; metrics on :{app.metrics_port}" if app.metrics_port else ""
    print(
        f"snapcache operator: ImageCaches at {app.resources.server}, "
        f"cache registry at {app.config.registry_target}{metrics}",
        flush=True,
    )
    try:
        name = wait_for_signal()
        log.info("%s received; shutting down", name)
    finally:
        app.stop()
    log.info("stopped")
    return 0
