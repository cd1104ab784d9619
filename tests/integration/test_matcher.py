"""The matcher against a real registry over gRPC: load, follow the feed, survive restarts, report hits.

The registry runs on a fresh database per test (SQLite and PostgreSQL) with the scripted provider;
the matcher is the real `MatcherApp`, following the registry over the wire as in production.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cache_registry import store
from services.cache_registry.model import CacheSpec
from services.matcher.index_sync import SyncSettings
from services.matcher.server import FEED_HEALTH_NAME, MatcherApp, MatcherConfig
from services.matcher.servicer import SERVICE_NAME
from snapcache.grpc_server import ServiceBinding, create_server
from snapcache.rpc_errors import error_info, field_violations
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc
from tests.support.registry_harness import Harness

WAIT_SECONDS = 10.0


@pytest.fixture
def matcher(harness: Harness) -> Iterator[MatcherApp]:
    app = MatcherApp(
        MatcherConfig(
            registry_target=f"127.0.0.1:{harness.server.port}",
            listen="127.0.0.1:0",
            hit_flush_seconds=0.1,
            metrics_listen="127.0.0.1:0",
            status_check_seconds=0.1,
            sync=SyncSettings(live_window_seconds=1.0, backoff_initial_seconds=0.05, backoff_max_seconds=0.2),
        )
    )
    app.start(wait_loaded_seconds=WAIT_SECONDS)
    try:
        yield app
    finally:
        app.stop(0)


@pytest.fixture
def stub(matcher: MatcherApp) -> Iterator[mpb_grpc.MatcherServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{matcher.port}") as channel:
        yield mpb_grpc.MatcherServiceStub(channel)


def create(h: Harness, *images: str, cache_id: str, **fields: object) -> pb.ImageCache:
    cache = pb.ImageCache(images=list(images), **fields)  # type: ignore[arg-type]
    return h.stub.CreateImageCache(api.CreateImageCacheRequest(image_cache=cache, image_cache_id=cache_id))


def ask(stub: mpb_grpc.MatcherServiceStub, *images: str, **fields: object) -> mpb.MatchImageCachesResponse:
    request = mpb.MatchImageCachesRequest(images=list(images), **fields)  # type: ignore[arg-type]
    return stub.MatchImageCaches(request, timeout=5)


def eventually(check: Callable[[], object], *, what: str) -> None:
    """Poll ``check`` until it returns a true value; fail with ``what`` after WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})")


def chosen(stub: mpb_grpc.MatcherServiceStub, *images: str, **fields: object) -> str:
    return ask(stub, *images, validate_only=True, **fields).image_cache


def test_answers_follow_the_registry_ready_deleted_and_expired(
    harness: Harness, stub: mpb_grpc.MatcherServiceStub
) -> None:
    create(harness, "nginx:1.25", "redis:7", cache_id="imc-00000001", cache_size_gib=30)
    building = ask(stub, "nginx:1.25", validate_only=True)
    eventually(lambda: ask(stub, "nginx:1.25", validate_only=True).rejections, what="the CREATING cache")
    building = ask(stub, "nginx:1.25", validate_only=True)
    assert building.decision == mpb.MatchImageCachesResponse.NO_MATCH
    assert building.action == mpb.MatchImageCachesResponse.PULL_IMAGES
    [rejection] = building.rejections
    assert rejection.reason == mpb.Rejection.NOT_READY and rejection.state == pb.ImageCache.CREATING

    harness.settle()
    eventually(lambda: chosen(stub, "nginx:1.25") == "imageCaches/imc-00000001", what="READY to be matched")
    answer = ask(stub, "docker.io/library/nginx:1.25", "redis:7", validate_only=True)
    assert answer.decision == mpb.MatchImageCachesResponse.MATCHED
    assert answer.action == mpb.MatchImageCachesResponse.USE_CACHE
    [candidate] = answer.candidates
    assert [c.cached_image for c in candidate.covered_images] == [
        "docker.io/library/nginx:1.25",
        "docker.io/library/redis:7",
    ]
    assert all(c.compressed_bytes == 100 and c.uncompressed_bytes == 250 for c in candidate.covered_images)
    assert list(candidate.available_zones) == ["zone-a", "zone-b"]
    assert answer.normalized_images == ["docker.io/library/nginx:1.25", "docker.io/library/redis:7"]

    # a smaller cache with the same images wins (TKE: smaller first)
    create(harness, "nginx:1.25", cache_id="imc-00000002", cache_size_gib=10)
    harness.settle()
    eventually(lambda: chosen(stub, "nginx:1.25") == "imageCaches/imc-00000002", what="the smaller cache")

    # a cache with a retention of one day, created on the registry's (manual) clock long ago
    create(harness, "nginx:1.25", cache_id="imc-00000003", cache_size_gib=5, retention_days=1)
    harness.settle()
    eventually(
        lambda: (
            any(r.image_cache == "imageCaches/imc-00000003" for r in ask(stub, "nginx:1.25").rejections)
            or "imageCaches/imc-00000003" in [c.image_cache for c in ask(stub, "nginx:1.25").candidates]
        ),
        what="the short-lived cache",
    )
    expired = ask(stub, "nginx:1.25", validate_only=True, max_rejections=100)
    assert expired.image_cache == "imageCaches/imc-00000002"
    assert {r.image_cache: r.reason for r in expired.rejections}.get("imageCaches/imc-00000003") == (
        mpb.Rejection.EXPIRED
    )

    harness.stub.DeleteImageCache(api.DeleteImageCacheRequest(name="imageCaches/imc-00000002"))
    harness.settle()
    eventually(lambda: chosen(stub, "nginx:1.25") == "imageCaches/imc-00000001", what="the delete")


