"""From an ImageCache's spec to the registry cache it asks for, and what differs from the one there.

The cache id is derived from the resource's uid, so every operator (a restarted one, a second
replica) asks for the same id: a create after a crash answers ALREADY_EXISTS and the existing
cache is adopted, never built twice. The uid, not the name: an ImageCache deleted and created
again under the same name is a new resource and gets a new cache.

The API server has already checked the spec against the CRD's schema; the checks here repeat the
types and bounds only so that a resource written under an older or missing schema fails with a
message instead of an exception. What only the registry can judge (the image grammar, duplicates
after normalization, known zones) is left to it.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Mapping
from typing import Any

from services.operator.model import OWNER_NAME_LABEL, OWNER_UID_LABEL, CacheSpec, ImageCacheResource

DEFAULT_CACHE_SIZE_GIB = 20
DEFAULT_PLATFORM = "linux/amd64"
MIN_CACHE_SIZE_GIB = 1
MAX_CACHE_SIZE_GIB = 2048
MAX_RETENTION_DAYS = 3650
MAX_IMAGES = 64
MAX_LIST = 64
MAX_LABEL_VALUE = 63
MAX_DISPLAY_NAME = 63

_ID_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_REF = re.compile(
    r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
)
_LABEL_VALUE = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")

# Fields of the registry's UpdateImageCache mask the operator keeps in step with the spec.
# `zones` is not among them: the registry fixes a cache's zones at creation.
UPDATABLE_PATHS = (
    "cache_size_gib",
    "display_name",
    "images",
    "insecure_registries",
    "labels",
    "plain_http_registries",
    "platform",
    "registry_credentials",
    "retention_days",
)


class SpecError(ValueError):
    """The spec cannot be turned into a cache; the message names every bad field."""


def cache_id_for(uid: str) -> str:
    """The registry cache id of the ImageCache with this uid: `imc-` and 8 of [a-z0-9], stable."""
    number = int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "big")
    chars = []
    for _ in range(8):
        number, digit = divmod(number, len(_ID_ALPHABET))
        chars.append(_ID_ALPHABET[digit])
    return "imc-" + "".join(chars)


def owner_labels(resource: ImageCacheResource) -> tuple[tuple[str, str], ...]:
    """The labels that tie a cache to its ImageCache (the name only when it is a valid label value)."""
    labels = [(OWNER_UID_LABEL, resource.uid)]
    if len(resource.name) <= MAX_LABEL_VALUE and _LABEL_VALUE.fullmatch(resource.name):
        labels.append((OWNER_NAME_LABEL, resource.name))
    return tuple(sorted(labels))


def _strings(spec: Mapping[str, Any], key: str, problems: list[str], *, limit: int) -> tuple[str, ...]:
    value = spec.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        problems.append(f"spec.{key}: must be a list of non-empty strings")
        return ()
    if len(value) > limit:
        problems.append(f"spec.{key}: at most {limit} entries; got {len(value)}")
    return tuple(value)


def _integer(
    spec: Mapping[str, Any], key: str, problems: list[str], *, default: int, low: int, high: int
) -> int:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"spec.{key}: must be an integer")
        return default
    if not low <= value <= high:
        problems.append(f"spec.{key}: must be between {low} and {high}; got {value}")
    return value


def desired_spec(resource: ImageCacheResource) -> CacheSpec:
    """The cache an ImageCache asks for, with the CRD's defaults; `SpecError` if it cannot be one."""
    spec = resource.spec
    problems: list[str] = []
    images = _strings(spec, "images", problems, limit=MAX_IMAGES)
    if not images and not problems:
        problems.append("spec.images: at least one image is required")
    size = _integer(
        spec,
        "imageCacheSize",
        problems,
        default=DEFAULT_CACHE_SIZE_GIB,
        low=MIN_CACHE_SIZE_GIB,
        high=MAX_CACHE_SIZE_GIB,
    )
    retention = _integer(spec, "retentionDays", problems, default=0, low=0, high=MAX_RETENTION_DAYS)
    credentials = _strings(spec, "imageRegistryCredentials", problems, limit=MAX_LIST)
    for i, ref in enumerate(credentials):
        if not _SECRET_REF.fullmatch(ref):
            problems.append(f"spec.imageRegistryCredentials[{i}]: {ref!r} is not namespace/name of a Secret")
    platform = spec.get("platform") or DEFAULT_PLATFORM
    if not isinstance(platform, str):
        problems.append("spec.platform: must be a string")
        platform = DEFAULT_PLATFORM
    plain_http = _strings(spec, "plainHttpRegistries", problems, limit=MAX_LIST)
    insecure = _strings(spec, "insecureRegistries", problems, limit=MAX_LIST)
    zones = _strings(spec, "zones", problems, limit=MAX_LIST)
    if problems:
        raise SpecError("; ".join(problems))
    return CacheSpec(
        images=images,
        cache_size_gib=size,
        retention_days=retention,
        credentials=credentials,
        plain_http_registries=plain_http,
        insecure_registries=insecure,
        platform=platform,
        zones=zones,
        display_name=resource.name[:MAX_DISPLAY_NAME],
        labels=owner_labels(resource),
    )


def update_paths(desired: CacheSpec, current: CacheSpec) -> tuple[str, ...]:
    """The update-mask paths whose values differ (`zones` never: see `zones_differ`).

    Images and registry host lists compare as sets: reordering them changes nothing the registry
    pulls, and an update of `images` would rebuild. Credentials compare in order, since a later
    Secret wins for the same registry host.
    """
    differs = {
        "cache_size_gib": desired.cache_size_gib != current.cache_size_gib,
        "display_name": desired.display_name != current.display_name,
        "images": sorted(desired.images) != sorted(current.images),
        "insecure_registries": sorted(desired.insecure_registries) != sorted(current.insecure_registries),
        "labels": sorted(desired.labels) != sorted(current.labels),
        "plain_http_registries": sorted(desired.plain_http_registries)
        != sorted(current.plain_http_registries),
        "platform": desired.platform != current.platform,
        "registry_credentials": desired.credentials != current.credentials,
        "retention_days": desired.retention_days != current.retention_days,
    }
    return tuple(path for path in UPDATABLE_PATHS if differs[path])


def zones_differ(desired: CacheSpec, current: CacheSpec) -> bool:
    """True if the spec names other zones than the cache was created with."""
    return sorted(desired.zones) != sorted(current.zones)


REBUILD_PATHS = frozenset({"images", "cache_size_gib", "platform"})


def rebuilds(paths: tuple[str, ...]) -> bool:
    """Whether an update of these paths makes the registry rebuild the snapshot."""
    return bool(REBUILD_PATHS.intersection(paths))
