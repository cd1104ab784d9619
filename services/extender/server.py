"""Wiring of the extender: config -> matcher client, node cache, pod events -> use cases -> HTTP.

The only place that builds the extender's objects. It talks to the matcher over gRPC (as a
separate pod would) unless it is handed a matcher of its own process (`Matcher`: the CLI, which
sees both wings, wires that). Kubernetes access is optional: without it NodeNames requests see
zone-less nodes (score 0, logged and exposed as `snapcache_extender_node_cache_synced 0`) and no
events are written, while full-Nodes requests still work.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.extender.decisions import DecisionCache
from services.extender.http_app import ExtenderHTTPServer, ExtenderRoutes, serve_in_thread
from services.extender.matcher_client import MatcherClient
from services.extender.matches import MatchAnswer, MatchQuery
from services.extender.metrics import ExtenderMetrics
from services.extender.node_cache import NodeZoneCache
from services.extender.scheduling import EventSink, NoEvents, Scheduling
from snapcache.kube_clients import kube_api_client
from snapcache.pod_events import PodEvents
from snapcache.pod_requests import parse_default_mode
from snapcache.tls import PLAINTEXT_CHANNEL, ClientSecurity, ServerTls, SSLContextFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtenderConfig:
    """Everything the extender needs to start; validated before anything starts."""

    matcher_target: str  # host:port of the matcher; "" when ExtenderApp is given its own matcher
    listen: str = "127.0.0.1:50053"
    url_prefix: str = ""  # the scheduler's urlPrefix path ("" or "/snapcache")
    default_mode: str = "off"  # for pods without an annotation: off | auto
    # The scheduler's httpTimeout is 2 s in deploy/scheduler: the matcher gets well under half.
    matcher_budget_seconds: float = 0.5
    decision_ttl_seconds: float = 5.0
    max_body_bytes: int = 32 * 1024 * 1024  # 5,000 full Nodes is about 20 MB
    socket_timeout_seconds: float = 10.0
    kubeconfig: Path | None = None
    in_cluster: bool = False
    node_watch_timeout_seconds: int = 60
    freeze_gc: bool = True
    # how to reach the matcher: TLS, client certificate, token (a reader is enough)
    matcher_security: ClientSecurity = PLAINTEXT_CHANNEL
    # HTTPS for the scheduler (None: plain HTTP); mutual TLS with a client CA
    tls: ServerTls | None = None

    def validate(self) -> None:
        """Refuse a bad configuration at start-up rather than at the first request."""
        _host, colon, port = self.listen.rpartition(":")
        if not colon or not port.isdigit():
            raise ValueError(f"extender listen address must be HOST:PORT, not {self.listen!r}")
        parse_default_mode(self.default_mode)
        if not 0 < self.matcher_budget_seconds <= 5:
            raise ValueError("matcher_budget_seconds must be > 0 and <= 5 (the scheduler's default timeout)")
        if self.decision_ttl_seconds <= 0:
            raise ValueError("decision_ttl_seconds must be > 0")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if self.kubeconfig is not None and self.in_cluster:
            raise ValueError("give a kubeconfig or in_cluster, not both")
        self.matcher_security.validate()
        if self.tls is not None:
            self.tls.validate()


class Matcher(Protocol):
    """What the extender asks: `MatcherClient` over gRPC, or a matcher in the same process."""

    def match(self, query: MatchQuery) -> MatchAnswer:
        """The answer for one pod; UNKNOWN (fail open) when there is none."""

    def close(self) -> None:
        """Release what it holds; called once the HTTP server stopped."""


# Builds the extender's matcher, given the fail-open counter (the gRPC status code's name).
MatcherFactory = Callable[[Callable[[str], None]], Matcher]


class ExtenderApp:
    """A built extender: matcher client, node cache, events, HTTP server."""

    def __init__(self, config: ExtenderConfig, *, matcher: MatcherFactory | None = None) -> None:
        """``matcher`` replaces the gRPC client of ``config.matcher_target`` (see `Matcher`)."""
        config.validate()
        if matcher is None and not config.matcher_target:
            raise ValueError("the matcher's address is required")
        self.config = config
        self.node_cache: NodeZoneCache | None = None
        self.pod_events: PodEvents | None = None
        api_client = None
        if config.kubeconfig is not None or config.in_cluster:
            api_client = kube_api_client(kubeconfig=config.kubeconfig, in_cluster=config.in_cluster)
            self.node_cache = NodeZoneCache(
                api_client, watch_timeout_seconds=config.node_watch_timeout_seconds
            )
        cache = self.node_cache
        self.metrics = ExtenderMetrics(
            node_cache_synced=lambda: cache is not None and cache.synced(),
            node_cache_size=lambda: cache.size() if cache is not None else 0,
        )
        events: EventSink = NoEvents()
        if api_client is not None:
            self.pod_events = PodEvents(
                api_client,
                component="snapcache-extender",
                thread_name="extender-pod-events",
                on_sent=self.metrics.events_sent.inc,
                on_dropped=self.metrics.events_dropped.inc,
            )
            events = self.pod_events
        self.matcher: Matcher = (
            matcher(self.metrics.fail_open)
            if matcher is not None
            else MatcherClient(
                config.matcher_target,
                budget_seconds=config.matcher_budget_seconds,
                on_fail_open=self.metrics.fail_open,
                security=config.matcher_security,
            )
        )
        self.scheduling = Scheduling(
            match=self.matcher.match,
            node_zones=cache.zones if cache is not None else _no_zones,
            decisions=DecisionCache(ttl_seconds=config.decision_ttl_seconds),
            events=events,
            default_mode=parse_default_mode(config.default_mode),
        )
        self._stopping = threading.Event()
        self.routes = ExtenderRoutes(
            scheduling=self.scheduling,
            metrics=self.metrics,
            prefix=config.url_prefix,
            healthy=lambda: not self._stopping.is_set(),
        )
        self.http: ExtenderHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (after `start`)."""
        assert self.http is not None
        return int(self.http.server_address[1])

    def start(self, *, wait_nodes_seconds: float = 0.0) -> ExtenderApp:
        """Start following nodes, writing events and serving HTTP."""
        host, _, port = self.config.listen.rpartition(":")
        if self.node_cache is not None:
            self.node_cache.start()
        else:
            log.warning(
                "extender without Kubernetes access: NodeNames requests see nodes without zones "
                "(every score 0); full-Nodes requests work"
            )
        if self.pod_events is not None:
            self.pod_events.start()
        self.http = ExtenderHTTPServer(
            (host or "0.0.0.0", int(port)),
            self.routes,
            max_body_bytes=self.config.max_body_bytes,
            socket_timeout=self.config.socket_timeout_seconds,
            tls=SSLContextFiles(self.config.tls) if self.config.tls is not None else None,
        )
        self._thread = serve_in_thread(self.http)
        if wait_nodes_seconds and self.node_cache is not None:
            self.node_cache.wait_synced(wait_nodes_seconds)
        if self.config.freeze_gc:
            freeze_long_lived()
        return self

    def drain(self) -> None:
        """/healthz answers 503; requests still get answers."""
        self._stopping.set()

    def stop(self) -> None:
        """Stop serving and following."""
        self.drain()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.node_cache is not None:
            self.node_cache.stop()
        if self.pod_events is not None:
            self.pod_events.stop()
        self.matcher.close()


def _no_zones() -> Mapping[str, str | None]:
    return {}


def freeze_long_lived() -> None:
    """Move every object alive now out of the cyclic collector's sight (`gc.freeze`).

    Called once the extender is built and its node cache has listed (or given up waiting): the
    modules, the clients and a co-located matcher's index live as long as the process, and a full
    collection walking them is a pause on whichever request is running (bench/extender.py's
    process: 126,000 objects, the matcher's index of 2,000 caches a tenth of them, 60-75 ms a
    full collection; frozen, none). The matcher freezes each index it rebuilds itself
    (`services.matcher.index_sync`). The node index needs none of this: a name -> zone-id dict of
    strings and small ints is not tracked by the collector (5,000 nodes are 6 tracked objects),
    so a relist leaves nothing for it to walk. What requests keep for a while (the decision
    cache's answers) leaves with its TTL. Frozen objects are still freed by reference counting.
    """
    gc.freeze()