def test_a_zone_that_is_lost_stops_matching_in_that_zone(
    harness: Harness, stub: mpb_grpc.MatcherServiceStub
) -> None:
    harness.provider.fail_zone["zone-b"] = "zone-b's storage is full"
    create(harness, "nginx:1.25", cache_id="imc-00000001")
    harness.settle()
    eventually(lambda: chosen(stub, "nginx:1.25", zones=["zone-a"]), what="READY in zone-a")
    in_b = ask(stub, "nginx:1.25", zones=["zone-b"], validate_only=True)
    assert in_b.decision == mpb.MatchImageCachesResponse.NO_MATCH
    assert in_b.rejections[0].reason == mpb.Rejection.NOT_AVAILABLE_IN_ZONES
    either = ask(stub, "nginx:1.25", zones=["zone-a", "zone-b"], validate_only=True)
    assert list(either.candidates[0].available_zones) == ["zone-a"]


def test_a_zone_lost_after_ready_stops_matching_there(
    harness: Harness, stub: mpb_grpc.MatcherServiceStub
) -> None:
    create(harness, "nginx:1.25", cache_id="imc-00000001")
    harness.settle()
    eventually(lambda: chosen(stub, "nginx:1.25", zones=["zone-b"]), what="READY in zone-b")
    snapshot = harness.registry.get(name="imageCaches/imc-00000001").snapshot_id
    harness.provider.zone_copies.discard((snapshot, "zone-b"))
    harness.provider.fail_zone["zone-b"] = "zone-b's disks are gone"
    harness.worker.reconcile(startup=True)
    harness.settle()
    eventually(lambda: not chosen(stub, "nginx:1.25", zones=["zone-b"]), what="zone-b lost")
    lost = ask(stub, "nginx:1.25", zones=["zone-b"], validate_only=True)
    assert lost.rejections[0].reason == mpb.Rejection.NOT_AVAILABLE_IN_ZONES
    assert chosen(stub, "nginx:1.25", zones=["zone-a"]) == "imageCaches/imc-00000001"


def test_manual_match_and_strict(harness: Harness, stub: mpb_grpc.MatcherServiceStub) -> None:
    create(harness, "busybox:1", cache_id="imc-00000001")
    harness.settle()
    eventually(lambda: chosen(stub, "busybox:1"), what="READY")
    manual = ask(stub, "nginx:1.25", image_cache="imc-00000001", validate_only=True)
    assert manual.decision == mpb.MatchImageCachesResponse.MATCHED  # TKE: the named cache, as asked
    assert manual.image_cache == "imageCaches/imc-00000001"
    missing = ask(stub, "nginx:1.25", image_cache="imageCaches/imc-0000000z", strict=True)
    assert missing.decision == mpb.MatchImageCachesResponse.MANUAL_NOT_FOUND
    assert missing.action == mpb.MatchImageCachesResponse.REJECT
    assert "does not exist" in missing.message


def test_hits_reach_the_registry_batched_and_previews_do_not_count(
    harness: Harness, stub: mpb_grpc.MatcherServiceStub
) -> None:
    create(harness, "nginx:1.25", cache_id="imc-00000001")
    harness.settle()
    eventually(lambda: chosen(stub, "nginx:1.25"), what="READY")
    for _ in range(3):
        ask(stub, "nginx:1.25", validate_only=True)
    for _ in range(5):
        assert ask(stub, "nginx:1.25").decision == mpb.MatchImageCachesResponse.MATCHED

    def count() -> int:
        return harness.stub.GetImageCache(
            api.GetImageCacheRequest(name="imageCaches/imc-00000001")
        ).match_count

    eventually(lambda: count() == 5, what="5 hits in the registry")
    cache = harness.stub.GetImageCache(api.GetImageCacheRequest(name="imageCaches/imc-00000001"))
    assert cache.HasField("last_matched_time")
    time.sleep(0.3)  # several flush periods: nothing more arrives
    assert count() == 5


