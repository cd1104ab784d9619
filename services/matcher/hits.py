"""Match hits go back to the registry in batches, off the request path.

A match only bumps a counter in memory; a background thread sends the sums (`ReportMatches`:
count and latest time per cache) every few seconds. A failed send keeps the sums for the next
one, so a registry restart loses no hits; a cache deleted meanwhile is dropped by the registry
(`unknown`). Memory is bounded by the number of caches with hits since the last send.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf import timestamp_pb2

from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # caches per ReportMatches call


@dataclass
class _Pending:
    count: int
    last_ns: int


class HitReporter:
    """Counts hits per cache and flushes them to the registry."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        flush_seconds: float = 2.0,
        rpc_timeout_seconds: float = 5.0,
        on_flush: Callable[[int, int], None] | None = None,
    ) -> None:
        self._stub = api_grpc.CacheRegistryServiceStub(channel)
        self._flush_seconds = flush_seconds
        self._timeout = rpc_timeout_seconds
        self._on_flush = on_flush  # (hits sent, hits kept for later)
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, name: str, at_ns: int) -> None:
        """One pod matched to ``name`` at ``at_ns`` (wall clock nanoseconds)."""
        with self._lock:
            pending = self._pending.get(name)
            if pending is None:
                self._pending[name] = _Pending(1, at_ns)
            else:
                pending.count += 1
                pending.last_ns = max(pending.last_ns, at_ns)

    def pending(self) -> int:
        """Hits recorded and not yet accepted by the registry."""
        with self._lock:
            return sum(p.count for p in self._pending.values())

    def start(self) -> None:
        """Flush every ``flush_seconds`` in a background thread."""
        self._thread = threading.Thread(target=self._run, name="matcher-hits", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after one last flush."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self._timeout + 5)
        self.flush()

    def _run(self) -> None:
        while not self._stopping.wait(self._flush_seconds):
            self.flush()

    def flush(self) -> bool:
        """Send what is pending now; True if nothing is left over."""
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return True
        names = list(batch)
        for start in range(0, len(names), MAX_BATCH):
            chunk = names[start : start + MAX_BATCH]
            try:
                self._stub.ReportMatches(
                    api.ReportMatchesRequest(matches=[_report(name, batch[name]) for name in chunk]),
                    timeout=self._timeout,
                )
            except grpc.RpcError as exc:
                code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
                log.info(
                    "reporting %d cache hits failed (%s); keeping them for the next flush", len(names), code
                )
                self._keep({name: batch[name] for name in names[start:]})
                self._notify(
                    sum(batch[n].count for n in names[:start]), sum(batch[n].count for n in names[start:])
                )
                return False
        self._notify(sum(p.count for p in batch.values()), 0)
        return True

    def _keep(self, unsent: dict[str, _Pending]) -> None:
        with self._lock:
            for name, old in unsent.items():
                pending = self._pending.get(name)
                if pending is None:
                    self._pending[name] = old
                else:
                    pending.count += old.count
                    pending.last_ns = max(pending.last_ns, old.last_ns)

    def _notify(self, sent: int, kept: int) -> None:
        if self._on_flush is not None:
            self._on_flush(sent, kept)


def _report(name: str, pending: _Pending) -> api.MatchReport:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(pending.last_ns)
    return api.MatchReport(name=name, count=pending.count, last_matched_time=stamp)
