"""Wiring of the node agent: config -> disk catalogue, upstream, metrics -> mirror -> HTTP server.

The only place that builds the agent's objects. A background thread re-reads the disk root every
``rescan_seconds`` (a disk attached or released shows up within that time; an unchanged disk
costs one ``stat``) and, with ``hosts_dir``, keeps containerd's ``hosts.toml`` files pointing at
the mirror for Docker Hub and every registry the attached disks hold images of.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from services.node_agent.containerd_hosts import write_hosts_files
from services.node_agent.disk_catalogue import DiskCatalogue
from services.node_agent.hosts_toml import hosts_files
from services.node_agent.http_app import Mirror, MirrorHTTPServer, serve_in_thread
from services.node_agent.metrics import NodeAgentMetrics
from services.node_agent.upstream import Upstream
from snapcache.images import DEFAULT_REGISTRY

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

    def validate(self) -> None:
        """Refuse a bad configuration at start-up rather than at the first request."""
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
        self.catalogue = DiskCatalogue(
            config.disk_root, on_bad=lambda _disk, _digest, _why: self.metrics.digest_failure("disk")
        )
        self.metrics = NodeAgentMetrics(
            disks=lambda: len(self.catalogue.disk_ids), bad_blobs=lambda: self.catalogue.bad_count
        )
        self.upstream = Upstream(
            plain_http_registries=config.upstream_plain_http, timeout_seconds=config.upstream_timeout_seconds
        )
        self.mirror = Mirror(
            catalogue=self.catalogue,
            upstream=self.upstream,
            metrics=self.metrics,
            default_registry=config.default_registry,
        )
        self._server: MirrorHTTPServer | None = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self.port = 0
        self.metrics_port = 0

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
        """Read the disks, bind the mirror (and metrics), start serving and refreshing."""
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
        return self

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
        """Stop serving and refreshing; close upstream connections."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._refresher is not None:
            self._refresher.join(timeout=5)
        self.metrics.stop()
        self.upstream.close()