def test_registry_restart_does_not_interrupt_matching_and_the_index_catches_up(
    harness: Harness, matcher: MatcherApp, stub: mpb_grpc.MatcherServiceStub
) -> None:
    create(harness, "nginx:1.25", cache_id="imc-00000001")
    harness.settle()
    eventually(lambda: chosen(stub, "nginx:1.25"), what="READY")
    port = harness.server.port
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{matcher.port}"))

    def serving(name: str) -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=name)).status

    # the watchdog publishes the feed's health every status_check_seconds
    eventually(lambda: serving(FEED_HEALTH_NAME) == health_pb2.HealthCheckResponse.SERVING, what="feed live")

    harness.server.stop(0)
    # while the registry is down, answers keep coming from the last known state
    for _ in range(20):
        assert chosen(stub, "nginx:1.25") == "imageCaches/imc-00000001"
    eventually(lambda: ask(stub, "nginx:1.25").index_staleness.ToNanoseconds() > 0, what="staleness")
    status = stub.GetIndexStatus(mpb.GetIndexStatusRequest())
    assert status.loaded and not status.live and status.last_error
    assert serving(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    eventually(lambda: serving(FEED_HEALTH_NAME) == not_serving, what="feed health NOT_SERVING")
    staleness = _metric(matcher, "snapcache_matcher_index_staleness_seconds")
    assert staleness > 0

    # changes made while it was down (through the service, the gRPC server being gone)
    harness.registry.create(spec=_spec("redis:7"), cache_id="imc-00000002")
    harness.settle()
    harness.registry.delete(name="imageCaches/imc-00000001")
    harness.settle()

    harness.server = _serve_again(harness, port)
    eventually(lambda: chosen(stub, "redis:7") == "imageCaches/imc-00000002", what="catching up")
    eventually(lambda: chosen(stub, "nginx:1.25") == "", what="the delete made while down")
    eventually(lambda: stub.GetIndexStatus(mpb.GetIndexStatusRequest()).live, what="the feed live again")
    assert stub.GetIndexStatus(mpb.GetIndexStatusRequest()).full_syncs == 1  # resumed, not reloaded
    eventually(
        lambda: serving(FEED_HEALTH_NAME) == health_pb2.HealthCheckResponse.SERVING, what="feed health"
    )


def test_a_compacted_feed_means_a_full_resync(
    harness: Harness, matcher: MatcherApp, stub: mpb_grpc.MatcherServiceStub
) -> None:
    create(harness, "nginx:1.25", cache_id="imc-00000001")
    harness.settle()
    eventually(lambda: chosen(stub, "nginx:1.25"), what="READY")
    port = harness.server.port
    harness.server.stop(0)
    harness.registry.create(spec=_spec("redis:7"), cache_id="imc-00000002")
    harness.settle()
    with harness.database.transaction() as session:
        assert store.compact_changes(session, keep=1) > 0
    harness.server = _serve_again(harness, port)
    eventually(lambda: chosen(stub, "redis:7") == "imageCaches/imc-00000002", what="the resync")
    status = stub.GetIndexStatus(mpb.GetIndexStatusRequest())
    assert status.full_syncs == 2 and status.cache_count == 2


def test_bad_requests_get_codes_reasons_and_field_violations(stub: mpb_grpc.MatcherServiceStub) -> None:
    cases = [
        (mpb.MatchImageCachesRequest(), ["images"]),
        (mpb.MatchImageCachesRequest(images=["nginx"] * 65), ["images"]),
        (mpb.MatchImageCachesRequest(images=["nginx", "Bad:Ref"]), ["images[1]"]),
        (mpb.MatchImageCachesRequest(images=["nginx"], image_cache="cache-1"), ["image_cache"]),
        (mpb.MatchImageCachesRequest(images=["nginx"], policy=7), ["policy"]),  # type: ignore[arg-type]
    ]
    for request, fields in cases:
        with pytest.raises(grpc.RpcError) as caught:
            stub.MatchImageCaches(request, timeout=5)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(caught.value)
        assert info is not None and info.reason == "INVALID_MATCH_REQUEST" and info.domain == "snapcache.io"
        assert [f for f, _ in field_violations(caught.value)] == fields


def test_before_the_first_load_matches_are_unavailable() -> None:
    app = MatcherApp(MatcherConfig(registry_target="127.0.0.1:1", listen="127.0.0.1:0"))
    app.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            with pytest.raises(grpc.RpcError) as caught:
                mpb_grpc.MatcherServiceStub(channel).MatchImageCaches(
                    mpb.MatchImageCachesRequest(images=["nginx"]), timeout=5
                )
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            info = error_info(caught.value)
            assert info is not None and info.reason == "INDEX_NOT_LOADED"
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        app.stop(0)


def _spec(*images: str) -> CacheSpec:
    return CacheSpec(images=images, cache_size_gib=20, retention_days=0)


def _serve_again(harness: Harness, port: int) -> object:
    from services.cache_registry.servicer import SERVICE_NAME as REGISTRY_SERVICE
    from services.cache_registry.servicer import CacheRegistryServicer

    return create_server(
        f"127.0.0.1:{port}",
        [
            ServiceBinding(
                REGISTRY_SERVICE,
                api_grpc.add_CacheRegistryServiceServicer_to_server,
                CacheRegistryServicer(harness.registry),
            )
        ],
        max_workers=8,
    )


def _metric(app: MatcherApp, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")
