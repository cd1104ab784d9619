"""Seed containerd's snapshots from a cache disk's layer diffs: the runtime neither fetches nor unpacks them.

Why: served from the disk through the mirror, a ~200 MiB image still costs the pod most of its
start: containerd gunzips every layer, hashes it twice and writes its files (~1.4 s of ~2.7 s on
the test node), whatever the bytes' source. containerd's unpacker skips any layer whose snapshot
already exists under the layer's chain ID (and then never fetches that layer at all), so the agent
creates those snapshots itself, from the uncompressed diffs the cache's builder stored on the
disk: no gunzip, one hash, file data copied in the kernel (``overlay_layers``). The kubelet's own
pull then fetches the manifest and config through the mirror and finds every layer in place.

How, per image found on an attached disk (``submit``, called when a pod's disk is ready):

- its manifest and config are read from the disk and checked against their digests; the
  config's ``rootfs.diff_ids`` give the chain IDs (OCI image spec: ``ChainID(L0) = DiffID(L0)``,
  ``ChainID(L0..n) = sha256(ChainID(L0..n-1) + " " + DiffID(Ln))``);
- bottom up, a layer whose snapshot exists is skipped; otherwise a snapshot is prepared on its
  parent under a containerd lease, the layer's diff is applied into its directory (the overlay
  upper dir, its parents' directories beside it; or for a first layer the bind mount's source)
  and verified against its DiffID, and
  the snapshot is committed under the chain ID. A commit that finds the name taken (the
  kubelet's pull unpacked that layer meanwhile) is as good as done;
- the first layer that cannot be seeded (no diff on the disk, a diff that fails its DiffID, a
  layer the applier refuses, containerd refusing) stops the image there, its prepared snapshot
  removed: the pull unpacks that layer and the ones above as it would without the agent. Nothing
  the seeder does can make a pull fail; it can only leave less to do.

No race with the kubelet: while an image is being seeded, its repository is pending in the mirror
(``on_pending``), which holds the runtime's manifest request until the seeding is over, as it
does while a disk is being provisioned, so the pull starts once the snapshots are there.

Garbage: each image's snapshots are held by a lease that expires after ``lease_seconds``. The
pull that follows references the top snapshot from the image's config (containerd's
``gc.ref.snapshot`` label), which keeps the chain; if no pull comes (the pod went away), the lease
expires and containerd's collector removes them. Nothing is left behind either way.

A pool of ``workers`` threads; an image is seeded at most once at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from services.node_agent.containerd_snapshots import Mount, RuntimeUnavailable
from services.node_agent.disk_catalogue import MANIFEST_TYPES, DiskManifest, is_sha256, open_regular
from services.node_agent.overlay_layers import AppliedLayer, LayerCorrupt, LayerRefused, apply_layer
from services.node_agent.verification import digest_of
from snapcache.images import ImageReference, InvalidImageReference, parse_image_reference

log = logging.getLogger(__name__)

MAX_CONFIG_BYTES: Final = 4 * 1024 * 1024
UNCOMPRESSED_LAYER_TYPES: Final = frozenset(
    {"application/vnd.oci.image.layer.v1.tar", "application/vnd.docker.image.rootfs.diff.tar"}
)
SEEDED_LABEL: Final = "snapcache.io/seeded-from-disk"


class SnapshotRuntime(Protocol):
    """containerd's snapshotter and leases (``containerd_snapshots.ContainerdSnapshots``)."""

    snapshotter: str

    def create_lease(self, *, expire_seconds: float, labels: dict[str, str] | None = None) -> str: ...
    def exists(self, name: str) -> bool: ...
    def prepare(
        self, key: str, parent: str, *, lease: str, labels: dict[str, str] | None = None
    ) -> list[Mount]: ...
    def commit(self, name: str, key: str, *, lease: str, labels: dict[str, str] | None = None) -> bool: ...
    def remove(self, key: str) -> None: ...


class DiskImages(Protocol):
    """The attached disks' images (``disk_catalogue.DiskCatalogue``)."""

    def manifests(self, image: ImageReference) -> list[DiskManifest]: ...
    def mark_bad(self, disk_id: str, digest: str, why: str) -> None: ...


class SeedingStopped(Exception):
    """An image's seeding stopped at a layer; the pull does the rest."""


@dataclass(frozen=True, slots=True)
class SeedResult:
    """What seeding one image did."""

    image: str
    seeded: int  # layers written into the runtime now
    present: int  # layers whose snapshot existed already
    layers: int  # layers of the image
    bytes: int  # bytes of the diffs applied
    seconds: float
    stopped: str = ""  # why the seeding stopped before the top layer ("" when it did not)

    @property
    def complete(self) -> bool:
        """Every layer of the image is in the runtime: the pull will download none."""
        return self.seeded + self.present == self.layers


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chain ID of each layer of an image from its config's DiffIDs (OCI image spec)."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


