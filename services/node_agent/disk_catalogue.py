"""The disks attached to this node, as the mirror sees them: which image, manifest and blob is where.

A disk (what ``ProvisionDisk`` made from a cache's snapshot; with the local provider, the
directory ``<zone root>/disks/<disk_id>``, the ``location`` the registry returns) is an OCI image
layout: ``index.json`` lists each image's platform manifest, annotated with
``org.opencontainers.image.ref.name`` = the normalized reference the registry built it from
(``127.0.0.1:5000/demo/web:1.0``, ``docker.io/library/nginx@sha256:...``), and
``blobs/sha256/<hex>`` holds manifests, configs, layers and, for a multi-arch image, the index
the tag pointed at (unlisted in ``index.json``, found by what it lists).

The catalogue reads every disk under the root once (manifests are small; their digests are
checked as they are read), and again only when a disk's ``index.json`` changes or disks come and
go. It answers by repository: a blob is found for ``registry/repository`` only if a manifest of
that repository on that disk lists it, as a registry scopes blobs to repositories, so a request
can reach nothing but what the disks' own manifests name; a path is built only from a digest
the catalogue read from such a manifest.

A blob that fails its digest while being served is marked bad on its disk (``mark_bad``) and is
not offered again from there; the next request for it goes to another disk or upstream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from snapcache.images import ImageReference, InvalidImageReference, parse_image_reference

log = logging.getLogger(__name__)

REF_NAME_ANNOTATION: Final = "org.opencontainers.image.ref.name"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MAX_MANIFEST_BYTES: Final = 4 * 1024 * 1024  # containerd's limit too
_HEX_LENGTH: Final = 64


@dataclass(frozen=True, slots=True)
class DiskManifest:
    """A manifest or index on a disk, verified when the disk was read."""

    disk_id: str
    digest: str
    media_type: str
    path: Path
    size: int


@dataclass(frozen=True, slots=True)
class DiskBlob:
    """A blob on a disk, as a manifest on that disk describes it (digest and size)."""

    disk_id: str
    digest: str
    path: Path
    size: int


@dataclass(frozen=True, slots=True)
class _Disk:
    disk_id: str
    path: Path
    signature: tuple[int, int, int, int]  # see _signature
    tags: dict[tuple[str, str], str] = field(default_factory=dict)  # (name, tag) -> manifest digest
    manifests: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)  # -> (type, size)
    blobs: dict[tuple[str, str], int] = field(default_factory=dict)  # (name, digest) -> size
    # (name, platform manifest digest) -> the index the tag pointed at when the cache was built
    indexes: dict[tuple[str, str], str] = field(default_factory=dict)
    registries: frozenset[str] = frozenset()

    def blob_path(self, digest: str) -> Path:
        return self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_sha256(value: object) -> bool:
    """Whether ``value`` is a ``sha256:<64 lowercase hex>`` digest."""
    if not isinstance(value, str) or not value.startswith("sha256:"):
        return False
    hex_part = value[len("sha256:") :]
    return len(hex_part) == _HEX_LENGTH and all(c in "0123456789abcdef" for c in hex_part)


def media_type_of(document: dict[str, Any]) -> str:
    """A manifest's media type: its ``mediaType``, else what its shape says (OCI makes it optional)."""
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if isinstance(document.get("manifests"), list):
        return OCI_INDEX
    return OCI_MANIFEST


def _signature(layout: Path) -> tuple[int, int, int, int] | None:
    """What changes when a disk's content does: ``index.json`` (inode, size, mtime) and the blob
    directory's mtime (a blob added or replaced by rename). ``None``: not a layout (yet)."""
    try:
        index = (layout / "index.json").stat()
        blobs = (layout / "blobs" / "sha256").stat()
    except OSError:
        return None
    return (index.st_ino, index.st_size, index.st_mtime_ns, blobs.st_mtime_ns)


