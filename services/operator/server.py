"""Wiring of the operator: settings -> Kubernetes client, registry channel -> followers -> reconciler.

The only place that builds the operator's objects. Three threads do the work: one follows the
ImageCaches (`kube_resources`), one follows the registry's change feed (`cache_feed`), and one
reconciles the names they queue (`reconciler`), only once both have loaded, so no decision is
taken on half a picture. A fourth checks that the feed is still alive.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from services.operator.cache_book import CacheBook
from services.operator.cache_feed import CacheFeed
from services.operator.kube_resources import ImageCacheResources
from services.operator.metrics import OperatorMetrics
from services.operator.model import CacheView
from services.operator.reconciler import Reconciler, RetrySettings
from services.operator.registry_client import RegistryClient
from services.operator.work_queue import WorkQueue
from snapcache.kube_clients import kube_api_client
from snapcache.registry_feed import FeedSettings
from snapcache.tls import PLAINTEXT_CHANNEL, ClientSecurity, open_channel

log = logging.getLogger(__name__)

_ERROR_RETRY_SECONDS = 5.0


def _clock() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class OperatorConfig:
    """Everything the operator needs to start; validated before anything starts."""

    registry_target: str  # host:port of the cache registry
    kubeconfig: Path | None = None
    in_cluster: bool = False
    metrics_listen: str = ""  # host:port for /metrics, /healthz, /readyz; "" for none
    feed: FeedSettings = field(default_factory=FeedSettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    watch_timeout_seconds: int = 60
    feed_check_seconds: float = 1.0
    # how to reach the registry: TLS, client certificate, token (a writer: it creates caches)
    registry_security: ClientSecurity = PLAINTEXT_CHANNEL

    def validate(self) -> None:
        """Refuse a bad configuration at start-up rather than at the first ImageCache."""
        if not self.registry_target:
            raise ValueError("the registry's address is required")
        if self.in_cluster == (self.kubeconfig is not None):
            raise ValueError("give exactly one of a kubeconfig or in-cluster Kubernetes access")
        if self.kubeconfig is not None and not self.kubeconfig.is_file():
            raise ValueError(f"kubeconfig {self.kubeconfig} is not a file")
        self.registry_security.validate()


class OperatorApp:
    """A built operator: its followers, reconciler and metrics, started and stopped together."""

    def __init__(self, config: OperatorConfig) -> None:
        config.validate()
        self.config = config
        api_client = kube_api_client(kubeconfig=config.kubeconfig, in_cluster=config.in_cluster)
        self.queue = WorkQueue()
        self.book = CacheBook()
        self.resources = ImageCacheResources(
            api_client, on_change=self.queue.add, watch_timeout_seconds=config.watch_timeout_seconds
        )
        # gRPC's default reconnect backoff grows to two minutes: a restarted registry would leave
        # statuses stale (and changes unapplied) that long
        self.channel = open_channel(
            config.registry_target,
            config.registry_security,
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self.feed = CacheFeed(
            self.channel,
            book=self.book,
            on_change=self._cache_changed,
            on_resync=lambda: self.queue.add_all(self.resources.names()),
            settings=config.feed,
        )
        self.reconciler = Reconciler(
            resources=self.resources,
            registry=RegistryClient(self.channel),
            book=self.book,
            clock=_clock,
            retry=config.retry,
        )
        self.metrics = OperatorMetrics(feed=self.feed.status, sizes=self._sizes, ready=self.ready)
        self.metrics_port = 0
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def _cache_changed(self, cache: CacheView) -> None:
        name = self.resources.name_for_uid(cache.owner_uid)
        if name is not None:
            self.queue.add(name)

    def _sizes(self) -> dict[str, int]:
        return {
            "imagecaches": len(self.resources.names()),
            "caches": len(self.book),
            "queue": len(self.queue),
        }

    def ready(self) -> bool:
        """True once the ImageCaches and the registry's caches are loaded."""
        return self.resources.synced() and self.feed.synced()

    def start(self) -> OperatorApp:
        """Start following both sides and reconciling; never waits for either to answer."""
        self.resources.start()
        self.feed.start()
        for target, name in ((self._work, "operator-reconcile"), (self._check_feed, "operator-feed-check")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.config.metrics_listen:
            self.metrics_port = self.metrics.serve(self.config.metrics_listen)
        log.info(
            "operator following ImageCaches at %s and the cache registry at %s",
            self.resources.server,
            self.config.registry_target,
        )
        return self

    def _work(self) -> None:
        while not self._stopping.is_set() and not self.ready():
            self._stopping.wait(0.05)
        if self._stopping.is_set():
            return
        log.info("ImageCaches and the registry's caches loaded; reconciling")
        while not self._stopping.is_set():
            name = self.queue.get(timeout=1.0)
            if name is None:
                continue
            try:
                delay = self.reconciler.reconcile(name)
            except Exception:  # a bug must not stop the operator: log it, look again later
                log.exception("reconciling ImageCache %s failed", name)
                self.metrics.reconciled("error")
                self.queue.add_after(name, _ERROR_RETRY_SECONDS)
                continue
            if delay is None:
                self.metrics.reconciled("done")
            else:
                self.metrics.reconciled("again" if delay == 0 else "retry")
                self.queue.add_after(name, delay)

    def _check_feed(self) -> None:
        while not self._stopping.wait(self.config.feed_check_seconds):
            self.feed.check()

    def stop(self) -> None:
        """Stop reconciling and following; close the channel and the endpoint."""
        self._stopping.set()
        self.queue.close()
        for thread in self._threads:
            thread.join(timeout=10)
        self.feed.stop()
        self.resources.stop()
        self.channel.close()
        self.metrics.stop()
