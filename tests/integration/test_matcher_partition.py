"""The matcher cut off from the registry by a network partition for 30 s (not a clean shutdown:
connections stay open and go silent, new ones hang).

It keeps answering from its index, says how stale it is (the answers, GetIndexStatus, the feed's
health entry), and within seconds of the network healing has caught up with what changed
meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.matcher.index_sync import SyncSettings
from services.matcher.server import FEED_HEALTH_NAME, MatcherApp, MatcherConfig
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import image_cache_pb2 as pb
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc
from tests.support.gated_forwarder import GatedForwarder
from tests.support.registry_harness import Harness

PARTITION_SECONDS = 30.0
CATCH_UP_SECONDS = 10.0


@pytest.fixture
def network(harness: Harness) -> Iterator[GatedForwarder]:
    forwarder = GatedForwarder(("127.0.0.1", harness.server.port))
    forwarder.open()
    try:
        yield forwarder
    finally:
        forwarder.close()


@pytest.fixture
def matcher(network: GatedForwarder) -> Iterator[MatcherApp]:
    app = MatcherApp(
        MatcherConfig(
            registry_target=network.host,
            listen="127.0.0.1:0",
            hit_flush_seconds=0.2,
            status_check_seconds=0.2,
            sync=SyncSettings(
                live_window_seconds=2.0,
                backoff_initial_seconds=0.1,
                backoff_max_seconds=1.0,
                rpc_timeout_seconds=5,
            ),
        )
    )
    app.start(wait_loaded_seconds=10)
    try:
        yield app
    finally:
        app.stop(0)


def _create(harness: Harness, image: str, cache_id: str) -> None:
    cache = pb.ImageCache(images=[image])
    harness.stub.CreateImageCache(api.CreateImageCacheRequest(image_cache=cache, image_cache_id=cache_id))
    harness.settle()


def _until(check: object, *, seconds: float, what: str) -> float:
    started = time.monotonic()
    while not check():  # type: ignore[operator]
        if time.monotonic() - started > seconds:
            pytest.fail(f"timed out after {seconds}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_partitioned_matcher_answers_reports_staleness_and_catches_up(
    harness: Harness, network: GatedForwarder, matcher: MatcherApp
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{matcher.port}") as channel:
        stub = mpb_grpc.MatcherServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def answer(image: str) -> mpb.MatchImageCachesResponse:
            request = mpb.MatchImageCachesRequest(images=[image], validate_only=True)
            return stub.MatchImageCaches(request, timeout=5)

        def feed_serving() -> bool:
            status = health.Check(health_pb2.HealthCheckRequest(service=FEED_HEALTH_NAME), timeout=5).status
            return status == health_pb2.HealthCheckResponse.SERVING

        _create(harness, "nginx:1.25", "imc-0000a001")
        _until(
            lambda: answer("nginx:1.25").image_cache == "imageCaches/imc-0000a001", seconds=10, what="a match"
        )
        _until(feed_serving, seconds=10, what="the feed live")

        network.partition()
        partitioned = time.monotonic()
        # changes the matcher cannot see while cut off
        _create(harness, "redis:7", "imc-0000a002")
        harness.stub.DeleteImageCache(api.DeleteImageCacheRequest(name="imageCaches/imc-0000a001"))
        harness.settle()

        staleness_seen = 0.0
        while time.monotonic() - partitioned < PARTITION_SECONDS:
            got = answer("nginx:1.25")  # from the last known state, every time
            assert got.image_cache == "imageCaches/imc-0000a001"
            assert answer("redis:7").image_cache == ""
            staleness_seen = max(staleness_seen, got.index_staleness.ToNanoseconds() / 1e9)
            time.sleep(1.0)
        assert staleness_seen > PARTITION_SECONDS - 5  # it said how stale, and it kept counting
        status = stub.GetIndexStatus(mpb.GetIndexStatusRequest(), timeout=5)
        assert status.loaded and not status.live and status.staleness.ToNanoseconds() > 0
        assert not feed_serving()

        network.heal()
        caught_up = _until(
            lambda: (
                answer("redis:7").image_cache == "imageCaches/imc-0000a002"
                and answer("nginx:1.25").image_cache == ""
            ),
            seconds=CATCH_UP_SECONDS,
            what="the matcher to catch up",
        )
        assert caught_up < CATCH_UP_SECONDS
        _until(feed_serving, seconds=CATCH_UP_SECONDS, what="the feed live again")
        assert answer("redis:7").index_staleness.ToNanoseconds() == 0
