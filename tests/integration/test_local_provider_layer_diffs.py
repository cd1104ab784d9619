"""Layer diffs: the builder stores each gzip layer's uncompressed tar under its DiffID.

The stream and config parsing are tested on bytes; the rest through the local provider pulling
from a real registry, then snapshot, zone copy and disk, as a node would receive them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from services.cache_registry.distribution import Descriptor
from services.cache_registry.local_provider import (
    LocalProvider,
    LocalProviderConfig,
    LocalZone,
    expected_diff,
    inflate_gzip,
    layer_diff_ids,
)
from services.cache_registry.provider import BuildFailure, PulledImage, PullProgress
from services.cache_registry.server import RegistryApp, RegistryConfig, ZoneConfig
from snapcache.demo.oci_images import (
    OCI_CONFIG,
    OCI_MANIFEST,
    BuiltImage,
    BuiltLayer,
    ImageSpec,
    LayerSpec,
    build_image,
    canonical_json,
    push_image,
    sha256_digest,
)
from snapcache.images import ImageReference
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from tests.integration.test_local_provider import _no_thread_leaks  # noqa: F401  (autouse: no pull thread outlives a test)
from tests.support.oci_fixtures import OciRegistry, PushedImages

GiB = 1024**3
MiB = 1024**2
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_NONDISTRIBUTABLE_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"


# --- bytes ---------------------------------------------------------------------------------


def _tar(seed: int, size: int) -> bytes:
    """A tar of one file of seeded random bytes."""
    content = hashlib.shake_256(seed.to_bytes(8, "little")).digest(size)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo(f"file-{seed}")
        info.size, info.mtime = len(content), 0
        archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _inflated(data: bytes) -> list[bytes]:
    return list(inflate_gzip(io.BytesIO(data)))


def test_inflate_gzip_joins_members_in_bounded_chunks() -> None:
    text = _tar(1, 300_000)
    zeros = bytes(9 * MiB)  # inflates ~1000:1: one 1 MiB read holds all of it
    members = gzip.compress(text, mtime=0) + gzip.compress(zeros, mtime=0) + gzip.compress(b"", mtime=0)
    chunks = _inflated(members)
    assert b"".join(chunks) == text + zeros
    assert max(len(chunk) for chunk in chunks) == MiB  # bounded, however well it compresses
    assert _inflated(b"") == []


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda data: data[:-6], EOFError),  # cut inside the trailer
        (lambda data: data[: len(data) // 2], EOFError),  # cut inside the deflate stream
        (lambda data: data[:-8] + b"\0" * 8, zlib.error),  # CRC and ISIZE wrong
        (lambda data: b"\x1f\x8c" + data[2:], zlib.error),  # not a gzip header
        (lambda data: data + b"\0\0\0\0", zlib.error),  # trailing garbage after the member
    ],
)
def test_inflate_gzip_refuses_damaged_streams(
    damage: Callable[[bytes], bytes], error: type[Exception]
) -> None:
    data = gzip.compress(_tar(2, 3 * MiB), mtime=0, compresslevel=1)
    with pytest.raises(error):
        _inflated(damage(data))


_A, _B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


@pytest.mark.parametrize(
    ("config", "count", "expected"),
    [
        ({"rootfs": {"type": "layers", "diff_ids": [_A, _B]}}, 2, [_A, _B]),
        ({"rootfs": {"diff_ids": [_A, "sha512:" + "c" * 128]}}, 2, [_A, None]),
        ({"rootfs": {"diff_ids": [_A, 7]}}, 2, [_A, None]),
        ({"rootfs": {"diff_ids": [_A]}}, 2, [None, None]),  # not one to one: no pairing by guess
        ({"rootfs": {"diff_ids": [_A, _B]}}, 1, [None]),
        ({"rootfs": {}}, 1, [None]),
        ({"rootfs": "layers"}, 1, [None]),
        ([], 1, [None]),
        ({}, 0, []),
    ],
)
def test_layer_diff_ids(config: object, count: int, expected: list[str | None]) -> None:
    assert layer_diff_ids(json.dumps(config).encode(), count) == expected


def test_layer_diff_ids_of_a_config_that_is_not_json() -> None:
    assert layer_diff_ids(b"\xff{", 2) == [None, None]


@pytest.mark.parametrize(
    ("media_type", "digest", "diff_id", "expected"),
    [
        (OCI_GZIP, _B, _A, _A),
        (DOCKER_GZIP, _B, _A, _A),
        (OCI_GZIP, _B, None, None),
        (OCI_TAR, _A, _A, _A),  # an uncompressed layer is its own diff
        (DOCKER_TAR, _A, _A, _A),
        (OCI_TAR, _B, _A, None),  # ... unless its config says otherwise
        (OCI_ZSTD, _B, _A, None),
        (OCI_NONDISTRIBUTABLE_GZIP, _B, _A, None),
        (DOCKER_FOREIGN, _B, _A, None),
        ("application/octet-stream", _A, _A, None),
    ],
)
def test_expected_diff(media_type: str, digest: str, diff_id: str | None, expected: str | None) -> None:
    assert expected_diff(Descriptor(media_type=media_type, digest=digest, size=1), diff_id) == expected


# --- through the provider and a real registry ------------------------------------------------


@dataclass(frozen=True)
class RawLayer:
    """A layer as pushed: its media type, blob, the tar inside, and the DiffID its config lists."""

    media_type: str
    blob: bytes
    tar: bytes
    listed_diff_id: str

    @property
    def digest(self) -> str:
        return sha256_digest(self.blob)

    @property
    def diff_id(self) -> str:
        """The true DiffID: the digest of the tar."""
        return sha256_digest(self.tar)


def _gzip_layer(tar: bytes, *, media_type: str = OCI_GZIP, level: int = 6, listed: str = "") -> RawLayer:
    return RawLayer(
        media_type, gzip.compress(tar, compresslevel=level, mtime=0), tar, listed or sha256_digest(tar)
    )


def _raw_image(repository: str, layers: list[RawLayer]) -> BuiltImage:
    """A single-platform image of hand-made layers (any media types, any listed DiffIDs)."""
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.listed_diff_id for layer in layers]},
    }
    config_bytes = canonical_json(config)
    config_digest = sha256_digest(config_bytes)
    manifest_bytes = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
            "layers": [
                {"mediaType": layer.media_type, "digest": layer.digest, "size": len(layer.blob)}
                for layer in layers
            ],
        }
    )
    built = tuple(
        BuiltLayer(layer.digest, len(layer.blob), layer.diff_id, len(layer.tar)) for layer in layers
    )
    return BuiltImage(
        repository=repository,
        tag="1.0",
        platform=("linux", "amd64"),
        manifest_bytes=manifest_bytes,
        manifest_digest=sha256_digest(manifest_bytes),
        config=config,
        config_bytes=config_bytes,
        config_digest=config_digest,
        layers=built,
        blobs={config_digest: config_bytes, **{layer.digest: layer.blob for layer in layers}},
        compressed_bytes=len(config_bytes) + sum(len(layer.blob) for layer in layers),
        uncompressed_bytes=len(config_bytes) + sum(len(layer.tar) for layer in layers),
    )


@dataclass
class Recorder:
    """Progress reports as the provider sent them."""

    reports: list[PullProgress]

    def __call__(self, progress: PullProgress) -> None:
        self.reports.append(progress)


@pytest.fixture
def provider(tmp_path: Path) -> LocalProvider:
    """Zone ``b`` is stored outside the root, as another filesystem would be."""
    return LocalProvider(
        LocalProviderConfig(
            root=tmp_path / "provider",
            zones=[LocalZone("b", root=tmp_path / "elsewhere" / "b")],
            pull_concurrency=4,
        )
    )


def _pull(
    provider: LocalProvider,
    registry: OciRegistry,
    images: list[ImageReference],
    *,
    disk_id: str = "builder-1",
    capacity_bytes: int = GiB,
) -> list[PulledImage]:
    provider.create_builder_disk(disk_id=disk_id, capacity_bytes=capacity_bytes)
    return provider.pull_images(
        disk_id=disk_id,
        images=images,
        options=registry.pull_options(),
        capacity_bytes=capacity_bytes,
        on_progress=Recorder([]),
        cancelled=lambda: False,
    )


def _blob_dir(layout: Path) -> Path:
    return layout / "blobs" / "sha256"


def _held(layout: Path, digest: str) -> bool:
    return (_blob_dir(layout) / digest.removeprefix("sha256:")).is_file()


def _verified(layout: Path, digest: str) -> bool:
    """The blob is there and its content has that digest."""
    path = _blob_dir(layout) / digest.removeprefix("sha256:")
    if not path.is_file():
        return False
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(MiB):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest() == digest


def _partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".partial")]


@pytest.fixture(scope="module")
def mixed_image(oci_registry: OciRegistry) -> tuple[BuiltImage, list[RawLayer]]:
    """One image with a layer of every kind the builder must tell apart, pushed as diffs/mixed:1.0."""
    plain = _gzip_layer(_tar(10, 200_000))
    corrupt_blob = bytearray(gzip.compress(_tar(18, 200_000), mtime=0, compresslevel=1))
    corrupt_blob[len(corrupt_blob) // 2] ^= 0xFF  # its blob digest is what it is; its gzip is not
    tar_17 = _tar(17, 50_000)
    layers = [
        plain,  # diff stored
        _gzip_layer(_tar(11, 150_000), media_type=DOCKER_GZIP),  # diff stored
        RawLayer(  # two gzip members: diff stored
            OCI_GZIP,
            gzip.compress(_tar(12, 90_000)[:40_960], mtime=0)
            + gzip.compress(_tar(12, 90_000)[40_960:], mtime=0),
            _tar(12, 90_000),
            sha256_digest(_tar(12, 90_000)),
        ),
        RawLayer(OCI_TAR, tar_17, tar_17, sha256_digest(tar_17)),  # its own diff
        _gzip_layer(_tar(13, 120_000), listed="sha256:" + "d" * 64),  # config lies: no diff
        RawLayer(OCI_ZSTD, b"(\xb5/\xfd not really zstd", _tar(14, 10), "sha256:" + "e" * 64),  # none
        _gzip_layer(_tar(15, 80_000), media_type=OCI_NONDISTRIBUTABLE_GZIP),  # none
        RawLayer(OCI_TAR, _tar(16, 30_000), _tar(16, 30_000), "sha256:" + "f" * 64),  # config lies: none
        RawLayer(OCI_GZIP, bytes(corrupt_blob), _tar(18, 200_000), sha256_digest(_tar(18, 200_000))),  # none
        _gzip_layer(plain.tar, level=1),  # another blob, the same DiffID as the first: one diff
    ]
    assert layers[-1].digest != plain.digest and layers[-1].diff_id == plain.diff_id
    image = _raw_image("diffs/mixed", layers)
    push_image(oci_registry.url, image)
    return image, layers


@pytest.mark.e2e
def test_diffs_reach_the_disk_through_snapshot_and_zone_copy(
    provider: LocalProvider,
    oci_registry: OciRegistry,
    pushed_images: PushedImages,
    mixed_image: tuple[BuiltImage, list[RawLayer]],
) -> None:
    _, layers = mixed_image
    web, worker, base = pushed_images.web, pushed_images.worker, pushed_images.base
    mixed = oci_registry.reference("diffs/mixed", tag="1.0")
    pulled = _pull(provider, oci_registry, [web.reference, worker.reference, base.reference, mixed])
    assert [p.layer_diffs for p in pulled] == ["stored", "stored", "stored", "stored for 5 of 10 layers"]

    provider.create_snapshot(disk_id="builder-1", snapshot_id="snap-1")
    provider.release_builder_disk(disk_id="builder-1")
    provider.hydrate_zone(snapshot_id="snap-1", zone="b")
    disk = Path(provider.provision_disk(snapshot_id="snap-1", zone="b", disk_id="disk-1").location)
    snapshot = provider.root / "snapshots" / "snap-1"

    amd64 = next(image for image in base.built if image.platform[1] == "amd64")
    arm64 = next(image for image in base.built if image.platform[1] == "arm64")
    demo_diffs = {layer.diff_id for image in (web.image, worker.image, amd64) for layer in image.layers}
    assert len(demo_diffs) == 5  # web and worker share their base layer: one diff
    mixed_diffs = {layer.diff_id for i, layer in enumerate(layers) if i in (0, 1, 2, 3, 9)}
    assert len(mixed_diffs) == 4  # the first and last layers are one tar
    for diff_id in demo_diffs | mixed_diffs:
        assert _verified(disk, diff_id), diff_id
        name = diff_id.removeprefix("sha256:")
        assert (_blob_dir(disk) / name).stat().st_ino != (_blob_dir(snapshot) / name).stat().st_ino  # copied
        assert (_blob_dir(snapshot) / name).stat().st_mode & 0o777 == 0o444
    for diff_id in {layer.diff_id for layer in arm64.layers}:  # only the chosen platform's layers
        assert not _held(disk, diff_id)
    for layer in layers[4:9]:  # a lying config, zstd, non-distributable, a lying tar, a broken gzip
        assert not _held(disk, layer.listed_diff_id)
        assert layer.media_type == OCI_TAR or not _held(disk, layer.diff_id)  # a tar is its own blob
    assert {p.name for p in _blob_dir(disk).iterdir()} == {p.name for p in _blob_dir(snapshot).iterdir()}
    assert _partials(provider.root) == [] and _partials(provider.root.parent / "elsewhere") == []


def _need_with_diffs(images: list[BuiltImage]) -> int:
    """Blobs as stored (manifests, configs, unique layers) plus every unique layer's tar."""
    layers = {layer.digest: layer for image in images for layer in image.layers}
    return (
        sum(len(image.manifest_bytes) + len(image.config_bytes) for image in images)
        + sum(layer.size for layer in layers.values())
        + sum({layer.diff_id: layer.uncompressed_size for layer in layers.values()}.values())
    )


