"""Wiring of the node agent: config -> disk catalogue, upstream, metrics -> mirror -> HTTP server.

The only place that builds the agent's objects. A background thread re-reads the disk root every
``rescan_seconds`` (a disk attached or released shows up within that time; an unchanged disk
costs one ``stat``) and, with ``hosts_dir``, keeps containerd's ``hosts.toml`` files pointing at
the mirror for Docker Hub and every registry the attached disks hold images of.

With a matcher (``matcher_target``), the agent also provisions disks for the pods bound to its
node: the pod watch (``kube_pods``) wakes the reconcile loop, which runs one ``PodDisks.round``
(matcher -> ``DiskKeeper`` -> registry, events on the pods) at each change and at least every
``reconcile_seconds`` (the grace period and retries are clocked there). The mirror then serves
only this node's disks (the disk root may be shared, as the local provider's zone directory
is) and holds the manifests of images whose disk is on its way (``pending_images``). A disk
is served once the registry has said which of its cache's images are private; those are served
only to clients their own registry lets pull them (``pull_authority``). With
``seed_containerd`` (containerd's socket) the agent also writes a pod's cached images' layers
into containerd's snapshotter from the disk as soon as it is attached (``snapshot_seeding``),
holding the image's manifest in the mirror meanwhile: the kubelet's pull then downloads and
unpacks no layer. A restarted
agent adopts the disks it finds there under its node's ids before the first round, which waits
for the first full list of pods: nothing is released for want of knowing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.node_agent.containerd_hosts import write_hosts_files
from services.node_agent.containerd_snapshots import ContainerdSnapshots
from services.node_agent.disk_catalogue import DiskCatalogue
from services.node_agent.disk_keeper import DiskKeeper, DiskRefusal
from services.node_agent.hosts_toml import hosts_files
from services.node_agent.http_app import Mirror, MirrorHTTPServer, serve_in_thread
from services.node_agent.kube_pods import NodePods, node_zone
from services.node_agent.matcher_lookup import MatcherLookup
from services.node_agent.metrics import NodeAgentMetrics
from services.node_agent.pending_images import PendingImages
from services.node_agent.pod_disks import PodDisks
from services.node_agent.pull_authority import PullAuthority
from services.node_agent.registry_disks import RegistryDisks
from services.node_agent.snapshot_seeding import SeedResult, SnapshotSeeder
from services.node_agent.upstream import Upstream
from snapcache.images import DEFAULT_REGISTRY
from snapcache.kube_clients import kube_api_client
from snapcache.pod_events import PodEvents
from snapcache.pod_requests import PodRequest, parse_default_mode
from snapcache.tls import PLAINTEXT_CHANNEL, ClientSecurity, open_channel

log = logging.getLogger(__name__)


def split_listen(address: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); raise ``ValueError`` otherwise."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen address must be HOST:PORT, not {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True)
class NodeAgentConfig:
    """Everything the node agent needs to start; validated before anything starts."""

    disk_root: Path  # the directory whose subdirectories are the attached disks (OCI layouts)
    listen: str = "127.0.0.1:50055"
    upstream_plain_http: frozenset[str] = frozenset()  # registries reached over plain HTTP
    default_registry: str = DEFAULT_REGISTRY  # the upstream of requests without ?ns=
    metrics_listen: str = ""  # host:port for /metrics; "" for none
    hosts_dir: Path | None = None  # containerd's config_path: hosts.toml files are kept there
    mirror_url: str = ""  # what hosts.toml points at (default http://<listen address>)
    rescan_seconds: float = 2.0
    upstream_timeout_seconds: float = 30.0
    socket_timeout_seconds: float = 60.0
    # Per-pod provisioning, on when a matcher is given: the pods bound to node_name get disks.
    matcher_target: str = ""  # host:port of the matcher; "" serves whatever is under disk_root
    registry_target: str = ""  # host:port of the cache registry (ProvisionDisk / ReleaseDisk)
    node_name: str = ""
    zone: str = ""  # "" reads the Node's topology.kubernetes.io/zone label at start-up
    kubeconfig: Path | None = None
    in_cluster: bool = False
    default_mode: str = "off"  # pods without a use-image-cache annotation: off | auto
    disk_grace_seconds: float = 300.0  # an unused disk is kept this long before ReleaseDisk
    provision_retry_seconds: float = 30.0  # a refused ProvisionDisk is not asked again before this
    matcher_retry_seconds: float = 10.0  # a pod the matcher could not answer is asked again after this
    reconcile_seconds: float = 2.0  # a round at least this often (and at every pod change)
    matcher_timeout_seconds: float = 5.0
    # a manifest of a pod's image whose disk is on its way waits this long at most, then passes through
    pending_wait_seconds: float = 10.0
    # containerd's socket: seed a pod's cached images' layers into its snapshotter when the disk is attached
    seed_containerd: Path | None = None
    containerd_namespace: str = "k8s.io"  # the CRI plugin's namespace
    containerd_snapshotter: str = "overlayfs"  # the CRI plugin's snapshotter (only overlayfs is seeded)
    seed_lease_seconds: float = 600.0  # seeded snapshots no pull has referenced are collected after this
    client_security: ClientSecurity = PLAINTEXT_CHANNEL  # TLS/token to the matcher and the registry

    @property
    def provisioning(self) -> bool:
        """True when the agent provisions disks for its node's pods."""
        return bool(self.matcher_target)

    def validate(self) -> None:
        """Refuse a bad configuration at start-up rather than at the first request."""
        if self.provisioning:
            if not self.node_name:
                raise ValueError(
                    "provisioning disks for pods needs the node's name (--node-name, $NODE_NAME)"
                )
            if not self.registry_target:
                raise ValueError("provisioning disks for pods needs the cache registry's address")
            if self.kubeconfig is None and not self.in_cluster:
                raise ValueError(
                    "provisioning disks for pods needs Kubernetes access (kubeconfig or in-cluster)"
                )
            parse_default_mode(self.default_mode)
            if self.disk_grace_seconds < 0:
                raise ValueError("disk_grace_seconds must be >= 0")
            positive = (
                self.provision_retry_seconds,
                self.matcher_retry_seconds,
                self.reconcile_seconds,
                self.matcher_timeout_seconds,
            )
            if self.seed_containerd is not None and self.containerd_snapshotter != "overlayfs":
                raise ValueError("only containerd's overlayfs snapshotter can be seeded")
            if self.seed_lease_seconds <= 0:
                raise ValueError("seed_lease_seconds must be > 0")
            if self.pending_wait_seconds < 0:
                raise ValueError("pending_wait_seconds must be >= 0")
            if min(positive) <= 0:
                raise ValueError("provisioning retries, reconcile period and matcher timeout must be > 0")
        split_listen(self.listen)
        if self.metrics_listen:
            split_listen(self.metrics_listen)
        if self.rescan_seconds <= 0:
            raise ValueError("rescan_seconds must be > 0")
        if self.upstream_timeout_seconds <= 0 or self.socket_timeout_seconds <= 0:
            raise ValueError("timeouts must be > 0")
        if self.mirror_url and not self.mirror_url.startswith(("http://", "https://")):
            raise ValueError(f"mirror URL must start with http:// or https://, not {self.mirror_url!r}")


