"""Build real OCI images in Python and push them over the distribution HTTP API.

Tests, benchmarks and the demo need images with known content and sizes, built without Docker
and without network access. Everything here is deterministic from the specs (fixed tar headers,
mtime 0, seeded content), so the same spec always yields the same digests and a layer shared by
two images (same ``LayerSpec``) is one blob in the registry.

How layers are made fast enough for tests and a ~200 MiB benchmark image:
- the gzip stream is written by hand (RFC 1952 header, raw deflate, CRC-32 and ISIZE trailer) as
  a sequence of independently compressed deflate segments, each closed with a full flush. No
  back-reference crosses a segment, so the concatenation is one valid deflate stream, and a
  1 MiB run of zeros compresses to the same segment every time: a 1+ GiB zero layer costs one
  hashing pass, not a gigabyte of deflate work;
- incompressible (random) content is stored with deflate level 0 (stored blocks), which is what
  gzip achieves on such data anyway, at memory-copy speed;
- with ``blob_dir`` set, layers stream to files there and uploads stream from them, so a large
  image never has to sit in memory.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import random
import struct
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

KiB = 1024
MiB = 1024 * KiB
_CHUNK = MiB
_TAR_BLOCK = 512

# (user, password) for basic auth, or any httpx auth flow (a registry behind token auth)
Auth = tuple[str, str] | httpx.Auth


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One layer: ``file_count`` files totalling ``size_bytes``, random or all zeros."""

    size_bytes: int
    compressible: bool = False  # True: zeros (huge unpacked, tiny gzipped); False: random bytes
    seed: int = 0
    file_count: int = 1


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """One single-platform image: its name and layers, bottom first."""

    repository: str
    tag: str
    layers: Sequence[LayerSpec]
    platform: tuple[str, ...] = ("linux", "amd64")  # (os, architecture[, variant])


@dataclass(frozen=True, slots=True)
class BuiltLayer:
    """A built layer blob: compressed digest/size and the uncompressed tar's digest/size."""

    digest: str
    size: int
    diff_id: str
    uncompressed_size: int


@dataclass(frozen=True, slots=True)
class BuiltImage:
    """A built single-platform image, ready to push; blobs are bytes or files in ``blob_dir``."""

    repository: str
    tag: str
    platform: tuple[str, ...]
    manifest_bytes: bytes
    manifest_digest: str
    config: dict[str, Any]
    config_bytes: bytes
    config_digest: str
    layers: tuple[BuiltLayer, ...]
    blobs: dict[str, bytes | Path]  # digest -> content, config and layers
    compressed_bytes: int  # config + layers as stored
    uncompressed_bytes: int  # config + layers as unpacked

    @property
    def platform_json(self) -> dict[str, str]:
        """The platform as an OCI descriptor's ``platform`` object."""
        os_name, arch, *rest = self.platform
        value = {"os": os_name, "architecture": arch}
        if rest and rest[0]:
            value["variant"] = rest[0]
        return value


@dataclass(frozen=True, slots=True)
class DemoImage:
    """One demo image: one spec is a plain manifest, several are pushed as a multi-arch index."""

    repository: str
    tag: str
    platforms: tuple[ImageSpec, ...]


@dataclass(frozen=True, slots=True)
class PushedImage:
    """A pushed image: its tag's digest (manifest or index) and the platform images behind it."""

    repository: str
    tag: str
    digest: str
    images: tuple[BuiltImage, ...]
    is_index: bool = False
    index_bytes: bytes = field(default=b"", repr=False)