@pytest.mark.e2e
def test_diffs_are_written_only_when_blobs_and_diffs_fit(
    provider: LocalProvider, oci_registry: OciRegistry, pushed_images: PushedImages
) -> None:
    web, worker = pushed_images.web, pushed_images.worker
    need = _need_with_diffs([web.image, worker.image])
    references = [web.reference, worker.reference]

    short = _pull(provider, oci_registry, references, disk_id="short", capacity_bytes=need - 1)
    assert [p.layer_diffs for p in short] == ["skipped: needs 1 more bytes"] * 2
    assert not any(_held(provider.root / "builders" / "short", layer.diff_id) for layer in web.image.layers)

    exact = _pull(provider, oci_registry, references, disk_id="exact", capacity_bytes=need)
    assert [p.layer_diffs for p in exact] == ["stored", "stored"]
    builder = provider.root / "builders" / "exact"
    assert sum(p.stat().st_size for p in _blob_dir(builder).iterdir()) == need  # the meter's count too


@pytest.fixture(scope="module")
def random_image(oci_registry: OciRegistry) -> BuiltImage:
    """Incompressible: stored and unpacked are both ~2 MiB, blobs plus diffs ~4 MiB."""
    image = build_image(ImageSpec("diffs/random", "1.0", [LayerSpec(2 * MiB, seed=61)]))
    push_image(oci_registry.url, image)
    return image