class NodeAgentApp:
    """A built node agent: the mirror's HTTP server, the disk catalogue and its refresher."""

    def __init__(self, config: NodeAgentConfig) -> None:
        config.validate()
        self.config = config
        self.keeper: DiskKeeper | None = None
        self._vetted: frozenset[str] = frozenset()  # held disks whose private images are known
        self.catalogue = DiskCatalogue(
            config.disk_root,
            on_bad=lambda _disk, _digest, _why: self.metrics.digest_failure("disk"),
            accept=(lambda name: name in self._vetted) if config.provisioning else None,
        )
        self.metrics = NodeAgentMetrics(
            disks=lambda: len(self.catalogue.disk_ids), bad_blobs=lambda: self.catalogue.bad_count
        )
        self.upstream = Upstream(
            plain_http_registries=config.upstream_plain_http, timeout_seconds=config.upstream_timeout_seconds
        )
        self.pending = PendingImages()
        # private images on disks: only in provisioning mode does the agent know (from the registry)
        self.authority = PullAuthority(self.upstream.allows) if config.provisioning else None
        self.mirror = Mirror(
            catalogue=self.catalogue,
            upstream=self.upstream,
            metrics=self.metrics,
            default_registry=config.default_registry,
            pending=self.pending if config.provisioning else None,
            pending_wait_seconds=config.pending_wait_seconds,
            authority=self.authority,
        )
        self._server: MirrorHTTPServer | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._refresher: threading.Thread | None = None
        self._provisioner: threading.Thread | None = None
        self.port = 0
        self.metrics_port = 0
        self.zone = config.zone
        self.pods: NodePods | None = None
        self.events: PodEvents | None = None
        self.pod_disks: PodDisks | None = None
        self._matcher: MatcherLookup | None = None
        self._registry_channel: grpc.Channel | None = None
        self._registry_disks: RegistryDisks | None = None
        self._private_by_cache: dict[str, frozenset[str]] = {}
        self.seeder: SnapshotSeeder | None = None
        self._containerd: ContainerdSnapshots | None = None
        if config.provisioning:
            self._kube = kube_api_client(
                kubeconfig=config.kubeconfig, in_cluster=config.in_cluster, retries=3
            )

    def _build_provisioning(self) -> None:
        config = self.config
        if not self.zone:
            self.zone = node_zone(self._kube, config.node_name) or ""
            if not self.zone:
                raise ValueError(f"node {config.node_name} has no zone label; give the zone (--zone)")
        self._registry_channel = open_channel(config.registry_target, config.client_security)
        self._registry_disks = RegistryDisks(self._registry_channel, holder=config.node_name)
        self.keeper = DiskKeeper(
            registry=self._registry_disks,
            node=config.node_name,
            zone=self.zone,
            grace_seconds=config.disk_grace_seconds,
            retry_seconds=config.provision_retry_seconds,
            on_provisioned=lambda _cache, seconds: self.metrics.provisioning_seconds.observe(seconds),
            on_refused=lambda _cache, refusal: self.metrics.provisioning_failure(
                refusal.reason or refusal.code
            ),
        )
        try:
            names = sorted(p.name for p in config.disk_root.iterdir())
        except OSError:
            names = []
        adopted = self.keeper.recover(names)
        self._update_private()
        if adopted:
            log.info(
                "adopted %d disk(s) of this node found under %s: %s", len(adopted), config.disk_root, adopted
            )
        self._matcher = MatcherLookup(
            config.matcher_target,
            security=config.client_security,
            timeout_seconds=config.matcher_timeout_seconds,
        )
        self.events = PodEvents(
            self._kube,
            component="snapcache-node-agent",
            thread_name="node-agent-pod-events",
            on_dropped=self.metrics.events_dropped.inc,
        )
        if config.seed_containerd is not None:
            self._containerd = ContainerdSnapshots(
                config.seed_containerd,
                namespace=config.containerd_namespace,
                snapshotter=config.containerd_snapshotter,
            )
            self.seeder = SnapshotSeeder(
                runtime=self._containerd,
                disks=self.catalogue,
                lease_seconds=config.seed_lease_seconds,
                on_pending=lambda names: self.pending.publish(names, source="runtime"),
                on_done=self._seeded,
            )
        self.pod_disks = PodDisks(
            keeper=self.keeper,
            matcher=self._matcher,
            events=self.events,
            default_mode=parse_default_mode(config.default_mode),
            retry_seconds=config.matcher_retry_seconds,
            on_accelerated=self.metrics.pods_accelerated.inc,
            on_failure=self.metrics.provisioning_failure,
            on_disks_changed=self._disks_changed,
            on_pending=self.pending.publish,
            on_ready=self._seed,
        )
        self.pods = NodePods(self._kube, node=config.node_name, on_change=self._wake.set)

    @property
    def mirror_url(self) -> str:
        """The URL containerd reaches the mirror at."""
        if self.config.mirror_url:
            return self.config.mirror_url.rstrip("/")
        host, _ = split_listen(self.config.listen)
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def start(self) -> NodeAgentApp:
        """Read the disks, bind the mirror (and metrics), start serving, refreshing and provisioning."""
        if self.config.provisioning:
            self._build_provisioning()
        self.catalogue.refresh()
        self._server = MirrorHTTPServer(
            split_listen(self.config.listen), self.mirror, socket_timeout=self.config.socket_timeout_seconds
        )
        self.port = int(self._server.server_address[1])
        if self.config.metrics_listen:
            self.metrics_port = self.metrics.serve(self.config.metrics_listen)
        self.write_hosts()
        serve_in_thread(self._server)
        self._refresher = threading.Thread(target=self._refresh_loop, name="node-agent-disks", daemon=True)
        self._refresher.start()
        if self.pods is not None and self.events is not None:
            self.events.start()
            self.pods.start()
            self._provisioner = threading.Thread(
                target=self._provision_loop, name="node-agent-provisioning", daemon=True
            )
            self._provisioner.start()
        return self

    def _seed(self, request: PodRequest) -> None:
        """Seed the runtime with the pod's images that its disk holds (the others are pulled as usual)."""
        if self.seeder is not None:
            self.seeder.submit(request.images)

    def _seeded(self, result: SeedResult) -> None:
        self.metrics.seeding(
            complete=result.complete,
            seconds=result.seconds,
            seeded=result.seeded,
            present=result.present,
            seeded_bytes=result.bytes,
        )

    def _disks_changed(self) -> None:
        # before the pods are told: a pod told its disk is ready finds it served, and its private
        # images served only to clients their registry allows
        self._update_private()
        if self.catalogue.refresh():
            self.write_hosts()

    def _update_private(self) -> None:
        """Learn from the registry which images of each held cache are private; vet its disk.

        A disk is served only once this is known (``_vetted``): until then its pods pull as they
        would without it, and the registry is asked again at the next round.
        """
        if self.authority is None or self.keeper is None or self._registry_disks is None:
            return
        held = self.keeper.cache_ids
        self._private_by_cache = {c: n for c, n in self._private_by_cache.items() if c in held}
        for cache_id in held - self._private_by_cache.keys():
            try:
                self._private_by_cache[cache_id] = self._registry_disks.private_repositories(cache_id)
            except DiskRefusal as refusal:
                log.warning(
                    "cannot tell which images of %s are private (%s): its disk waits", cache_id, refusal
                )
        self.authority.set_private(frozenset().union(*self._private_by_cache.values()))
        disks = (self.keeper.disk_of(cache_id) for cache_id in self._private_by_cache)
        self._vetted = frozenset(disk for disk in disks if disk is not None)

    def _provision_loop(self) -> None:
        assert self.pods is not None and self.pod_disks is not None
        while not self._stop.is_set():
            self._wake.wait(self.config.reconcile_seconds)
            self._wake.clear()
            if self._stop.is_set():
                return
            if not self.pods.synced():
                continue
            try:
                self.pod_disks.round(self.pods.pods())
                if self.keeper is not None and self.keeper.cache_ids - self._private_by_cache.keys():
                    self._disks_changed()  # a cache whose private images are not known yet
            except Exception:  # the next round starts over from the pods and the disks held
                log.exception("provisioning round failed")

    def write_hosts(self) -> None:
        """Point containerd at the mirror for Docker Hub and every registry on a disk."""
        if self.config.hosts_dir is None:
            return
        files = hosts_files(
            self.catalogue.registries | self.config.upstream_plain_http,
            mirror_url=self.mirror_url,
            plain_http=self.config.upstream_plain_http,
        )
        written = write_hosts_files(self.config.hosts_dir, files)
        if written:
            log.info("containerd hosts.toml written for %s", ", ".join(written))

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.config.rescan_seconds):
            try:
                if self.catalogue.refresh():
                    self.write_hosts()
            except Exception:  # keep serving what is known; try again next round
                log.exception("reading the disks failed")

    def stop(self) -> None:
        """Stop serving, refreshing and provisioning (disks stay: a restart adopts them)."""
        self._stop.set()
        self._wake.set()
        self.pending.clear()  # no request waits for a round that will not come
        if self.pods is not None:
            self.pods.stop()
        if self._provisioner is not None:
            self._provisioner.join(timeout=15)
        if self.events is not None:
            self.events.stop()
        if self.seeder is not None:
            self.seeder.close()
        if self._containerd is not None:
            self._containerd.close()
        if self._matcher is not None:
            self._matcher.close()
        if self._registry_channel is not None:
            self._registry_channel.close()
        if self.config.provisioning:
            self._kube.close()  # type: ignore[no-untyped-call]
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._refresher is not None:
            self._refresher.join(timeout=5)
        self.metrics.stop()
        self.upstream.close()
