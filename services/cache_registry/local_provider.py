"""The embedded data plane: builder disks, snapshots and zone disks as directories on one machine.

It models what a cloud provider does with block devices, using files, so the whole lifecycle
runs (and is tested) without a cloud, with the same contract (idempotent, atomic, inventoried)
and the same costs in the same places:

- A **builder disk** is ``builders/<disk_id>/``, a valid OCI image layout (``oci-layout``,
  ``index.json``, ``blobs/sha256/<hex>``) with a hard capacity: bytes are counted as they are
  written, and a write past ``capacity_bytes`` fails with ``CACHE_TOO_SMALL``. ``pull_images``
  first resolves every manifest and sizes every layer (compressed, and unpacked from the gzip/zstd
  metadata, see ``distribution``), so a cache that cannot hold the images fails before any layer
  is downloaded, naming the size that would fit. Blobs are then downloaded concurrently, each
  once even when several images share it, via ``<hex>.partial`` renamed only after its digest
  verified: a blob present is a blob verified, which is what lets a retried build resume where
  the last attempt stopped. ``index.json`` lists each image's platform manifest under the
  annotation ``org.opencontainers.image.ref.name`` = the normalized reference, exactly as
  ``str(ImageReference)`` writes it (``127.0.0.1:5000/demo/web:1.0``, also with ``@sha256:...``):
  skopeo 1.9 accepts that form verbatim in ``oci:DIR:REF`` (it splits DIR at the *first* colon,
  which is why ids and the root path must not contain ``:``).
- **Layer diffs.** After its layers verified, the builder also stores each gzip layer's
  *uncompressed* tar as the blob ``blobs/sha256/<DiffID>`` (the digest the image config lists in
  ``rootfs.diff_ids`` at the layer's position). A node makes containerd's snapshots straight from
  these, without gunzipping (most of a pod start on a cached image); the build does it once.
  Each diff is verified like every blob (``.partial``, renamed only when its sha256 equals the
  DiffID), so a present diff is never rewritten. A layer gets no diff, and the build goes on,
  when its config names a DiffID its content does not have (logged), when its stream does not
  decompress, when it is zstd (no zstd library here), non-distributable or foreign; an
  uncompressed layer needs none (it is its own diff). Diffs are optional, so they never fail a
  build for size: they are written only when the blobs *plus* every diff fit the disk
  (``CACHE_TOO_SMALL`` still means ``max(stored, unpacked)`` does not), else none is and
  ``PulledImage.layer_diffs`` says how many bytes were missing. Extra blobs are invisible to
  OCI readers (only manifests name blobs), and snapshots, zone copies and disks carry every
  blob, so diffs travel with them and are collected with them.
- A **snapshot** is immutable and content-addressed: each blob is hard-linked into the shared
  store ``cas/sha256/<hex>`` (a blob shared by many snapshots is one inode), and
  ``snapshots/<snapshot_id>/`` is an OCI layout whose blobs are hard links into that store, all
  read-only (0444). Taking a snapshot copies no blob bytes, like a copy-on-write disk snapshot.
- A **zone** has its own storage root (``zones/<name>/`` by default; it may be another
  filesystem, as another zone's storage would be). ``hydrate_zone`` is a *real* copy of the
  snapshot's blobs into the zone's own content store (blobs it already has are skipped), then a
  link tree ``<zone root>/snapshots/<snapshot_id>/``. ``provision_disk`` makes
  ``<zone root>/disks/<disk_id>/``, a hard-link tree of the zone copy: no bytes copied, itself a
  valid OCI layout, and its path is the disk's location.

Everything that creates a tree builds it under a ``.tmp-*`` name and renames it into place, so a
crash leaves only temporaries: ``inventory()`` never reports them and ``collect_garbage()``
removes them, then frees every content-store blob whose link count shows that no snapshot or
disk references it any more (``st_nlink == 1``). Deletions rename to a temporary first, for the
same reason.

Concurrency: different caches build in parallel (each pull holds only its builder disk's lock).
Garbage collection must not free a blob between the moment a snapshot, hydration or disk finds it
in a content store and the moment it links it, so those operations hold a shared lock and GC the
exclusive side. That covers threads of one process; across processes (several registry replicas
on one data directory) exclusion is the registry's job, through its leases.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from services.cache_registry.distribution import (
    Descriptor,
    DistributionClient,
    ResolvedImage,
    uncompressed_size_of_file,
)
from services.cache_registry.provider import (
    BuildFailure,
    CancelCheck,
    DiskInfo,
    Inventory,
    ProgressCallback,
    PulledImage,
    PullOptions,
    PullProgress,
    SnapshotInfo,
    ZoneInfo,
)
from snapcache.errors import AlreadyExists, FailedPrecondition, ResourceExhausted, invalid
from snapcache.images import ImageReference

GiB = 1024**3
MiB = 1024**2
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
SNAPSHOT_ANNOTATION = "io.snapcache.snapshot-id"
DISK_ANNOTATION = "io.snapcache.disk-id"
ZONE_ANNOTATION = "io.snapcache.zone"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
_TMP = ".tmp-"
_PARTIAL = ".partial"
# Ids become directory names and skopeo ``oci:DIR:REF`` paths: no "/", no ":", no leading dot.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
_HEX = re.compile(r"^[a-f0-9]{64}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_PROGRESS_INTERVAL_SECONDS = 0.2
_POLL_SECONDS = 0.05
# Layer diffs: which layers get one (exact media types: the non-distributable and foreign
# variants end the same way but are not ours to copy), and the streaming sizes. 1 MiB in, at most
# 1 MiB out per zlib call: as fast as 4 or 16 MiB (measured: ~230 MB/s of tar per layer, zlib
# 1.2.13 inflating alone ~270), and memory stays bounded however well a layer compresses (a
# run of zeros inflates ~1000:1).
GZIP_LAYER_MEDIA_TYPES = frozenset(
    {"application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.docker.image.rootfs.diff.tar.gzip"}
)
TAR_LAYER_MEDIA_TYPES = frozenset(
    {"application/vnd.oci.image.layer.v1.tar", "application/vnd.docker.image.rootfs.diff.tar"}
)
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header and trailer around the deflate stream
_INFLATE_READ_BYTES = MiB
_INFLATE_OUTPUT_BYTES = MiB

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LocalZone:
    """A zone: its name, how many derived disks it may hold (0 = unlimited), its storage root."""

    name: str
    max_disks: int = 0
    root: Path | None = None  # default: <provider root>/zones/<name>


FAULT_DELAYS_ENV = "SNAPCACHE_LOCAL_PROVIDER_FAULT_DELAYS"
FAULT_STEPS = ("snapshot", "hydrate", "delete")


def parse_fault_delays(text: str) -> dict[str, float]:
    """``snapshot=5,hydrate=2``: seconds to pause in the middle of each step (fault injection)."""
    delays: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        step, _, seconds = item.partition("=")
        if step not in FAULT_STEPS:
            raise ValueError(f"{FAULT_DELAYS_ENV}: unknown step {step!r} (known: {', '.join(FAULT_STEPS)})")
        try:
            delays[step] = float(seconds)
        except ValueError:
            raise ValueError(f"{FAULT_DELAYS_ENV}: {item!r} is not STEP=SECONDS") from None
    return delays


def _fault_delays_from_env() -> dict[str, float]:
    return parse_fault_delays(os.environ.get(FAULT_DELAYS_ENV, ""))


@dataclass(frozen=True, slots=True)
class LocalProviderConfig:
    """Where the local provider keeps its trees, its zones, and how many blobs it pulls at once.

    ``fault_delays`` (from ``$SNAPCACHE_LOCAL_PROVIDER_FAULT_DELAYS`` by default) pauses the
    provider in the middle of a step, with its partial work on disk: fault injection, so a test
    can kill a registry replica while it snapshots, hydrates a zone or deletes, and check that
    another replica finishes the work and nothing is left behind. Empty in normal use.
    """

    root: Path
    zones: Sequence[LocalZone]
    pull_concurrency: int = 4
    request_timeout_seconds: float = 30.0
    fault_delays: dict[str, float] = field(default_factory=_fault_delays_from_env)

    def validate(self) -> None:
        """Raise ``ValueError`` on a setting the provider cannot work with."""
        if ":" in str(self.root):
            raise ValueError(f"provider root {self.root} must not contain ':' (skopeo oci: paths)")
        if self.pull_concurrency < 1:
            raise ValueError(f"pull_concurrency must be at least 1, got {self.pull_concurrency}")
        if self.request_timeout_seconds <= 0:
            raise ValueError("request_timeout_seconds must be positive")
        names = [zone.name for zone in self.zones]
        if len(set(names)) != len(names):
            raise ValueError(f"zone names must be unique: {names}")
        for zone in self.zones:
            if not _ID.match(zone.name):
                raise ValueError(f"zone name {zone.name!r} must be letters, digits, '.', '_' or '-'")
            if zone.max_disks < 0:
                raise ValueError(f"zone {zone.name}: max_disks must be >= 0")
            if zone.root is not None and ":" in str(zone.root):
                raise ValueError(f"zone {zone.name}: root must not contain ':'")


class _SharedExclusiveLock:
    """Many holders of the shared side at once, or one of the exclusive side (GC), never both."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            while self._exclusive or self._exclusive_waiting:
                self._condition.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._condition:
                self._shared -= 1
                self._condition.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._condition:
            self._exclusive_waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._condition.wait()
            finally:
                self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._condition:
                self._exclusive = False
                self._condition.notify_all()


