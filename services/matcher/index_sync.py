"""Keeps the matcher's index in step with the registry: a full load, then the change feed.

Load: List every page (the first page's revision is where the feed resumes, so nothing that
changes while the pages are read is missed; the index ignores versions older than what it
holds, so changes seen twice do no harm). Follow: WatchImageCaches from that revision, applying
each change under the index lock. A dropped stream resumes from the last revision received; a
registry that says the revision is gone (OUT_OF_RANGE, the feed was compacted) gets a full
resync, built beside the live index and swapped in, so matching never sees a half-built index.

While the registry is unreachable, matching goes on from the last known state; `status()` says
how long it has been since the registry was last heard from.
"""

from __future__ import annotations

import gc
import logging
import queue
import random
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
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc

log = logging.getLogger(__name__)

# Our own generator: jitter must not draw from (or disturb) the process-wide `random` state.
_JITTER = random.Random()

_Page = api.ListImageCachesResponse | BaseException | None
# The image pool forgets images of deleted caches every this many changes from the feed.
PRUNE_EVERY_UPSERTS = 10_000
_UPSERT = api.WatchImageCachesResponse.UPSERT
_DELETE = api.WatchImageCachesResponse.DELETE


@dataclass(frozen=True)
class SyncSettings:
    """How the follower talks to the registry."""

    page_size: int = 1000
    # The feed counts as live while something (a change or a PROGRESS heartbeat, every 5 s by
    # default) arrived within this window.
    live_window_seconds: float = 15.0
    backoff_initial_seconds: float = 0.2
    backoff_max_seconds: float = 5.0
    rpc_timeout_seconds: float = 30.0


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


def _put(pages: queue.Queue[_Page], item: _Page, abandon: threading.Event) -> None:
    """Hand ``item`` over unless the consumer gave up (then it would never be taken)."""
    while not abandon.is_set():
        try:
            pages.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


