"""The local provider against a real registry: pull, snapshot, zones, disks, resume, GC (all e2e)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.cache_registry.local_provider import (
    _HOST,
    REF_NAME_ANNOTATION,
    LocalProvider,
    LocalProviderConfig,
    LocalZone,
)
from services.cache_registry.provider import (
    BuildFailure,
    Inventory,
    Platform,
    PulledImage,
    PullProgress,
)
from snapcache.demo.oci_images import BuiltImage, ImageSpec, LayerSpec, build_image, push_image
from snapcache.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ResourceExhausted
from snapcache.images import ImageReference
from tests.support.oci_fixtures import OciRegistry, PushedImages

pytestmark = pytest.mark.e2e

GiB = 1024**3
MiB = 1024**2
_ACCESS = re.compile(
    r'"GET /v2/(?P<repo>[^ ]+)/blobs/(?P<digest>sha256:[0-9a-f]{64}) HTTP/1\.1" (?P<status>\d+) '
)


@pytest.fixture
def provider(tmp_path: Path) -> LocalProvider:
    """Zone ``a`` holds at most 2 disks; zone ``b`` is unlimited and stored outside the root."""
    return LocalProvider(
        LocalProviderConfig(
            root=tmp_path / "provider",
            zones=[
                LocalZone("a", max_disks=2),
                LocalZone("b", max_disks=0, root=tmp_path / "elsewhere" / "b"),
            ],
            pull_concurrency=4,
        )
    )


@dataclass
class Recorder:
    """Progress reports as the provider sent them."""

    reports: list[PullProgress]

    def __call__(self, progress: PullProgress) -> None:
        self.reports.append(progress)


def _pull(
    provider: LocalProvider,
    registry: OciRegistry,
    images: list[ImageReference],
    *,
    disk_id: str = "builder-1",
    capacity_bytes: int = GiB,
    platform: Platform | None = None,
    recorder: Recorder | None = None,
) -> list[PulledImage]:
    provider.create_builder_disk(disk_id=disk_id, capacity_bytes=capacity_bytes)
    return provider.pull_images(
        disk_id=disk_id,
        images=images,
        options=registry.pull_options(platform=platform),
        capacity_bytes=capacity_bytes,
        on_progress=recorder or Recorder([]),
        cancelled=lambda: False,
    )


def _skopeo_digest(layout: Path, reference: ImageReference) -> str:
    result = subprocess.run(
        ["skopeo", "inspect", f"oci:{layout}:{reference}"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    digest: str = json.loads(result.stdout)["Digest"]
    return digest


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _blob_gets(registry: OciRegistry, since: int) -> list[tuple[str, str]]:
    """(digest, status) of every blob GET in the registry's access log after byte ``since``."""
    text = registry.server.log_path.read_bytes()[since:].decode(errors="replace")
    return [(m["digest"], m["status"]) for m in _ACCESS.finditer(text)]


