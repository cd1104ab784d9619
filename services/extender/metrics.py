"""The extender's Prometheus metrics, on a registry of its own (several extenders per process in tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from snapcache.rpc_observer import RequestMetrics


class _NodeCacheCollector(Collector):
    def __init__(self, synced: Callable[[], bool], size: Callable[[], int]) -> None:
        self._synced = synced
        self._size = size

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "snapcache_extender_node_cache_synced",
            "1 once the node cache has listed the nodes (0 without Kubernetes access: NodeNames "
            "requests then see nodes without zones)",
            value=float(self._synced()),
        )
        yield GaugeMetricFamily(
            "snapcache_extender_node_cache_nodes", "Nodes in the node cache", value=float(self._size())
        )


class ExtenderMetrics:
    """Counters the request path bumps."""

    def __init__(self, *, node_cache_synced: Callable[[], bool], node_cache_size: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_NodeCacheCollector(node_cache_synced, node_cache_size))
        self._requests = RequestMetrics(
            self.registry,
            requests="snapcache_extender_requests",
            requests_help="Requests by verb and HTTP status",
            latency="snapcache_extender_request_duration_seconds",
            latency_help="Seconds taken to answer a scheduler call (the matcher's included), by verb",
            label="verb",
        )
        self._codes = {code: str(code) for code in (200, 400, 404, 411, 413, 503)}
        fail_open = Counter(
            "snapcache_extender_fail_open",
            "Matcher calls that failed (down, slow, error), answered as if no cache: by gRPC code",
            ["code"],
            registry=self.registry,
        )
        self._fail_open = fail_open
        self.events_dropped = Counter(
            "snapcache_extender_events_dropped",
            "Pod events dropped (queue full or API error)",
            registry=self.registry,
        )
        self.events_sent = Counter(
            "snapcache_extender_events_sent", "Pod events written", registry=self.registry
        )

    def request(self, verb: str, code: int, seconds: float | None = None) -> None:
        """Count one HTTP answer (and time it)."""
        self._requests.finished(verb, self._codes.get(code) or str(code), seconds)

    def fail_open(self, code: str) -> None:
        """Count one matcher call that failed open."""
        self._fail_open.labels(code).inc()

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
