"""Wiring of the matcher: settings -> registry channel -> index sync, hit reporter -> gRPC server.

The only place that builds the matcher's objects. The matcher talks to the registry over the
wire only, as it will when they run as separate pods; `snapcache serve` runs both in one process
and points the matcher at the registry's address.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from grpc_health.v1 import health_pb2

from services.matcher.hits import HitReporter
from services.matcher.index_sync import IndexSync, SyncSettings
from services.matcher.metrics import MatcherMetrics
from services.matcher.servicer import SERVICE_NAME, MatcherServicer
from snapcache.grpc_server import (
    PLAINTEXT,
    AioRunningServer,
    ServerSecurity,
    ServiceBinding,
    create_aio_server,
)
from snapcache.tls import PLAINTEXT_CHANNEL, ClientSecurity, open_channel
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc

log = logging.getLogger(__name__)

# Health entry that is SERVING only while the registry's change feed is live: a probe or an
# operator can tell "answering from a stale index" apart from "down".
FEED_HEALTH_NAME = "snapcache.v1.MatcherService.IndexFeed"

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class MatcherConfig:
    """Everything the matcher needs to start; validated before anything starts."""

    registry_target: str  # host:port of the cache registry
    # "" serves no gRPC: the matcher answers only in its own process (an extender beside it,
    # `snapcache_cli.colocated_matcher`)
    listen: str = "127.0.0.1:50052"
    hit_flush_seconds: float = 2.0
    metrics_listen: str = ""  # host:port for /metrics; "" for none
    sync: SyncSettings = field(default_factory=SyncSettings)
    status_check_seconds: float = 1.0
    security: ServerSecurity = PLAINTEXT  # TLS and access control of the matcher's gRPC API
    # Calls in flight beyond which new ones are refused at once with RESOURCE_EXHAUSTED.
    max_inflight_rpcs: int = 1024
    # how to reach the registry: TLS, client certificate, token (a writer: it reports matches)
    registry_security: ClientSecurity = PLAINTEXT_CHANNEL
    # Images the registry pulled with its own docker config (`docker_config_path` credentials,
    # like a kubelet's node credentials) are matched for every pod when True; for none when False
    # (the default: no pod names those credentials, so sharing them is the operator's decision,
    # not any cache writer's). See docs/security.md.
    share_node_credentials: bool = False

    def validate(self) -> None:
        """Refuse a bad configuration at start-up rather than at the first request."""
        if not self.registry_target:
            raise ValueError("the registry's address is required")
        if self.hit_flush_seconds <= 0 or self.status_check_seconds <= 0:
            raise ValueError("hit_flush_seconds and status_check_seconds must be > 0")
        if not 1 <= self.sync.page_size <= 1000:
            raise ValueError("sync page_size must be 1 to 1000")
        if self.max_inflight_rpcs < 1:
            raise ValueError("max_inflight_rpcs must be >= 1")
        self.security.validate()
        self.registry_security.validate()


class MatcherApp:
    """A built matcher: channel, index sync, hit reporter, metrics and server."""

    def __init__(self, config: MatcherConfig) -> None:
        config.validate()
        self.config = config
        self.channel = open_channel(
            config.registry_target,
            config.registry_security,
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        )
        self.sync = IndexSync(
            self.channel, settings=config.sync, share_node_credentials=config.share_node_credentials
        )
        self.metrics = MatcherMetrics(self.sync.status, self._pending_hits)
        self.hits = HitReporter(
            self.channel,
            flush_seconds=config.hit_flush_seconds,
            on_flush=lambda sent, _kept: self.metrics.hits_reported.inc(sent),
        )
        self.servicer = MatcherServicer(sync=self.sync, hits=self.hits, metrics=self.metrics)
        self.server: AioRunningServer | None = None
        self.metrics_port = 0
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    def _pending_hits(self) -> int:
        return self.hits.pending()

    @property
    def port(self) -> int:
        """The bound port (after `start`)."""
        assert self.server is not None
        return self.server.port

    def bindings(self) -> list[ServiceBinding]:
        """The matcher's gRPC services."""
        return [
            ServiceBinding(
                full_name=SERVICE_NAME,
                add_to_server=mpb_grpc.add_MatcherServiceServicer_to_server,
                servicer=self.servicer,
            )
        ]

    def start(self, *, wait_loaded_seconds: float = 0.0) -> MatcherApp:
        """Start following the registry and serving (unless ``listen`` is ""); optionally wait
        for the first load."""
        if self.config.listen:  # "" for a matcher answering in its own process only
            self.server = create_aio_server(
                self.config.listen,
                self.bindings(),
                thread_name="matcher-grpc",
                max_concurrent_rpcs=self.config.max_inflight_rpcs,
                security=self.config.security,
                metrics=self.metrics.rpc,
            )
        self._update_health()
        self.sync.start()
        self.hits.start()
        if self.config.metrics_listen:
            self.metrics_port = self.metrics.serve(self.config.metrics_listen)
        self._watchdog = threading.Thread(target=self._watch_status, name="matcher-status", daemon=True)
        self._watchdog.start()
        if wait_loaded_seconds and self.sync.wait_loaded(wait_loaded_seconds):
            self._update_health()
        return self

    def _watch_status(self) -> None:
        while not self._stopping.wait(self.config.status_check_seconds):
            try:
                self.sync.check_feed()
                self._update_health()
            except Exception:  # the watchdog must outlive a bug in what it checks
                log.exception("matcher status check failed")

    def _update_health(self) -> None:
        if self.server is None or self._stopping.is_set():
            return
        status = self.sync.status()
        # Serving once loaded, also when stale: a stale index still saves pulls, and going
        # NOT_SERVING would send every pod to pull at once exactly when the registry is down.
        self.server.health.set(SERVICE_NAME, _SERVING if status.loaded else _NOT_SERVING)
        self.server.health.set(FEED_HEALTH_NAME, _SERVING if status.live else _NOT_SERVING)

    def drain(self) -> None:
        """Health NOT_SERVING; calls in flight still finish."""
        self._stopping.set()
        if self.server is not None:
            self.server.set_serving(False)
            self.server.health.set(FEED_HEALTH_NAME, _NOT_SERVING)

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop serving, report the last hits, stop following the registry."""
        self.drain()
        if self.server is not None:
            self.server.stop(grace_seconds)
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)
        self.hits.stop()
        self.sync.stop()
        self.metrics.stop()
        self.channel.close()
