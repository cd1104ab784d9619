"""Follows the registry's change feed into the `CacheBook`: what drives ImageCache statuses.

The protocol (List, then WatchImageCaches from the first page's revision; resume after a drop,
full reload when the revision is gone; liveness and the silent-stream check) is the ground
floor's `FeedFollower`. This is the operator's side of it: a load keeps the caches made for an
ImageCache (those carrying the owner-uid label) and every ImageCache is looked at afterwards;
each change is recorded and the operator told which cache changed; when the feed answers again
after an outage every ImageCache is looked at too (those backing off after the outage need not
wait out their delay). No polling: between changes nothing is asked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from services.operator.cache_book import CacheBook
from services.operator.model import OWNER_UID_LABEL, CacheView
from services.operator.registry_client import cache_view
from snapcache.registry_feed import FeedFollower, FeedSettings
from snapcache.v1 import cache_registry_pb2 as api

log = logging.getLogger(__name__)

_UPSERT = api.WatchImageCachesResponse.UPSERT
_DELETE = api.WatchImageCachesResponse.DELETE


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
        self._book = book
        self._on_change = on_change
        self._on_resync = on_resync  # after a full load, and when the feed answers again after an outage
        self._follower = FeedFollower(
            channel, self, settings=settings or FeedSettings(page_size=500), thread_name="operator-cache-feed"
        )

    def start(self) -> None:
        """Start following in a background thread."""
        self._follower.start()

    def stop(self) -> None:
        """Stop following."""
        self._follower.stop()

    def synced(self) -> bool:
        """True once the first full load is done."""
        return self._follower.loaded()

    def wait_synced(self, timeout: float) -> bool:
        """Wait for the first full load; True if done."""
        return self._follower.wait_loaded(timeout)

    def status(self) -> FeedStatus:
        """A consistent read of the follower's position."""
        feed = self._follower.status()
        return FeedStatus(
            synced=feed.loaded,
            live=feed.live,
            revision=feed.revision,
            staleness_seconds=feed.staleness_seconds,
            reloads=feed.loads,
        )

    def check(self) -> None:
        """Drop a stream gone silent (no change, no heartbeat), so that it reconnects."""
        self._follower.check()

    # -- the follower's consumer -------------------------------------------------------------------

    def load(self, pages: Iterator[api.ListImageCachesResponse]) -> None:
        """Keep the caches made for an ImageCache; then every ImageCache is looked at."""
        views: list[CacheView] = []
        revision = 0
        for page in pages:
            revision = revision or page.revision
            views.extend(cache_view(c) for c in page.image_caches if OWNER_UID_LABEL in c.labels)
        if self._follower.stopping():
            return
        self._book.replace_all(views)
        log.info("registry feed loaded: %d ImageCache-owned caches at revision %d", len(views), revision)
        # before the follower marks the load done: a caller that waited for it sees the resync queued
        self._on_resync()

    def apply(self, change: api.WatchImageCachesResponse) -> None:
        """Record one change; tell the operator when it concerns a CR-born cache."""
        if change.type == _UPSERT:
            view = cache_view(change.image_cache)
            if view.owner_uid and self._book.put(view):
                self._on_change(view)
        elif change.type == _DELETE:
            view = cache_view(change.image_cache)
            removed = self._book.remove(view.cache_id, revision=change.revision)
            if removed is not None or view.owner_uid:
                self._on_change(view)

    def recovered(self) -> None:
        """The feed answers again after an outage: look at every ImageCache."""
        self._on_resync()