class _DiskReader:
    """Reads one disk's layout into a ``_Disk``; a manifest that fails its digest is left out."""

    def __init__(self, disk_id: str, path: Path, signature: tuple[int, int, int, int], on_bad: BadCallback):
        self.disk = _Disk(disk_id=disk_id, path=path, signature=signature)
        self._on_bad = on_bad
        self._manifest_names: dict[str, set[str]] = {}  # platform manifest digest -> names

    def read(self) -> _Disk:
        try:
            index = json.loads((self.disk.path / "index.json").read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("disk %s: unreadable index.json (%s); not serving from it", self.disk.disk_id, exc)
            return self.disk
        entries = index.get("manifests") if isinstance(index, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict):
                self._read_entry(entry)
        self._find_indexes()
        registries = {name.partition("/")[0] for name, _ in self.disk.manifests}
        return _Disk(
            disk_id=self.disk.disk_id,
            path=self.disk.path,
            signature=self.disk.signature,
            tags=self.disk.tags,
            manifests=self.disk.manifests,
            blobs=self.disk.blobs,
            indexes=self.disk.indexes,
            registries=frozenset(registries),
        )

    def _read_entry(self, entry: dict[str, Any]) -> None:
        annotations = entry.get("annotations")
        ref_name = annotations.get(REF_NAME_ANNOTATION) if isinstance(annotations, dict) else None
        digest = entry.get("digest")
        if not isinstance(ref_name, str) or not is_sha256(digest):
            return
        try:
            reference = parse_image_reference(ref_name)
        except InvalidImageReference:
            log.warning("disk %s: skipping image with invalid ref name %r", self.disk.disk_id, ref_name[:200])
            return
        assert isinstance(digest, str)
        verified = self._verified_json(digest)
        if verified is None:
            return
        document, manifest_size = verified
        media_type = media_type_of(document)
        if media_type not in MANIFEST_TYPES:
            return
        name = reference.name
        self.disk.manifests[(name, digest)] = (media_type, manifest_size)
        self._manifest_names.setdefault(digest, set()).add(name)
        if reference.tag:
            self.disk.tags[(name, reference.tag)] = digest
        descriptors = [document.get("config"), *(document.get("layers") or [])]
        for descriptor in descriptors:
            if not isinstance(descriptor, dict):
                continue
            blob_digest, size = descriptor.get("digest"), descriptor.get("size")
            if is_sha256(blob_digest) and isinstance(size, int) and not isinstance(size, bool) and size >= 0:
                assert isinstance(blob_digest, str)
                self.disk.blobs[(name, blob_digest)] = size
        # the manifest itself is a blob of the repository too (some clients fetch it that way)
        self.disk.blobs[(name, digest)] = manifest_size

    def _verified_json(self, digest: str) -> tuple[dict[str, Any], int] | None:
        """The JSON document blob ``digest`` holds and its size, if it is one and matches its digest."""
        path = self.disk.blob_path(digest)
        try:
            if path.stat().st_size > MAX_MANIFEST_BYTES:
                return None
            data = path.read_bytes()
        except OSError:
            return None
        if _sha256(data) != digest:
            self._on_bad(self.disk.disk_id, digest, "manifest read from the disk does not match its digest")
            return None
        try:
            document = json.loads(data)
        except ValueError:
            return None
        return (document, len(data)) if isinstance(document, dict) else None

    def _find_indexes(self) -> None:
        """The multi-arch indexes the images were built from: small JSON blobs listing a manifest."""
        known = {digest for _, digest in self.disk.blobs}
        directory = self.disk.path / "blobs" / "sha256"
        try:
            candidates = [p for p in directory.iterdir() if f"sha256:{p.name}" not in known]
        except OSError:
            return
        for path in candidates:
            digest = f"sha256:{path.name}"
            if not is_sha256(digest):
                continue
            try:
                if path.stat().st_size > MAX_MANIFEST_BYTES:
                    continue
                with path.open("rb") as handle:
                    if handle.read(1) != b"{":
                        continue
            except OSError:
                continue
            verified = self._verified_json(digest)
            if verified is None or media_type_of(verified[0]) not in INDEX_TYPES:
                continue
            document, index_size = verified
            listed = document.get("manifests")
            for entry in listed if isinstance(listed, list) else []:
                manifest_digest = entry.get("digest") if isinstance(entry, dict) else None
                if not isinstance(manifest_digest, str):
                    continue
                for name in self._manifest_names.get(manifest_digest, set()):
                    self.disk.manifests[(name, digest)] = (media_type_of(document), index_size)
                    self.disk.blobs[(name, digest)] = index_size
                    self.disk.indexes[(name, manifest_digest)] = digest


BadCallback = Callable[[str, str, str], None]


class DiskCatalogue:
    """What the disks under ``root`` hold; safe to query from many threads while it refreshes."""

    def __init__(
        self, root: Path, *, on_bad: BadCallback | None = None, accept: Callable[[str], bool] | None = None
    ) -> None:
        self.root = Path(root)
        self._on_bad_hook = on_bad
        # which entries of the root are this node's disks (all, by default): a root shared by
        # several nodes (the local provider's zone directory) holds other nodes' disks too
        self._accept = accept
        self._disks: dict[str, _Disk] = {}
        self._order: tuple[_Disk, ...] = ()  # newest index.json first: it wins a tag
        self._bad: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()

    # -- reading the disks --

    def refresh(self) -> bool:
        """Read disks that appeared or changed, forget those gone; return whether anything changed."""
        with self._refresh_lock:
            try:
                entries = sorted(
                    p
                    for p in self.root.iterdir()
                    if not p.name.startswith(".") and (self._accept is None or self._accept(p.name))
                )
            except OSError:
                entries = []
            current = self._disks
            disks: dict[str, _Disk] = {}
            for path in entries:
                signature = _signature(path)
                if signature is None:
                    continue
                known = current.get(path.name)
                if known is not None and known.signature == signature and known.path == path:
                    disks[path.name] = known
                    continue
                disks[path.name] = _DiskReader(path.name, path, signature, self._report_bad).read()
                log.info(
                    "disk %s attached: %d image(s) of %s",
                    path.name,
                    len(disks[path.name].tags),
                    ", ".join(sorted(disks[path.name].registries)) or "no registry",
                )
            changed = disks.keys() != current.keys() or any(disks[k] is not current[k] for k in disks)
            kept = {k for k in disks if current.get(k) is disks[k]}  # a disk read anew starts clean
            for gone in current.keys() - disks.keys():
                log.info("disk %s detached", gone)
            order = sorted(disks.values(), key=lambda d: (d.signature[2], d.disk_id), reverse=True)
            with self._lock:
                self._disks = disks
                self._order = tuple(order)
                self._bad = {(disk_id, digest) for disk_id, digest in self._bad if disk_id in kept}
            return changed

    # -- queries --

    @property
    def disk_ids(self) -> list[str]:
        """The disks being served from."""
        return sorted(self._disks)

    @property
    def registries(self) -> frozenset[str]:
        """Every registry an image on a disk comes from (for containerd's hosts.toml)."""
        return frozenset().union(*(disk.registries for disk in self._order))

    @property
    def bad_count(self) -> int:
        """Blobs marked bad on disks still attached."""
        return len(self._bad)

    def manifests(self, image: ImageReference) -> list[DiskManifest]:
        """What ``image`` (by tag or digest) names on the newest disk holding it intact, best first.

        By digest: that manifest or index. By tag: the index the tag pointed at when the cache was
        built, if the image came from one (so the runtime chooses its own platform, as with the
        registry: another platform's manifest is simply not on the disk and passes through), then
        the platform manifest, for a client that does not accept indexes.
        """
        for disk in self._order:
            digest = image.digest or disk.tags.get((image.name, image.tag), "")
            if not digest or (disk.disk_id, digest) in self._bad:
                continue
            found = disk.manifests.get((image.name, digest))
            if found is None:
                continue
            answers = [DiskManifest(disk.disk_id, digest, found[0], disk.blob_path(digest), found[1])]
            index = "" if image.digest else disk.indexes.get((image.name, digest), "")
            index_found = disk.manifests.get((image.name, index)) if index else None
            if index_found is not None and (disk.disk_id, index) not in self._bad:
                answers.insert(
                    0,
                    DiskManifest(disk.disk_id, index, index_found[0], disk.blob_path(index), index_found[1]),
                )
            return answers
        return []

    def blob(self, name: str, digest: str) -> DiskBlob | None:
        """Blob ``digest`` of repository ``name`` (``registry/repository``) from a disk, if any holds it."""
        for disk in self._order:
            size = disk.blobs.get((name, digest))
            if size is not None and (disk.disk_id, digest) not in self._bad:
                return DiskBlob(disk.disk_id, digest, disk.blob_path(digest), size)
        return None

    def mark_bad(self, disk_id: str, digest: str, why: str) -> None:
        """Stop serving ``digest`` from ``disk_id`` (it failed its digest or size)."""
        self._report_bad(disk_id, digest, why)

    def _report_bad(self, disk_id: str, digest: str, why: str) -> None:
        with self._lock:
            if (disk_id, digest) in self._bad:
                return
            self._bad.add((disk_id, digest))
        log.error("disk %s: blob %s is corrupt (%s); serving it from elsewhere", disk_id, digest, why)
        if self._on_bad_hook is not None:
            self._on_bad_hook(disk_id, digest, why)

    def names(self) -> Iterable[str]:
        """Every ``registry/repository`` on a disk."""
        return sorted({name for disk in self._order for name, _ in disk.manifests})


def open_regular(path: Path) -> tuple[int, int]:
    """Open a blob read-only without following a symlink; ``(fd, size)``."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return fd, os.fstat(fd).st_size
