"""The provider port: what the registry needs from whatever really holds disks and snapshots.

The registry's control plane (store, lifecycle worker) decides *what* should exist; a provider
makes it so on some data plane. The embedded default is `local_provider.LocalProvider`
(directories, hard links, a real OCI pull); a cloud or CSI provider implements the same port.

Contract for every implementation:
- every method is idempotent (the worker retries after crashes and restarts);
- every method that creates something does it atomically (it exists whole or not at all), so a
  crash leaves at most a temporary that `inventory()` does not report and `collect_garbage()`
  removes;
- ``inventory()`` reports what exists, so the registry's start-up reconcile pass can delete what
  no record owns (orphaned builder disks, half-made snapshots, leaked disks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from snapcache.images import ImageReference


@dataclass(frozen=True, slots=True)
class Platform:
    """An OCI platform such as ``linux/amd64`` or ``linux/arm64/v8``."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


@dataclass(frozen=True, slots=True)
class RegistryCredential:
    """A username/password (or identity token) for one registry host. Never persisted."""

    username: str = ""
    password: str = ""
    identity_token: str = ""

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return f"RegistryCredential(username={self.username!r}, password=<redacted>)"


@dataclass(frozen=True, slots=True)
class PullOptions:
    """How to reach registries for one build."""

    platform: Platform = field(default_factory=Platform)
    # registry host ("docker.io", "127.0.0.1:5000") -> credential
    credentials: Mapping[str, RegistryCredential] = field(default_factory=dict)
    # hosts reached over plain HTTP (TKE RegistryHttpEndPointList)
    plain_http_registries: frozenset[str] = frozenset()
    # hosts reached over HTTPS without certificate verification (TKE RegistrySkipVerifyList)
    insecure_registries: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class PulledImage:
    """What the builder recorded about one image it pulled."""

    reference: ImageReference  # normalized, as requested
    manifest_digest: str  # the platform-specific image manifest
    index_digest: str  # the image index it was chosen from, "" when the reference named a manifest
    platform: Platform
    compressed_bytes: int  # config + layers as stored
    uncompressed_bytes: int  # config + layers as unpacked by a runtime
    layer_count: int
    # True only when the provider saw the image's registry serve its manifest without
    # credentials (pulled anonymously, or an anonymous request for it succeeded). False, the
    # safe default, makes an image pulled with credentials private to those credentials' users.
    anonymous_pull_allowed: bool = False
    # Whether the disk also holds each layer's uncompressed tar as the blob named by its DiffID,
    # from which a node makes snapshots without unpacking: "stored" (every layer), "stored for K
    # of M layers" (the others unpack on the node), "skipped: needs N more bytes" (blobs and
    # diffs do not fit the disk together), "" (the provider does not store diffs).
    layer_diffs: str = ""


@dataclass(frozen=True, slots=True)
class PullProgress:
    """Bytes fetched so far by one build (monotonic), and the total once manifests are resolved."""

    bytes_done: int
    bytes_total: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """An immutable snapshot as the provider holds it."""

    snapshot_id: str
    size_bytes: int
    blob_count: int


@dataclass(frozen=True, slots=True)
class DiskInfo:
    """A disk derived from a snapshot in one zone."""

    disk_id: str
    snapshot_id: str
    zone: str
    # where a node finds the disk's content: a path for the local provider, a volume id in clouds
    location: str


@dataclass(frozen=True, slots=True)
class ZoneInfo:
    """A zone the provider can place snapshot copies and derived disks in."""

    name: str
    max_disks: int  # capacity for derived disks; 0 = unlimited
    disks_in_use: int


@dataclass(frozen=True, slots=True)
class Inventory:
    """Everything the provider holds, for the registry's reconcile pass."""

    builder_disks: frozenset[str]
    snapshots: frozenset[str]
    zone_snapshots: frozenset[tuple[str, str]]  # (snapshot_id, zone)
    disks: frozenset[str]


class BuildFailure(Exception):
    """A build cannot go on. ``retryable`` failures (registry down) may succeed on a later try."""

    def __init__(self, reason: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable


ProgressCallback = Callable[[PullProgress], None]
CancelCheck = Callable[[], bool]


class Provider(Protocol):
    """The data plane behind the registry (see the module docstring for the contract)."""

    def zones(self) -> Sequence[ZoneInfo]:
        """The configured zones with their disk capacity and use."""
        ...

    def create_builder_disk(self, *, disk_id: str, capacity_bytes: int) -> None:
        """Create an empty builder disk; an existing one is kept so a build can resume."""
        ...

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
        """Pull every image onto the builder disk; raise ``BuildFailure`` with a reason.

        Each ``PulledImage`` says whether its registry serves it without credentials
        (``anonymous_pull_allowed``): the registry records the others as private, matched only for
        pods allowed to use the credentials that pulled them. A provider that cannot tell leaves
        it False.
        """
        ...

    def create_snapshot(self, *, disk_id: str, snapshot_id: str) -> SnapshotInfo:
        """Snapshot the builder disk: immutable, content-addressed, no bytes copied."""
        ...

    def release_builder_disk(self, *, disk_id: str) -> None:
        """Delete a builder disk (no error if it is gone)."""
        ...

    def hydrate_zone(self, *, snapshot_id: str, zone: str) -> None:
        """Make the snapshot available in a zone (a real copy into the zone's storage)."""
        ...

    def remove_from_zone(self, *, snapshot_id: str, zone: str) -> None:
        """Drop the snapshot's copy in a zone (no error if it is gone)."""
        ...

    def delete_snapshot(self, *, snapshot_id: str) -> None:
        """Delete a snapshot and all its zone copies (no error if it is gone)."""
        ...

    def provision_disk(self, *, snapshot_id: str, zone: str, disk_id: str) -> DiskInfo:
        """Create a disk from the snapshot's copy in a zone, copying no bytes."""
        ...

    def release_disk(self, *, disk_id: str) -> None:
        """Delete a derived disk (no error if it is gone)."""
        ...

    def inventory(self) -> Inventory:
        """Everything that exists on the data plane."""
        ...

    def collect_garbage(self) -> int:
        """Remove temporaries and blobs no snapshot or disk references; return bytes freed."""
        ...
