"""The operator's registry follower against a real registry over gRPC: load, follow, resume, reload.

The registry is the test harness (a fresh database per test, SQLite and PostgreSQL, the scripted
provider) behind a real gRPC server; `CacheFeed` follows it over the wire as in production.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from services.cache_registry import store
from services.cache_registry.model import CacheSpec
from services.cache_registry.servicer import SERVICE_NAME, CacheRegistryServicer
from services.operator.cache_book import CacheBook
from services.operator.cache_feed import CacheFeed
from services.operator.model import OWNER_UID_LABEL, CacheState, CacheView
from snapcache.grpc_server import RunningServer, ServiceBinding, create_server
from snapcache.registry_feed import FeedSettings
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from tests.support.registry_harness import Harness

WAIT_SECONDS = 20.0


@dataclass
class Follower:
    """A running `CacheFeed` and what it told."""

    feed: CacheFeed
    book: CacheBook
    changed: list[CacheView] = field(default_factory=list)
    resyncs: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def changed_ids(self) -> list[str]:
        with self.lock:
            return [c.cache_id for c in self.changed]


@pytest.fixture
def follower(harness: Harness) -> Iterator[Follower]:
    channel = grpc.insecure_channel(f"127.0.0.1:{harness.server.port}")
    book = CacheBook()
    made = Follower(feed=None, book=book)  # type: ignore[arg-type]

    def changed(view: CacheView) -> None:
        with made.lock:
            made.changed.append(view)

    made.feed = CacheFeed(
        channel,
        book=book,
        on_change=changed,
        on_resync=lambda: made.resyncs.append(time.monotonic()),
        settings=FeedSettings(live_window_seconds=1.0, backoff_initial_seconds=0.05, backoff_max_seconds=0.2),
    )
    # what the operator's server does (`_check_feed`): drop a stream that has gone quiet
    checking = threading.Event()

    def check_feed() -> None:
        while not checking.wait(0.1):
            made.feed.check()

    checker = threading.Thread(target=check_feed, name="feed-check", daemon=True)
    checker.start()
    try:
        yield made
    finally:
        checking.set()
        checker.join(timeout=5)
        made.feed.stop()
        channel.close()


def create(h: Harness, cache_id: str, *, owner: str = "") -> None:
    labels = {OWNER_UID_LABEL: owner} if owner else {}
    cache = pb.ImageCache(images=["nginx:1.25"], labels=labels)
    h.stub.CreateImageCache(api.CreateImageCacheRequest(image_cache=cache, image_cache_id=cache_id))


def eventually(check: Callable[[], object], *, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def serve_again(harness: Harness, port: int) -> RunningServer:
    binding = ServiceBinding(
        SERVICE_NAME,
        api_grpc.add_CacheRegistryServiceServicer_to_server,
        CacheRegistryServicer(harness.registry),
    )
    return create_server(f"127.0.0.1:{port}", [binding], max_workers=8)


def test_loads_then_follows_only_the_caches_made_for_imagecaches(
    harness: Harness, follower: Follower
) -> None:
    create(harness, "imc-0000000a", owner="uid-a")
    create(harness, "imc-0000000b")  # made through the API: not the operator's
    follower.feed.start()
    assert follower.feed.wait_synced(WAIT_SECONDS)
    assert len(follower.resyncs) == 1
    assert follower.book.get("imc-0000000a") is not None and follower.book.get("imc-0000000b") is None

    create(harness, "imc-0000000c", owner="uid-c")
    create(harness, "imc-0000000d")
    harness.settle()
    eventually(
        lambda: (c := follower.book.get("imc-0000000c")) is not None and c.state is CacheState.READY,
        what="the build of c in the book",
    )
    assert "imc-0000000d" not in follower.changed_ids()
    ready = follower.book.get("imc-0000000c")
    assert ready is not None and ready.owner_uid == "uid-c" and ready.zones

    harness.stub.DeleteImageCache(api.DeleteImageCacheRequest(name="imageCaches/imc-0000000a"))
    harness.settle()
    eventually(lambda: follower.book.get("imc-0000000a") is None, what="the deletion of a")
    assert follower.changed_ids().count("imc-0000000a") >= 2  # DELETING, then gone
    assert follower.feed.status().live


def test_a_dropped_feed_resumes_from_its_revision(harness: Harness, follower: Follower) -> None:
    create(harness, "imc-0000000a", owner="uid-a")
    follower.feed.start()
    assert follower.feed.wait_synced(WAIT_SECONDS)
    port = harness.server.port
    harness.server.stop(0)
    # changes while the feed is down, made through the service (the gRPC server is gone)
    harness.registry.create(
        spec=CacheSpec(
            images=("redis:7",), cache_size_gib=20, retention_days=0, labels=((OWNER_UID_LABEL, "b"),)
        ),
        cache_id="imc-0000000b",
    )
    harness.registry.delete(name="imageCaches/imc-0000000a")
    harness.settle()
    harness.server = serve_again(harness, port)
    eventually(lambda: follower.book.get("imc-0000000b") is not None, what="the cache made while down")
    eventually(lambda: follower.book.get("imc-0000000a") is None, what="the deletion made while down")
    eventually(lambda: follower.feed.status().live, what="the feed live again")
    assert follower.feed.status().reloads == 1  # resumed, not reloaded
    assert len(follower.resyncs) == 2  # but every ImageCache is looked at again


def test_a_compacted_feed_is_reloaded_and_everything_looked_at_again(
    harness: Harness, follower: Follower
) -> None:
    create(harness, "imc-0000000a", owner="uid-a")
    follower.feed.start()
    assert follower.feed.wait_synced(WAIT_SECONDS)
    port = harness.server.port
    harness.server.stop(0)
    harness.registry.create(
        spec=CacheSpec(
            images=("redis:7",), cache_size_gib=20, retention_days=0, labels=((OWNER_UID_LABEL, "b"),)
        ),
        cache_id="imc-0000000b",
    )
    harness.registry.delete(name="imageCaches/imc-0000000a")
    harness.settle()
    with harness.database.transaction() as session:
        assert store.compact_changes(session, keep=1) > 0
    harness.server = serve_again(harness, port)
    # at least one reload (a loaded machine may see the stream fail twice around the restart)
    eventually(lambda: follower.feed.status().reloads >= 2, what="the reload")
    eventually(lambda: follower.book.get("imc-0000000b") is not None, what="the cache made while down")
    assert follower.book.get("imc-0000000a") is None
    assert len(follower.resyncs) >= 2  # every ImageCache looked at again after the reload
