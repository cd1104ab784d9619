"""A client for the OCI distribution API: resolve images, download blobs, size layers.

The builder needs three things from a registry: the manifest for one platform (through an
index when the tag names a multi-arch image), every blob streamed to disk and verified, and the
unpacked size of each layer *before* downloading it, so a cache that is too small fails in
seconds rather than after gigabytes. Everything a registry can get wrong is mapped to a
``BuildFailure`` reason here, so the rest of the builder never sees HTTP.

Trust: every manifest and blob is checked against its digest (sha256 only). A digest-pinned
reference must match what is served; for a tag, the body must match the registry's
``Docker-Content-Digest`` header when it sends one. A blob download that does not verify is
deleted, so a file at the destination path is always verified content.

Auth follows the Docker token protocol. A request goes out plain; on 401 the
``WWW-Authenticate`` challenge decides: ``Basic`` resends with the credentials, ``Bearer``
fetches a token from the realm (with basic credentials, an identity token as an OAuth2 refresh
token, or anonymously) and caches it per (host, scope) until it expires. The challenge is
remembered per host, so later requests authenticate up front instead of paying a 401 each.
Passwords and tokens never appear in messages, reprs or logs.

Unpacked layer sizes come from the compressed stream's own metadata, never by decompressing:
see ``gzip_uncompressed_size`` (the gzip ISIZE trailer, fetched with ``Range: bytes=-4``) and
``zstd_frame_content_size`` (the zstd frame header, ``Range: bytes=0-17``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from services.cache_registry.provider import BuildFailure, Platform, PullOptions, RegistryCredential
from snapcache.images import ImageReference
from snapcache.registry_auth import Challenge, parse_www_authenticate, preferred_challenge

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST])

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"

MiB = 1024 * 1024
MAX_MANIFEST_BYTES = 4 * MiB  # containerd's limit too
MAX_CONFIG_BYTES = 16 * MiB
# Tokens whose lifetime the realm does not state live 60 s (Docker token spec); refresh early.
_DEFAULT_TOKEN_SECONDS = 60.0
_TOKEN_MARGIN_SECONDS = 10.0
# Annotation set by eStargz builders: the unpacked size, which ISIZE cannot give for their
# multi-member gzip streams.
ESTARGZ_UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"

_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")

ChunkCallback = Callable[[int], None]
# Blobs must arrive byte for byte as stored (their digest is over those bytes): ask servers not to
# add a transfer compression on top. (Manifests may come gzip'ed; httpx decodes them.)
_BLOB_HEADERS = {"Accept-Encoding": "identity"}


# --- pure parts: challenges, platforms, sizes ------------------------------------------------


_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm"}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}
_IMPLIED_VARIANT = {("amd64", "v1")}


def normalize_platform(platform: Platform) -> Platform:
    """Canonical form for matching: ``aarch64`` -> ``arm64``, ``arm64`` implies ``v8``, ``arm`` ``v7``."""
    os_name = platform.os.lower()
    arch = _ARCH_ALIASES.get(platform.architecture.lower(), platform.architecture.lower())
    variant = platform.variant.lower()
    if (arch, variant) in _IMPLIED_VARIANT:
        variant = ""
    variant = variant or _DEFAULT_VARIANT.get(arch, "")
    return Platform(os=os_name, architecture=arch, variant=variant)


def platform_matches(wanted: Platform, candidate: Platform) -> bool:
    """Whether ``candidate`` serves ``wanted``; ``linux/arm64`` and ``linux/arm64/v8`` are one."""
    return normalize_platform(wanted) == normalize_platform(candidate)


class Compression(Enum):
    """How a layer blob is compressed, judged by its media type."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


def layer_compression(media_type: str) -> Compression:
    """The compression of a layer media type (unknown types are treated as stored as is)."""
    if media_type.endswith(("gzip", "+gzip")):
        return Compression.GZIP
    if media_type.endswith("zstd"):
        return Compression.ZSTD
    return Compression.NONE


