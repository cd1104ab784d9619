"""The registry API through a real gRPC server, on SQLite and PostgreSQL, with a scripted provider."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2

from services.cache_registry import store
from services.cache_registry.provider import BuildFailure
from snapcache.rpc_errors import error_info, field_violations
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import image_cache_pb2 as pb
from tests.support.registry_harness import Harness

DIGEST = "sha256:" + "a" * 64


def create(h: Harness, *images: str, cache_id: str = "", **fields: object) -> pb.ImageCache:
    cache = pb.ImageCache(images=list(images or ["nginx:1.25"]), **fields)  # type: ignore[arg-type]
    return h.stub.CreateImageCache(api.CreateImageCacheRequest(image_cache=cache, image_cache_id=cache_id))


def get(h: Harness, name: str) -> pb.ImageCache:
    return h.stub.GetImageCache(api.GetImageCacheRequest(name=name))


def rpc_error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_create_returns_creating_then_build_reaches_ready(harness: Harness) -> None:
    created = create(harness, "nginx", "redis:7", display_name="web", labels={"team": "a"})
    assert created.state == pb.ImageCache.CREATING
    assert created.name.startswith("imageCaches/imc-") and len(created.name) == len("imageCaches/imc-") + 8
    assert created.cache_size_gib == 20 and created.platform == "linux/amd64"
    assert created.progress.phase == pb.BuildProgress.QUEUED

    harness.settle()
    ready = get(harness, created.name)
    assert ready.state == pb.ImageCache.READY
    assert [i.normalized_image for i in ready.cached_images] == [
        "docker.io/library/nginx:latest",
        "docker.io/library/redis:7",
    ]
    assert {z.zone: z.state for z in ready.zone_availability} == {
        "zone-a": pb.ZoneAvailability.AVAILABLE,
        "zone-b": pb.ZoneAvailability.AVAILABLE,
    }
    assert ready.snapshot_size_bytes == 1000
    assert ready.HasField("ready_time")
    assert not harness.provider.builders, "the builder disk must be released after the snapshot"
    assert len(harness.provider.snapshots) == 1
    reasons = [
        e.reason
        for e in harness.stub.ListImageCacheEvents(
            api.ListImageCacheEventsRequest(parent=created.name)
        ).events
    ]
    assert reasons[:2] == ["Created", "BuildStarted"]
    assert reasons.count("ImagePulled") == 2
    assert {"SnapshotCreated", "BuilderReleased", "ZoneAvailable"} <= set(reasons)


def test_client_chosen_id_and_duplicate_is_already_exists_without_writing(harness: Harness) -> None:
    first = create(harness, "nginx", cache_id="imc-abcdefgh")
    assert first.name == "imageCaches/imc-abcdefgh"
    error = rpc_error(lambda: create(harness, "redis", cache_id="imc-abcdefgh"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    info = error_info(error)
    assert info is not None and info.reason == "IMAGE_CACHE_EXISTS" and info.domain == "snapcache.io"
    assert list(get(harness, first.name).images) == ["nginx"], "the duplicate must not overwrite"


@pytest.mark.parametrize(
    ("fields", "images", "field"),
    [
        ({"cache_size_gib": -1}, ["nginx"], "image_cache.cache_size_gib"),
        ({"cache_size_gib": 4096}, ["nginx"], "image_cache.cache_size_gib"),
        ({"retention_days": -3}, ["nginx"], "image_cache.retention_days"),
        ({"retention_days": 99999}, ["nginx"], "image_cache.retention_days"),
        ({}, [], "image_cache.images"),
        ({}, ["Nginx:1.0"], "image_cache.images[0]"),
        ({}, ["nginx", "docker.io/library/nginx:latest"], "image_cache.images[1]"),
        ({}, [f"img{i}" for i in range(65)], "image_cache.images"),
        ({"zones": ["nowhere"]}, ["nginx"], "image_cache.zones[0]"),
        ({"platform": "Linux-AMD64"}, ["nginx"], "image_cache.platform"),
        ({"plain_http_registries": ["http://x"]}, ["nginx"], "image_cache.plain_http_registries[0]"),
        ({"labels": {"bad key!": "v"}}, ["nginx"], "image_cache.labels[bad key!]"),
        ({"display_name": "x" * 64}, ["nginx"], "image_cache.display_name"),
        (
            {"registry_credentials": [pb.RegistryCredentialRef(docker_config_path="relative/config.json")]},
            ["nginx"],
            "image_cache.registry_credentials[0].docker_config_path",
        ),
    ],
)
def test_bad_create_is_invalid_argument_with_field_violation_and_writes_nothing(
    harness: Harness, fields: dict[str, object], images: list[str], field: str
) -> None:
    message = pb.ImageCache(images=images, **fields)  # type: ignore[arg-type]
    error = rpc_error(lambda: harness.stub.CreateImageCache(api.CreateImageCacheRequest(image_cache=message)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(error)
    assert info is not None and info.reason == "INVALID_FIELD"
    assert field in [f for f, _ in field_violations(error)]
    with harness.database.transaction(write=False) as session:
        assert store.all_cache_ids(session) == set()
        assert store.current_revision(session) == 0


def test_bad_client_id_is_rejected(harness: Harness) -> None:
    error = rpc_error(lambda: create(harness, "nginx", cache_id="my-cache"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(error)] == ["image_cache_id"]


@pytest.mark.parametrize("name", ["imageCaches/imc-zzzzzzzz", "imc-00000000"])
def test_unknown_id_is_not_found(harness: Harness, name: str) -> None:
    error = rpc_error(lambda: get(harness, name))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(error)
    assert info is not None and info.reason == "IMAGE_CACHE_NOT_FOUND"


def test_malformed_name_is_invalid_argument(harness: Harness) -> None:
    error = rpc_error(lambda: get(harness, "imageCaches/../../etc"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "INVALID_NAME"  # type: ignore[union-attr]


def test_list_pages_with_opaque_tokens_and_filters(harness: Harness) -> None:
    names = [create(harness, f"app{i}:1.0", labels={"tier": "web" if i % 2 else "db"}).name for i in range(7)]
    harness.settle()
    create(harness, "busybox")  # stays CREATING
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = harness.stub.ListImageCaches(api.ListImageCachesRequest(page_size=3, page_token=token))
        assert len(page.image_caches) <= 3
        seen += [c.name for c in page.image_caches]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3 and len(seen) == 8 and seen == sorted(seen)
    assert set(names) <= set(seen)

    ready = harness.stub.ListImageCaches(api.ListImageCachesRequest(filter="state = READY"))
    assert sorted(c.name for c in ready.image_caches) == sorted(names)
    by_image = harness.stub.ListImageCaches(
        api.ListImageCachesRequest(filter='image = "docker.io/library/app3:1.0"')
    )
    assert [c.name for c in by_image.image_caches] == [names[3]]
    combined = harness.stub.ListImageCaches(
        api.ListImageCachesRequest(filter="state = READY AND labels.tier = web")
    )
    assert sorted(c.name for c in combined.image_caches) == sorted(names[1::2])


def test_tampered_or_reused_page_token_is_invalid_argument(harness: Harness) -> None:
    for i in range(3):
        create(harness, f"app{i}")
    page = harness.stub.ListImageCaches(api.ListImageCachesRequest(page_size=1))
    token = page.next_page_token
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    for bad, filter_text in [(tampered, ""), ("!!!notbase64", ""), (token, "state = READY")]:
        error = rpc_error(
            lambda bad=bad, filter_text=filter_text: harness.stub.ListImageCaches(
                api.ListImageCachesRequest(page_size=1, page_token=bad, filter=filter_text)
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(error).reason == "INVALID_PAGE_TOKEN"  # type: ignore[union-attr]


@pytest.mark.parametrize("filter_text", ["state = SLEEPING", "color = red", "state READY", "image = Bad:Ref"])
def test_bad_filter_is_invalid_argument(harness: Harness, filter_text: str) -> None:
    error = rpc_error(lambda: harness.stub.ListImageCaches(api.ListImageCachesRequest(filter=filter_text)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "INVALID_FILTER"  # type: ignore[union-attr]


def test_update_with_field_mask_and_rebuild(harness: Harness) -> None:
    created = create(harness, "nginx:1.25", retention_days=7)
    harness.settle()
    ready = get(harness, created.name)
    renamed = harness.stub.UpdateImageCache(
        api.UpdateImageCacheRequest(
            image_cache=pb.ImageCache(name=created.name, display_name="renamed", images=["ignored"]),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        )
    )
    assert renamed.display_name == "renamed" and list(renamed.images) == ["nginx:1.25"]
    assert renamed.state == pb.ImageCache.READY

    rebuilt = harness.stub.UpdateImageCache(
        api.UpdateImageCacheRequest(
            image_cache=pb.ImageCache(name=created.name, images=["nginx:1.26"], etag=renamed.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["images"]),
        )
    )
    assert rebuilt.state == pb.ImageCache.UPDATING
    harness.settle()
    after = get(harness, created.name)
    assert after.state == pb.ImageCache.READY
    assert [i.normalized_image for i in after.cached_images] == ["docker.io/library/nginx:1.26"]
    assert len(harness.provider.snapshots) == 1, "the previous snapshot is deleted after a rebuild"
    assert after.ready_time.ToDatetime() >= ready.ready_time.ToDatetime()


def test_update_errors(harness: Harness) -> None:
    created = create(harness, "nginx")
    stale_etag = created.etag
    harness.settle()
    mask = field_mask_pb2.FieldMask
    cases = [
        (
            api.UpdateImageCacheRequest(image_cache=pb.ImageCache(name=created.name)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD_MASK",
        ),
        (
            api.UpdateImageCacheRequest(
                image_cache=pb.ImageCache(name=created.name), update_mask=mask(paths=["state"])
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD_MASK",
        ),
        (
            api.UpdateImageCacheRequest(
                image_cache=pb.ImageCache(name=created.name, retention_days=-1),
                update_mask=mask(paths=["retention_days"]),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
        ),
        (
            api.UpdateImageCacheRequest(
                image_cache=pb.ImageCache(name=created.name, display_name="x", etag=stale_etag),
                update_mask=mask(paths=["display_name"]),
            ),
            grpc.StatusCode.ABORTED,
            "ETAG_MISMATCH",
        ),
        (
            api.UpdateImageCacheRequest(
                image_cache=pb.ImageCache(name="imageCaches/imc-nothere0", display_name="x"),
                update_mask=mask(paths=["display_name"]),
            ),
            grpc.StatusCode.NOT_FOUND,
            "IMAGE_CACHE_NOT_FOUND",
        ),
    ]
    before = get(harness, created.name)
    for request, code, reason in cases:
        error = rpc_error(lambda request=request: harness.stub.UpdateImageCache(request))
        assert (error.code(), error_info(error).reason) == (code, reason)  # type: ignore[union-attr]
    assert get(harness, created.name) == before, "a refused update changes nothing"


def test_retention_sets_expire_time_and_expiry_deletes_snapshot(harness: Harness) -> None:
    created = create(harness, "nginx", retention_days=2)
    assert created.expire_time.ToDatetime(tzinfo=UTC) == created.create_time.ToDatetime(
        tzinfo=UTC
    ).replace() + (datetime(2026, 1, 3, tzinfo=UTC) - datetime(2026, 1, 1, tzinfo=UTC))
    harness.settle()
    assert get(harness, created.name).state == pb.ImageCache.READY
    harness.clock.advance(days=2, seconds=1)
    harness.settle()
    expired = get(harness, created.name)
    assert expired.state == pb.ImageCache.EXPIRED
    assert not harness.provider.snapshots and not harness.provider.zone_copies
    error = rpc_error(
        lambda: harness.stub.ProvisionDisk(api.ProvisionDiskRequest(parent=created.name, zone="zone-a"))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_permanent_cache_has_no_expire_time(harness: Harness) -> None:
    assert not create(harness, "nginx").HasField("expire_time")


def test_failed_build_reports_reason_and_cleans_up(harness: Harness) -> None:
    harness.provider.fail_pull = BuildFailure("IMAGE_NOT_FOUND", "image docker.io/library/nope:1 not found")
    created = create(harness, "nope:1")
    harness.settle()
    failed = get(harness, created.name)
    assert failed.state == pb.ImageCache.FAILED
    assert failed.state_reason == "IMAGE_NOT_FOUND" and "not found" in failed.state_message
    assert not harness.provider.builders and not harness.provider.snapshots
    events = harness.stub.ListImageCacheEvents(api.ListImageCacheEventsRequest(parent=created.name)).events
    assert events[-1].reason == "BuildFailed" and events[-1].type == pb.ImageCacheEvent.WARNING

    # failed caches are removed after the clean-up delay (24 h)
    harness.clock.advance(hours=25)
    harness.worker.housekeeping()
    assert rpc_error(lambda: get(harness, created.name)).code() == grpc.StatusCode.NOT_FOUND


def test_transient_failure_retries_with_backoff_then_fails(harness: Harness) -> None:
    harness.provider.fail_pull = BuildFailure("REGISTRY_UNREACHABLE", "registry down", retryable=True)
    created = create(harness, "nginx")
    harness.settle()
    cache = get(harness, created.name)
    assert cache.state == pb.ImageCache.CREATING and cache.progress.attempt == 1
    assert len(harness.provider.builders) == 1, "kept for resuming"
    harness.clock.advance(seconds=5)
    harness.settle()
    harness.clock.advance(seconds=10)
    harness.settle()
    cache = get(harness, created.name)
    assert cache.state == pb.ImageCache.FAILED and cache.state_reason == "REGISTRY_UNREACHABLE"
    assert cache.progress.attempt == 3 and len(harness.provider.pulls) == 3
    assert not harness.provider.builders


def test_transient_failure_then_success_resumes(harness: Harness) -> None:
    harness.provider.fail_pull = BuildFailure("REGISTRY_UNREACHABLE", "registry down", retryable=True)
    created = create(harness, "nginx")
    harness.settle()
    harness.provider.fail_pull = None
    harness.clock.advance(seconds=5)
    harness.settle()
    assert get(harness, created.name).state == pb.ImageCache.READY
    assert len(set(harness.provider.pulls)) == 1, "the retry uses the same builder disk"


def test_provision_and_release_disks(harness: Harness) -> None:
    created = create(harness, "nginx")
    error = rpc_error(
        lambda: harness.stub.ProvisionDisk(api.ProvisionDiskRequest(parent=created.name, zone="zone-a"))
    )
    assert (error.code(), error_info(error).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "IMAGE_CACHE_NOT_READY",
    )  # type: ignore[union-attr]
    harness.settle()
    disk = harness.stub.ProvisionDisk(
        api.ProvisionDiskRequest(parent=created.name, zone="zone-a", disk_id="node-1", holder="node-1")
    )
    assert disk.name == f"{created.name}/disks/node-1" and disk.zone == "zone-a"
    again = harness.stub.ProvisionDisk(
        api.ProvisionDiskRequest(parent=created.name, zone="zone-a", disk_id="node-1")
    )
    assert again.name == disk.name and len(harness.provider.disks) == 1, "idempotent per disk id"
    assert get(harness, created.name).disk_count == 1
    assert [d.name for d in harness.stub.ListDisks(api.ListDisksRequest(parent=created.name)).disks] == [
        disk.name
    ]

    error = rpc_error(
        lambda: harness.stub.ProvisionDisk(api.ProvisionDiskRequest(parent=created.name, zone="zone-x"))
    )
    assert error_info(error).reason == "SNAPSHOT_NOT_IN_ZONE"  # type: ignore[union-attr]

    error = rpc_error(lambda: harness.stub.DeleteImageCache(api.DeleteImageCacheRequest(name=created.name)))
    assert (error.code(), error_info(error).reason) == (grpc.StatusCode.FAILED_PRECONDITION, "DISKS_IN_USE")  # type: ignore[union-attr]

    assert harness.stub.ReleaseDisk(api.ReleaseDiskRequest(name=disk.name)).released
    assert not harness.stub.ReleaseDisk(api.ReleaseDiskRequest(name=disk.name)).released
    assert not harness.provider.disks and get(harness, created.name).disk_count == 0


def test_zone_capacity_exhausted_leaks_nothing(harness: Harness) -> None:
    harness.provider.max_disks = 1
    created = create(harness, "nginx")
    harness.settle()
    harness.stub.ProvisionDisk(api.ProvisionDiskRequest(parent=created.name, zone="zone-a", disk_id="d1"))
    error = rpc_error(
        lambda: harness.stub.ProvisionDisk(
            api.ProvisionDiskRequest(parent=created.name, zone="zone-a", disk_id="d2")
        )
    )
    assert (error.code(), error_info(error).reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "ZONE_CAPACITY_EXHAUSTED",
    )  # type: ignore[union-attr]
    assert set(harness.provider.disks) == {"d1"}
    assert get(harness, created.name).disk_count == 1


def test_zone_copy_failure_marks_zone_unavailable(harness: Harness) -> None:
    harness.provider.fail_zone["zone-b"] = "zone storage is full"
    created = create(harness, "nginx")
    harness.settle()
    zones = {z.zone: z for z in get(harness, created.name).zone_availability}
    assert zones["zone-a"].state == pb.ZoneAvailability.AVAILABLE
    assert zones["zone-b"].state == pb.ZoneAvailability.UNAVAILABLE and "full" in zones["zone-b"].message


def test_delete_removes_snapshot_disks_and_record(harness: Harness) -> None:
    created = create(harness, "nginx")
    harness.settle()
    harness.stub.ProvisionDisk(api.ProvisionDiskRequest(parent=created.name, zone="zone-a", disk_id="d1"))
    deleting = harness.stub.DeleteImageCache(api.DeleteImageCacheRequest(name=created.name, force=True))
    assert deleting.state == pb.ImageCache.DELETING
    harness.settle()
    assert rpc_error(lambda: get(harness, created.name)).code() == grpc.StatusCode.NOT_FOUND
    assert not harness.provider.snapshots and not harness.provider.disks and not harness.provider.zone_copies


def test_delete_during_build_discards_the_build(harness: Harness) -> None:
    gate = threading.Event()
    harness.provider.pull_gate = gate
    created = create(harness, "nginx")
    harness.worker.run_once()  # the build starts and blocks in pull
    harness.stub.DeleteImageCache(api.DeleteImageCacheRequest(name=created.name))
    gate.set()
    harness.settle()
    assert rpc_error(lambda: get(harness, created.name)).code() == grpc.StatusCode.NOT_FOUND
    assert not harness.provider.builders and not harness.provider.snapshots


def test_report_matches_counts_hits(harness: Harness) -> None:
    created = create(harness, "nginx")
    when = timestamp_pb2.Timestamp(seconds=1_800_000_000)
    answer = harness.stub.ReportMatches(
        api.ReportMatchesRequest(
            matches=[
                api.MatchReport(name=created.name, count=3, last_matched_time=when),
                api.MatchReport(name=created.name, count=2),
                api.MatchReport(name="imageCaches/imc-gone0000", count=1),
            ]
        )
    )
    assert (answer.applied, answer.unknown) == (1, 1)
    cache = get(harness, created.name)
    assert cache.match_count == 5 and cache.HasField("last_matched_time")
    error = rpc_error(
        lambda: harness.stub.ReportMatches(
            api.ReportMatchesRequest(matches=[api.MatchReport(name=created.name, count=0)])
        )
    )
    assert [f for f, _ in field_violations(error)] == ["matches[0].count"]


def test_watch_streams_changes_in_revision_order_and_resumes(harness: Harness) -> None:
    first = create(harness, "nginx")
    stream = harness.stub.WatchImageCaches(api.WatchImageCachesRequest(start_revision=0), timeout=10)
    initial = next(stream)
    assert initial.type == api.WatchImageCachesResponse.UPSERT and initial.image_cache.name == first.name
    marker = next(stream)
    assert marker.type == api.WatchImageCachesResponse.PROGRESS
    harness.settle()
    with harness.database.transaction(write=False) as session:
        settled = store.current_revision(session)
    revisions: list[int] = []
    states: list[int] = []
    # Heartbeats (PROGRESS) may come between changes while the build runs: read up to the
    # revision the settled build reached, not up to the first heartbeat.
    for message in stream:
        if message.type != api.WatchImageCachesResponse.PROGRESS:
            revisions.append(message.revision)
            states.append(message.image_cache.state)
        if message.revision >= settled:
            break
    stream.cancel()
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    assert states[-1] == pb.ImageCache.READY

    # resume from the middle: exactly the later changes come again
    middle = revisions[len(revisions) // 2]
    resumed = harness.stub.WatchImageCaches(api.WatchImageCachesRequest(start_revision=middle), timeout=10)
    again = []
    for message in resumed:
        if message.type == api.WatchImageCachesResponse.PROGRESS:
            break
        again.append(message.revision)
    resumed.cancel()
    assert again == [r for r in revisions if r > middle]


def test_watch_delete_and_name_filter(harness: Harness) -> None:
    a = create(harness, "nginx")
    b = create(harness, "redis")
    with harness.database.transaction(write=False) as session:
        start = store.current_revision(session)
    stream = harness.stub.WatchImageCaches(
        api.WatchImageCachesRequest(start_revision=start, name=b.name), timeout=10
    )
    harness.stub.DeleteImageCache(api.DeleteImageCacheRequest(name=a.name))
    harness.stub.DeleteImageCache(api.DeleteImageCacheRequest(name=b.name))
    harness.settle()
    seen = []
    for message in stream:
        if message.type == api.WatchImageCachesResponse.DELETE:
            seen.append(message.image_cache.name)
            break
        if message.type == api.WatchImageCachesResponse.UPSERT:
            assert message.image_cache.name == b.name
    stream.cancel()
    assert seen == [b.name]


def test_watch_compacted_revision_is_out_of_range(harness: Harness) -> None:
    for i in range(5):
        create(harness, f"app{i}")
    with harness.database.transaction() as session:
        store.compact_changes(session, keep=2)
    stream = harness.stub.WatchImageCaches(api.WatchImageCachesRequest(start_revision=1), timeout=5)
    error = rpc_error(lambda: next(stream))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error_info(error).reason == "REVISION_COMPACTED"  # type: ignore[union-attr]


def test_list_revision_plus_watch_misses_nothing(harness: Harness) -> None:
    create(harness, "nginx")
    page = harness.stub.ListImageCaches(api.ListImageCachesRequest())
    late = create(harness, "redis")
    stream = harness.stub.WatchImageCaches(
        api.WatchImageCachesRequest(start_revision=page.revision), timeout=5
    )
    message = next(stream)
    stream.cancel()
    assert message.image_cache.name == late.name and message.revision > page.revision


def test_startup_reconcile_removes_orphans_and_keeps_live_work(harness: Harness) -> None:
    ready = create(harness, "nginx")
    harness.settle()
    building = create(harness, "redis")  # stays CREATING: its builder disk is live work
    cache = harness.registry.get(name=building.name)
    live_builder = f"{cache.cache_id}-{cache.build_id}"
    provider = harness.provider
    provider.builders |= {live_builder, "imc-gone0000-dead"}
    provider.snapshots.add("snap-orphan")
    provider.zone_copies |= {("snap-orphan", "zone-a")}
    provider.disks["disk-orphan"] = ("snap-orphan", "zone-a")
    kept_snapshot = harness.registry.get(name=ready.name).snapshot_id

    harness.worker.reconcile(startup=True)

    assert provider.builders == {live_builder}
    assert provider.snapshots == {kept_snapshot}
    assert ("snap-orphan", "zone-a") not in provider.zone_copies
    assert "disk-orphan" not in provider.disks
    assert {c for c in provider.zone_copies if c[0] == kept_snapshot} == {
        (kept_snapshot, "zone-a"),
        (kept_snapshot, "zone-b"),
    }


def test_a_lost_zone_copy_is_copied_again_or_marked_unavailable(harness: Harness) -> None:
    created = create(harness, "nginx")
    harness.settle()
    snapshot = harness.registry.get(name=created.name).snapshot_id
    provider = harness.provider
    provider.zone_copies.discard((snapshot, "zone-a"))  # the zone's storage lost its copy

    harness.worker.reconcile(startup=False)  # seen once: may be a copy in flight, left alone
    assert {z.zone: z.state for z in get(harness, created.name).zone_availability}["zone-a"] == (
        pb.ZoneAvailability.AVAILABLE
    )
    harness.worker.reconcile(startup=True)  # acted on (as after the grace period)
    zones = {z.zone: z for z in get(harness, created.name).zone_availability}
    assert zones["zone-a"].state == pb.ZoneAvailability.HYDRATING and "lost" in zones["zone-a"].message
    harness.settle()
    assert (snapshot, "zone-a") in provider.zone_copies
    again = get(harness, created.name)
    assert {z.zone: z.state for z in again.zone_availability} == {
        "zone-a": pb.ZoneAvailability.AVAILABLE,
        "zone-b": pb.ZoneAvailability.AVAILABLE,
    }
    reasons = [
        e.reason
        for e in harness.stub.ListImageCacheEvents(
            api.ListImageCacheEventsRequest(parent=created.name)
        ).events
    ]
    assert reasons[-2:] == ["ZoneLost", "ZoneAvailable"]

    # lost again, and this time the zone cannot take a copy: UNAVAILABLE with the reason
    provider.zone_copies.discard((snapshot, "zone-b"))
    provider.fail_zone["zone-b"] = "zone-b's storage is read-only"
    harness.worker.reconcile(startup=True)
    harness.settle()
    zones = {z.zone: z for z in get(harness, created.name).zone_availability}
    assert zones["zone-b"].state == pb.ZoneAvailability.UNAVAILABLE
    assert zones["zone-b"].message == "zone-b's storage is read-only"
    assert get(harness, created.name).state == pb.ImageCache.READY


def test_a_provider_that_lost_sight_of_most_copies_is_not_trusted(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    names = [create(harness, f"app{i}:1").name for i in range(5)]  # 10 zone copies
    harness.settle()
    harness.provider.zone_copies.clear()  # e.g. the zones' storage is not mounted
    harness.worker.reconcile(startup=True)
    for name in names:
        assert {z.state for z in get(harness, name).zone_availability} == {pb.ZoneAvailability.AVAILABLE}
    assert "holds none of 10 of 10 zone copies" in caplog.text


def test_periodic_reconcile_waits_for_a_grace_period(harness: Harness) -> None:
    harness.provider.disks["disk-in-flight"] = ("snap-x", "zone-a")
    harness.worker.reconcile(startup=False)
    assert "disk-in-flight" in harness.provider.disks, (
        "a provision in flight must not be removed at first sight"
    )