@pytest.mark.e2e
def test_a_disk_too_small_for_diffs_still_builds_without_them(
    provider: LocalProvider, oci_registry: OciRegistry, random_image: BuiltImage
) -> None:
    reference = oci_registry.reference("diffs/random", tag="1.0")
    (layer,) = random_image.layers
    stored = len(random_image.manifest_bytes) + random_image.compressed_bytes
    unpacked = len(random_image.manifest_bytes) + random_image.uncompressed_bytes
    capacity = max(stored, unpacked) + 4096
    need = stored + layer.uncompressed_size
    assert capacity < need

    (pulled,) = _pull(provider, oci_registry, [reference], capacity_bytes=capacity)
    assert pulled.layer_diffs == f"skipped: needs {need - capacity} more bytes"
    builder = provider.root / "builders" / "builder-1"
    assert _verified(builder, layer.digest) and not _held(builder, layer.diff_id)

    with pytest.raises(BuildFailure) as caught:  # what fails a build for size did not change
        _pull(
            provider, oci_registry, [reference], disk_id="builder-2", capacity_bytes=max(stored, unpacked) - 1
        )
    assert caught.value.reason == "CACHE_TOO_SMALL"


@pytest.mark.e2e
def test_a_retried_build_keeps_present_diffs_and_finishes_the_others(
    provider: LocalProvider, oci_registry: OciRegistry, pushed_images: PushedImages
) -> None:
    web = pushed_images.web
    (first,) = _pull(provider, oci_registry, [web.reference])
    assert first.layer_diffs == "stored"
    builder = provider.root / "builders" / "builder-1"
    kept, removed, _ = (_blob_dir(builder) / layer.diff_id[7:] for layer in web.image.layers)
    before = kept.stat()
    removed.unlink()  # as if the first attempt died before this one was renamed into place
    leftover = removed.with_name(removed.name + ".partial")
    leftover.write_bytes(b"half a diff")

    (second,) = _pull(provider, oci_registry, [web.reference])
    assert second.layer_diffs == "stored"
    after = kept.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert _verified(builder, "sha256:" + removed.name)
    assert not leftover.exists()