# How much bigger than its content a compressed stream can be. Real encoders fall back to stored
# (raw) blocks on incompressible data: deflate adds 5 bytes per block, and zlib and Go's
# compress/flate (Docker, BuildKit) close a block every ~16 K symbols: +0.03%. zstd adds 3 bytes
# per raw block of up to 128 KiB. Nothing in either format forbids smaller blocks, so we allow
# 1/64 (1.6%) plus 1 KiB of framing: far above any common encoder, and still tight enough to tell
# a wrapped 32-bit size from a real one. Too tight a floor would turn a legitimate incompressible
# layer into a "wrapped" one and refuse a cache that fits.
_FRAMING_SLACK_BYTES = 1024
_EXPANSION_DIVISOR = 64
# Deflate's best case is 258-byte matches at ~2 bits each: at most ~1032:1 (zlib's figure).
_DEFLATE_MAX_RATIO = 1032
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_HEADER_PROBE_BYTES = 18  # magic 4 + descriptor 1 + window 1 + dictionary id 4 + content size 8
# When a zstd stream does not state its size (streaming encoders usually do not), we estimate.
# Container layers (binaries, text, package databases) typically unpack to 2-4x their zstd size;
# 3x keeps the cache-size check useful without refusing caches that would fit most of the time.
ZSTD_ESTIMATED_RATIO = 3


def _content_floor(compressed_size: int) -> int:
    """The least content a stream of ``compressed_size`` bytes can hold (see the slack above)."""
    return max(0, (compressed_size - _FRAMING_SLACK_BYTES) * (_EXPANSION_DIVISOR - 1) // _EXPANSION_DIVISOR)


def gzip_uncompressed_size(*, isize: int, compressed_size: int) -> int | None:
    """The unpacked size of a gzip layer from its ISIZE trailer field (size mod 2**32).

    A layer of 4 GiB or more wraps ISIZE: the true size is ``isize + k * 2**32`` for some k >= 0.
    Compression cannot make data much *bigger* (stored blocks; see ``_EXPANSION_DIVISOR``), which
    puts a floor under the true size given the compressed size; we answer the smallest candidate
    at or above that floor. That is exact whenever the true size is less than the floor plus
    4 GiB: every layer under 4 GiB, and every larger one that compression shrank by less than
    ~4 GiB (incompressible data of any size included). Otherwise it is low by a multiple of
    4 GiB, which no method short of decompressing can tell.

    ``None`` when ISIZE cannot describe this stream: the answer would need a ratio beyond
    deflate's maximum, i.e. the trailer belongs to the last member of a multi-member gzip
    (eStargz) rather than to the whole layer.
    """
    floor = _content_floor(compressed_size)
    wraps = 0 if isize >= floor else -(-(floor - isize) // 2**32)
    size = isize + wraps * 2**32
    if size > _DEFLATE_MAX_RATIO * compressed_size + 2**16:
        return None
    return size


def zstd_frame_content_size(header: bytes) -> int | None:
    """The Frame_Content_Size of the zstd frame starting ``header``, if the frame states it."""
    if len(header) < 5 or header[:4] != _ZSTD_MAGIC:
        return None
    descriptor = header[4]
    size_flag = descriptor >> 6
    single_segment = (descriptor >> 5) & 1
    position = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3]
    width = (1 if single_segment else 0, 2, 4, 8)[size_flag]
    if width == 0 or len(header) < position + width:
        return None
    value = int.from_bytes(header[position : position + width], "little")
    return value + 256 if width == 2 else value


def zstd_uncompressed_size(*, header: bytes, compressed_size: int) -> int:
    """The unpacked size of a zstd layer from its first frame header, else an estimate.

    A stated content size below what the compressed bytes must unpack to belongs to the first of
    several frames (zstd:chunked), not to the layer: then, as when no size is stated, we answer
    ``ZSTD_ESTIMATED_RATIO`` times the compressed size.
    """
    stated = zstd_frame_content_size(header)
    floor = _content_floor(compressed_size)
    if stated is not None and stated >= floor:
        return stated
    return compressed_size * ZSTD_ESTIMATED_RATIO


# --- descriptors and resolved images ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor: what a blob or manifest is, its digest and size."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    """One image resolved to a single platform: verified manifest (and index) and config bytes."""

    reference: ImageReference
    platform: Platform
    manifest: Descriptor
    manifest_bytes: bytes
    config: Descriptor
    config_bytes: bytes
    layers: tuple[Descriptor, ...]
    index: Descriptor | None = None
    index_bytes: bytes = b""

    @property
    def compressed_bytes(self) -> int:
        """Config plus layers as stored in the registry."""
        return self.config.size + sum(layer.size for layer in self.layers)


def layer_size_probe(layer: Descriptor) -> tuple[int, int] | None:
    """Which bytes of a layer blob reveal its unpacked size: ``(start, length)``, -1 = from the end."""
    compression = layer_compression(layer.media_type)
    if compression is Compression.GZIP and ESTARGZ_UNCOMPRESSED_SIZE not in layer.annotations:
        return (-1, 4) if layer.size >= 4 else None
    if compression is Compression.ZSTD:
        return (0, min(ZSTD_HEADER_PROBE_BYTES, layer.size))
    return None


def uncompressed_size(layer: Descriptor, probe: bytes | None) -> int | None:
    """A layer's unpacked size from the probe bytes ``layer_size_probe`` named (``None``: unknown)."""
    annotated = layer.annotations.get(ESTARGZ_UNCOMPRESSED_SIZE, "")
    if annotated.isdigit():
        return int(annotated)
    compression = layer_compression(layer.media_type)
    if compression is Compression.NONE:
        return layer.size
    if probe is None:
        return None
    if compression is Compression.ZSTD:
        return zstd_uncompressed_size(header=probe, compressed_size=layer.size)
    if len(probe) != 4:
        return None
    return gzip_uncompressed_size(isize=int.from_bytes(probe, "little"), compressed_size=layer.size)


def uncompressed_size_of_file(layer: Descriptor, path: Path) -> int:
    """A downloaded layer's unpacked size, read from the file (falls back to an estimate)."""
    spot = layer_size_probe(layer)
    probe: bytes | None = None
    if spot is not None:
        start, length = spot
        with path.open("rb") as handle:
            if start < 0:
                handle.seek(-length, os.SEEK_END)
            else:
                handle.seek(start)
            probe = handle.read(length)
    size = uncompressed_size(layer, probe)
    # A gzip trailer inconsistent with the stream (multi-member gzip): same estimate as zstd.
    return size if size is not None else layer.size * ZSTD_ESTIMATED_RATIO


# --- the client ------------------------------------------------------------------------------


def _failure(reason: str, message: str, *, retryable: bool = False) -> BuildFailure:
    return BuildFailure(reason, message, retryable=retryable)


def _basic_authorization(credential: RegistryCredential) -> str:
    token = base64.b64encode(f"{credential.username}:{credential.password}".encode()).decode()
    return f"Basic {token}"


def _registry_errors(response: httpx.Response) -> list[str]:
    """The ``errors[].code`` values of a registry error body (read at most 64 KiB of it)."""
    data = b""
    try:
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) > 65536:
                return []
        body = json.loads(data)
    except (ValueError, httpx.HTTPError):
        return []
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list):
        return []
    return [str(error.get("code", "")) for error in errors if isinstance(error, dict)]


