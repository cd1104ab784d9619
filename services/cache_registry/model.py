"""The registry's domain values: image caches, their images, zones, events and disks.

Plain dataclasses and enums, no transport or SQL. The store maps them to rows, the servicer to
protos; everything in between (validation, lifecycle, the worker) works on these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import NewType

from snapcache.cache_names import CACHE_NAME_PREFIX as CACHE_NAME_PREFIX  # noqa: PLC0414 (re-export)

CacheId = NewType("CacheId", str)
DiskId = NewType("DiskId", str)


class CacheState(enum.Enum):
    """Lifecycle states (see `lifecycle` for the legal transitions)."""

    CREATING = "CREATING"
    READY = "READY"
    UPDATING = "UPDATING"
    FAILED = "FAILED"
    UPDATE_FAILED = "UPDATE_FAILED"
    DELETING = "DELETING"
    EXPIRED = "EXPIRED"


class ZoneState(enum.Enum):
    """Availability of a snapshot in one zone."""

    HYDRATING = "HYDRATING"
    AVAILABLE = "AVAILABLE"
    UNAVAILABLE = "UNAVAILABLE"


class BuildPhase(enum.Enum):
    """Where a build is."""

    NONE = "NONE"
    QUEUED = "QUEUED"
    PULLING = "PULLING"
    SNAPSHOTTING = "SNAPSHOTTING"
    RELEASING_BUILDER = "RELEASING_BUILDER"
    DONE = "DONE"


class EventType(enum.Enum):
    """Severity of a cache event."""

    NORMAL = "NORMAL"
    WARNING = "WARNING"


class ChangeType(enum.Enum):
    """Kind of entry in the change feed."""

    UPSERT = "UPSERT"
    DELETE = "DELETE"


@dataclass(frozen=True, slots=True)
class CredentialRef:
    """Where registry credentials live; exactly one field is set."""

    secret: str = ""  # "namespace/name" of a kubernetes.io/dockerconfigjson Secret
    docker_config_path: str = ""  # a docker config.json on the registry's host


@dataclass(frozen=True, slots=True)
class CachedImage:
    """What a build recorded about one image."""

    image: str
    normalized_image: str
    manifest_digest: str
    index_digest: str
    platform: str
    compressed_bytes: int
    uncompressed_bytes: int
    layer_count: int
    # The registry refused (or could not be asked for) an anonymous pull of the manifest: only
    # pods allowed to use every reference in `authorized_by` may get the image from the cache.
    requires_credentials: bool = False
    authorized_by: tuple[CredentialRef, ...] = ()


@dataclass(frozen=True, slots=True)
class ZoneAvailability:
    """State of the snapshot's copy in one zone."""

    zone: str
    state: ZoneState
    message: str
    update_time: datetime


@dataclass(frozen=True, slots=True)
class BuildProgress:
    """Progress of the running build."""

    phase: BuildPhase = BuildPhase.NONE
    bytes_done: int = 0
    bytes_total: int = 0
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """What the user asks for: everything a build depends on, plus descriptive fields."""

    images: tuple[str, ...]
    cache_size_gib: int
    retention_days: int
    display_name: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    registry_credentials: tuple[CredentialRef, ...] = ()
    plain_http_registries: tuple[str, ...] = ()
    insecure_registries: tuple[str, ...] = ()
    platform: str = "linux/amd64"
    zones: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ImageCache:
    """An image cache: its spec and everything the registry observed about it."""

    cache_id: CacheId
    spec: CacheSpec
    state: CacheState
    create_time: datetime
    update_time: datetime
    state_reason: str = ""
    state_message: str = ""
    progress: BuildProgress = field(default_factory=BuildProgress)
    cached_images: tuple[CachedImage, ...] = ()
    zones: tuple[ZoneAvailability, ...] = ()
    snapshot_id: str = ""
    snapshot_size_bytes: int = 0
    build_id: str = ""  # changes whenever a new build is requested; names its builder disk
    disk_count: int = 0
    ready_time: datetime | None = None
    expire_time: datetime | None = None
    last_matched_time: datetime | None = None
    match_count: int = 0
    version: int = 1  # optimistic concurrency; the etag is derived from it
    revision: int = 0  # change-feed revision of this version

    @property
    def name(self) -> str:
        """The resource name, `imageCaches/imc-xxxxxxxx`."""
        return CACHE_NAME_PREFIX + self.cache_id

    @property
    def etag(self) -> str:
        """Opaque version tag for AIP-154 guarded updates."""
        return f'W/"{self.version}"'


@dataclass(frozen=True, slots=True)
class CacheEvent:
    """One entry of a cache's event log."""

    sequence: int
    time: datetime
    type: EventType
    reason: str
    message: str
    attributes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Disk:
    """A live disk provisioned from a cache's snapshot."""

    disk_id: DiskId
    cache_id: CacheId
    zone: str
    location: str
    snapshot_id: str
    holder: str
    create_time: datetime

    @property
    def name(self) -> str:
        """`imageCaches/{cache}/disks/{disk}`."""
        return f"{CACHE_NAME_PREFIX}{self.cache_id}/disks/{self.disk_id}"


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the change feed."""

    revision: int
    type: ChangeType
    cache: ImageCache