def test_pull_snapshot_provision_readable_by_skopeo(
    provider: LocalProvider, pushed_images: PushedImages, oci_registry: OciRegistry
) -> None:
    web, base = pushed_images.web, pushed_images.base
    pinned = oci_registry.reference("demo/worker", digest=pushed_images.worker.digest)
    images = [web.reference, base.reference, pinned, web.reference]  # duplicates are answered in order
    recorder = Recorder([])
    pulled = _pull(provider, oci_registry, images, recorder=recorder)

    assert [p.reference for p in pulled] == images
    assert [p.manifest_digest for p in pulled] == [
        web.digest,
        base.manifest_digest(Platform("linux", "amd64")),
        pushed_images.worker.digest,
        web.digest,
    ]
    assert [p.index_digest for p in pulled] == ["", base.digest, "", ""]
    assert pulled[0].layer_count == 3
    assert pulled[0].compressed_bytes == web.image.compressed_bytes
    assert pulled[0].uncompressed_bytes == web.image.uncompressed_bytes
    assert pulled[1].platform == Platform("linux", "amd64")
    assert [p.layer_diffs for p in pulled] == ["stored"] * 4  # extra blobs: skopeo reads on, below

    done = [r.bytes_done for r in recorder.reports]
    assert done == sorted(done)  # monotonic
    assert recorder.reports[-1].bytes_done == recorder.reports[-1].bytes_total > 0

    builder = provider.root / "builders" / "builder-1"
    index = json.loads((builder / "index.json").read_text())
    assert [m["annotations"][REF_NAME_ANNOTATION] for m in index["manifests"]] == [str(r) for r in images[:3]]
    assert _blob(builder, base.digest).is_file()  # the index blob is kept too

    snapshot = provider.create_snapshot(disk_id="builder-1", snapshot_id="snap-1")
    provider.hydrate_zone(snapshot_id="snap-1", zone="b")
    disk = provider.provision_disk(snapshot_id="snap-1", zone="b", disk_id="disk-1")
    assert disk.location == str(provider.root.parent / "elsewhere" / "b" / "disks" / "disk-1")
    assert (disk.disk_id, disk.snapshot_id, disk.zone) == ("disk-1", "snap-1", "b")
    layouts = [builder, provider.root / "snapshots" / "snap-1", Path(disk.location)]
    for layout in layouts:
        for reference, image in zip(images, pulled, strict=True):
            assert _skopeo_digest(layout, reference) == image.manifest_digest
    blob_count = len(list((provider.root / "snapshots" / "snap-1" / "blobs" / "sha256").iterdir()))
    assert snapshot.blob_count == blob_count
    assert snapshot.size_bytes == sum(p.stat().st_size for p in _blob(builder, web.digest).parent.iterdir())


def test_pull_index_for_arm64(
    provider: LocalProvider, pushed_images: PushedImages, oci_registry: OciRegistry
) -> None:
    base = pushed_images.base
    (pulled,) = _pull(provider, oci_registry, [base.reference], platform=Platform("linux", "arm64"))
    assert pulled.manifest_digest == base.manifest_digest(Platform("linux", "arm64", "v8"))
    assert pulled.platform == Platform("linux", "arm64", "v8")
    assert pulled.index_digest == base.digest


def test_private_registry_pull(
    provider: LocalProvider, pushed_images: PushedImages, private_oci_registry: OciRegistry
) -> None:
    (pulled,) = _pull(provider, private_oci_registry, [pushed_images.private.reference])
    assert pulled.manifest_digest == pushed_images.private.digest


def test_snapshot_and_provision_copy_no_bytes(
    provider: LocalProvider, pushed_images: PushedImages, oci_registry: OciRegistry
) -> None:
    web = pushed_images.web
    _pull(provider, oci_registry, [web.reference])
    builder = provider.root / "builders" / "builder-1"
    before = {p.name: p.stat().st_ino for p in (builder / "blobs" / "sha256").iterdir()}
    provider.create_snapshot(disk_id="builder-1", snapshot_id="snap-1")
    snapshot = provider.root / "snapshots" / "snap-1"
    for name, inode in before.items():
        stat = (snapshot / "blobs" / "sha256" / name).stat()
        assert stat.st_ino == inode  # the builder's file itself: nothing copied
        assert stat.st_mode & 0o777 == 0o444
        assert (provider.root / "cas" / "sha256" / name).stat().st_ino == inode

    provider.hydrate_zone(snapshot_id="snap-1", zone="a")
    zone_copy = provider.root / "zones" / "a" / "snapshots" / "snap-1"
    disk = Path(provider.provision_disk(snapshot_id="snap-1", zone="a", disk_id="disk-1").location)
    for name, inode in before.items():
        zone_inode = (zone_copy / "blobs" / "sha256" / name).stat().st_ino
        assert zone_inode != inode  # hydration is a real copy into the zone's storage
        assert (disk / "blobs" / "sha256" / name).stat().st_ino == zone_inode  # the disk is not
    assert provider.provision_disk(snapshot_id="snap-1", zone="a", disk_id="disk-1").location == str(disk)


