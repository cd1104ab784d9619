"""The node agent's Prometheus metrics, on a registry of its own (several agents per process in tests).

What the issue asks to see: disks attached, bytes served from disks vs passed through, every
blob that failed its digest (by source: a corrupt disk, or a registry that served bad content),
and per-pod provisioning: how long a disk took, how many pods got one, and what failed, by reason
(the registry's ErrorInfo reason, or MATCHER_UNAVAILABLE when the pod was left to pull unasked),
the manifest requests held for a disk on its way (``pending_images``), by outcome, and the
seedings of images' layers into containerd (``snapshot_seeding``): their duration by result, the
layers seeded or found there, and the bytes written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from snapcache.metrics_endpoint import MetricsEndpoint


class _DiskCollector(Collector):
    def __init__(self, disks: Callable[[], int], bad_blobs: Callable[[], int]) -> None:
        self._disks = disks
        self._bad_blobs = bad_blobs

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "snapcache_node_agent_disks_attached",
            "Disks the mirror serves images from",
            value=float(self._disks()),
        )
        yield GaugeMetricFamily(
            "snapcache_node_agent_bad_blobs",
            "Blobs marked corrupt on attached disks (no longer served from there)",
            value=float(self._bad_blobs()),
        )


class NodeAgentMetrics:
    """Counters the mirror's request path bumps."""

    def __init__(self, *, disks: Callable[[], int], bad_blobs: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_DiskCollector(disks, bad_blobs))
        self._requests = Counter(
            "snapcache_node_agent_requests",
            "Mirror answers by what was asked (manifest, blob, base, refused), where the answer came "
            "from (disk, upstream, local) and HTTP status",
            ["kind", "source", "code"],
            registry=self.registry,
        )
        self._bytes = Counter(
            "snapcache_node_agent_served_bytes",
            "Body bytes sent to clients, by source: disk (saved a download) or upstream (passed through)",
            ["source"],
            registry=self.registry,
        )
        self._digest_failures = Counter(
            "snapcache_node_agent_digest_failures",
            "Manifests and blobs whose content did not match their digest (never served as good), by source",
            ["source"],
            registry=self.registry,
        )
        self.provisioning_seconds = Histogram(
            "snapcache_node_agent_provisioning_seconds",
            "Time ProvisionDisk took for a disk this node's pods wanted",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.pods_accelerated = Counter(
            "snapcache_node_agent_pods_accelerated",
            "Pods on this node whose cache's disk was attached for them",
            registry=self.registry,
        )
        self._failures = Counter(
            "snapcache_node_agent_provisioning_failures",
            "Disks a pod wanted that could not be had (the pod pulls), by reason",
            ["reason"],
            registry=self.registry,
        )
        self._pending_waits = Counter(
            "snapcache_node_agent_pending_waits",
            "Manifest requests held while the disk of their pod's cache was on its way, by outcome: "
            "settled (attached, refused or not matched) or timeout (passed through)",
            ["outcome"],
            registry=self.registry,
        )
        self._private_checks = Counter(
            "snapcache_node_agent_private_checks",
            "Requests for a private image on a disk, by whether its registry allowed the client's "
            "credentials (refused ones pass through to the registry)",
            ["result"],
            registry=self.registry,
        )
        self._seeding_seconds = Histogram(
            "snapcache_node_agent_seeding_seconds",
            "Seedings of an image's layers into containerd's snapshotter from a disk, by result: "
            "complete (every layer in place: the pull downloads none) or partial (the pull unpacks the rest)",
            ["result"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
            registry=self.registry,
        )
        self._seeded_layers = Counter(
            "snapcache_node_agent_seeded_layers",
            "Layers of images on disks put into containerd's snapshotter, by how: seeded (written from "
            "the disk's diff) or present (there already)",
            ["how"],
            registry=self.registry,
        )
        self._seeded_bytes = Counter(
            "snapcache_node_agent_seeded_bytes",
            "Bytes of layer diffs written from disks into containerd's snapshotter",
            registry=self.registry,
        )
        self.events_dropped = Counter(
            "snapcache_node_agent_events_dropped",
            "Pod events not written (queue full or the API server refused)",
            registry=self.registry,
        )
        self._bound: dict[tuple[str, str, int], Any] = {}
        self._endpoint = MetricsEndpoint(self.registry)

    def answered(self, kind: str, source: str, code: int, body_bytes: int = 0) -> None:
        """Count one answer and the body bytes it carried."""
        key = (kind, source, code)
        child = self._bound.get(key)
        if child is None:
            child = self._bound.setdefault(key, self._requests.labels(kind, source, str(code)))
        child.inc()
        if body_bytes:
            self._bytes.labels(source).inc(body_bytes)

    def provisioning_failure(self, reason: str) -> None:
        """Count one disk a pod wanted and did not get."""
        self._failures.labels(reason or "UNKNOWN").inc()

    def private_check(self, allowed: bool) -> None:
        """Count one request for a private image on a disk."""
        self._private_checks.labels("allowed" if allowed else "refused").inc()

    def pending_wait(self, settled: bool) -> None:
        """Count one manifest request held for a disk on its way."""
        self._pending_waits.labels("settled" if settled else "timeout").inc()

    def seeding(
        self, *, complete: bool, seconds: float, seeded: int, present: int, seeded_bytes: int
    ) -> None:
        """Count one image's seeding into containerd."""
        self._seeding_seconds.labels("complete" if complete else "partial").observe(seconds)
        self._seeded_layers.labels("seeded").inc(seeded)
        self._seeded_layers.labels("present").inc(present)
        self._seeded_bytes.inc(seeded_bytes)

    def digest_failure(self, source: str) -> None:
        """Count one content that failed its digest."""
        self._digest_failures.labels(source).inc()

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)

    def serve(self, address: str) -> int:
        """Expose /metrics on ``host:port`` (port 0 picks one); return the port."""
        return self._endpoint.serve(address)

    def stop(self) -> None:
        """Stop the metrics endpoint, if any."""
        self._endpoint.stop()
