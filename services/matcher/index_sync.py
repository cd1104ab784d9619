"""Keeps the matcher's index in step with the registry: a full load, then the change feed.

The protocol (List, then WatchImageCaches from the first page's revision; resume after a drop,
full reload when the revision is gone; liveness) is the ground floor's `FeedFollower`. This
module is the matcher's side of it: a load builds a fresh index beside the live one and swaps
it in, so matching never sees a half-built index; each change is applied under the index lock;
the index ignores versions older than what it holds, so changes seen twice do no harm.

While the registry is unreachable, matching goes on from the last known state; `status()` says
how long it has been since the registry was last heard from.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from services.matcher.index import CacheIndex, ImagePool, IndexBuilder
from services.matcher.matching import WALK_FIRST
from services.matcher.messages import entry_from_cache
from snapcache.errors import Unavailable
from snapcache.registry_feed import FeedFollower, FeedSettings
from snapcache.v1 import cache_registry_pb2 as api

log = logging.getLogger(__name__)

# The image pool forgets images of deleted caches every this many changes from the feed.
PRUNE_EVERY_UPSERTS = 10_000
_UPSERT = api.WatchImageCachesResponse.UPSERT
_DELETE = api.WatchImageCachesResponse.DELETE

SyncSettings = FeedSettings  # how the matcher follows the registry


@dataclass(frozen=True)
class SyncStatus:
    """A snapshot of the follower's state, for health, metrics and GetIndexStatus."""

    loaded: bool
    live: bool
    cache_count: int
    ready_count: int
    revision: int
    staleness_seconds: float
    last_full_sync_time: float  # wall clock seconds; 0 before the first load
    full_syncs: int
    last_error: str


class IndexSync:
    """Owns the index and follows the registry into it."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        settings: SyncSettings | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        share_node_credentials: bool = False,
    ) -> None:
        self._share_node_credentials = share_node_credentials  # see `pull_access`
        self._lock = threading.Lock()
        self._pool = ImagePool()
        self._upserts_since_prune = 0
        self._index = CacheIndex(self._pool)
        self._follower = FeedFollower(
            channel,
            self,
            settings=settings,
            thread_name="matcher-index-sync",
            # answers are already right; this only spares the first pods the sorts
            after_load=self._warm,
            monotonic=monotonic,
        )

    # -- reading ---------------------------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[CacheIndex]:
        """The index, held still for one match; UNAVAILABLE until it was loaded once."""
        if not self._follower.loaded():
            raise Unavailable(
                reason="INDEX_NOT_LOADED",
                message="the matcher has not loaded the cache index from the registry yet; retry",
            )
        with self._lock:
            yield self._index

    def wait_loaded(self, timeout: float) -> bool:
        """Block until the first full load is done (or ``timeout`` passes); True if loaded."""
        return self._follower.wait_loaded(timeout)

    def position(self) -> tuple[int, float]:
        """The revision reached and the staleness in seconds, for each answer (no lock: cheap)."""
        return self._follower.position()

    def status(self) -> SyncStatus:
        """Where the index stands now."""
        feed = self._follower.status()
        with self._lock:
            cache_count, ready_count = len(self._index), self._index.ready_count
        return SyncStatus(
            loaded=feed.loaded,
            live=feed.live,
            cache_count=cache_count,
            ready_count=ready_count,
            revision=feed.revision,
            staleness_seconds=feed.staleness_seconds,
            last_full_sync_time=feed.last_load_time,
            full_syncs=feed.loads,
            last_error=feed.last_error,
        )

    # -- running ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start following the registry in a background thread."""
        self._follower.start()

    def stop(self) -> None:
        """Stop following; the index keeps its last state."""
        self._follower.stop()

    def check_feed(self) -> None:
        """Drop a stream that has gone quiet, so it reconnects (see `FeedFollower.check`)."""
        self._follower.check()

    def load_once(self) -> None:
        """List every cache into a fresh index and swap it in (what start-up and a resync do)."""
        self._follower.load_once()

    # -- the follower's consumer -------------------------------------------------------------------

    def load(self, pages: Iterator[api.ListImageCachesResponse]) -> None:
        """Build a fresh index from every page and swap it in."""
        # The collector off while a load builds millions of objects: they are all kept, and full
        # collections walking them (and the old index) over and over made the load a third
        # slower. Reference counting still frees what is dropped; afterwards the index is frozen
        # out of the collector's sight.
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._load(pages)
        finally:
            if collecting:
                gc.enable()

    def _load(self, pages: Iterator[api.ListImageCachesResponse]) -> None:
        started = time.perf_counter()
        pool = ImagePool()  # fresh: the old index's images go with it
        builder = IndexBuilder(pool)
        revision = 0
        share = self._share_node_credentials
        for page in pages:
            revision = revision or page.revision
            for cache in page.image_caches:
                builder.add(entry_from_cache(cache, pool, share_node_credentials=share))
        if self._follower.stopping():
            return  # stopping: keep the index as it was rather than swap in half of one
        fresh = builder.finish(revision=revision)
        with self._lock:
            self._index = fresh
            self._pool = pool
            self._upserts_since_prune = 0
        # The index lives until the next full load and holds millions of objects: out of the
        # collector's sight, a full collection no longer walks them (a pause of a second or
        # more at 100,000 caches, hitting whichever request is running). It has no cycles, so
        # reference counting still frees it when a resync replaces it.
        gc.freeze()
        log.info(
            "matcher index loaded: %d caches at revision %d in %.2fs",
            len(fresh),
            revision,
            time.perf_counter() - started,
        )

    def apply(self, change: api.WatchImageCachesResponse) -> None:
        """Apply one change of the feed under the index lock."""
        entry = (
            entry_from_cache(
                change.image_cache, self._pool, share_node_credentials=self._share_node_credentials
            )
            if change.type == _UPSERT
            else None
        )
        with self._lock:
            if entry is not None:
                self._index.upsert(entry)
                self._upserts_since_prune += 1
                if self._upserts_since_prune >= PRUNE_EVERY_UPSERTS:
                    self._upserts_since_prune = 0
                    self._pool.prune(self._index)
            elif change.type == _DELETE:
                self._index.delete(change.image_cache.name, revision=change.revision)
            else:
                self._index.advance(change.revision)

    def recovered(self) -> None:
        """Nothing to do: the index was kept while the registry was away."""

    def _warm(self) -> None:
        # Without the lock, as matching goes on: it only orders postings, which a match may also
        # do (the same list, either way), and the feed's writes run on this same thread.
        self._index.warm(min_size=WALK_FIRST)