def test_two_snapshots_share_one_inode_per_shared_layer(
    provider: LocalProvider, pushed_images: PushedImages, oci_registry: OciRegistry
) -> None:
    web, worker = pushed_images.web, pushed_images.worker
    shared = {layer.digest for layer in web.image.layers} & {layer.digest for layer in worker.image.layers}
    assert len(shared) == 1  # the demo base layer
    (base_layer,) = shared
    _pull(provider, oci_registry, [web.reference], disk_id="builder-web")
    _pull(provider, oci_registry, [worker.reference], disk_id="builder-worker")
    assert (
        _blob(provider.root / "builders" / "builder-web", base_layer).stat().st_ino
        != _blob(provider.root / "builders" / "builder-worker", base_layer).stat().st_ino
    )
    provider.create_snapshot(disk_id="builder-web", snapshot_id="snap-web")
    provider.create_snapshot(disk_id="builder-worker", snapshot_id="snap-worker")
    provider.release_builder_disk(disk_id="builder-web")
    provider.release_builder_disk(disk_id="builder-worker")
    in_web = _blob(provider.root / "snapshots" / "snap-web", base_layer).stat()
    in_worker = _blob(provider.root / "snapshots" / "snap-worker", base_layer).stat()
    assert (
        in_web.st_ino == in_worker.st_ino == (provider.root / "cas" / "sha256" / base_layer[7:]).stat().st_ino
    )
    assert in_web.st_nlink == 3  # the store and two snapshots

    for snapshot_id in ("snap-web", "snap-worker"):
        provider.hydrate_zone(snapshot_id=snapshot_id, zone="b")
    zone_b = provider.root.parent / "elsewhere" / "b"
    assert (
        _blob(zone_b / "snapshots" / "snap-web", base_layer).stat().st_ino
        == _blob(zone_b / "snapshots" / "snap-worker", base_layer).stat().st_ino
    )


@pytest.fixture(scope="module")
def zeros_image(oci_registry: OciRegistry) -> BuiltImage:
    """1.37 GiB unpacked (one layer of zeros), ~1.4 MB compressed."""
    image = build_image(ImageSpec("big/zeros", "1.0", [LayerSpec(1400 * MiB, compressible=True, seed=41)]))
    push_image(oci_registry.url, image)
    return image


def test_cache_too_small_fails_before_downloading_layers(
    provider: LocalProvider, oci_registry: OciRegistry, zeros_image: BuiltImage
) -> None:
    reference = oci_registry.reference("big/zeros", tag="1.0")
    log_mark = oci_registry.server.log_path.stat().st_size
    assert zeros_image.compressed_bytes < 2 * MiB < GiB < zeros_image.uncompressed_bytes
    with pytest.raises(BuildFailure) as caught:
        _pull(provider, oci_registry, [reference], capacity_bytes=GiB)
    assert caught.value.reason == "CACHE_TOO_SMALL"
    assert not caught.value.retryable
    assert caught.value.message == (
        "images need 1.4 GiB uncompressed; cache size is 1 GiB (a cache of 2 GiB would fit)"
    )
    layer = zeros_image.layers[0].digest
    assert not _blob(provider.root / "builders" / "builder-1", layer).exists()
    assert (layer, "200") not in _blob_gets(oci_registry, log_mark)  # only the 4-byte range probe
    assert (layer, "206") in _blob_gets(oci_registry, log_mark)

    # A disk that holds the image unpacked (what the message asks for) builds, but not with the
    # 1.4 GiB layer diff on top of the blobs: that one is skipped (and not written, which saves
    # this test seconds).
    capacity = zeros_image.uncompressed_bytes + 64 * 1024
    (pulled,) = _pull(provider, oci_registry, [reference], capacity_bytes=capacity)
    assert pulled.uncompressed_bytes == zeros_image.uncompressed_bytes  # ISIZE, exactly
    short = len(zeros_image.manifest_bytes) + zeros_image.layers[0].size - 64 * 1024
    assert pulled.layer_diffs == f"skipped: needs {short} more bytes"
    assert not _blob(provider.root / "builders" / "builder-1", zeros_image.layers[0].diff_id).exists()


