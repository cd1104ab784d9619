"""The operator's Prometheus metrics and health endpoints, on one optional HTTP address.

`/metrics` (a registry of its own, so several operators in one process do not collide),
`/healthz` (200 while the operator runs) and `/readyz` (200 once both the ImageCaches and the
registry's caches have been loaded, 503 before).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.operator.cache_feed import FeedStatus


class _Gauges(Collector):
    """Gauges read at scrape time from the running operator."""

    def __init__(self, feed: Callable[[], FeedStatus], sizes: Callable[[], dict[str, int]]) -> None:
        self._feed = feed
        self._sizes = sizes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self._feed()
        values: list[tuple[str, str, float]] = [
            (
                "registry_feed_live",
                "1 while the registry's change feed is connected and live",
                float(status.live),
            ),
            (
                "registry_feed_staleness_seconds",
                "Seconds since the registry was last heard from (0 while live)",
                status.staleness_seconds,
            ),
            ("registry_feed_revision", "Change-feed revision reached", float(status.revision)),
            ("registry_feed_reloads", "Full reloads of the registry's caches", float(status.reloads)),
        ]
        sizes = self._sizes()
        values += [
            ("imagecaches", "ImageCache resources known", float(sizes.get("imagecaches", 0))),
            ("caches", "Registry caches made for ImageCaches", float(sizes.get("caches", 0))),
            ("queue_depth", "ImageCaches waiting to be reconciled", float(sizes.get("queue", 0))),
        ]
        for name, help_text, value in values:
            yield GaugeMetricFamily(f"snapcache_operator_{name}", help_text, value=value)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds are not worth a log line."""


class OperatorMetrics:
    """Counters the operator bumps, gauges read on scrape, and the HTTP endpoint."""

    def __init__(
        self,
        *,
        feed: Callable[[], FeedStatus],
        sizes: Callable[[], dict[str, int]],
        ready: Callable[[], bool],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Gauges(feed, sizes))
        reconciles = Counter(
            "snapcache_operator_reconciles",
            "Reconciles of ImageCaches by result (done, again, retry, error)",
            ["result"],
            registry=self.registry,
        )
        self._reconciles = {r: reconciles.labels(r) for r in ("done", "again", "retry", "error")}
        self._ready = ready
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def reconciled(self, result: str) -> None:
        """Count one reconcile."""
        self._reconciles[result].inc()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            if self._ready():
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok\n"]
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"loading ImageCaches or the registry's caches\n"]
        metrics: Iterable[bytes] = make_wsgi_app(self.registry)(environ, start_response)
        return metrics

    def serve(self, address: str) -> int:
        """Serve /metrics, /healthz and /readyz on ``host:port`` (port 0 picks one); return the port."""
        host, _, port = address.rpartition(":")
        server = make_server(host or "0.0.0.0", int(port), self._app, _Server, handler_class=_QuietHandler)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="operator-metrics", daemon=True)
        self._thread.start()
        return int(server.server_port)

    def stop(self) -> None:
        """Stop the HTTP endpoint, if any."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
