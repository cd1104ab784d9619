"""Following the cache registry: a full List, then its change feed, for every service that mirrors it.

The matcher keeps its index this way and the operator its book of caches; both need the same
protocol, so it lives here once:

- Load: List every page (the first page's revision is where the feed resumes, so nothing that
  changes while the pages are read is missed). Pages are fetched by a helper thread while the
  consumer converts the previous one, so the registry's work and the consumer's overlap.
- Follow: WatchImageCaches from that revision, handing each change to the consumer. A dropped
  stream resumes from the last revision received (with jittered, capped backoff); OUT_OF_RANGE
  (the revision was compacted, or is ahead of a registry that lost its database) and any bug in
  the consumer get a full reload.
- Liveness: the feed is live while something (a change or the registry's heartbeat) arrived
  within the live window; `check` drops a stream gone silent so it reconnects (a registry that
  vanished without closing its connection would otherwise leave it waiting forever).

The consumer owns its data and its locking; the follower only calls it from its own thread.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc

from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc

log = logging.getLogger(__name__)

# Our own generator: jitter must not draw from (or disturb) the process-wide `random` state.
_JITTER = random.Random()
_PREFETCH_PAGES = 4

_Page = api.ListImageCachesResponse | BaseException | None


class FeedConsumer(Protocol):
    """What a service does with what the registry says."""

    def load(self, pages: Iterator[api.ListImageCachesResponse]) -> None:
        """Replace everything with the caches of ``pages`` (every page, in order)."""

    def apply(self, change: api.WatchImageCachesResponse) -> None:
        """Apply one change of the feed (UPSERT, DELETE or a PROGRESS heartbeat)."""

    def recovered(self) -> None:
        """The feed answers again after an outage (not called after a load)."""


@dataclass(frozen=True)
class FeedSettings:
    """How the follower talks to the registry."""

    page_size: int = 1000
    # The feed counts as live while something (a change or a PROGRESS heartbeat, every 5 s by
    # default) arrived within this window.
    live_window_seconds: float = 15.0
    backoff_initial_seconds: float = 0.2
    backoff_max_seconds: float = 5.0
    rpc_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class FeedStatus:
    """Where the follower stands, for health, metrics and status RPCs."""

    loaded: bool
    live: bool
    revision: int
    staleness_seconds: float
    loads: int  # full loads done
    last_load_time: float  # wall clock seconds; 0 before the first load
    last_error: str


def _put(pages: queue.Queue[_Page], item: _Page, abandon: threading.Event) -> None:
    """Hand ``item`` over unless the consumer gave up (then it would never be taken)."""
    while not abandon.is_set():
        try:
            pages.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


class FeedFollower:
    """Keeps a `FeedConsumer` current from the registry, in a thread of its own."""

    def __init__(
        self,
        channel: grpc.Channel,
        consumer: FeedConsumer,
        *,
        settings: FeedSettings | None = None,
        thread_name: str = "registry-feed",
        after_load: Callable[[], None] = lambda: None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stub = api_grpc.CacheRegistryServiceStub(channel)
        self._consumer = consumer
        self._settings = settings or FeedSettings()
        self._thread_name = thread_name
        self._after_load = after_load  # work that may wait until the consumer answers (warming)
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._call: grpc.RpcContext | None = None
        self._call_started = 0.0  # when the current Watch call was made
        self._revision = 0
        self._last_contact = 0.0
        self._streaming = False
        self._recovering = False
        self._loads = 0
        self._last_load_time = 0.0
        self._last_error = ""

    # -- reading ---------------------------------------------------------------------------------

    def loaded(self) -> bool:
        """True once the first full load is done."""
        return self._loaded.is_set()

    def wait_loaded(self, timeout: float) -> bool:
        """Block until the first full load is done (or ``timeout`` passes); True if loaded."""
        return self._loaded.wait(timeout)

    def position(self) -> tuple[int, float]:
        """The revision reached and the staleness in seconds (no lock: cheap enough per request)."""
        since = self._monotonic() - self._last_contact if self._last_contact else 0.0
        live = self._streaming and since < self._settings.live_window_seconds
        return self._revision, 0.0 if live else since

    def status(self) -> FeedStatus:
        """A consistent read of where the follower stands."""
        with self._lock:
            since = self._monotonic() - self._last_contact if self._last_contact else 0.0
            live = self._streaming and since < self._settings.live_window_seconds
            return FeedStatus(
                loaded=self._loaded.is_set(),
                live=live,
                revision=self._revision,
                staleness_seconds=0.0 if live else since,
                loads=self._loads,
                last_load_time=self._last_load_time,
                last_error=self._last_error,
            )

    def check(self) -> None:
        """Drop a stream that has gone quiet (no change, no heartbeat) so it reconnects.

        Also a Watch that has brought nothing at all since it was made: one made while the
        registry was going away can be left open with no answer and no error, forever.
        """
        with self._lock:
            quiet = self._monotonic() - max(self._last_contact, self._call_started)
            call = self._call
        if call is not None and quiet > self._settings.live_window_seconds:
            log.warning("registry feed silent for %.0fs; reconnecting", quiet)
            call.cancel()

    # -- running ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start following in a background thread."""
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following; the consumer keeps its last state."""
        self._stopping.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def stopping(self) -> bool:
        """True once `stop` was called (a consumer's load can give up early)."""
        return self._stopping.is_set()

    def _run(self) -> None:
        backoff = self._settings.backoff_initial_seconds
        need_load = True
        while not self._stopping.is_set():
            try:
                if need_load:
                    self.load_once()
                    need_load = False
                    self._after_load()
                self._follow()
                backoff = self._settings.backoff_initial_seconds
            except grpc.RpcError as exc:
                if self._stopping.is_set():
                    break
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                details = exc.details() if isinstance(exc, grpc.Call) else type(exc).__name__
                self._note_error(f"{code.name}: {details}")
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
                log.exception("following the registry failed; reloading")
                self._note_error("internal error while following the registry")
                need_load = True
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self._settings.backoff_max_seconds)

    def _note_error(self, text: str) -> None:
        with self._lock:
            self._streaming = False
            self._last_error = text
        self._recovering = True

    def load_once(self) -> None:
        """List every cache into the consumer (what start-up and a reload do)."""
        revision: list[int] = []

        def numbered(pages: Iterator[api.ListImageCachesResponse]) -> Iterator[api.ListImageCachesResponse]:
            for page in pages:
                if not revision:
                    revision.append(page.revision)
                yield page

        self._consumer.load(numbered(self._pages()))
        if self._stopping.is_set():
            return  # a load cut short by stop: nothing to record
        with self._lock:
            self._revision = revision[0] if revision else 0
            self._last_contact = self._monotonic()
            self._loads += 1
            self._last_load_time = time.time()
            self._last_error = ""
        self._recovering = False
        self._loaded.set()

    def _pages(self) -> Iterator[api.ListImageCachesResponse]:
        """Every page of List, fetched one ahead by a helper thread; ends early when stopping."""
        pages: queue.Queue[_Page] = queue.Queue(maxsize=_PREFETCH_PAGES)
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
            except BaseException as exc:  # handed to the consuming thread, which raises it
                _put(pages, exc, abandon)

        fetcher = threading.Thread(target=fetch, name=f"{self._thread_name}-list", daemon=True)
        fetcher.start()
        try:
            while not self._stopping.is_set():
                item = pages.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            abandon.set()
            fetcher.join(timeout=self._settings.rpc_timeout_seconds)

    def _follow(self) -> None:
        """Apply the change feed from the resume revision until it ends or fails."""
        call = self._stub.WatchImageCaches(api.WatchImageCachesRequest(start_revision=self._revision))
        with self._lock:
            self._call = call
            self._call_started = self._monotonic()
        if self._stopping.is_set():
            call.cancel()
        try:
            for change in call:
                if self._recovering:
                    self._recovering = False
                    self._consumer.recovered()
                self._consumer.apply(change)
                with self._lock:
                    self._revision = max(self._revision, change.revision)
                    self._last_contact = self._monotonic()
                    self._streaming = True
                    self._last_error = ""
        finally:
            with self._lock:
                self._streaming = False
                if self._call is call:
                    self._call = None  # ended: nothing for `check` to drop