@dataclass(frozen=True, slots=True)
class _ZonePaths:
    name: str
    max_disks: int
    root: Path

    @property
    def cas(self) -> Path:
        return self.root / "cas" / "sha256"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def disks(self) -> Path:
        return self.root / "disks"


# --- OCI layout files ------------------------------------------------------------------------


def _blob_dir(layout: Path) -> Path:
    return layout / "blobs" / "sha256"


def _hex(digest: str) -> str:
    value = digest.removeprefix("sha256:")
    if not _HEX.match(value):
        raise ValueError(f"not a sha256 digest: {digest[:80]!r}")
    return value


def _write_file(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    temporary = path.with_name(path.name + _PARTIAL)
    temporary.write_bytes(data)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def _read_index(layout: Path) -> dict[str, Any]:
    try:
        document = json.loads((layout / "index.json").read_bytes())
    except (OSError, ValueError):
        return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    return document if isinstance(document, dict) else {"schemaVersion": 2, "manifests": []}


def _write_layout_files(
    layout: Path, manifests: Sequence[dict[str, Any]], annotations: dict[str, str], *, mode: int
) -> None:
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(manifests)}
    if annotations:
        index["annotations"] = annotations
    _write_file(layout / "oci-layout", _OCI_LAYOUT, mode=mode)
    _write_file(layout / "index.json", json.dumps(index, indent=1).encode(), mode=mode)


def _blobs(layout: Path) -> list[Path]:
    directory = _blob_dir(layout)
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    return sorted(p for p in entries if _HEX.match(p.name))


# Temporaries carry their writer: `.tmp-<name>-<host>-<pid>-<random>`. Replicas may share the
# provider's trees, so garbage collection removes only temporaries whose writer is gone: a process
# of this host that no longer runs, or (another host's, or an older form) one untouched for an hour.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
TEMPORARY_MAX_AGE_SECONDS = 3600.0


def _unique_tmp(parent: Path, name: str) -> Path:
    return parent / f"{_TMP}{name}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _abandoned(temporary: Path, *, now: float) -> bool:
    """Whether nobody is writing ``temporary`` any more (see `_unique_tmp`)."""
    parts = temporary.name.rsplit("-", 3)
    if len(parts) == 4 and parts[1] == _HOST and parts[2].isdigit():
        pid = int(parts[2])
        if pid == os.getpid():
            return True  # ours, and the caller holds the exclusive lock: no step of ours is running
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    try:
        newest = max(
            (p.stat().st_mtime for p in (temporary, temporary / "blobs" / "sha256") if p.exists()),
            default=0.0,
        )
    except OSError:
        return False
    return now - newest > TEMPORARY_MAX_AGE_SECONDS