def sha256_digest(data: bytes) -> str:
    """The OCI digest string of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no spaces) for configs and manifests."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=8)
def _deflate_zeros(length: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(bytes(length)) + compressor.flush(zlib.Z_FULL_FLUSH)


class _GzipSegmentWriter:
    """Writes a single-member gzip stream as independently deflated segments (see module doc)."""

    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink
        self._compressed_hash = hashlib.sha256()
        self._uncompressed_hash = hashlib.sha256()
        self._crc = 0
        self.compressed_size = 0
        self.uncompressed_size = 0
        # magic, deflate, no flags, mtime 0, no extra flags, OS "unknown": byte-for-byte stable
        self._emit(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")

    def _emit(self, data: bytes) -> None:
        self._sink.write(data)
        self._compressed_hash.update(data)
        self.compressed_size += len(data)

    def _account(self, data: bytes) -> None:
        self._uncompressed_hash.update(data)
        self._crc = zlib.crc32(data, self._crc)
        self.uncompressed_size += len(data)

    def write(self, data: bytes, *, level: int) -> None:
        self._account(data)
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
        self._emit(compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH))

    def write_zeros(self, length: int) -> None:
        zeros = bytes(min(length, _CHUNK))
        while length > 0:
            part = min(length, _CHUNK)
            self._account(zeros[:part] if part < len(zeros) else zeros)
            self._emit(_deflate_zeros(part))
            length -= part

    def finish(self) -> tuple[str, str]:
        """Close the stream; return (compressed digest, uncompressed digest)."""
        self._emit(zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH))  # final empty block
        self._emit(struct.pack("<II", self._crc, self.uncompressed_size & 0xFFFFFFFF))
        return (
            "sha256:" + self._compressed_hash.hexdigest(),
            "sha256:" + self._uncompressed_hash.hexdigest(),
        )


def _tar_header(name: str, *, size: int, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _file_sizes(spec: LayerSpec) -> list[int]:
    count = max(1, spec.file_count)
    base, extra = divmod(spec.size_bytes, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def _write_layer(spec: LayerSpec, sink: BinaryIO) -> BuiltLayer:
    writer = _GzipSegmentWriter(sink)
    top = f"layer-{spec.seed}"
    writer.write(_tar_header(top + "/", size=0, directory=True), level=9)
    for index, size in enumerate(_file_sizes(spec)):
        writer.write(_tar_header(f"{top}/file-{index}", size=size), level=9)
        padding = -size % _TAR_BLOCK
        if spec.compressible:
            writer.write_zeros(size + padding)
            continue
        rng = random.Random(f"{spec.seed}/{index}")
        remaining = size
        while remaining > 0:
            part = min(remaining, _CHUNK)
            writer.write(rng.randbytes(part), level=0)
            remaining -= part
        if padding:
            writer.write(bytes(padding), level=9)
    writer.write_zeros(2 * _TAR_BLOCK)  # end-of-archive marker
    digest, diff_id = writer.finish()
    return BuiltLayer(
        digest=digest,
        size=writer.compressed_size,
        diff_id=diff_id,
        uncompressed_size=writer.uncompressed_size,
    )


def _build_layer(spec: LayerSpec, blob_dir: Path | None) -> tuple[BuiltLayer, bytes | Path]:
    if blob_dir is None:
        buffer = io.BytesIO()
        layer = _write_layer(spec, buffer)
        return layer, buffer.getvalue()
    blob_dir.mkdir(parents=True, exist_ok=True)
    partial = blob_dir / f".building-{spec.seed}-{spec.size_bytes}-{id(spec)}"
    with partial.open("wb") as handle:
        layer = _write_layer(spec, handle)
    final = blob_dir / layer.digest.removeprefix("sha256:")
    partial.replace(final)
    return layer, final


def build_image(spec: ImageSpec, *, blob_dir: Path | None = None) -> BuiltImage:
    """Build ``spec``; with ``blob_dir`` layers are written there as files, else kept in memory."""
    layers: list[BuiltLayer] = []
    blobs: dict[str, bytes | Path] = {}
    for layer_spec in spec.layers:
        layer, content = _build_layer(layer_spec, blob_dir)
        layers.append(layer)
        blobs[layer.digest] = content
    os_name, arch, *rest = spec.platform
    config: dict[str, Any] = {
        "architecture": arch,
        "os": os_name,
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "snapcache demo"} for _ in layers],
    }
    if rest and rest[0]:
        config["variant"] = rest[0]
    config_bytes = canonical_json(config)
    config_digest = sha256_digest(config_bytes)
    blobs = {config_digest: config_bytes, **blobs}
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": [
            {"mediaType": OCI_LAYER_GZIP, "digest": layer.digest, "size": layer.size} for layer in layers
        ],
    }
    manifest_bytes = canonical_json(manifest)
    return BuiltImage(
        repository=spec.repository,
        tag=spec.tag,
        platform=tuple(spec.platform),
        manifest_bytes=manifest_bytes,
        manifest_digest=sha256_digest(manifest_bytes),
        config=config,
        config_bytes=config_bytes,
        config_digest=config_digest,
        layers=tuple(layers),
        blobs=blobs,
        compressed_bytes=len(config_bytes) + sum(layer.size for layer in layers),
        uncompressed_bytes=len(config_bytes) + sum(layer.uncompressed_size for layer in layers),
    )


def build_index(images: Sequence[BuiltImage]) -> bytes:
    """The OCI image index bytes listing ``images`` with their platforms."""
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": image.manifest_digest,
                "size": len(image.manifest_bytes),
                "platform": image.platform_json,
            }
            for image in images
        ],
    }
    return canonical_json(index)


def _blob_chunks(content: bytes | Path) -> Iterator[bytes]:
    if isinstance(content, bytes):
        yield content
        return
    with content.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            yield chunk


def _blob_size(content: bytes | Path) -> int:
    return len(content) if isinstance(content, bytes) else content.stat().st_size


def _check(response: httpx.Response, expected: int, what: str) -> None:
    if response.status_code != expected:
        raise RuntimeError(
            f"{what}: {response.request.method} {response.request.url.path} answered "
            f"{response.status_code}: {response.text[:300]}"
        )


def _push_blob(client: httpx.Client, repository: str, digest: str, content: bytes | Path) -> None:
    head = client.head(f"/v2/{repository}/blobs/{digest}")
    if head.status_code == 200:
        return
    started = client.post(f"/v2/{repository}/blobs/uploads/")
    _check(started, 202, f"start upload of {digest}")
    location = httpx.URL(started.headers["Location"])
    if not location.is_absolute_url:
        location = client.base_url.join(str(location))
    location = location.copy_merge_params({"digest": digest})
    done = client.put(
        location,
        content=_blob_chunks(content),
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Length": str(_blob_size(content)),
        },
    )
    _check(done, 201, f"upload of {digest}")


def _put_manifest(client: httpx.Client, repository: str, reference: str, body: bytes, media_type: str) -> str:
    response = client.put(
        f"/v2/{repository}/manifests/{reference}", content=body, headers={"Content-Type": media_type}
    )
    _check(response, 201, f"manifest {repository}:{reference}")
    return sha256_digest(body)


def _client(registry_url: str, auth: Auth | None, timeout_seconds: float) -> httpx.Client:
    return httpx.Client(
        base_url=registry_url.rstrip("/"), auth=auth, timeout=timeout_seconds, follow_redirects=True
    )


def push_image(
    registry_url: str,
    built: BuiltImage,
    *,
    tag: str | None = None,
    auth: Auth | None = None,
    timeout_seconds: float = 60.0,
) -> str:
    """Push blobs (skipping those present) and the manifest; tag it (``tag=""``: by digest only)."""
    reference = built.tag if tag is None else tag
    with _client(registry_url, auth, timeout_seconds) as client:
        for digest, content in built.blobs.items():
            _push_blob(client, built.repository, digest, content)
        return _put_manifest(
            client, built.repository, reference or built.manifest_digest, built.manifest_bytes, OCI_MANIFEST
        )


def push_index(
    registry_url: str,
    *,
    repository: str,
    tag: str,
    images: Sequence[BuiltImage],
    auth: Auth | None = None,
    timeout_seconds: float = 60.0,
) -> str:
    """Push each image by digest into ``repository``, then an index over them as ``tag``."""
    for image in images:
        if image.repository != repository:
            raise ValueError(f"image for {image.repository} cannot go into an index in {repository}")
        push_image(registry_url, image, tag="", auth=auth, timeout_seconds=timeout_seconds)
    with _client(registry_url, auth, timeout_seconds) as client:
        return _put_manifest(client, repository, tag, build_index(images), OCI_INDEX)


# A base layer shared by demo/web and demo/worker: one blob in the registry and, after a build,
# one file in the content store.
_DEMO_BASE = LayerSpec(size_bytes=384 * KiB, seed=100, file_count=3)


def demo_images() -> list[DemoImage]:
    """The README demo's images: small, built and pushed in well under a second."""
    web = ImageSpec(
        "demo/web",
        "1.0",
        [
            _DEMO_BASE,
            LayerSpec(256 * KiB, seed=101, file_count=2),
            LayerSpec(2 * MiB, compressible=True, seed=102),
        ],
    )
    worker = ImageSpec("demo/worker", "1.0", [_DEMO_BASE, LayerSpec(192 * KiB, seed=111)])
    base_amd64 = ImageSpec("demo/base", "1.0", [LayerSpec(128 * KiB, seed=121)], platform=("linux", "amd64"))
    base_arm64 = ImageSpec(
        "demo/base", "1.0", [LayerSpec(128 * KiB, seed=122)], platform=("linux", "arm64", "v8")
    )
    return [
        DemoImage("demo/web", "1.0", (web,)),
        DemoImage("demo/worker", "1.0", (worker,)),
        DemoImage("demo/base", "1.0", (base_amd64, base_arm64)),
    ]


def push_demo_image(
    registry_url: str, demo: DemoImage, *, auth: Auth | None = None, blob_dir: Path | None = None
) -> PushedImage:
    """Build and push one demo image (an index when it has several platforms)."""
    built = tuple(build_image(spec, blob_dir=blob_dir) for spec in demo.platforms)
    if len(built) == 1:
        digest = push_image(registry_url, built[0], tag=demo.tag, auth=auth)
        return PushedImage(demo.repository, demo.tag, digest, built)
    digest = push_index(registry_url, repository=demo.repository, tag=demo.tag, images=built, auth=auth)
    return PushedImage(
        demo.repository, demo.tag, digest, built, is_index=True, index_bytes=build_index(built)
    )


def push_demo_images(registry_url: str, *, auth: Auth | None = None) -> list[PushedImage]:
    """Build and push every image of ``demo_images()``."""
    return [push_demo_image(registry_url, demo, auth=auth) for demo in demo_images()]