@pytest.mark.e2e
def test_a_diff_bigger_than_its_size_metadata_is_dropped_not_failed(
    tmp_path: Path, oci_registry: OciRegistry
) -> None:
    """A multi-member gzip whose last ISIZE looks plausible: the diff overflows what was planned."""
    random_tar, zeros_tar = _tar(70, MiB), bytes(3 * MiB)
    tricky = RawLayer(
        OCI_GZIP,
        gzip.compress(random_tar, mtime=0) + gzip.compress(zeros_tar, mtime=0),
        random_tar + zeros_tar,
        sha256_digest(random_tar + zeros_tar),
    )
    fine = _gzip_layer(_tar(71, 512 * 1024))
    image = _raw_image("diffs/tricky", [tricky, fine])
    push_image(oci_registry.url, image)
    # planned: ISIZE says 3 MiB for the 4 MiB tricky layer
    capacity = len(image.manifest_bytes) + image.compressed_bytes + 3 * MiB + len(fine.tar)
    one_at_a_time = LocalProvider(
        LocalProviderConfig(root=tmp_path / "provider", zones=[LocalZone("a")], pull_concurrency=1)
    )
    (pulled,) = _pull(
        one_at_a_time,
        oci_registry,
        [oci_registry.reference("diffs/tricky", tag="1.0")],
        capacity_bytes=capacity,
    )
    # the tricky diff ran out of room and gave its bytes back, so the next one still fit
    assert pulled.layer_diffs == "stored for 1 of 2 layers"
    builder = one_at_a_time.root / "builders" / "builder-1"
    assert not _held(builder, tricky.diff_id) and _verified(builder, fine.diff_id)
    assert _partials(builder) == []


