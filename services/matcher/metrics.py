"""The matcher's Prometheus metrics: index freshness read at scrape time, answers counted.

A registry of its own (not the process-wide default), so several matchers in one process (tests,
`snapcache serve`) do not collide, and an HTTP endpoint only when one is configured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.matcher.index_sync import SyncStatus
from services.matcher.matching import Action, Decision
from snapcache.metrics_endpoint import MetricsEndpoint
from snapcache.rpc_observer import RpcMetrics


class _IndexCollector(Collector):
    """Gauges of the index, from one consistent status read per scrape."""

    def __init__(self, status: Callable[[], SyncStatus], hits_pending: Callable[[], int]) -> None:
        self._status = status
        self._hits_pending = hits_pending

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self._status()
        values = [
            (
                "index_staleness_seconds",
                "Seconds since the registry was last heard from (0 while live)",
                status.staleness_seconds,
            ),
            (
                "index_feed_live",
                "1 while the registry's change feed is connected and live",
                float(status.live),
            ),
            ("index_loaded", "1 once the index was loaded from the registry", float(status.loaded)),
            ("index_caches", "Caches in the index, every state", float(status.cache_count)),
            ("index_ready_caches", "READY caches in the index", float(status.ready_count)),
            ("index_revision", "Registry change-feed revision the index has reached", float(status.revision)),
            ("index_full_syncs", "Full loads of the index (start-up and resyncs)", float(status.full_syncs)),
            ("hits_pending", "Matches not yet reported to the registry", float(self._hits_pending())),
        ]
        for name, documentation, value in values:
            yield GaugeMetricFamily(f"snapcache_matcher_{name}", documentation, value=value)


class MatcherMetrics:
    """Counters the request path bumps, and gauges read from the index."""

    def __init__(self, status: Callable[[], SyncStatus], hits_pending: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_IndexCollector(status, hits_pending))
        answers = Counter(
            "snapcache_matcher_answers",
            "Match answers by decision (why) and action (what the pod does)",
            ["decision", "action"],
            registry=self.registry,
        )
        # Children bound once: the request path only bumps one (no label lookup). Latency is
        # the RPC layer's histogram (`rpc`): one per call, not a second one here.
        self._answers = {
            (decision, action): answers.labels(decision.name, action.name)
            for decision in Decision
            for action in Action
        }
        self.hits = Counter(
            "snapcache_matcher_hits",
            "Matches that chose a cache for a pod (validate_only previews excluded); "
            "hit ratio: rate of this over rate of snapcache_matcher_answers_total",
            registry=self.registry,
        )
        self.saved_bytes = Counter(
            "snapcache_matcher_saved_bytes",
            "Compressed bytes of the pods' images held by the caches chosen for them: what those "
            "pods need not pull once they mount the disk (validate_only previews excluded)",
            registry=self.registry,
        )
        self.rpc = RpcMetrics(self.registry, "snapcache_matcher")
        self.hits_reported = Counter(
            "snapcache_matcher_hits_reported", "Match hits accepted by the registry", registry=self.registry
        )
        self._endpoint = MetricsEndpoint(self.registry)

    def answered(self, decision: Decision, action: Action, *, hit_bytes: int | None) -> None:
        """Count one answer (and a hit with the bytes it saves, when it chose a cache for a pod)."""
        self._answers[decision, action].inc()
        if hit_bytes is not None:
            self.hits.inc()
            self.saved_bytes.inc(hit_bytes)

    def serve(self, address: str) -> int:
        """Expose /metrics on ``host:port`` (port 0 picks one); return the port."""
        return self._endpoint.serve(address)

    def stop(self) -> None:
        """Stop the metrics endpoint, if any."""
        self._endpoint.stop()