def _checked_digest(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _DIGEST.match(value):
        raise _failure("MANIFEST_INVALID", f"{what} has an invalid or unsupported digest {str(value)[:80]!r}")
    return value


def _descriptor(value: Any, what: str) -> Descriptor:
    if not isinstance(value, dict):
        raise _failure("MANIFEST_INVALID", f"{what} is not a descriptor object")
    media_type = value.get("mediaType", "")
    size = value.get("size")
    if not isinstance(media_type, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _failure("MANIFEST_INVALID", f"{what} has an invalid mediaType or size")
    platform = None
    raw_platform = value.get("platform")
    if isinstance(raw_platform, dict):
        platform = Platform(
            os=str(raw_platform.get("os", "")),
            architecture=str(raw_platform.get("architecture", "")),
            variant=str(raw_platform.get("variant", "")),
        )
    raw_annotations = value.get("annotations") or {}
    annotations = (
        {str(k): str(v) for k, v in raw_annotations.items()} if isinstance(raw_annotations, dict) else {}
    )
    return Descriptor(
        media_type=media_type,
        digest=_checked_digest(value.get("digest"), what),
        size=size,
        platform=platform,
        annotations=annotations,
    )


def _parse_json_manifest(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise _failure("MANIFEST_INVALID", f"{what} is not a JSON object")
    return document


class DistributionClient:
    """Talks the OCI distribution API to any number of registries, with auth and verification."""

    def __init__(
        self,
        *,
        credentials: Mapping[str, RegistryCredential] | None = None,
        plain_http_registries: frozenset[str] = frozenset(),
        insecure_registries: frozenset[str] = frozenset(),
        timeout_seconds: float = 30.0,
        connect_timeout_seconds: float = 10.0,
        max_connections: int = 16,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._credentials = dict(credentials or {})
        self._plain_http = frozenset(plain_http_registries)
        self._insecure = frozenset(insecure_registries)
        self._timeout = httpx.Timeout(timeout_seconds, connect=connect_timeout_seconds)
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._transport = transport
        self._clients: dict[bool, httpx.Client] = {}
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}  # registry host -> last challenge seen
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}  # (host, scope) -> (token, expiry)

    @classmethod
    def from_options(
        cls,
        options: PullOptions,
        *,
        max_connections: int = 16,
        timeout_seconds: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> Self:
        """A client configured from a build's ``PullOptions``."""
        return cls(
            credentials=options.credentials,
            plain_http_registries=options.plain_http_registries,
            insecure_registries=options.insecure_registries,
            timeout_seconds=timeout_seconds,
            max_connections=max_connections,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"DistributionClient(registries_with_credentials={sorted(self._credentials)})"

    def close(self) -> None:
        """Close pooled connections."""
        with self._lock:
            clients, self._clients = self._clients, {}
        for client in clients.values():
            client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- public operations --

    def resolve(
        self,
        reference: ImageReference,
        *,
        platform: Platform,
        known_blob: Callable[[str], bytes | None] | None = None,
    ) -> ResolvedImage:
        """Resolve a tag or digest to the verified manifest and config for ``platform``.

        ``known_blob(digest)`` may return a blob the caller already holds verified (a resumed
        build's config), which is then checked again and not fetched.
        """
        target = reference.digest or reference.tag or "latest"
        top, body = self._get_manifest(reference, target, expected_digest=reference.digest)
        index: Descriptor | None = None
        index_bytes = b""
        if top.media_type in INDEX_MEDIA_TYPES:
            index, index_bytes = top, body
            chosen = self._choose_platform(reference, body, platform)
            manifest, body = self._get_manifest(reference, chosen.digest, expected_digest=chosen.digest)
            if manifest.media_type not in MANIFEST_MEDIA_TYPES:
                raise _failure(
                    "MANIFEST_INVALID",
                    f"image {reference}: the {platform} entry of its index is a {manifest.media_type}, "
                    "not an image manifest",
                )
            found_platform = chosen.platform or platform
        elif top.media_type in MANIFEST_MEDIA_TYPES:
            manifest = top
            found_platform = platform
        else:
            raise _failure(
                "MANIFEST_INVALID",
                f"image {reference} has unsupported manifest type {top.media_type or 'unknown'!r} "
                "(schema 1 and artifacts cannot be cached)",
            )
        document = _parse_json_manifest(body, f"manifest of {reference}")
        config = _descriptor(document.get("config"), f"config of {reference}")
        raw_layers = document.get("layers")
        if not isinstance(raw_layers, list):
            raise _failure("MANIFEST_INVALID", f"manifest of {reference} has no layers list")
        layers = tuple(_descriptor(layer, f"layer {i} of {reference}") for i, layer in enumerate(raw_layers))
        if config.size > MAX_CONFIG_BYTES:
            raise _failure(
                "MANIFEST_INVALID", f"config of {reference} is {config.size} bytes, over the limit"
            )
        held = known_blob(config.digest) if known_blob is not None else None
        if held is not None:
            self._verify(reference, config, held)
            config_bytes = held
        else:
            config_bytes = self.fetch_blob(reference, config)
        if index is None:
            found_platform = self._config_platform(reference, config_bytes, platform)
        return ResolvedImage(
            reference=reference,
            platform=found_platform,
            manifest=manifest,
            manifest_bytes=body,
            config=config,
            config_bytes=config_bytes,
            layers=layers,
            index=index,
            index_bytes=index_bytes,
        )

    def fetch_blob(self, reference: ImageReference, descriptor: Descriptor) -> bytes:
        """A small blob (a config) in memory, verified."""
        with self._stream(
            "GET",
            reference,
            f"blobs/{descriptor.digest}",
            what=f"blob {descriptor.digest}",
            headers=_BLOB_HEADERS,
            follow_redirects=True,
        ) as response:
            data = b"".join(response.iter_bytes())
        self._verify(reference, descriptor, data)
        return data

    def download_blob(
        self,
        reference: ImageReference,
        descriptor: Descriptor,
        destination: Path,
        *,
        on_chunk: ChunkCallback | None = None,
    ) -> None:
        """Stream a blob to ``destination`` via ``<destination>.partial``, hashing as it is written.

        One pass over the data: each chunk as the connection delivers it (up to 64 KiB, httpcore's
        read size) is hashed and written with one system call. Re-chunking to 1 MiB, in httpx
        or in a buffered writer, only adds a copy of every byte: measured no faster, often
        slower. ``on_chunk(n)`` runs before each chunk is written; raising from it (a full disk,
        a cancelled build) aborts the download. On any failure the partial file is removed, so
        ``destination`` only ever holds verified content.
        """
        partial = destination.with_name(destination.name + ".partial")
        hasher = hashlib.sha256()
        written = 0
        try:
            with (
                self._stream(
                    "GET",
                    reference,
                    f"blobs/{descriptor.digest}",
                    what=f"blob {descriptor.digest}",
                    headers=_BLOB_HEADERS,
                    follow_redirects=True,
                ) as response,
                partial.open("wb") as handle,
            ):
                for chunk in response.iter_bytes():
                    written += len(chunk)
                    if written > descriptor.size:
                        raise _failure(
                            "DIGEST_MISMATCH",
                            f"blob {descriptor.digest} of image {reference}: registry sent more than "
                            f"the {descriptor.size} bytes the manifest states",
                        )
                    if on_chunk is not None:
                        on_chunk(len(chunk))
                    handle.write(chunk)
                    hasher.update(chunk)
            self._check_digest(reference, descriptor, written, "sha256:" + hasher.hexdigest())
            os.replace(partial, destination)
        except httpx.TransportError as exc:
            partial.unlink(missing_ok=True)
            raise self._unreachable(reference, exc) from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def layer_uncompressed_size(self, reference: ImageReference, layer: Descriptor) -> int | None:
        """A layer's unpacked size from a small range request; ``None`` if the registry ignores ranges."""
        spot = layer_size_probe(layer)
        if spot is None:
            return uncompressed_size(layer, None)
        start, length = spot
        byte_range = f"bytes=-{length}" if start < 0 else f"bytes={start}-{start + length - 1}"
        with self._stream(
            "GET",
            reference,
            f"blobs/{layer.digest}",
            what=f"blob {layer.digest}",
            headers={**_BLOB_HEADERS, "Range": byte_range},
            follow_redirects=True,
        ) as response:
            if response.status_code != 206:
                return None  # a full body is on its way: leave it unread; the caller sizes it later
            probe = response.read()[:length]
        return uncompressed_size(layer, probe)

    def manifest_served(self, reference: ImageReference, digest: str) -> bool:
        """Whether the registry serves manifest ``digest`` of ``reference``'s repository to this client.

        A client made without credentials asks anonymously, following a Bearer challenge with an
        anonymous token as any pull does: that is how the builder tells a public image from a
        private one. A HEAD request (no body; not counted as a pull by Docker Hub). Any answer but
        2xx is False, an unreachable registry included: a caller that must be safe treats what it
        could not confirm as private. Registries that hide private repositories answer 404 to
        strangers, so a 404 is False too.
        """
        try:
            with self._stream(
                "HEAD", reference, f"manifests/{digest}", what="manifest", headers={"Accept": MANIFEST_ACCEPT}
            ):
                return True
        except BuildFailure:
            return False

    # -- manifests --

    def _get_manifest(
        self, reference: ImageReference, target: str, *, expected_digest: str
    ) -> tuple[Descriptor, bytes]:
        with self._stream(
            "GET", reference, f"manifests/{target}", what="manifest", headers={"Accept": MANIFEST_ACCEPT}
        ) as response:
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_MANIFEST_BYTES:
                    raise _failure("MANIFEST_INVALID", f"manifest of {reference} is larger than 4 MiB")
                chunks.append(chunk)
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            served_digest = response.headers.get("Docker-Content-Digest", "")
        body = b"".join(chunks)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if expected_digest and digest != expected_digest:
            raise _failure(
                "DIGEST_MISMATCH",
                f"image {reference}: registry served a manifest with digest {digest}, "
                f"expected {expected_digest}",
            )
        if served_digest.startswith("sha256:") and served_digest != digest:
            raise _failure(
                "DIGEST_MISMATCH",
                f"image {reference}: manifest body hashes to {digest} but the registry says {served_digest}",
            )
        document = _parse_json_manifest(body, f"manifest of {reference}")
        media_type = document.get("mediaType")
        if not isinstance(media_type, str) or not media_type:
            media_type = content_type  # mediaType is optional in OCI manifests
        if media_type not in INDEX_MEDIA_TYPES | MANIFEST_MEDIA_TYPES and document.get("schemaVersion") == 2:
            if isinstance(document.get("manifests"), list):
                media_type = OCI_INDEX
            elif "config" in document and isinstance(document.get("layers"), list):
                media_type = OCI_MANIFEST
        return Descriptor(media_type=media_type, digest=digest, size=len(body)), body

    def _choose_platform(self, reference: ImageReference, body: bytes, platform: Platform) -> Descriptor:
        document = _parse_json_manifest(body, f"index of {reference}")
        entries = document.get("manifests")
        if not isinstance(entries, list):
            raise _failure("MANIFEST_INVALID", f"index of {reference} has no manifests list")
        descriptors = [
            _descriptor(entry, f"index entry {i} of {reference}") for i, entry in enumerate(entries)
        ]
        for descriptor in descriptors:
            if descriptor.platform is not None and platform_matches(platform, descriptor.platform):
                return descriptor
        offered = sorted({str(d.platform) for d in descriptors if d.platform is not None})
        raise _failure(
            "PLATFORM_NOT_FOUND",
            f"image {reference} has no {platform} variant (it offers {', '.join(offered) or 'none'})",
        )

    @staticmethod
    def _config_platform(reference: ImageReference, config_bytes: bytes, wanted: Platform) -> Platform:
        try:
            config = json.loads(config_bytes)
        except ValueError:
            config = None
        if not isinstance(config, dict) or not config.get("os") or not config.get("architecture"):
            return wanted  # not a runnable image config: nothing to check against
        found = Platform(
            os=str(config["os"]),
            architecture=str(config["architecture"]),
            variant=str(config.get("variant", "")),
        )
        if not wanted.variant or not found.variant:
            found_key = normalize_platform(Platform(found.os, found.architecture))
            wanted_key = normalize_platform(Platform(wanted.os, wanted.architecture))
        else:
            found_key, wanted_key = normalize_platform(found), normalize_platform(wanted)
        if found_key != wanted_key:
            raise _failure(
                "PLATFORM_NOT_FOUND", f"image {reference} is built for {found} only; {wanted} was requested"
            )
        return found

    # -- verification --

    def _verify(self, reference: ImageReference, descriptor: Descriptor, data: bytes) -> None:
        self._check_digest(reference, descriptor, len(data), "sha256:" + hashlib.sha256(data).hexdigest())

    @staticmethod
    def _check_digest(reference: ImageReference, descriptor: Descriptor, size: int, digest: str) -> None:
        if size != descriptor.size or digest != descriptor.digest:
            raise _failure(
                "DIGEST_MISMATCH",
                f"blob {descriptor.digest} of image {reference}: received {size} bytes hashing to {digest} "
                f"(expected {descriptor.size} bytes)",
            )

    # -- HTTP with auth and error mapping --

    def _endpoint(self, registry: str) -> str:
        host = DOCKER_HUB_ENDPOINT if registry == DOCKER_HUB else registry
        scheme = "http" if registry in self._plain_http else "https"
        return f"{scheme}://{host}"

    def _client(self, *, verify: bool) -> httpx.Client:
        with self._lock:
            client = self._clients.get(verify)
            if client is None:
                client = httpx.Client(
                    verify=verify,
                    timeout=self._timeout,
                    limits=self._limits,
                    transport=self._transport,
                    headers={"User-Agent": "snapcache"},
                )
                self._clients[verify] = client
            return client

    @contextmanager
    def _stream(
        self,
        method: str,
        reference: ImageReference,
        path: str,
        *,
        what: str,
        headers: Mapping[str, str] | None = None,
        follow_redirects: bool = False,
    ) -> Iterator[httpx.Response]:
        """Send with auth; yield a successful (2xx) streaming response, else raise ``BuildFailure``."""
        registry = reference.registry
        scope = f"repository:{reference.repository}:pull"
        url = f"{self._endpoint(registry)}/v2/{reference.repository}/{path}"
        client = self._client(verify=registry not in self._insecure)
        authorization = self._authorization(registry, scope, after_challenge=False, reference=reference)
        for attempt in range(2):
            request_headers = dict(headers or {})
            if authorization:
                request_headers["Authorization"] = authorization
            request = client.build_request(method, url, headers=request_headers)
            try:
                response = client.send(request, stream=True, follow_redirects=follow_redirects)
            except httpx.TransportError as exc:
                raise self._unreachable(reference, exc) from None
            try:
                if response.status_code == 401 and attempt == 0:
                    challenges = parse_www_authenticate(response.headers.get_list("WWW-Authenticate"))
                    answered = self._remember_challenge(registry, challenges)
                    authorization = self._authorization(
                        registry,
                        scope,
                        after_challenge=True,
                        answered=answered,
                        rejected=authorization,
                        reference=reference,
                    )
                    continue
                self._raise_for_status(reference, response, what=what, authenticated=bool(authorization))
                yield response
                return
            except httpx.TransportError as exc:
                raise self._unreachable(reference, exc) from None
            finally:
                response.close()
        raise AssertionError("unreachable: the second attempt always returns or raises")

    def _remember_challenge(self, registry: str, challenges: Sequence[Challenge]) -> Challenge | None:
        """Keep the host's challenge for later requests; return it (None: none usable)."""
        chosen = preferred_challenge(challenges)
        with self._lock:
            if chosen is None:
                self._challenges.pop(registry, None)
            else:
                self._challenges[registry] = chosen
        return chosen

    def _authorization(
        self,
        registry: str,
        scope: str,
        *,
        after_challenge: bool,
        answered: Challenge | None = None,
        rejected: str = "",
        reference: ImageReference | None = None,
    ) -> str:
        """The Authorization header for a request to ``registry`` (``""``: go anonymous).

        Before any challenge from a host, requests go anonymous. Once a host has challenged, its
        scheme is used up front: Basic credentials, or a cached (or freshly fetched) Bearer token
        for ``scope``. ``after_challenge`` means the host just answered 401 to this request, sent
        with the Authorization header ``rejected``: that token is dropped, however long its issuer
        said it would last (the registry may have expired or revoked it), and a new one fetched
        for the scope the challenge named. A different cached token, one another thread fetched
        meanwhile, is used as it is. After a challenge, ``answered`` is the challenge this very
        request got: another thread's request to the same host may have stored a challenge for
        another repository meanwhile, whose scope would buy a token this request cannot use.
        """
        if after_challenge:
            challenge = answered
        else:
            with self._lock:
                challenge = self._challenges.get(registry)
        credential = self._credentials.get(registry)
        if challenge is None:
            if after_challenge:
                raise _failure(
                    "REGISTRY_AUTH_FAILED",
                    f"registry {registry} answered 401 without a usable WWW-Authenticate challenge",
                )
            return ""
        if challenge.scheme == "basic":
            if credential is not None and (credential.username or credential.password):
                return _basic_authorization(credential)
            if not after_challenge:
                return ""
            raise _failure(
                "REGISTRY_AUTH_FAILED",
                f"registry {registry} requires authentication and no credentials were given for it",
            )
        key = (registry, scope)
        now = time.monotonic()
        with self._lock:
            cached = self._tokens.get(key)
            if after_challenge and cached is not None and f"Bearer {cached[0]}" == rejected:
                del self._tokens[key]
                cached = None
        if cached is not None and cached[1] > now:
            return f"Bearer {cached[0]}"
        token_scope = (challenge.params.get("scope") or scope) if after_challenge else scope
        token, lifetime = self._fetch_token(registry, challenge, token_scope, reference)
        # renew a little early (a request takes time to arrive), but a short-lived token (the
        # spec's floor is 60 s; some issue less) must still be reused for most of its life
        margin = min(_TOKEN_MARGIN_SECONDS, lifetime / 4)
        with self._lock:
            self._tokens[key] = (token, now + lifetime - margin)
        return f"Bearer {token}"

    def _fetch_token(
        self, registry: str, challenge: Challenge, scope: str, reference: ImageReference | None
    ) -> tuple[str, float]:
        realm = challenge.params.get("realm", "")
        realm_url = httpx.URL(realm) if realm else None
        if realm_url is None or realm_url.scheme not in ("http", "https") or not realm_url.host:
            raise _failure(
                "REGISTRY_AUTH_FAILED", f"registry {registry} sent a Bearer challenge without a realm"
            )
        realm_host = realm_url.netloc.decode()
        credential = self._credentials.get(registry)
        if (
            realm_url.scheme == "http"
            and realm_host not in self._plain_http
            and registry not in self._plain_http
        ):
            credential = None  # never send a password in clear to a host not listed as plain HTTP
        params = {k: v for k, v in (("service", challenge.params.get("service", "")), ("scope", scope)) if v}
        client = self._client(verify=realm_host not in self._insecure)
        what = f"image {reference}" if reference is not None else f"registry {registry}"
        try:
            if credential is not None and credential.identity_token:
                response = client.post(
                    realm_url,
                    data={
                        **params,
                        "grant_type": "refresh_token",
                        "refresh_token": credential.identity_token,
                        "client_id": "snapcache",
                    },
                )
            elif credential is not None and (credential.username or credential.password):
                response = client.get(
                    realm_url, params=params, auth=httpx.BasicAuth(credential.username, credential.password)
                )
            else:
                response = client.get(realm_url, params=params)
        except httpx.TransportError as exc:
            raise _failure(
                "REGISTRY_UNREACHABLE",
                f"token service {realm_host} for registry {registry} unreachable ({type(exc).__name__})",
                retryable=True,
            ) from None
        if response.status_code in (401, 403):
            who = (
                f"user {credential.username!r}"
                if credential is not None and credential.username
                else "anonymous"
            )
            raise _failure(
                "REGISTRY_AUTH_FAILED",
                f"token service {realm_host} refused {who} for {what} on registry {registry} "
                f"(HTTP {response.status_code})",
            )
        if response.status_code >= 500 or response.status_code == 429:
            raise _failure(
                "REGISTRY_UNREACHABLE",
                f"token service {realm_host} for registry {registry} answered HTTP {response.status_code}",
                retryable=True,
            )
        try:
            body = response.json()
        except ValueError:
            body = None
        token = ""
        lifetime = _DEFAULT_TOKEN_SECONDS
        if isinstance(body, dict):
            token = str(body.get("token") or body.get("access_token") or "")
            expires_in = body.get("expires_in")
            if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
                lifetime = float(expires_in)
        if response.status_code != 200 or not token:
            raise _failure(
                "REGISTRY_AUTH_FAILED",
                f"token service {realm_host} for registry {registry} returned no token "
                f"(HTTP {response.status_code})",
            )
        return token, lifetime

    def _raise_for_status(
        self, reference: ImageReference, response: httpx.Response, *, what: str, authenticated: bool
    ) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        codes = _registry_errors(response)
        registry = reference.registry
        if status == 404 or any(
            code in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN") for code in codes
        ):
            subject = f"image {reference}" if what == "manifest" else f"{what} of image {reference}"
            raise _failure("IMAGE_NOT_FOUND", f"{subject} not found in registry")
        if status in (401, 403):
            user = self._credentials.get(registry)
            # A Bearer registry says why in its challenge: insufficient_scope means the token
            # service vouched for the caller but granted no pull (distribution also answers so for
            # a repository that does not exist, not to reveal which do); others answer DENIED.
            error = next(
                (
                    c.params.get("error", "")
                    for c in parse_www_authenticate(response.headers.get_list("WWW-Authenticate"))
                    if c.scheme == "bearer"
                ),
                "",
            )
            denied = error == "insufficient_scope" or "DENIED" in codes
            if user is None and (denied or not authenticated):
                detail = "requires authentication (no credentials were given for it)"
            elif denied and user is not None:
                who = f"user {user.username!r}" if user.username else "the given identity token"
                detail = f"denied {who} pull access to {reference.repository}"
            elif authenticated and user is not None and user.username:
                detail = f"rejected the credentials of user {user.username!r}"
            elif authenticated:
                detail = "refused access"
            else:
                detail = "requires authentication"
            why = f"HTTP {status} {error}" if error else f"HTTP {status}"
            raise _failure(
                "REGISTRY_AUTH_FAILED",
                f"registry {registry} {detail} for image {reference} ({why}; "
                "or the repository does not exist)",
            )
        if status == 429:
            raise _failure(
                "REGISTRY_UNREACHABLE",
                f"registry {registry} is rate-limiting pulls (HTTP 429)",
                retryable=True,
            )
        if status >= 500:
            raise _failure(
                "REGISTRY_UNREACHABLE",
                f"registry {registry} failed with HTTP {status} on {what} of image {reference}",
                retryable=True,
            )
        raise _failure(
            "REGISTRY_ERROR",
            f"registry {registry} answered HTTP {status} ({', '.join(codes) or 'no error code'}) "
            f"on {what} of image {reference}",
        )

    @staticmethod
    def _unreachable(reference: ImageReference, exc: httpx.TransportError) -> BuildFailure:
        kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "connection failed"
        return _failure(
            "REGISTRY_UNREACHABLE",
            f"registry {reference.registry} unreachable for image {reference} ({kind}: {type(exc).__name__})",
            retryable=True,
        )