class IndexSync:
    """Owns the index and the thread that keeps it current."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        settings: SyncSettings | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stub = api_grpc.CacheRegistryServiceStub(channel)
        self._settings = settings or SyncSettings()
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._pool = ImagePool()
        self._upserts_since_prune = 0
        self._index = CacheIndex(self._pool)
        self._loaded = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._call: grpc.RpcContext | None = None
        self._resume_revision = 0
        self._last_contact = 0.0
        self._streaming = False
        self._last_full_sync_time = 0.0
        self._full_syncs = 0
        self._last_error = ""

    # -- reading ---------------------------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[CacheIndex]:
        """The index, held still for one match; UNAVAILABLE until it was loaded once."""
        if not self._loaded.is_set():
            raise Unavailable(
                reason="INDEX_NOT_LOADED",
                message="the matcher has not loaded the cache index from the registry yet; retry",
            )
        with self._lock:
            yield self._index

    def wait_loaded(self, timeout: float) -> bool:
        """Block until the first full load is done (or ``timeout`` passes); True if loaded."""
        return self._loaded.wait(timeout)

    def position(self) -> tuple[int, float]:
        """The revision reached and the staleness in seconds, for each answer (no lock: cheap)."""
        since = self._monotonic() - self._last_contact if self._last_contact else 0.0
        live = self._streaming and since < self._settings.live_window_seconds
        return self._resume_revision, 0.0 if live else since

    def status(self) -> SyncStatus:
        """Where the index stands now."""
        now = self._monotonic()
        with self._lock:
            since = now - self._last_contact if self._last_contact else 0.0
            live = self._streaming and since < self._settings.live_window_seconds
            loaded = self._loaded.is_set()
            return SyncStatus(
                loaded=loaded,
                live=live,
                cache_count=len(self._index),
                ready_count=self._index.ready_count,
                revision=self._resume_revision,
                staleness_seconds=0.0 if live or not loaded else since,
                last_full_sync_time=self._last_full_sync_time,
                full_syncs=self._full_syncs,
                last_error=self._last_error,
            )

    # -- running ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start following the registry in a background thread."""
        self._thread = threading.Thread(target=self._run, name="matcher-index-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following; the index keeps its last state."""
        self._stopping.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        backoff = self._settings.backoff_initial_seconds
        need_full = True
        while not self._stopping.is_set():
            try:
                if need_full:
                    self.load_once()
                    need_full = False
                    # answers are already right; this only spares the first pods the sorts
                    self._index.warm(min_size=WALK_FIRST)
                    backoff = self._settings.backoff_initial_seconds
                self._follow()
                backoff = self._settings.backoff_initial_seconds
            except grpc.RpcError as exc:
                if self._stopping.is_set():
                    break
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                self._note_error(f"{code.name}: {details}")
                if code is grpc.StatusCode.OUT_OF_RANGE:
                    log.warning(
                        "registry compacted the feed past revision %d; resyncing", self._resume_revision
                    )
                    need_full = True
                    continue
                log.info("registry feed down (%s: %s); retrying in %.1fs", code.name, details, backoff)
                self._stopping.wait(backoff * _JITTER.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self._settings.backoff_max_seconds)
            except Exception:  # a bug must not end the follower: keep serving, log, retry
                log.exception("matcher index sync failed; retrying")
                self._note_error("internal error in index sync")
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self._settings.backoff_max_seconds)

    def _note_error(self, text: str) -> None:
        with self._lock:
            self._streaming = False
            self._last_error = text

    def check_feed(self) -> None:
        """Drop a stream that has gone quiet (no change, no heartbeat) so it reconnects.

        A registry that vanished without closing its connection would otherwise leave the
        stream waiting forever while the index silently ages.
        """
        with self._lock:
            quiet = self._monotonic() - self._last_contact
            call = self._call if self._streaming else None
        if call is not None and quiet > self._settings.live_window_seconds:
            log.warning("registry feed silent for %.0fs; reconnecting", quiet)
            call.cancel()

    def load_once(self) -> None:
        """List every cache into a fresh index and swap it in (what start-up and a resync do).

        Pages are fetched by a helper thread while this one converts and files the previous page,
        so the registry's work and the matcher's overlap instead of adding up; only the final
        ordering of the postings waits for the last page.
        """
        # The collector off while a load builds millions of objects: they are all kept, and full
        # collections walking them (and the old index) over and over made the load a third
        # slower. Reference counting still frees what is dropped; afterwards the index is frozen
        # out of the collector's sight (`_load`).
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._load()
        finally:
            if collecting:
                gc.enable()

    def _load(self) -> None:
        started = time.perf_counter()
        pages: queue.Queue[_Page] = queue.Queue(maxsize=4)
        abandon = threading.Event()

        def fetch() -> None:
            token = ""
            try:
                while not abandon.is_set():
                    page = self._stub.ListImageCaches(
                        api.ListImageCachesRequest(page_size=self._settings.page_size, page_token=token),
                        timeout=self._settings.rpc_timeout_seconds,
                    )
                    _put(pages, page, abandon)
                    token = page.next_page_token
                    if not token:
                        break
                _put(pages, None, abandon)
            except BaseException as exc:  # handed to the converting thread, which raises it
                _put(pages, exc, abandon)

        fetcher = threading.Thread(target=fetch, name="matcher-index-fetch", daemon=True)
        fetcher.start()
        pool = ImagePool()  # fresh: the old index's images go with it
        builder = IndexBuilder(pool)
        first_revision: int | None = None
        try:
            while True:
                item = pages.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                if first_revision is None:
                    first_revision = item.revision
                for cache in item.image_caches:
                    builder.add(entry_from_cache(cache, pool))
                if self._stopping.is_set():
                    return  # stopping: keep the index as it was rather than swap in half of one
        finally:
            abandon.set()
            fetcher.join(timeout=self._settings.rpc_timeout_seconds)
        fresh = builder.finish(revision=first_revision or 0)
        with self._lock:
            self._index = fresh
            self._pool = pool
            self._upserts_since_prune = 0
            self._resume_revision = first_revision or 0
            self._last_contact = self._monotonic()
            self._last_full_sync_time = time.time()
            self._full_syncs += 1
            self._last_error = ""
        # The index lives until the next full load and holds millions of objects: out of the
        # collector's sight, a full collection no longer walks them (a pause of a second or
        # more at 100,000 caches, hitting whichever request is running). It has no cycles, so
        # reference counting still frees it when a resync replaces it.
        gc.freeze()
        self._loaded.set()
        log.info(
            "matcher index loaded: %d caches at revision %d in %.2fs",
            len(fresh),
            first_revision or 0,
            time.perf_counter() - started,
        )

    def _follow(self) -> None:
        """Apply the change feed from the resume revision until it ends or fails."""
        call = self._stub.WatchImageCaches(api.WatchImageCachesRequest(start_revision=self._resume_revision))
        self._call = call
        if self._stopping.is_set():
            call.cancel()
        for change in call:
            entry = entry_from_cache(change.image_cache, self._pool) if change.type == _UPSERT else None
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
                self._resume_revision = max(self._resume_revision, change.revision)
                self._last_contact = self._monotonic()
                self._streaming = True
                self._last_error = ""
        with self._lock:
            self._streaming = False
