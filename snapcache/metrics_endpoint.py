"""The `/metrics` endpoint every snapcache service exposes: Prometheus registries over HTTP.

Each component keeps a registry of its own (several of one kind run in a test process); a
process running several (`snapcache serve`) serves them all on one endpoint, one scrape target
per pod as Prometheus expects. Their metric names never collide: each has its component's prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Metric, start_http_server
from prometheus_client.registry import Collector


class _Union(Collector):
    """The metrics of several registries, as one collector."""

    def __init__(self, registries: tuple[CollectorRegistry, ...]) -> None:
        self._registries = registries

    def collect(self) -> Iterator[Metric]:
        for registry in self._registries:
            yield from registry.collect()


def merged(*registries: CollectorRegistry) -> CollectorRegistry:
    """One registry exposing every metric of ``registries`` (read at each scrape)."""
    if len(registries) == 1:
        return registries[0]
    union = CollectorRegistry(auto_describe=False)
    union.register(_Union(registries))
    return union


class MetricsEndpoint:
    """Serves collector registries at ``/metrics`` on ``host:port`` in a daemon thread."""

    def __init__(self, *registries: CollectorRegistry) -> None:
        self._registry = merged(*registries)
        self._server: WSGIServer | None = None

    def serve(self, address: str) -> int:
        """Start serving on ``host:port`` (port 0 picks one); return the port."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "0.0.0.0", registry=self._registry)
        self._server = server
        return int(server.server_port)

    def stop(self) -> None:
        """Stop serving, if it was."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
