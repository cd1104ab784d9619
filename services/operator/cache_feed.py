"""Follows the registry's change feed into the `CacheBook`: what drives ImageCache statuses.

Load: List every page (the first page's revision is where the feed resumes) and keep the caches
made for an ImageCache (those carrying the owner-uid label). Follow: WatchImageCaches from that
revision, recording each change and telling the operator which cache changed. A dropped stream
resumes from the last revision received, and once it answers again every ImageCache is looked at
(those backing off after the outage need not wait out their delay). OUT_OF_RANGE (the revision
was compacted, or is ahead of a registry that lost its database) gets a full reload, after which
every ImageCache is looked at too. A stream that stays silent past the live window (the registry
sends a heartbeat every few seconds) is dropped by `check` and reconnects. No polling: between
changes nothing is asked.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from services.operator.cache_book import CacheBook
from services.operator.model import OWNER_UID_LABEL, CacheView
from services.operator.registry_client import cache_view
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc

log = logging.getLogger(__name__)

_JITTER = random.Random()  # our own: never disturbs the process-wide generator
_UPSERT = api.WatchImageCachesResponse.UPSERT
_DELETE = api.WatchImageCachesResponse.DELETE


@dataclass(frozen=True)
class FeedSettings:
    """How the follower talks to the registry."""

    page_size: int = 500
    live_window_seconds: float = 15.0
    backoff_initial_seconds: float = 0.2
    backoff_max_seconds: float = 5.0
    rpc_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class FeedStatus:
    """Where the follower stands, for metrics and logs."""

    synced: bool
    live: bool
    revision: int
    staleness_seconds: float
    reloads: int


class CacheFeed:
    """Keeps a `CacheBook` current from the registry; calls back for each change of a CR-born cache."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        book: CacheBook,
        on_change: Callable[[CacheView], None],
        on_resync: Callable[[], None],
        settings: FeedSettings | None = None,
    ) -> None:
        self._stub = api_grpc.CacheRegistryServiceStub(channel)
        self._book = book
        self._on_change = on_change
        self._on_resync = on_resync  # after a full load, and when the feed answers again after an outage
        self._recovering = False
        self._settings = settings or FeedSettings()
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._call: grpc.RpcContext | None = None
        self._revision = 0
        self._last_contact = 0.0
        self._streaming = False
        self._reloads = 0

    def start(self) -> None:
        """Start following in a background thread."""
        self._thread = threading.Thread(target=self._run, name="operator-cache-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following."""
        self._stopping.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def synced(self) -> bool:
        """True once the first full load is done."""
        return self._synced.is_set()

    def wait_synced(self, timeout: float) -> bool:
        """Wait for the first full load; True if done."""
        return self._synced.wait(timeout)

    def status(self) -> FeedStatus:
        """A consistent read of the follower's position."""
        with self._lock:
            since = time.monotonic() - self._last_contact if self._last_contact else 0.0
            live = self._streaming and since < self._settings.live_window_seconds
            return FeedStatus(
                synced=self._synced.is_set(),
                live=live,
                revision=self._revision,
                staleness_seconds=0.0 if live else since,
                reloads=self._reloads,
            )

    def check(self) -> None:
        """Drop a stream gone silent (no change, no heartbeat), so that it reconnects."""
        with self._lock:
            quiet = time.monotonic() - self._last_contact
            call = self._call if self._streaming else None
        if call is not None and quiet > self._settings.live_window_seconds:
            log.warning("registry feed silent for %.0fs; reconnecting", quiet)
            call.cancel()

    def _run(self) -> None:
        backoff = self._settings.backoff_initial_seconds
        need_load = True
        while not self._stopping.is_set():
            try:
                if need_load:
                    self._load()
                    need_load = False
                self._follow()
                backoff = self._settings.backoff_initial_seconds
            except grpc.RpcError as exc:
                if self._stopping.is_set():
                    break
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                details = exc.details() if isinstance(exc, grpc.Call) else type(exc).__name__
                with self._lock:
                    self._streaming = False
                self._recovering = True
                if code is grpc.StatusCode.OUT_OF_RANGE:
                    log.warning(
                        "registry feed cannot resume from revision %d (%s); reloading",
                        self._revision,
                        details,
                    )
                    need_load = True
                    continue
                if code is not grpc.StatusCode.CANCELLED:
                    log.info("registry feed down (%s: %s); retrying in %.1fs", code.name, details, backoff)
                self._stopping.wait(backoff * _JITTER.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self._settings.backoff_max_seconds)
            except Exception:  # a bug must not end the follower: log, reload, retry
                log.exception("registry feed failed; reloading")
                need_load = True
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self._settings.backoff_max_seconds)

    def _load(self) -> None:
        """List every cache; keep those made for an ImageCache; resume the feed at the list's revision."""
        views: list[CacheView] = []
        token = ""
        first_revision: int | None = None
        while True:
            page = self._stub.ListImageCaches(
                api.ListImageCachesRequest(page_size=self._settings.page_size, page_token=token),
                timeout=self._settings.rpc_timeout_seconds,
            )
            if first_revision is None:
                first_revision = page.revision
            views.extend(cache_view(c) for c in page.image_caches if OWNER_UID_LABEL in c.labels)
            token = page.next_page_token
            if not token or self._stopping.is_set():
                break
        self._book.replace_all(views)
        with self._lock:
            self._revision = first_revision or 0
            self._last_contact = time.monotonic()
            self._reloads += 1
        self._recovering = False
        log.info(
            "registry feed loaded: %d ImageCache-owned caches at revision %d", len(views), self._revision
        )
        self._on_resync()
        self._synced.set()  # after the resync is queued: a caller that waited sees it done

    def _follow(self) -> None:
        call = self._stub.WatchImageCaches(api.WatchImageCachesRequest(start_revision=self._revision))
        self._call = call
        if self._stopping.is_set():
            call.cancel()
        for change in call:
            if self._recovering:
                self._recovering = False
                self._on_resync()
            if change.type == _UPSERT:
                view = cache_view(change.image_cache)
                if view.owner_uid and self._book.put(view):
                    self._on_change(view)
            elif change.type == _DELETE:
                view = cache_view(change.image_cache)
                removed = self._book.remove(view.cache_id, revision=change.revision)
                if removed is not None or view.owner_uid:
                    self._on_change(view)
            with self._lock:
                self._revision = max(self._revision, change.revision)
                self._last_contact = time.monotonic()
                self._streaming = True
        with self._lock:
            self._streaming = False
