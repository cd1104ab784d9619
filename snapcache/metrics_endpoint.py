"""The `/metrics` endpoint every snapcache service exposes: one Prometheus registry over HTTP."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


class MetricsEndpoint:
    """Serves one collector registry at ``/metrics`` on ``host:port`` in a daemon thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
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