def test_cancelled_pull_is_retryable_and_keeps_the_disk(
    provider: LocalProvider, pushed_images: PushedImages, oci_registry: OciRegistry
) -> None:
    provider.create_builder_disk(disk_id="builder-1", capacity_bytes=GiB)
    with pytest.raises(BuildFailure) as caught:
        provider.pull_images(
            disk_id="builder-1",
            images=[pushed_images.web.reference],
            options=oci_registry.pull_options(),
            capacity_bytes=GiB,
            on_progress=Recorder([]),
            cancelled=lambda: True,
        )
    assert (caught.value.reason, caught.value.retryable) == ("CANCELLED", True)
    assert provider.inventory().builder_disks == frozenset({"builder-1"})


def test_interrupted_pull_resumes_without_refetching_finished_blobs(
    tmp_path: Path, fresh_oci_registry: OciRegistry
) -> None:
    provider = LocalProvider(
        LocalProviderConfig(root=tmp_path / "provider", zones=[LocalZone("a")], pull_concurrency=1)
    )
    image = build_image(
        ImageSpec("resume/app", "1.0", [LayerSpec(300 * 1024, seed=50 + i) for i in range(4)])
    )
    push_image(fresh_oci_registry.url, image)
    last = image.layers[-1]
    stored = fresh_oci_registry.server.storage_dir / (
        f"docker/registry/v2/blobs/sha256/{last.digest[7:9]}/{last.digest[7:]}/data"
    )
    original = stored.read_bytes()
    corrupted = bytearray(original)
    corrupted[len(corrupted) // 2] ^= 0xFF  # the gzip trailer (and so the size probe) stays intact
    stored.write_bytes(bytes(corrupted))
    reference = fresh_oci_registry.reference("resume/app", tag="1.0")

    with pytest.raises(BuildFailure) as caught:  # the pull dies on the last layer, one at a time
        _pull(provider, fresh_oci_registry, [reference])
    assert caught.value.reason == "DIGEST_MISMATCH"
    builder = provider.root / "builders" / "builder-1"
    finished = {p.name for p in (builder / "blobs" / "sha256").iterdir()}
    assert {layer.digest[7:] for layer in image.layers[:-1]} | {image.config_digest[7:]} <= finished
    assert last.digest[7:] not in finished
    (builder / "blobs" / "sha256" / ("f" * 64 + ".partial")).write_bytes(b"left by a crash")

    stored.write_bytes(original)  # the registry heals; the build is retried on the same disk
    log_mark = fresh_oci_registry.server.log_path.stat().st_size
    (pulled,) = _pull(provider, fresh_oci_registry, [reference])
    assert pulled.manifest_digest == image.manifest_digest
    fetched = [digest for digest, status in _blob_gets(fresh_oci_registry, log_mark) if status == "200"]
    assert fetched == [last.digest]  # config and finished layers came from the disk
    assert not list((builder / "blobs" / "sha256").glob("*.partial"))
    assert _skopeo_digest(builder, reference) == image.manifest_digest


def test_zone_capacity_and_idempotent_provisioning(
    provider: LocalProvider, pushed_images: PushedImages, oci_registry: OciRegistry
) -> None:
    _pull(provider, oci_registry, [pushed_images.worker.reference])
    provider.create_snapshot(disk_id="builder-1", snapshot_id="snap-1")
    provider.hydrate_zone(snapshot_id="snap-1", zone="a")
    provider.hydrate_zone(snapshot_id="snap-1", zone="a")  # idempotent
    first = provider.provision_disk(snapshot_id="snap-1", zone="a", disk_id="disk-1")
    provider.provision_disk(snapshot_id="snap-1", zone="a", disk_id="disk-2")
    assert provider.provision_disk(snapshot_id="snap-1", zone="a", disk_id="disk-1") == first
    assert [(z.name, z.max_disks, z.disks_in_use) for z in provider.zones()] == [("a", 2, 2), ("b", 0, 0)]

    with pytest.raises(ResourceExhausted) as exhausted:
        provider.provision_disk(snapshot_id="snap-1", zone="a", disk_id="disk-3")
    assert exhausted.value.reason == "ZONE_CAPACITY_EXHAUSTED"
    assert exhausted.value.message == "zone a is at capacity: 2 of 2 disks in use"
    provider.release_disk(disk_id="disk-2")
    provider.release_disk(disk_id="disk-2")  # idempotent
    provider.provision_disk(snapshot_id="snap-1", zone="a", disk_id="disk-3")

    provider.hydrate_zone(snapshot_id="snap-1", zone="b")
    with pytest.raises(AlreadyExists) as taken:  # a disk id is global across zones
        provider.provision_disk(snapshot_id="snap-1", zone="b", disk_id="disk-1")
    assert taken.value.reason == "DISK_EXISTS"


def test_provision_refused_outside_hydrated_zones(
    provider: LocalProvider, pushed_images: PushedImages, oci_registry: OciRegistry
) -> None:
    _pull(provider, oci_registry, [pushed_images.worker.reference])
    provider.create_snapshot(disk_id="builder-1", snapshot_id="snap-1")
    with pytest.raises(FailedPrecondition) as not_here:
        provider.provision_disk(snapshot_id="snap-1", zone="b", disk_id="disk-1")
    assert not_here.value.reason == "SNAPSHOT_NOT_IN_ZONE"
    assert "zone b" in not_here.value.message
    with pytest.raises(FailedPrecondition) as unknown:
        provider.provision_disk(snapshot_id="snap-1", zone="mars", disk_id="disk-1")
    assert unknown.value.reason == "UNKNOWN_ZONE"
    with pytest.raises(FailedPrecondition) as unknown_hydrate:
        provider.hydrate_zone(snapshot_id="snap-1", zone="mars")
    assert unknown_hydrate.value.reason == "UNKNOWN_ZONE"
    with pytest.raises(FailedPrecondition) as missing:
        provider.hydrate_zone(snapshot_id="snap-nope", zone="a")
    assert missing.value.reason == "SNAPSHOT_NOT_FOUND"
    with pytest.raises(InvalidArgument):
        provider.provision_disk(snapshot_id="snap-1", zone="a", disk_id="../escape")
    assert provider.inventory().disks == frozenset()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_inventory_and_garbage_collection_leave_nothing_orphaned(
    provider: LocalProvider, pushed_images: PushedImages, oci_registry: OciRegistry, tmp_path: Path
) -> None:
    _pull(provider, oci_registry, [pushed_images.web.reference])
    provider.create_snapshot(disk_id="builder-1", snapshot_id="snap-1")
    provider.hydrate_zone(snapshot_id="snap-1", zone="a")
    provider.provision_disk(snapshot_id="snap-1", zone="a", disk_id="disk-1")
    # leftovers of crashes: half-made trees and a half-copied blob, written by a process that is
    # gone; a temporary of a process still running (another replica sharing the trees) stays,
    # and one of another host (or an older form) stays until it has been untouched for an hour
    gone = subprocess.Popen(["true"])  # a pid that has exited
    gone.wait()
    by_dead = f"{_HOST}-{gone.pid}-00000000"
    (provider.root / "snapshots" / f".tmp-snap-2-{by_dead}").mkdir()
    (provider.root / "snapshots" / f".tmp-snap-2-{by_dead}" / "junk").write_bytes(b"x" * 100)
    (provider.root / "zones" / "a" / "cas" / "sha256" / f".tmp-abc-{by_dead}").write_bytes(b"y" * 50)
    (provider.root / "builders" / f".tmp-builder-9-{by_dead}").mkdir()
    running = provider.root / "snapshots" / f".tmp-snap-3-{_HOST}-{os.getppid()}-00000000"
    running.mkdir()
    elsewhere = provider.root / "snapshots" / ".tmp-snap-4-otherhst-1234-00000000"
    elsewhere.mkdir()
    stale = provider.root / "builders" / ".tmp-builder-5-old"
    stale.mkdir()
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    assert provider.inventory() == Inventory(
        builder_disks=frozenset({"builder-1"}),
        snapshots=frozenset({"snap-1"}),
        zone_snapshots=frozenset({("snap-1", "a")}),
        disks=frozenset({"disk-1"}),
    )
    assert provider.collect_garbage() == 150  # only the temporaries: every blob is still referenced
    assert running.is_dir() and elsewhere.is_dir() and not stale.exists()
    running.rmdir()
    elsewhere.rmdir()

    provider.release_builder_disk(disk_id="builder-1")
    provider.delete_snapshot(snapshot_id="snap-1")
    provider.delete_snapshot(snapshot_id="snap-1")  # idempotent
    provider.remove_from_zone(snapshot_id="snap-1", zone="a")
    assert provider.inventory() == Inventory(frozenset(), frozenset(), frozenset(), frozenset({"disk-1"}))
    snapshot_bytes = sum(p.stat().st_size for p in (provider.root / "cas" / "sha256").iterdir())
    assert provider.collect_garbage() == snapshot_bytes  # the central store; the zone's feeds disk-1
    disk = provider.root / "zones" / "a" / "disks" / "disk-1"
    assert _skopeo_digest(disk, pushed_images.web.reference) == pushed_images.web.digest

    provider.release_disk(disk_id="disk-1")
    assert provider.collect_garbage() == snapshot_bytes  # now the zone's copies go too
    assert provider.inventory() == Inventory(frozenset(), frozenset(), frozenset(), frozenset())
    assert _files(tmp_path / "provider") == []
    assert provider.collect_garbage() == 0


def test_concurrent_builds_and_garbage_collection(
    provider: LocalProvider, pushed_images: PushedImages, oci_registry: OciRegistry
) -> None:
    errors: list[BaseException] = []
    references = {
        "w": pushed_images.web.reference,
        "k": pushed_images.worker.reference,
        "b": pushed_images.base.reference,
    }

    def build(name: str) -> None:
        try:
            for round_ in range(3):
                disk_id, snapshot_id = f"builder-{name}-{round_}", f"snap-{name}-{round_}"
                _pull(provider, oci_registry, [references[name]], disk_id=disk_id)
                provider.create_snapshot(disk_id=disk_id, snapshot_id=snapshot_id)
                provider.release_builder_disk(disk_id=disk_id)
                provider.hydrate_zone(snapshot_id=snapshot_id, zone="b")
                provider.provision_disk(snapshot_id=snapshot_id, zone="b", disk_id=f"disk-{name}-{round_}")
                if round_ < 2:
                    provider.delete_snapshot(snapshot_id=snapshot_id)
        except BaseException as exc:
            errors.append(exc)

    stop = threading.Event()

    def collect() -> None:
        while not stop.wait(0.002):  # as a periodic reconcile would, only much more often
            provider.collect_garbage()

    threads = [threading.Thread(target=build, args=(name,)) for name in references]
    collector = threading.Thread(target=collect)
    collector.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    stop.set()
    collector.join(timeout=60)
    assert errors == []
    inventory = provider.inventory()
    assert inventory.snapshots == {"snap-w-2", "snap-k-2", "snap-b-2"}
    assert len(inventory.disks) == 9
    zone_b = provider.root.parent / "elsewhere" / "b"
    for name, reference in references.items():
        for round_ in range(3):
            disk = zone_b / "disks" / f"disk-{name}-{round_}"
            for blob in (disk / "blobs" / "sha256").iterdir():
                assert blob.stat().st_nlink >= 2  # still in the zone store
            assert _skopeo_digest(disk, reference)


def test_provider_config_is_validated(tmp_path: Path) -> None:
    for zones, concurrency in (
        ([LocalZone("a"), LocalZone("a")], 4),
        ([LocalZone("bad/name")], 4),
        ([LocalZone("a", max_disks=-1)], 4),
        ([LocalZone("a")], 0),
    ):
        with pytest.raises(ValueError):
            LocalProvider(LocalProviderConfig(root=tmp_path, zones=zones, pull_concurrency=concurrency))
    with pytest.raises(ValueError):
        LocalProvider(LocalProviderConfig(root=tmp_path / "a:b", zones=[]))


@pytest.fixture(autouse=True)
def _no_thread_leaks() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [
        t for t in threading.enumerate() if t not in before and t.is_alive() and t.name.startswith("pull")
    ]
    assert leaked == []
