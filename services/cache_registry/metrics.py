"""The registry's Prometheus metrics: builds counted as the worker finishes them, the rest read at scrape.

A registry of its own (several registries per process in tests and `snapcache serve`). Per-zone
availability and live disks are read from the database when scraped (one scan of four JSON
fields per cache, as reconcile does, and one of the disks), so every replica reports the same
truth and nothing on the request path keeps them up to date.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.cache_registry import store
from services.cache_registry.database import Database
from services.cache_registry.model import CacheState, ZoneState
from snapcache.rpc_observer import RpcMetrics

log = logging.getLogger(__name__)

_DATABASE_UP = "snapcache_registry_database_up"
_DATABASE_UP_HELP = "1 when the last scrape could read the database (0: the gauges below are missing)"
BUILD_RESULTS = ("succeeded", "retrying", "failed")
# Builds take seconds (a small image from a local registry) to tens of minutes (gigabytes).
BUILD_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)


class _DatabaseCollector(Collector):
    """Caches by state, snapshot copies by zone and state, live disks by zone: one read per scrape."""

    def __init__(self, database: Database, zones: tuple[str, ...]) -> None:
        self._db = database
        self._zones = zones

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            with self._db.transaction(write=False) as session:
                refs = store.provider_refs(session)
                disks = store.list_disks(session)
        except Exception:  # a scrape must not fail because the database is away: say so instead
            log.warning("metrics: cannot read the database", exc_info=True)
            yield GaugeMetricFamily(_DATABASE_UP, _DATABASE_UP_HELP, value=0.0)
            return
        yield GaugeMetricFamily(_DATABASE_UP, _DATABASE_UP_HELP, value=1.0)
        states = Tally(ref.state for ref in refs)
        by_state = GaugeMetricFamily("snapcache_registry_caches", "Caches by state", labels=["state"])
        for state in CacheState:
            by_state.add_metric([state.name], float(states[state]))
        yield by_state
        copies = Tally(
            (zone, zone_state)
            for ref in refs
            if ref.state is CacheState.READY
            for zone, zone_state in ref.zones
        )
        zones = sorted({*self._zones, *(zone for zone, _ in copies)})
        availability = GaugeMetricFamily(
            "snapcache_registry_zone_caches",
            "READY caches by zone and the state of their snapshot's copy there (AVAILABLE: a disk "
            "can be made now)",
            labels=["zone", "state"],
        )
        for zone in zones:
            for zone_state in ZoneState:
                availability.add_metric([zone, zone_state.name], float(copies[zone, zone_state]))
        yield availability
        live = Tally(disk.zone for disk in disks)
        disk_family = GaugeMetricFamily(
            "snapcache_registry_disks", "Live disks made from cache snapshots, by zone", labels=["zone"]
        )
        for zone in sorted({*self._zones, *live}):
            disk_family.add_metric([zone], float(live[zone]))
        yield disk_family


class RegistryMetrics:
    """Build counters the worker bumps, request metrics the gRPC layer bumps, gauges read at scrape."""

    def __init__(self, *, database: Database, zones: tuple[str, ...]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_DatabaseCollector(database, zones))
        builds = Counter(
            "snapcache_registry_builds",
            "Build attempts finished, by result (succeeded, retrying: failed and scheduled again, "
            "failed: the cache is FAILED)",
            ["result"],
            registry=self.registry,
        )
        durations = Histogram(
            "snapcache_registry_build_duration_seconds",
            "Seconds a build attempt took, from the builder disk to READY (or the failure), by result",
            ["result"],
            registry=self.registry,
            buckets=BUILD_BUCKETS,
        )
        self._builds = {result: builds.labels(result) for result in BUILD_RESULTS}
        self._durations = {result: durations.labels(result) for result in BUILD_RESULTS}
        self.bytes_pulled = Counter(
            "snapcache_registry_pulled_bytes",
            "Compressed bytes of the images successful builds pulled",
            registry=self.registry,
        )
        self.rpc = RpcMetrics(self.registry, "snapcache_registry")

    def build_finished(self, result: str, seconds: float, bytes_pulled: int) -> None:
        """Count one finished build attempt (the worker's `BuildObserver`)."""
        self._builds[result].inc()
        self._durations[result].observe(seconds)
        if bytes_pulled:
            self.bytes_pulled.inc(bytes_pulled)