def _remove_tree(path: Path) -> int:
    """Delete a tree; return the bytes of files whose last link went with it."""
    freed = 0
    if not path.exists() and not path.is_symlink():
        return 0
    if path.is_file() or path.is_symlink():
        stat = path.lstat()
        path.unlink(missing_ok=True)
        return stat.st_size if stat.st_nlink == 1 else 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for filename in filenames:
            try:
                stat = os.lstat(os.path.join(dirpath, filename))
            except FileNotFoundError:
                continue
            if stat.st_nlink == 1:
                freed += stat.st_size
    shutil.rmtree(path, ignore_errors=True)
    return freed


def _discard(path: Path) -> None:
    """Remove a tree atomically from readers' view: rename to a temporary, then delete."""
    if not path.exists():
        return
    doomed = _unique_tmp(path.parent, path.name)
    try:
        path.rename(doomed)
    except FileNotFoundError:
        return
    _remove_tree(doomed)


def _size_text(size: int, *, round_up: bool) -> str:
    unit, name = (GiB, "GiB") if size >= GiB else (MiB, "MiB")
    tenths = -(-size * 10 // unit) if round_up else size * 10 // unit
    whole, fraction = divmod(tenths, 10)
    return f"{whole} {name}" if fraction == 0 else f"{whole}.{fraction} {name}"


def cache_too_small(*, need_bytes: int, capacity_bytes: int) -> BuildFailure:
    """The ``CACHE_TOO_SMALL`` failure, naming the whole-GiB cache size that would fit."""
    fits = max(1, -(-need_bytes // GiB))
    return BuildFailure(
        "CACHE_TOO_SMALL",
        f"images need {_size_text(need_bytes, round_up=True)} uncompressed; cache size is "
        f"{_size_text(capacity_bytes, round_up=False)} (a cache of {fits} GiB would fit)",
    )


# --- layer diffs -----------------------------------------------------------------------------


def layer_diff_ids(config_bytes: bytes, layer_count: int) -> list[str | None]:
    """Each layer's DiffID from an image config's ``rootfs.diff_ids`` (None where unusable).

    A list that does not pair one to one with the manifest's layers gives no DiffID at all:
    matching them up by position would be a guess. Only sha256 DiffIDs name a blob here.
    """
    try:
        listed = json.loads(config_bytes)["rootfs"]["diff_ids"]
    except (ValueError, TypeError, KeyError):
        return [None] * layer_count
    if not isinstance(listed, list) or len(listed) != layer_count:
        return [None] * layer_count
    return [item if isinstance(item, str) and _DIGEST.match(item) else None for item in listed]


def expected_diff(layer: Descriptor, diff_id: str | None) -> str | None:
    """The digest of the blob that will be ``layer``'s diff, if it may have one.

    A gzip layer's diff is the blob its DiffID names (written if its content verifies); an
    uncompressed layer is its own diff when its digest is its DiffID. zstd layers (no zstd
    library here), non-distributable, foreign and unknown layers have none.
    """
    if diff_id is None:
        return None
    if layer.media_type in GZIP_LAYER_MEDIA_TYPES:
        return diff_id
    if layer.media_type in TAR_LAYER_MEDIA_TYPES and layer.digest == diff_id:
        return diff_id
    return None


def inflate_gzip(source: BinaryIO) -> Iterator[bytes]:
    """The uncompressed content of a gzip stream, every member of it, in chunks of at most 1 MiB.

    zlib inflates in C with the GIL released, so layers inflate in parallel on the pull threads.
    Raises ``zlib.error`` on a corrupt stream, ``EOFError`` on one cut short.
    """
    inflater = zlib.decompressobj(_GZIP_WBITS)
    begun = False  # whether the current member has been fed anything
    pending = b""
    while True:
        if not pending:
            pending = source.read(_INFLATE_READ_BYTES)
            if not pending:
                break
        output = inflater.decompress(pending, _INFLATE_OUTPUT_BYTES)
        begun = True
        if output:
            yield output
        if inflater.eof:  # one member ended; another may follow (multi-member gzip, eStargz)
            pending = inflater.unused_data
            inflater = zlib.decompressobj(_GZIP_WBITS)
            begun = False
        else:
            pending = inflater.unconsumed_tail
    while begun and not inflater.eof:  # what zlib still held when the input ran out
        output = inflater.decompress(b"", _INFLATE_OUTPUT_BYTES)
        if not output:
            raise EOFError("the gzip stream ends before its trailer")
        yield output


# --- pulling ---------------------------------------------------------------------------------


class _Stopped(Exception):
    """A download or diff noticed the pull is being abandoned (cancelled or another blob failed)."""


class _Meter:
    """Bytes on the builder disk (hard capacity) and bytes fetched (progress), shared by threads."""

    def __init__(self, *, disk_id: str, capacity_bytes: int, used_bytes: int, stop: threading.Event) -> None:
        self._lock = threading.Lock()
        self._disk_id = disk_id
        self.capacity_bytes = capacity_bytes
        self.used_bytes = used_bytes
        self.done_bytes = 0
        self._stop = stop

    def reserve(self, size: int) -> None:
        """Account ``size`` bytes about to be written; refuse them past capacity."""
        if self._stop.is_set():
            raise _Stopped
        with self._lock:
            if self.used_bytes + size > self.capacity_bytes:
                raise BuildFailure(
                    "CACHE_TOO_SMALL",
                    f"builder disk {self._disk_id} is full: its {self.capacity_bytes} bytes cannot take "
                    f"{size} more (the images need more than their metadata announced)",
                )
            self.used_bytes += size
            self.done_bytes += size

    def count_present(self, size: int) -> None:
        """Count a blob found on the disk already (a resumed pull) as fetched."""
        with self._lock:
            self.done_bytes += size

    def claim(self, size: int) -> bool:
        """Account ``size`` bytes of an optional write (not fetched); False, and nothing, past capacity."""
        if self._stop.is_set():
            raise _Stopped
        with self._lock:
            if self.used_bytes + size > self.capacity_bytes:
                return False
            self.used_bytes += size
            return True

    def release(self, size: int) -> None:
        """Give back claimed bytes whose file was deleted."""
        with self._lock:
            self.used_bytes -= size


@dataclass(frozen=True, slots=True)
class _Blob:
    reference: ImageReference
    descriptor: Descriptor


class _Pull:
    """One ``pull_images`` call: resolve, size, check capacity, download, write ``index.json``."""

    def __init__(
        self,
        *,
        provider: LocalProvider,
        disk_id: str,
        builder: Path,
        images: Sequence[ImageReference],
        options: PullOptions,
        capacity_bytes: int,
        on_progress: ProgressCallback,
        cancelled: CancelCheck,
    ) -> None:
        self._provider = provider
        self._disk_id = disk_id
        self._builder = builder
        self._images = list(images)
        self._options = options
        self._capacity = capacity_bytes
        self._on_progress = on_progress
        self._cancelled = cancelled
        self._stop = threading.Event()
        self._meter = _Meter(disk_id=disk_id, capacity_bytes=capacity_bytes, used_bytes=0, stop=self._stop)
        self._bytes_total = 0
        self._message = ""
        self._last_report = (-1, -1, "")
        self._last_report_time = 0.0

    def run(self) -> list[PulledImage]:
        self._check_cancelled()
        blob_dir = _blob_dir(self._builder)
        for stale in blob_dir.glob("*" + _PARTIAL):  # a crashed attempt's half-written blobs
            stale.unlink(missing_ok=True)
        self._meter.used_bytes = sum(p.stat().st_size for p in _blobs(self._builder))
        unique = list(dict.fromkeys(self._images))
        config = self._provider.config
        self._message = f"resolving {len(unique)} image(s)"
        self._report(self._message, force=True)
        with (
            DistributionClient.from_options(
                self._options,
                max_connections=config.pull_concurrency + 2,
                timeout_seconds=config.request_timeout_seconds,
            ) as client,
            ThreadPoolExecutor(max_workers=config.pull_concurrency, thread_name_prefix="pull") as pool,
        ):
            try:
                platform = self._options.platform
                resolved = self._run_all(
                    pool,
                    [
                        functools.partial(client.resolve, r, platform=platform, known_blob=self._held_blob)
                        for r in unique
                    ],
                )
                layers = self._unique_layers(resolved)
                sizes = self._run_all(pool, [functools.partial(self._layer_size, client, b) for b in layers])
                unpacked = {blob.descriptor.digest: size for blob, size in zip(layers, sizes, strict=True)}
                small = self._small_blobs(resolved)
                self._check_fits(small, layers, unpacked)
                for digest, data in small.items():
                    self._store_bytes(digest, data)
                self._message = f"downloading {len(layers)} layer(s)"
                self._run_all(pool, [functools.partial(self._download, client, b) for b in layers])
                for blob in layers:  # a registry that ignored Range requests: size from the files now
                    if unpacked[blob.descriptor.digest] is None:
                        path = blob_dir / _hex(blob.descriptor.digest)
                        unpacked[blob.descriptor.digest] = uncompressed_size_of_file(blob.descriptor, path)
                self._check_fits(small, layers, unpacked)
                layer_diffs = self._write_layer_diffs(pool, resolved, small, layers, unpacked)
                anonymous = self._anonymous_access(pool, resolved)
            finally:
                self._stop.set()  # whatever happened, no download or diff may go on writing
        by_reference = {image.reference: image for image in resolved}
        self._write_index(resolved)
        self._report(f"pulled {len(unique)} image(s)", force=True)
        return [
            self._pulled(
                by_reference[reference],
                unpacked,
                anonymous=anonymous[reference],
                layer_diffs=layer_diffs[reference],
            )
            for reference in self._images
        ]

    # -- phases --

    def _run_all(self, pool: ThreadPoolExecutor, calls: Sequence[Callable[[], T]]) -> list[T]:
        """Run calls on the pool; meanwhile poll cancellation and report progress from this thread."""
        futures: list[Future[T]] = [pool.submit(call) for call in calls]
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=_POLL_SECONDS, return_when=FIRST_EXCEPTION)
                for future in done:
                    error = future.exception()
                    if error is not None:
                        raise error
                self._check_cancelled()
                self._report(self._message)
        except BaseException:
            self._stop.set()
            wait(futures)  # bounded: downloads stop at their next chunk, requests have timeouts
            raise
        return [future.result() for future in futures]

    @staticmethod
    def _unique_layers(resolved: Sequence[ResolvedImage]) -> list[_Blob]:
        layers: dict[str, _Blob] = {}
        for image in resolved:
            for layer in image.layers:
                layers.setdefault(layer.digest, _Blob(image.reference, layer))
        return list(layers.values())

    @staticmethod
    def _small_blobs(resolved: Sequence[ResolvedImage]) -> dict[str, bytes]:
        """Manifests, indexes and configs: already fetched and verified while resolving."""
        small: dict[str, bytes] = {}
        for image in resolved:
            small[image.manifest.digest] = image.manifest_bytes
            small[image.config.digest] = image.config_bytes
            if image.index is not None:
                small[image.index.digest] = image.index_bytes
        return small

    def _held_blob(self, digest: str) -> bytes | None:
        """A blob a previous attempt already stored (verified before it got its name), or None."""
        try:
            return (_blob_dir(self._builder) / _hex(digest)).read_bytes()
        except FileNotFoundError:
            return None

    def _layer_size(self, client: DistributionClient, blob: _Blob) -> int | None:
        path = _blob_dir(self._builder) / _hex(blob.descriptor.digest)
        if self._present(path, blob.descriptor.size):
            return uncompressed_size_of_file(blob.descriptor, path)
        return client.layer_uncompressed_size(blob.reference, blob.descriptor)

    @staticmethod
    def _stored_bytes(small: dict[str, bytes], layers: Sequence[_Blob]) -> int:
        return sum(len(data) for data in small.values()) + sum(b.descriptor.size for b in layers)

    def _check_fits(
        self, small: dict[str, bytes], layers: Sequence[_Blob], unpacked: dict[str, int | None]
    ) -> None:
        """Refuse before downloading when the images cannot fit, unpacked or as stored."""
        stored = self._stored_bytes(small, layers)
        unpacked_total = sum(len(data) for data in small.values())  # configs, manifests: as they are
        unpacked_total += sum(
            size if (size := unpacked[b.descriptor.digest]) is not None else b.descriptor.size for b in layers
        )
        need = max(stored, unpacked_total)
        if need > self._capacity:
            raise cache_too_small(need_bytes=need, capacity_bytes=self._capacity)
        self._bytes_total = stored

    def _store_bytes(self, digest: str, data: bytes) -> None:
        path = _blob_dir(self._builder) / _hex(digest)
        if self._present(path, len(data)):
            self._meter.count_present(len(data))
            return
        self._meter.reserve(len(data))
        _write_file(path, data)

    def _download(self, client: DistributionClient, blob: _Blob) -> None:
        path = _blob_dir(self._builder) / _hex(blob.descriptor.digest)
        if self._present(path, blob.descriptor.size):
            self._meter.count_present(blob.descriptor.size)
            return
        path.unlink(missing_ok=True)
        client.download_blob(blob.reference, blob.descriptor, path, on_chunk=self._meter.reserve)

    def _write_layer_diffs(
        self,
        pool: ThreadPoolExecutor,
        resolved: Sequence[ResolvedImage],
        small: dict[str, bytes],
        layers: Sequence[_Blob],
        unpacked: dict[str, int | None],
    ) -> dict[ImageReference, str]:
        """Store the layers' uncompressed diffs if blobs and diffs all fit; each image's outcome.

        One diff per DiffID, however many images or layer blobs share it. A layer's expected
        diff is its config's DiffID when the layer is gzip, or itself when it is an uncompressed
        tar whose digest is that DiffID; anything else gets none.
        """
        blob_dir = _blob_dir(self._builder)
        held_as_blobs = set(small) | {blob.descriptor.digest for blob in layers}
        expected: dict[ImageReference, list[str | None]] = {}
        to_write: dict[str, _Blob] = {}
        for image in resolved:
            diff_ids = layer_diff_ids(image.config_bytes, len(image.layers))
            if image.layers and diff_ids.count(None) == len(diff_ids):
                log.warning(
                    "image %s: its config lists no usable rootfs.diff_ids: no layer diffs", image.reference
                )
            wanted: list[str | None] = []
            for layer, listed in zip(image.layers, diff_ids, strict=True):
                diff_id = expected_diff(layer, listed)
                if listed is not None and diff_id is None and layer.media_type in TAR_LAYER_MEDIA_TYPES:
                    log.warning(
                        "image %s: uncompressed layer %s is listed with DiffID %s: no diff",
                        image.reference,
                        layer.digest,
                        listed,
                    )
                if diff_id is not None and diff_id not in held_as_blobs:
                    to_write.setdefault(diff_id, _Blob(image.reference, layer))
                wanted.append(diff_id)
            expected[image.reference] = wanted
        need = self._stored_bytes(small, layers) + sum(
            unpacked[blob.descriptor.digest] or blob.descriptor.size for blob in to_write.values()
        )
        if need > self._capacity:
            log.info(
                "builder disk %s: no layer diffs: blobs and diffs need %d bytes, the disk holds %d",
                self._disk_id,
                need,
                self._capacity,
            )
            skipped = f"skipped: needs {need - self._capacity} more bytes"
            return {image.reference: skipped for image in resolved}
        if to_write:
            self._message = f"writing {len(to_write)} layer diff(s)"
            self._run_all(
                pool,
                [functools.partial(self._write_diff, diff_id, blob) for diff_id, blob in to_write.items()],
            )
        outcomes: dict[ImageReference, str] = {}
        for image in resolved:
            wanted = expected[image.reference]
            held = sum(1 for diff_id in wanted if diff_id is not None and (blob_dir / _hex(diff_id)).exists())
            outcomes[image.reference] = (
                "stored" if held == len(wanted) else f"stored for {held} of {len(wanted)} layers"
            )
        return outcomes

    def _write_diff(self, diff_id: str, blob: _Blob) -> None:
        """Inflate one gzip layer into the blob ``diff_id`` via ``.partial``; on any doubt, no diff."""
        blob_dir = _blob_dir(self._builder)
        path = blob_dir / _hex(diff_id)
        if path.exists():
            return  # present means verified
        layer = blob.descriptor
        partial = path.with_name(path.name + _PARTIAL)
        hasher = hashlib.sha256()
        claimed = 0
        published = False
        try:
            with (blob_dir / _hex(layer.digest)).open("rb") as source, partial.open("wb") as sink:
                for chunk in inflate_gzip(source):
                    if not self._meter.claim(len(chunk)):
                        log.warning(
                            "layer %s of %s unpacks to more than its size metadata said and the disk "
                            "is full: no diff",
                            layer.digest,
                            blob.reference,
                        )
                        return
                    claimed += len(chunk)
                    sink.write(chunk)
                    hasher.update(chunk)
            found = "sha256:" + hasher.hexdigest()
            if found != diff_id:
                log.warning(
                    "layer %s of %s unpacks to %s, not the DiffID %s its config lists: no diff",
                    layer.digest,
                    blob.reference,
                    found,
                    diff_id,
                )
                return
            os.replace(partial, path)
            published = True
        except (zlib.error, EOFError) as exc:
            log.warning("layer %s of %s does not decompress (%s): no diff", layer.digest, blob.reference, exc)
        finally:
            if not published:
                partial.unlink(missing_ok=True)
                self._meter.release(claimed)

    @staticmethod
    def _present(path: Path, size: int) -> bool:
        """Present means verified: blobs reach their final name only after their digest checked."""
        try:
            return path.stat().st_size == size
        except FileNotFoundError:
            return False

    def _write_index(self, resolved: Sequence[ResolvedImage]) -> None:
        manifests = []
        for image in resolved:
            entry: dict[str, Any] = {
                "mediaType": image.manifest.media_type,
                "digest": image.manifest.digest,
                "size": image.manifest.size,
                "annotations": {REF_NAME_ANNOTATION: layout_ref_name(image.reference)},
            }
            platform = {"os": image.platform.os, "architecture": image.platform.architecture}
            if image.platform.variant:
                platform["variant"] = image.platform.variant
            entry["platform"] = platform
            manifests.append(entry)
        _write_layout_files(self._builder, manifests, {}, mode=0o644)

    def _anonymous_access(
        self, pool: ThreadPoolExecutor, resolved: Sequence[ResolvedImage]
    ) -> dict[ImageReference, bool]:
        """Whether each image's registry serves its manifest without credentials.

        An image of a registry the build had no credentials for was pulled anonymously: public.
        The others are asked again anonymously, one HEAD each (`manifest_served`); only a 2xx
        answer makes them public, so an image pulled with a pull secret stays private to the
        secret's users unless its registry really serves it to anyone.
        """
        credentials = self._options.credentials
        found = {image.reference: image.reference.registry not in credentials for image in resolved}
        asked = [image for image in resolved if not found[image.reference]]
        if not asked:
            return found
        config = self._provider.config
        self._message = f"checking anonymous access to {len(asked)} image(s)"
        with DistributionClient.from_options(
            replace(self._options, credentials={}),
            max_connections=config.pull_concurrency,
            timeout_seconds=config.request_timeout_seconds,
        ) as anonymous:
            served = self._run_all(
                pool,
                [functools.partial(anonymous.manifest_served, i.reference, i.manifest.digest) for i in asked],
            )
        found.update((image.reference, yes) for image, yes in zip(asked, served, strict=True))
        return found

    def _pulled(
        self, image: ResolvedImage, unpacked: dict[str, int | None], *, anonymous: bool, layer_diffs: str
    ) -> PulledImage:
        layers_unpacked = sum(unpacked[layer.digest] or layer.size for layer in image.layers)
        return PulledImage(
            reference=image.reference,
            manifest_digest=image.manifest.digest,
            index_digest=image.index.digest if image.index is not None else "",
            platform=image.platform,
            compressed_bytes=image.compressed_bytes,
            uncompressed_bytes=image.config.size + layers_unpacked,
            layer_count=len(image.layers),
            anonymous_pull_allowed=anonymous,
            layer_diffs=layer_diffs,
        )

    # -- cancellation and progress (always on the calling thread) --

    def _check_cancelled(self) -> None:
        if self._cancelled():
            self._stop.set()
            raise BuildFailure(
                "CANCELLED",
                f"pull onto builder disk {self._disk_id} cancelled; blobs pulled so far are kept",
                retryable=True,
            )

    def _report(self, message: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_report_time < _PROGRESS_INTERVAL_SECONDS:
            return
        done = min(self._meter.done_bytes, self._bytes_total) if self._bytes_total else self._meter.done_bytes
        done = max(done, self._last_report[0])  # monotonic even if a total is revised
        current = (done, self._bytes_total, message)
        if current == self._last_report and not force:
            return
        self._last_report = current
        self._last_report_time = now
        self._on_progress(PullProgress(bytes_done=done, bytes_total=self._bytes_total, message=message))


def layout_ref_name(reference: ImageReference) -> str:
    """The ``org.opencontainers.image.ref.name`` of an image in a layout: its normalized reference.

    ``skopeo inspect oci:DIR:<this>`` finds it (checked with skopeo 1.9, digest form included).
    """
    return str(reference)


# --- the provider ----------------------------------------------------------------------------


class LocalProvider:
    """The ``Provider`` port on a local directory tree (see the module docstring for the model)."""

    def __init__(self, config: LocalProviderConfig) -> None:
        config.validate()
        self.config = config
        self.root = Path(config.root).resolve()
        self._builders = self.root / "builders"
        self._snapshots = self.root / "snapshots"
        self._cas = self.root / "cas" / "sha256"
        self._zones = {
            zone.name: _ZonePaths(
                name=zone.name,
                max_disks=zone.max_disks,
                root=Path(zone.root).resolve() if zone.root is not None else self.root / "zones" / zone.name,
            )
            for zone in config.zones
        }
        for directory in (self._builders, self._snapshots, self._cas):
            directory.mkdir(parents=True, exist_ok=True)
        for zone_paths in self._zones.values():
            for directory in (zone_paths.cas, zone_paths.snapshots, zone_paths.disks):
                directory.mkdir(parents=True, exist_ok=True)
        self._gc_lock = _SharedExclusiveLock()
        self._locks_guard = threading.Lock()
        self._disk_locks: dict[str, threading.Lock] = {}
        self._zone_locks = {name: threading.Lock() for name in self._zones}

    def _fault(self, step: str) -> None:
        delay = self.config.fault_delays.get(step)
        if delay:
            time.sleep(delay)

    def __repr__(self) -> str:
        return f"LocalProvider(root={str(self.root)!r}, zones={sorted(self._zones)})"

    # -- paths and checks --

    @staticmethod
    def _check_id(field: str, value: str) -> str:
        if not _ID.match(value):
            raise invalid(
                field, "must be 1-200 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
            )
        return value

    def _zone(self, name: str) -> _ZonePaths:
        zone = self._zones.get(name)
        if zone is None:
            raise FailedPrecondition(
                reason="UNKNOWN_ZONE",
                message=f"zone {name!r} is not configured "
                f"(zones: {', '.join(sorted(self._zones)) or 'none'})",
                metadata={"zone": name},
            )
        return zone

    def _builder(self, disk_id: str) -> Path:
        return self._builders / self._check_id("disk_id", disk_id)

    @contextmanager
    def _disk_lock(self, disk_id: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._disk_locks.setdefault(disk_id, threading.Lock())
        with lock:
            yield

    @staticmethod
    def _entries(directory: Path) -> list[Path]:
        try:
            return sorted(p for p in directory.iterdir() if not p.name.startswith("."))
        except FileNotFoundError:
            return []

    def _find_disk(self, disk_id: str) -> tuple[_ZonePaths, Path] | None:
        for zone in self._zones.values():
            path = zone.disks / disk_id
            if path.is_dir():
                return zone, path
        return None

    # -- the port --

    def zones(self) -> Sequence[ZoneInfo]:
        """The configured zones with their disk capacity and use."""
        return [
            ZoneInfo(name=zone.name, max_disks=zone.max_disks, disks_in_use=len(self._entries(zone.disks)))
            for zone in self._zones.values()
        ]

    def create_builder_disk(self, *, disk_id: str, capacity_bytes: int) -> None:
        """Create an empty builder disk (an empty OCI layout); an existing one is kept for resuming."""
        final = self._builder(disk_id)
        if capacity_bytes <= 0:
            raise invalid("capacity_bytes", "must be positive")
        with self._gc_lock.shared():
            if final.is_dir():
                return
            temporary = _unique_tmp(self._builders, disk_id)
            _blob_dir(temporary).mkdir(parents=True)
            _write_layout_files(temporary, [], {}, mode=0o644)
            try:
                temporary.rename(final)
            except OSError:  # created meanwhile by another thread: keep that one
                _remove_tree(temporary)

    def pull_images(
        self,
        *,
        disk_id: str,
        images: Sequence[ImageReference],
        options: PullOptions,
        capacity_bytes: int,
        on_progress: ProgressCallback,
        cancelled: CancelCheck,
    ) -> list[PulledImage]:
        """Pull every image onto the builder disk, resuming from verified blobs already there.

        Returns one ``PulledImage`` per requested reference, in order (duplicates included).
        Raises ``BuildFailure``: the distribution client's reasons, ``CACHE_TOO_SMALL`` (before any
        layer download when sizes are known up front), ``CANCELLED`` (retryable: blobs are kept)
        and ``BUILDER_DISK_NOT_FOUND``.
        """
        builder = self._builder(disk_id)
        with self._disk_lock(disk_id):
            if not builder.is_dir():
                raise BuildFailure("BUILDER_DISK_NOT_FOUND", f"builder disk {disk_id} does not exist")
            return _Pull(
                provider=self,
                disk_id=disk_id,
                builder=builder,
                images=images,
                options=options,
                capacity_bytes=capacity_bytes,
                on_progress=on_progress,
                cancelled=cancelled,
            ).run()

    def create_snapshot(self, *, disk_id: str, snapshot_id: str) -> SnapshotInfo:
        """Snapshot the builder disk into the content store: hard links only, no bytes copied."""
        builder = self._builder(disk_id)
        final = self._snapshots / self._check_id("snapshot_id", snapshot_id)
        with self._disk_lock(disk_id), self._gc_lock.shared():
            if final.is_dir():
                return self._snapshot_info(final)
            if not builder.is_dir():
                raise FailedPrecondition(
                    reason="BUILDER_DISK_NOT_FOUND",
                    message=f"builder disk {disk_id} does not exist; cannot snapshot it",
                )
            manifests = _read_index(builder).get("manifests") or []
            if not manifests:
                raise FailedPrecondition(
                    reason="BUILDER_DISK_EMPTY",
                    message=f"builder disk {disk_id} holds no pulled images; cannot snapshot it",
                )
            temporary = _unique_tmp(self._snapshots, snapshot_id)
            try:
                _blob_dir(temporary).mkdir(parents=True)
                for blob in _blobs(builder):
                    os.chmod(blob, 0o444)
                    stored = self._cas / blob.name
                    with contextlib.suppress(FileExistsError):  # another snapshot has it: share the inode
                        os.link(blob, stored)
                    os.link(stored, _blob_dir(temporary) / blob.name)
                self._fault("snapshot")
                _write_layout_files(temporary, manifests, {SNAPSHOT_ANNOTATION: snapshot_id}, mode=0o444)
                temporary.rename(final)
            except BaseException:
                _remove_tree(temporary)
                if not final.is_dir():
                    raise
            return self._snapshot_info(final)

    def release_builder_disk(self, *, disk_id: str) -> None:
        """Delete a builder disk (no error if it is gone)."""
        builder = self._builder(disk_id)
        with self._disk_lock(disk_id), self._gc_lock.shared():
            _discard(builder)

    def hydrate_zone(self, *, snapshot_id: str, zone: str) -> None:
        """Copy the snapshot's blobs into the zone's content store (skipping those it has)."""
        zone_paths = self._zone(zone)
        source = self._snapshots / self._check_id("snapshot_id", snapshot_id)
        final = zone_paths.snapshots / snapshot_id
        with self._gc_lock.shared():
            if final.is_dir():
                return
            if not source.is_dir():
                raise FailedPrecondition(
                    reason="SNAPSHOT_NOT_FOUND",
                    message=f"snapshot {snapshot_id} does not exist; cannot copy it to zone {zone}",
                    metadata={"snapshot_id": snapshot_id, "zone": zone},
                )
            temporary = _unique_tmp(zone_paths.snapshots, snapshot_id)
            try:
                _blob_dir(temporary).mkdir(parents=True)
                for blob in _blobs(source):
                    stored = zone_paths.cas / blob.name
                    if not stored.exists():
                        self._copy_into(blob, stored)
                    os.link(stored, _blob_dir(temporary) / blob.name)
                self._fault("hydrate")
                index = _read_index(source)
                annotations = {**(index.get("annotations") or {}), ZONE_ANNOTATION: zone}
                _write_layout_files(temporary, index.get("manifests") or [], annotations, mode=0o444)
                temporary.rename(final)
            except BaseException:
                _remove_tree(temporary)
                if not final.is_dir():
                    raise

    @staticmethod
    def _copy_into(source: Path, stored: Path) -> None:
        """A real copy (the zone may be another filesystem), published atomically by a link."""
        temporary = _unique_tmp(stored.parent, stored.name)
        try:
            shutil.copyfile(source, temporary)  # sendfile(2): in-kernel, no Python-side buffers
            os.chmod(temporary, 0o444)
            with contextlib.suppress(FileExistsError):  # a concurrent hydration copied it first
                os.link(temporary, stored)
        finally:
            temporary.unlink(missing_ok=True)

    def remove_from_zone(self, *, snapshot_id: str, zone: str) -> None:
        """Drop the snapshot's copy in a zone; its disks keep their blobs (no error if gone)."""
        zone_paths = self._zone(zone)
        path = zone_paths.snapshots / self._check_id("snapshot_id", snapshot_id)
        with self._gc_lock.shared():
            _discard(path)

    def delete_snapshot(self, *, snapshot_id: str) -> None:
        """Delete a snapshot and all its zone copies (no error if gone); derived disks stay usable."""
        self._check_id("snapshot_id", snapshot_id)
        with self._gc_lock.shared():
            for zone_paths in self._zones.values():
                _discard(zone_paths.snapshots / snapshot_id)
            self._fault("delete")
            _discard(self._snapshots / snapshot_id)

    def provision_disk(self, *, snapshot_id: str, zone: str, disk_id: str) -> DiskInfo:
        """A disk from the snapshot's copy in ``zone``: a hard-link tree, no bytes copied.

        Raises ``FailedPrecondition`` (``UNKNOWN_ZONE``, ``SNAPSHOT_NOT_IN_ZONE``),
        ``ResourceExhausted`` (``ZONE_CAPACITY_EXHAUSTED``) and ``AlreadyExists``
        (``DISK_EXISTS``: the id is taken by a disk of another snapshot or zone).
        """
        zone_paths = self._zone(zone)
        self._check_id("snapshot_id", snapshot_id)
        self._check_id("disk_id", disk_id)
        with self._gc_lock.shared(), self._zone_locks[zone]:
            existing = self._find_disk(disk_id)
            if existing is not None:
                info = self._disk_info(*existing)
                if info.snapshot_id != snapshot_id or info.zone != zone:
                    raise AlreadyExists(
                        reason="DISK_EXISTS",
                        message=f"disk {disk_id} already exists from snapshot {info.snapshot_id} "
                        f"in zone {info.zone}",
                        metadata={"disk_id": disk_id},
                    )
                return info
            source = zone_paths.snapshots / snapshot_id
            if not source.is_dir():
                raise FailedPrecondition(
                    reason="SNAPSHOT_NOT_IN_ZONE",
                    message=f"snapshot {snapshot_id} is not available in zone {zone} (not hydrated there)",
                    metadata={"snapshot_id": snapshot_id, "zone": zone},
                )
            in_use = len(self._entries(zone_paths.disks))
            if zone_paths.max_disks and in_use >= zone_paths.max_disks:
                raise ResourceExhausted(
                    reason="ZONE_CAPACITY_EXHAUSTED",
                    message=f"zone {zone} is at capacity: {in_use} of {zone_paths.max_disks} disks in use",
                    metadata={"zone": zone, "max_disks": str(zone_paths.max_disks)},
                )
            final = zone_paths.disks / disk_id
            temporary = _unique_tmp(zone_paths.disks, disk_id)
            try:
                _blob_dir(temporary).mkdir(parents=True)
                for blob in _blobs(source):
                    os.link(blob, _blob_dir(temporary) / blob.name)
                index = _read_index(source)
                annotations = dict(index.get("annotations") or {})
                annotations.update(
                    {SNAPSHOT_ANNOTATION: snapshot_id, DISK_ANNOTATION: disk_id, ZONE_ANNOTATION: zone}
                )
                _write_layout_files(temporary, index.get("manifests") or [], annotations, mode=0o444)
                temporary.rename(final)
            except BaseException:
                _remove_tree(temporary)
                raise
            return self._disk_info(zone_paths, final)

    def release_disk(self, *, disk_id: str) -> None:
        """Delete a derived disk (no error if it is gone)."""
        self._check_id("disk_id", disk_id)
        with self._gc_lock.shared():
            found = self._find_disk(disk_id)
            if found is not None:
                _discard(found[1])

    def inventory(self) -> Inventory:
        """Builder disks, snapshots, zone copies and disks; never temporaries."""
        return Inventory(
            builder_disks=frozenset(p.name for p in self._entries(self._builders)),
            snapshots=frozenset(p.name for p in self._entries(self._snapshots)),
            zone_snapshots=frozenset(
                (p.name, zone.name) for zone in self._zones.values() for p in self._entries(zone.snapshots)
            ),
            disks=frozenset(p.name for zone in self._zones.values() for p in self._entries(zone.disks)),
        )

    def collect_garbage(self) -> int:
        """Remove abandoned temporaries and content-store blobs nothing links to; return bytes freed."""
        freed = 0
        with self._gc_lock.exclusive():
            parents = [self._builders, self._snapshots]
            for zone in self._zones.values():
                parents += [zone.snapshots, zone.disks, zone.cas]
            now = time.time()
            for parent in parents:
                for leftover in parent.glob(_TMP + "*"):
                    if _abandoned(leftover, now=now):
                        freed += _remove_tree(leftover)
            for store in [self._cas, *(zone.cas for zone in self._zones.values())]:
                for blob in self._store_blobs(store):
                    stat = blob.stat()
                    if stat.st_nlink == 1:
                        blob.unlink()
                        freed += stat.st_size
        return freed

    @staticmethod
    def _store_blobs(store: Path) -> list[Path]:
        try:
            return [p for p in store.iterdir() if _HEX.match(p.name)]
        except FileNotFoundError:
            return []

    # -- descriptions --

    @staticmethod
    def _snapshot_info(path: Path) -> SnapshotInfo:
        blobs = _blobs(path)
        return SnapshotInfo(
            snapshot_id=path.name,
            size_bytes=sum(blob.stat().st_size for blob in blobs),
            blob_count=len(blobs),
        )

    @staticmethod
    def _disk_info(zone: _ZonePaths, path: Path) -> DiskInfo:
        annotations = _read_index(path).get("annotations") or {}
        return DiskInfo(
            disk_id=path.name,
            snapshot_id=str(annotations.get(SNAPSHOT_ANNOTATION, "")),
            zone=zone.name,
            location=str(path),
        )
