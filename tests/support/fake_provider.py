"""An in-memory provider: the seam the registry owns, for fast service and worker tests.

Integration tests use the real `LocalProvider` against a real OCI registry; this fake only lets
lifecycle tests script outcomes (a failure, a slow pull, a zone copy error) deterministically.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.cache_registry.provider import (
    BuildFailure,
    CancelCheck,
    DiskInfo,
    Inventory,
    Platform,
    ProgressCallback,
    PulledImage,
    PullOptions,
    PullProgress,
    SnapshotInfo,
    ZoneInfo,
)
from snapcache.errors import FailedPrecondition, ResourceExhausted
from snapcache.images import ImageReference


@dataclass
class FakeProvider:
    """Records what exists; `fail_pull` / `fail_zone` script failures."""

    zone_names: Sequence[str] = ("zone-a", "zone-b")
    max_disks: int = 0
    fail_pull: BuildFailure | None = None
    fail_zone: dict[str, str] = field(default_factory=dict)
    pull_gate: threading.Event | None = None  # when set, pulls block until it is set
    builders: set[str] = field(default_factory=set)
    snapshots: set[str] = field(default_factory=set)
    zone_copies: set[tuple[str, str]] = field(default_factory=set)
    disks: dict[str, tuple[str, str]] = field(default_factory=dict)
    pulls: list[str] = field(default_factory=list)
    options_seen: list[PullOptions] = field(default_factory=list)

    def zones(self) -> Sequence[ZoneInfo]:
        return [
            ZoneInfo(
                name=z,
                max_disks=self.max_disks,
                disks_in_use=sum(1 for d in self.disks.values() if d[1] == z),
            )
            for z in self.zone_names
        ]

    def create_builder_disk(self, *, disk_id: str, capacity_bytes: int) -> None:
        self.builders.add(disk_id)

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
        assert disk_id in self.builders
        self.pulls.append(disk_id)
        self.options_seen.append(options)
        if self.pull_gate is not None:
            while not self.pull_gate.wait(0.01):
                if cancelled():
                    raise BuildFailure("CANCELLED", "build cancelled")
        if self.fail_pull is not None:
            raise self.fail_pull
        on_progress(PullProgress(bytes_done=100 * len(images), bytes_total=100 * len(images)))
        return [
            PulledImage(
                reference=ref,
                manifest_digest="sha256:" + format(abs(hash(str(ref))), "064x")[:64],
                index_digest="",
                platform=Platform(),
                compressed_bytes=100,
                uncompressed_bytes=250,
                layer_count=2,
            )
            for ref in images
        ]

    def create_snapshot(self, *, disk_id: str, snapshot_id: str) -> SnapshotInfo:
        assert disk_id in self.builders
        self.snapshots.add(snapshot_id)
        return SnapshotInfo(snapshot_id=snapshot_id, size_bytes=1000, blob_count=3)

    def release_builder_disk(self, *, disk_id: str) -> None:
        self.builders.discard(disk_id)

    def hydrate_zone(self, *, snapshot_id: str, zone: str) -> None:
        if zone in self.fail_zone:
            raise FailedPrecondition(reason="ZONE_COPY_FAILED", message=self.fail_zone[zone])
        self.zone_copies.add((snapshot_id, zone))

    def remove_from_zone(self, *, snapshot_id: str, zone: str) -> None:
        self.zone_copies.discard((snapshot_id, zone))

    def delete_snapshot(self, *, snapshot_id: str) -> None:
        self.snapshots.discard(snapshot_id)
        self.zone_copies = {c for c in self.zone_copies if c[0] != snapshot_id}

    def provision_disk(self, *, snapshot_id: str, zone: str, disk_id: str) -> DiskInfo:
        if (snapshot_id, zone) not in self.zone_copies:
            raise FailedPrecondition(reason="SNAPSHOT_NOT_IN_ZONE", message="not in zone")
        in_zone = sum(1 for d in self.disks.values() if d[1] == zone)
        if self.max_disks and in_zone >= self.max_disks:
            raise ResourceExhausted(reason="ZONE_CAPACITY_EXHAUSTED", message=f"zone {zone} is full")
        self.disks[disk_id] = (snapshot_id, zone)
        return DiskInfo(
            disk_id=disk_id, snapshot_id=snapshot_id, zone=zone, location=f"/fake/{zone}/{disk_id}"
        )

    def release_disk(self, *, disk_id: str) -> None:
        self.disks.pop(disk_id, None)

    def inventory(self) -> Inventory:
        return Inventory(
            builder_disks=frozenset(self.builders),
            snapshots=frozenset(self.snapshots),
            zone_snapshots=frozenset(self.zone_copies),
            disks=frozenset(self.disks),
        )

    def collect_garbage(self) -> int:
        return 0
