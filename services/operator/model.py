"""The values the operator's core works on: an ImageCache resource as read from the API server, a
registry cache as the change feed reports it, and the cache spec the operator wants.

Plain frozen dataclasses and the errors the edges raise: `kube_resources` turns API objects into
`ImageCacheResource` (parsed here from the plain dict the API serves), `registry_client` turns
protos into `CacheView`, so `cache_specs`, `statuses`, `plans` and `reconciler` are tested with
values alone.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

GROUP = "snapcache.io"
VERSION = "v1alpha1"
PLURAL = "imagecaches"
KIND = "ImageCache"
API_VERSION = f"{GROUP}/{VERSION}"

# Held by every ImageCache the operator manages, until its cache is gone from the registry.
FINALIZER = "snapcache.io/image-cache"
# Labels of CR-born caches in the registry: the owner's uid (what the operator trusts) and its
# name when it fits a label value (for people: `snapcache cache list --filter 'labels...'`).
OWNER_UID_LABEL = "snapcache.io/imagecache-uid"
OWNER_NAME_LABEL = "snapcache.io/imagecache"
# `"true"` on an ImageCache: delete its cache even while disks made from it are live.
FORCE_DELETE_ANNOTATION = "snapcache.io/force-delete"


class CacheState(enum.Enum):
    """The registry's lifecycle state of a cache (`snapcache.v1.ImageCache.State`)."""

    UNSPECIFIED = "STATE_UNSPECIFIED"
    CREATING = "CREATING"
    READY = "READY"
    UPDATING = "UPDATING"
    FAILED = "FAILED"
    UPDATE_FAILED = "UPDATE_FAILED"
    DELETING = "DELETING"
    EXPIRED = "EXPIRED"


@dataclass(frozen=True)
class CacheSpec:
    """The user-settable part of a registry cache, as the operator wants it or the registry has it.

    ``credentials`` are references only: `namespace/name` of a Secret, or (for caches made through
    the API) an absolute docker config path, which an ImageCache can never name.
    """

    images: tuple[str, ...]
    cache_size_gib: int
    retention_days: int
    credentials: tuple[str, ...] = ()
    plain_http_registries: tuple[str, ...] = ()
    insecure_registries: tuple[str, ...] = ()
    platform: str = ""
    zones: tuple[str, ...] = ()
    display_name: str = ""
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class BuildProgress:
    """Progress of a cache's build, as the registry reports it."""

    phase: str = ""  # QUEUED, PULLING, SNAPSHOTTING, RELEASING_BUILDER, DONE; "" for none
    bytes_done: int = 0
    bytes_total: int = 0
    attempt: int = 0


@dataclass(frozen=True)
class ZoneAvailability:
    """Availability of a cache's snapshot in one zone."""

    zone: str
    state: str  # HYDRATING, AVAILABLE, UNAVAILABLE
    message: str = ""


@dataclass(frozen=True)
class CacheView:
    """One version of a registry cache, as far as the operator cares."""

    cache_id: str
    state: CacheState
    spec: CacheSpec
    revision: int = 0
    state_reason: str = ""
    state_message: str = ""
    progress: BuildProgress = field(default_factory=BuildProgress)
    zones: tuple[ZoneAvailability, ...] = ()
    expire_time: datetime | None = None
    ready_time: datetime | None = None
    last_matched_time: datetime | None = None
    image_count: int = 0  # images the last successful build recorded
    snapshot_size_bytes: int = 0
    disk_count: int = 0

    @property
    def owner_uid(self) -> str:
        """The uid of the ImageCache this cache was made for; "" for a cache made through the API."""
        return dict(self.spec.labels).get(OWNER_UID_LABEL, "")


@dataclass(frozen=True)
class ImageCacheResource:
    """An ImageCache object as the API server served it (spec and status as plain JSON values)."""

    name: str
    uid: str
    generation: int
    resource_version: str
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    finalizers: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    deleting: bool = False  # metadata.deletionTimestamp is set

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> ImageCacheResource:
        """Parse the JSON object the API serves (fields it may omit default to empty)."""
        metadata = obj.get("metadata") or {}
        spec = obj.get("spec")
        status = obj.get("status")
        return cls(
            name=str(metadata.get("name") or ""),
            uid=str(metadata.get("uid") or ""),
            generation=int(metadata.get("generation") or 0),
            resource_version=str(metadata.get("resourceVersion") or ""),
            spec=spec if isinstance(spec, Mapping) else {},
            status=status if isinstance(status, Mapping) else {},
            finalizers=tuple(str(f) for f in metadata.get("finalizers") or ()),
            annotations={str(k): str(v) for k, v in (metadata.get("annotations") or {}).items()},
            deleting=bool(metadata.get("deletionTimestamp")),
        )


@dataclass(frozen=True)
class EventSpec:
    """A Kubernetes Event to record on an ImageCache."""

    type: str  # Normal or Warning
    reason: str  # CamelCase
    message: str


class RegistryRefusal(Exception):
    """The registry answered a call with an error (or could not be reached)."""

    # gRPC codes after which the same call may well succeed later
    TRANSIENT_CODES = frozenset(
        {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "INTERNAL", "UNKNOWN"}
    )

    def __init__(self, *, code: str, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}" if reason else f"{code}: {message}")
        self.code = code  # the gRPC status code's name, such as FAILED_PRECONDITION
        self.reason = reason  # the ErrorInfo reason, such as DISKS_IN_USE; "" if none
        self.message = message

    @property
    def transient(self) -> bool:
        """True if retrying the same call later may succeed."""
        return self.code in self.TRANSIENT_CODES


class ResourceConflict(Exception):
    """The ImageCache changed since it was read (HTTP 409); read it again."""


class ResourceGone(Exception):
    """The ImageCache no longer exists (HTTP 404)."""


class KubeApiError(Exception):
    """The Kubernetes API could not be reached, or refused a write for a reason other than a conflict."""
