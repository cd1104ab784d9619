"""Two registry replicas on one PostgreSQL database: a change committed through one reaches the
other's watchers at once (LISTEN/NOTIFY), not at their next poll."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from services.cache_registry.commit_listener import CommitListener
from services.cache_registry.service import RegistrySettings
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import image_cache_pb2 as pb
from tests.support.fake_provider import FakeProvider
from tests.support.registry_harness import Harness, build_harness, close_harness

# Replica B polls the database this seldom: a change seen sooner was pushed, not polled.
SLOW_POLL_SECONDS = 30.0
PROMPT_SECONDS = 2.0


@pytest.fixture
def replicas(postgres_url: str) -> Iterator[tuple[Harness, Harness]]:
    settings = RegistrySettings(
        watch_poll_seconds=SLOW_POLL_SECONDS, watch_heartbeat_seconds=SLOW_POLL_SECONDS
    )
    a = build_harness(postgres_url, FakeProvider())
    b = build_harness(postgres_url, FakeProvider(), settings)
    try:
        yield a, b
    finally:
        close_harness(b)
        close_harness(a)


def _watch(harness: Harness, seen: queue.Queue[tuple[str, float]]) -> grpc.Future:  # type: ignore[type-arg]
    head = harness.stub.ListImageCaches(api.ListImageCachesRequest(page_size=1)).revision
    call = harness.stub.WatchImageCaches(api.WatchImageCachesRequest(start_revision=head))

    def read() -> None:
        try:
            for change in call:
                if change.type == api.WatchImageCachesResponse.UPSERT:
                    seen.put((change.image_cache.name, time.monotonic()))
        except grpc.RpcError:
            pass

    threading.Thread(target=read, daemon=True).start()
    return call  # type: ignore[no-any-return]


def _create(harness: Harness, cache_id: str) -> float:
    request = api.CreateImageCacheRequest(
        image_cache=pb.ImageCache(images=["nginx:1.25"]), image_cache_id=cache_id
    )
    harness.stub.CreateImageCache(request)
    return time.monotonic()


def _arrival(seen: queue.Queue[tuple[str, float]], name: str, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            got, at = seen.get(timeout=left)
        except queue.Empty:
            return None
        if got == name:
            return at
    return None


def test_a_commit_on_one_replica_wakes_the_others_watchers(replicas: tuple[Harness, Harness]) -> None:
    a, b = replicas
    seen: queue.Queue[tuple[str, float]] = queue.Queue()
    call = _watch(b, seen)
    listener = CommitListener(b.database.engine, b.signal)
    try:
        time.sleep(0.2)  # B's watcher is now waiting for its (slow) poll
        # without the listener, B hears of A's commit only at its next poll
        _create(a, "imc-0000000a")
        assert _arrival(seen, "imageCaches/imc-0000000a", PROMPT_SECONDS) is None

        listener.start()
        assert listener.wait_listening(10)
        # on (re)connecting it wakes the watchers once, for what it may have missed
        assert _arrival(seen, "imageCaches/imc-0000000a", PROMPT_SECONDS) is not None
        for number in range(1, 6):
            name = f"imc-0000001{number}"
            committed = _create(a, name)
            arrived = _arrival(seen, f"imageCaches/{name}", PROMPT_SECONDS)
            assert arrived is not None, f"{name} did not reach replica B's watcher"
            assert arrived - committed < PROMPT_SECONDS
    finally:
        call.cancel()
        listener.stop()


def test_the_listener_reconnects_after_losing_its_connection(replicas: tuple[Harness, Harness]) -> None:
    a, b = replicas
    listener = CommitListener(b.database.engine, b.signal, backoff_initial_seconds=0.05)
    listener.start()
    try:
        assert listener.wait_listening(10)
        with a.database.engine.connect() as connection:  # kill B's LISTEN session from outside
            killed = connection.exec_driver_sql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE query = 'LISTEN snapcache_commits' AND datname = current_database() "
                "AND pid <> pg_backend_pid()"
            ).scalar_one()
        assert killed >= 1
        seen: queue.Queue[tuple[str, float]] = queue.Queue()
        call = _watch(b, seen)
        try:
            deadline = time.monotonic() + 10
            arrived = None
            number = 0
            while arrived is None and time.monotonic() < deadline:
                number += 1
                name = f"imc-000002{number:02d}"
                _create(a, name)
                arrived = _arrival(seen, f"imageCaches/{name}", 0.5)
            assert arrived is not None, "replica B never heard of A's commits again"
        finally:
            call.cancel()
    finally:
        listener.stop()