def snapshot_directories(mounts: Sequence[Mount]) -> tuple[Path, list[Path]]:
    """Where a prepared overlayfs snapshot's own files go, and its parents' directories, nearest first.

    A first layer is a lone bind mount of its directory; a layer with parents, an overlay mount
    whose ``upperdir`` is its directory and whose ``lowerdir`` lists the parents'.
    """
    if len(mounts) == 1:
        mount = mounts[0]
        if mount.type == "bind":
            return Path(mount.source), []
        if mount.type == "overlay":
            options = dict(option.partition("=")[::2] for option in mount.options)
            if options.get("upperdir") and options.get("lowerdir"):
                return Path(options["upperdir"]), [Path(p) for p in options["lowerdir"].split(":")]
    described = [(m.type, m.source) for m in mounts]
    raise SeedingStopped(f"not an overlayfs snapshot (mounts {described}); only overlayfs is seeded")


def _read_verified(path: Path, digest: str, limit: int) -> bytes:
    fd, size = open_regular(path)
    try:
        if size > limit:
            raise SeedingStopped(f"{digest} is {size} bytes, more than {limit}")
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(limit + 1)
    finally:
        os.close(fd)
    if digest_of(data) != digest:
        raise SeedingStopped(f"{path.name} on the disk does not match its digest {digest}")
    return data


@dataclass(frozen=True, slots=True)
class _Layer:
    chain_id: str
    diff_id: str
    diff: Path  # the uncompressed tar on the disk (it may not exist)


def disk_layers(manifest: DiskManifest) -> list[_Layer]:
    """The layers of a platform manifest on a disk, each with its chain ID and where its diff is."""
    blobs = manifest.path.parent
    document = _json(_read_verified(manifest.path, manifest.digest, MAX_CONFIG_BYTES), "manifest")
    config = document.get("config")
    layers = document.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise SeedingStopped("the manifest has no config or layers")
    config_digest = _digest(config.get("digest"))
    image_config = _json(
        _read_verified(blobs / _hex(config_digest), config_digest, MAX_CONFIG_BYTES), "config"
    )
    rootfs = image_config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
        raise SeedingStopped("the config's rootfs.diff_ids do not match the manifest's layers")
    diff_ids = [_digest(d) for d in diff_ids]
    found = []
    for layer, diff_id, chain_id in zip(layers, diff_ids, chain_ids(diff_ids), strict=True):
        media_type = layer.get("mediaType") if isinstance(layer, dict) else None
        if media_type in UNCOMPRESSED_LAYER_TYPES:  # the layer is its own diff
            diff = blobs / _hex(_digest(layer.get("digest")))
        else:
            diff = blobs / _hex(diff_id)
        found.append(_Layer(chain_id, diff_id, diff))
    return found


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except ValueError:
        raise SeedingStopped(f"the {what} is not JSON") from None
    if not isinstance(document, dict):
        raise SeedingStopped(f"the {what} is not a JSON object")
    return document


def _digest(value: Any) -> str:
    if not is_sha256(value):
        raise SeedingStopped(f"not a sha256 digest: {str(value)[:80]!r}")
    assert isinstance(value, str)
    return value


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