@pytest.fixture(scope="module")
def zeros_image(oci_registry: OciRegistry) -> BuiltImage:
    """1 GiB unpacked (one layer of zeros), ~1 MB compressed: seconds to unpack and write."""
    image = build_image(ImageSpec("diffs/zeros", "1.0", [LayerSpec(GiB, compressible=True, seed=62)]))
    push_image(oci_registry.url, image)
    return image


@pytest.mark.e2e
def test_cancelling_stops_a_diff_at_its_next_chunk(
    provider: LocalProvider, oci_registry: OciRegistry, zeros_image: BuiltImage
) -> None:
    (layer,) = zeros_image.layers
    builder = provider.root / "builders" / "builder-1"
    partial = _blob_dir(builder) / (layer.diff_id[7:] + ".partial")
    recorder = Recorder([])
    cancelled_at: list[float] = []
    partial_size: list[int] = []

    def cancelled() -> bool:
        if cancelled_at:
            return True
        if any(report.message.startswith("writing") for report in recorder.reports) and partial.exists():
            partial_size.append(partial.stat().st_size)
            cancelled_at.append(time.monotonic())
            return True
        return False

    provider.create_builder_disk(disk_id="builder-1", capacity_bytes=2 * GiB)
    with pytest.raises(BuildFailure) as caught:
        provider.pull_images(
            disk_id="builder-1",
            images=[oci_registry.reference("diffs/zeros", tag="1.0")],
            options=oci_registry.pull_options(),
            capacity_bytes=2 * GiB,
            on_progress=recorder,
            cancelled=cancelled,
        )
    stopped_after = time.monotonic() - cancelled_at[0]
    assert (caught.value.reason, caught.value.retryable) == ("CANCELLED", True)
    assert partial_size[0] < layer.uncompressed_size  # it was cancelled mid-diff
    assert stopped_after < 1.0, stopped_after  # the whole diff takes seconds: it stopped at a chunk
    assert not partial.exists() and not _held(builder, layer.diff_id)
    assert _verified(builder, layer.digest)  # the layer is kept for the retry


