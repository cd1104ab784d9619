"""``snapcache node-agent``: serve this node's attached disks to containerd as a read-only registry mirror.

One per node. It answers containerd's pulls (through ``hosts.toml``, which it can keep up to date
with ``--containerd-hosts-dir``) from the OCI layouts of the disks under ``--disk-root``, checking
every blob's digest as it is served, and passes everything else through to the real registries.

With ``--matcher`` it also provisions those disks: for each pod bound to ``--node-name`` that
opts in, the matcher names a cache usable in the node's ``--zone`` and the registry (the global
``--registry``, with the global TLS and token options, as for the matcher) makes one disk of it
per node, released ``--disk-grace-seconds`` after its last pod is gone. Kubernetes access from
``--kubeconfig`` or ``--in-cluster`` (or ``$SNAPCACHE_KUBECONFIG`` / ``$SNAPCACHE_KUBE_IN_CLUSTER``).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.node_agent.server import NodeAgentApp, NodeAgentConfig
from snapcache.images import DEFAULT_REGISTRY
from snapcache.kube_clients import IN_CLUSTER_TOKEN_FILE
from snapcache_cli.client import CommandFailed, client_security
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
    pods = command.add_argument_group(
        "per-pod provisioning", "with --matcher: disks for the opted-in pods bound to this node"
    )
    pods.add_argument(
        "--matcher",
        default="",
        metavar="ADDRESS",
        help="matcher gRPC address; turns provisioning on (default: off, the disk root is served as is)",
    )
    pods.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME", ""),
        metavar="NAME",
        help="this node's name (default $NODE_NAME: the downward API's spec.nodeName)",
    )
    pods.add_argument(
        "--zone",
        default=os.environ.get("NODE_ZONE", ""),
        metavar="ZONE",
        help="the zone disks are provisioned in (default $NODE_ZONE, else the Node's "
        "topology.kubernetes.io/zone label)",
    )
    access = pods.add_mutually_exclusive_group()
    access.add_argument(
        "--kubeconfig",
        type=Path,
        default=None,
        metavar="PATH",
        help="kubeconfig of the node's cluster (default $SNAPCACHE_KUBECONFIG)",
    )
    access.add_argument(
        "--in-cluster",
        action="store_true",
        help="use the pod's service account (default $SNAPCACHE_KUBE_IN_CLUSTER, or when one is mounted)",
    )
    pods.add_argument(
        "--disk-grace-seconds",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="keep a disk this long after its last pod is gone before releasing it (default 300)",
    )
    pods.add_argument(
        "--pending-wait-seconds",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="hold a manifest request of a pod's image while its disk is provisioned, at most this "
        "long, then pass it through (default 10; 0: never hold)",
    )
    pods.add_argument(
        "--seed-containerd",
        type=Path,
        default=None,
        metavar="SOCKET",
        help="containerd's socket: as soon as a pod's disk is attached, write its cached images' layers "
        "into containerd's overlayfs snapshotter from the disk, so the kubelet's pull downloads and "
        "unpacks none of them (the agent needs containerd's root, /var/lib/containerd, at the same "
        "path; default: off, containerd unpacks the layers it pulls through the mirror)",
    )
    pods.add_argument(
        "--containerd-namespace",
        default="k8s.io",
        help="the containerd namespace of the kubelet's images (default %(default)s, the CRI plugin's)",
    )
    pods.add_argument(
        "--seed-lease-seconds",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="seeded layers that no pull has used by then are left to containerd's garbage collector "
        "(default 600)",
    )
    pods.add_argument(
        "--image-cache-default",
        choices=("off", "auto"),
        default="off",
        help="image caches for pods without a use-image-cache annotation (default %(default)s; "
        "give the extender the same)",
    )
    command.set_defaults(handler=run_node_agent, default_log_level="info")


def _kube_access(args: argparse.Namespace) -> tuple[Path | None, bool]:
    kubeconfig: Path | None = args.kubeconfig
    in_cluster: bool = args.in_cluster
    if kubeconfig is None and not in_cluster:
        if os.environ.get("SNAPCACHE_KUBECONFIG"):
            kubeconfig = Path(os.environ["SNAPCACHE_KUBECONFIG"])
        else:
            flag = os.environ.get("SNAPCACHE_KUBE_IN_CLUSTER", "").strip().lower()
            in_cluster = flag in ("1", "true", "yes") or Path(IN_CLUSTER_TOKEN_FILE).is_file()
    return (kubeconfig.expanduser().resolve() if kubeconfig is not None else None), in_cluster


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
        **(_provisioning_options(args) if args.matcher else {}),
    )


def _provisioning_options(args: argparse.Namespace) -> dict[str, Any]:
    kubeconfig, in_cluster = _kube_access(args)
    return {
        "matcher_target": args.matcher,
        "registry_target": str(args.registry),
        "node_name": args.node_name,
        "zone": args.zone,
        "kubeconfig": kubeconfig,
        "in_cluster": in_cluster,
        "default_mode": args.image_cache_default,
        "disk_grace_seconds": args.disk_grace_seconds,
        "pending_wait_seconds": args.pending_wait_seconds,
        "seed_containerd": args.seed_containerd,
        "containerd_namespace": args.containerd_namespace,
        "seed_lease_seconds": args.seed_lease_seconds,
        "client_security": client_security(args),
    }


def run_node_agent(args: argparse.Namespace) -> int:
    """Start the agent, say where it serves, run until a signal, stop cleanly."""
    try:
        app = NodeAgentApp(node_agent_config(args))
    except ValueError as exc:
        raise CommandFailed(f"invalid configuration: {exc}", exit_code=2) from exc
    try:
        app.start()
    except (OSError, ValueError) as exc:  # a port is taken; the node has no zone
        app.stop()
        raise CommandFailed(f"cannot start: {exc}") from exc
    metrics = f"; metrics on :{app.metrics_port}" if app.metrics_port else ""
    pods = (
        f"; disks for the pods of node {app.config.node_name} in zone {app.zone} "
        f"(matcher {app.config.matcher_target}, registry {app.config.registry_target})"
        if app.config.provisioning
        else ""
    )
    print(
        f"snapcache node-agent: mirror on {app.mirror_url}, {len(app.catalogue.disk_ids)} disk(s) "
        f"under {app.config.disk_root}{metrics}{pods}",
        flush=True,
    )
    try:
        name = wait_for_signal()
        log.info("%s received; shutting down", name)
    finally:
        app.stop()
    log.info("stopped")
    return 0