class SnapshotSeeder:
    """Seeds the runtime's snapshots of the images on attached disks, in the background."""

    def __init__(
        self,
        *,
        runtime: SnapshotRuntime,
        disks: DiskImages,
        workers: int = 2,
        lease_seconds: float = 600.0,
        apply: Callable[..., AppliedLayer] = apply_layer,
        on_pending: Callable[[frozenset[str]], None] = lambda _names: None,
        on_done: Callable[[SeedResult], None] = lambda _result: None,
    ) -> None:
        self._runtime = runtime
        self._disks = disks
        self._lease_seconds = lease_seconds
        self._apply = apply
        self._on_pending = on_pending
        self._on_done = on_done
        self._lock = threading.Lock()
        self._in_flight: dict[str, str] = {}  # image -> its repository (registry/name)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="node-agent-seed")

    @property
    def pending(self) -> frozenset[str]:
        """The repositories of the images being seeded now."""
        with self._lock:
            return frozenset(self._in_flight.values())

    def submit(self, images: Iterable[str]) -> list[str]:
        """Start seeding each image an attached disk holds (not already being seeded); those started.

        Their repositories are pending (``on_pending``) before this returns, until each is done.
        """
        started = []
        with self._lock:
            for image in images:
                try:
                    reference = parse_image_reference(image)
                except InvalidImageReference:
                    continue
                if image in self._in_flight or not self._disks.manifests(reference):
                    continue
                self._in_flight[image] = reference.name
                started.append((image, reference))
            pending = frozenset(self._in_flight.values())
        if started:
            self._on_pending(pending)
        for image, reference in started:
            try:
                self._pool.submit(self._seed_and_report, image, reference)
            except RuntimeError:  # shutting down
                self._finished(image)
        return [image for image, _ in started]

    def close(self) -> None:
        """Stop taking work; a seeding in progress finishes its layer (its lease bounds the rest)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._in_flight.clear()
        self._on_pending(frozenset())

    def _finished(self, image: str) -> None:
        with self._lock:
            self._in_flight.pop(image, None)
            pending = frozenset(self._in_flight.values())
        self._on_pending(pending)

    def _seed_and_report(self, image: str, reference: ImageReference) -> None:
        try:
            result = self.seed(image, reference)
        except Exception as exc:  # never let a seeding thread die silently; the pull does the work
            log.exception("seeding %s failed", image)
            result = SeedResult(image, 0, 0, 0, 0, 0.0, stopped=f"unexpected error: {exc}")
        finally:
            self._finished(image)
        if result.stopped:
            log.warning(
                "seeded %d of %d layer(s) of %s into containerd (%d there already); stopped: %s",
                result.seeded, result.layers, image, result.present, result.stopped,
            )  # fmt: skip
        else:
            log.info(
                "seeded %d layer(s) of %s into containerd in %.2f s (%d there already)",
                result.seeded, image, result.seconds, result.present,
            )  # fmt: skip
        self._on_done(result)

    def seed(self, image: str, reference: ImageReference) -> SeedResult:
        """Seed one image's layers now (the thread's work; callable directly)."""
        began = time.monotonic()
        found = [m for m in self._disks.manifests(reference) if m.media_type in MANIFEST_TYPES]
        if not found:
            return SeedResult(image, 0, 0, 0, 0, 0.0, stopped="no platform manifest on an attached disk")
        manifest = found[-1]
        try:
            layers = disk_layers(manifest)
        except (SeedingStopped, OSError) as exc:
            return SeedResult(image, 0, 0, 0, 0, time.monotonic() - began, stopped=str(exc))
        seeded = present = written = 0
        lease = ""
        parent = ""
        stopped = ""
        try:
            for layer in layers:
                if self._runtime.exists(layer.chain_id):
                    present += 1
                    parent = layer.chain_id
                    continue
                if not layer.diff.is_file():
                    stopped = f"no unpacked diff of layer {layer.diff_id} on disk {manifest.disk_id}"
                    break
                if not lease:
                    lease = self._runtime.create_lease(
                        expire_seconds=self._lease_seconds, labels={SEEDED_LABEL: manifest.disk_id}
                    )
                committed, applied = self._seed_layer(layer, parent, lease, manifest.disk_id)
                if committed:
                    seeded += 1
                    written += applied
                else:  # the pull unpacked it meanwhile
                    present += 1
                parent = layer.chain_id
        except (SeedingStopped, LayerRefused, RuntimeUnavailable, OSError) as exc:
            stopped = str(exc) or type(exc).__name__
        return SeedResult(
            image, seeded, present, len(layers), written, time.monotonic() - began, stopped=stopped
        )

    def _seed_layer(self, layer: _Layer, parent: str, lease: str, disk_id: str) -> tuple[bool, int]:
        """Prepare, apply, commit one layer: whether ours was committed, and the diff's size.

        Raises to stop the image (after removing the prepared snapshot)."""
        key = f"snapcache-seed-{uuid.uuid4().hex} {layer.chain_id}"
        labels = {SEEDED_LABEL: disk_id}
        mounts = self._runtime.prepare(key, parent, lease=lease, labels=labels)
        committed = False
        try:
            upper, lowers = snapshot_directories(mounts)
            try:
                self._apply(layer.diff, upper, diff_id=layer.diff_id, lowers=lowers)
            except LayerCorrupt as exc:
                self._disks.mark_bad(disk_id, layer.diff_id, str(exc))
                raise
            committed = self._runtime.commit(layer.chain_id, key, lease=lease, labels=labels)
            return committed, layer.diff.stat().st_size  # the diff's bytes, as ``seeded_bytes`` counts
        finally:
            if not committed:  # failed, or another writer committed the same layer first
                try:
                    self._runtime.remove(key)
                except RuntimeUnavailable as exc:
                    log.warning("could not remove snapshot %s (its lease expires): %s", key, exc)