@pytest.mark.e2e
def test_the_build_event_says_whether_diffs_were_stored(
    tmp_path: Path, sqlite_url: str, pushed_images: PushedImages
) -> None:
    """Through the production wiring: ImagePulled carries ``layer_diffs``, the zone disk the diffs."""
    app = RegistryApp(
        RegistryConfig(
            data_dir=tmp_path / "data",
            listen="127.0.0.1:0",
            database_url=sqlite_url,
            zones=(ZoneConfig("zone-a"),),
            worker_poll_seconds=0.1,
        )
    ).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = api_grpc.CacheRegistryServiceStub(channel)
            created = stub.CreateImageCache(
                api.CreateImageCacheRequest(
                    image_cache=pb.ImageCache(
                        images=[str(pushed_images.web.reference)],
                        plain_http_registries=[pushed_images.registry.host],
                    )
                ),
                timeout=10,
            )
            deadline = time.monotonic() + 60
            cache = stub.GetImageCache(api.GetImageCacheRequest(name=created.name), timeout=10)
            while time.monotonic() < deadline and not (
                cache.state == pb.ImageCache.READY
                and [z.state for z in cache.zone_availability] == [pb.ZoneAvailability.AVAILABLE]
            ):
                assert cache.state != pb.ImageCache.FAILED, cache.state_message
                time.sleep(0.05)
                cache = stub.GetImageCache(api.GetImageCacheRequest(name=created.name), timeout=10)
            assert cache.state == pb.ImageCache.READY
            events = stub.ListImageCacheEvents(
                api.ListImageCacheEventsRequest(parent=created.name), timeout=10
            )
            (pulled,) = [event for event in events.events if event.reason == "ImagePulled"]
            assert pulled.attributes["layer_diffs"] == "stored"
            assert pulled.message.endswith("; layer diffs stored)")
            disk = stub.ProvisionDisk(
                api.ProvisionDiskRequest(parent=created.name, zone="zone-a", disk_id="node-1"), timeout=10
            )
            for layer in pushed_images.web.image.layers:
                assert _verified(Path(disk.location), layer.diff_id)
    finally:
        app.stop(0)
