"""Validation of what users send: bounds, formats and references, all violations at once.

Pure functions over domain values. A request with several bad fields gets one INVALID_ARGUMENT
listing every violation (AIP-193 BadRequest), so a user fixes them in one round trip.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from pathlib import PurePosixPath

from services.cache_registry.model import CacheId, CacheSpec, CredentialRef
from snapcache import cache_names
from snapcache.cache_names import CACHE_ID_PATTERN
from snapcache.errors import FieldViolation, InvalidArgument
from snapcache.images import InvalidImageReference, parse_image_reference

DEFAULT_CACHE_SIZE_GIB = 20
MIN_CACHE_SIZE_GIB = 1
MAX_CACHE_SIZE_GIB = 2048
MAX_RETENTION_DAYS = 3650
MAX_IMAGES = 64
MAX_LABELS = 64
MAX_DISPLAY_NAME = 63
MAX_REGISTRY_HOSTS = 64
DEFAULT_PLATFORM = "linux/amd64"

DISK_ID_PATTERN = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_LABEL_NAME = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_HOST = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[-A-Za-z0-9]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[-A-Za-z0-9]*[A-Za-z0-9])?)*)"
    r"(?::[0-9]{1,5})?"
)
_PLATFORM = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")
_ZONE = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def parse_cache_name(name: str, *, field: str = "name") -> CacheId:
    """`imageCaches/imc-xxxxxxxx` (or the bare id) -> the id; INVALID_ARGUMENT otherwise."""
    return CacheId(cache_names.parse_cache_name(name, field=field))


def check_cache_id(cache_id: str, *, field: str = "image_cache_id") -> CacheId:
    """A client-chosen id must have the server's own form, so names stay uniform."""
    if not CACHE_ID_PATTERN.fullmatch(cache_id):
        raise InvalidArgument(
            reason="INVALID_FIELD",
            message=f"{field}: {cache_id!r} must be imc- followed by 8 lowercase letters or digits",
            violations=(FieldViolation(field, "must match imc-[a-z0-9]{8}"),),
        )
    return CacheId(cache_id)


def _check_labels(labels: Sequence[tuple[str, str]], prefix: str) -> list[FieldViolation]:
    found: list[FieldViolation] = []
    if len(labels) > MAX_LABELS:
        found.append(FieldViolation(f"{prefix}.labels", f"at most {MAX_LABELS} labels"))
    for key, value in labels:
        name = key
        if "/" in key:
            key_prefix, name = key.split("/", 1)
            if len(key_prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(key_prefix):
                found.append(FieldViolation(f"{prefix}.labels[{key}]", "key prefix must be a DNS subdomain"))
        if not _LABEL_NAME.fullmatch(name):
            found.append(
                FieldViolation(
                    f"{prefix}.labels[{key}]",
                    "key must be 1-63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric",
                )
            )
        if value and not _LABEL_NAME.fullmatch(value):
            found.append(
                FieldViolation(
                    f"{prefix}.labels[{key}]",
                    "value must be empty or 1-63 alphanumerics, '-', '_' or '.', "
                    "starting and ending alphanumeric",
                )
            )
    return found


def _check_hosts(hosts: Sequence[str], field: str) -> list[FieldViolation]:
    found: list[FieldViolation] = []
    if len(hosts) > MAX_REGISTRY_HOSTS:
        found.append(FieldViolation(field, f"at most {MAX_REGISTRY_HOSTS} hosts"))
    for i, host in enumerate(hosts):
        if not _HOST.fullmatch(host):
            found.append(FieldViolation(f"{field}[{i}]", f"{host!r} is not a registry host[:port]"))
    return found


def _check_credentials(refs: Sequence[CredentialRef], field: str) -> list[FieldViolation]:
    found: list[FieldViolation] = []
    for i, ref in enumerate(refs):
        path = f"{field}[{i}]"
        if bool(ref.secret) == bool(ref.docker_config_path):
            found.append(FieldViolation(path, "set exactly one of secret or docker_config_path"))
        elif ref.secret:
            namespace, _, name = ref.secret.partition("/")
            if not _DNS_LABEL.fullmatch(namespace) or len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
                found.append(
                    FieldViolation(f"{path}.secret", "must be namespace/name of a Kubernetes Secret")
                )
        elif not PurePosixPath(ref.docker_config_path).is_absolute():
            found.append(FieldViolation(f"{path}.docker_config_path", "must be an absolute path"))
    return found


def _check_images(images: Sequence[str], field: str) -> list[FieldViolation]:
    found: list[FieldViolation] = []
    if not images:
        return [FieldViolation(field, "at least one image is required")]
    if len(images) > MAX_IMAGES:
        found.append(FieldViolation(field, f"at most {MAX_IMAGES} images; got {len(images)}"))
    seen: dict[str, int] = {}
    for i, image in enumerate(images):
        try:
            normalized = str(parse_image_reference(image))
        except InvalidImageReference as exc:
            found.append(FieldViolation(f"{field}[{i}]", f"{image!r}: {exc}"))
            continue
        if normalized in seen:
            found.append(
                FieldViolation(
                    f"{field}[{i}]", f"{image!r} duplicates {field}[{seen[normalized]}] ({normalized})"
                )
            )
        seen[normalized] = i
    return found


def check_spec(
    spec: CacheSpec,
    *,
    known_zones: Collection[str],
    prefix: str = "image_cache",
    only: Collection[str] | None = None,
) -> CacheSpec:
    """Validate a spec (all fields, or only the named ones for an update); return it with defaults.

    A zero ``cache_size_gib`` means "not set" (proto3) and becomes the default; an empty platform
    becomes linux/amd64.
    """
    wanted = set(only) if only is not None else None

    def checks(name: str) -> bool:
        return wanted is None or name in wanted

    found: list[FieldViolation] = []
    size = spec.cache_size_gib or DEFAULT_CACHE_SIZE_GIB
    platform = spec.platform or DEFAULT_PLATFORM
    if checks("images"):
        found += _check_images(spec.images, f"{prefix}.images")
    if checks("cache_size_gib") and not MIN_CACHE_SIZE_GIB <= size <= MAX_CACHE_SIZE_GIB:
        found.append(
            FieldViolation(
                f"{prefix}.cache_size_gib",
                f"must be between {MIN_CACHE_SIZE_GIB} and {MAX_CACHE_SIZE_GIB} GiB; "
                f"got {spec.cache_size_gib}",
            )
        )
    if checks("retention_days") and not 0 <= spec.retention_days <= MAX_RETENTION_DAYS:
        found.append(
            FieldViolation(
                f"{prefix}.retention_days",
                f"must be between 0 (permanent) and {MAX_RETENTION_DAYS}; got {spec.retention_days}",
            )
        )
    if checks("display_name") and len(spec.display_name) > MAX_DISPLAY_NAME:
        found.append(FieldViolation(f"{prefix}.display_name", f"at most {MAX_DISPLAY_NAME} characters"))
    if checks("labels"):
        found += _check_labels(spec.labels, prefix)
    if checks("registry_credentials"):
        found += _check_credentials(spec.registry_credentials, f"{prefix}.registry_credentials")
    if checks("plain_http_registries"):
        found += _check_hosts(spec.plain_http_registries, f"{prefix}.plain_http_registries")
    if checks("insecure_registries"):
        found += _check_hosts(spec.insecure_registries, f"{prefix}.insecure_registries")
    if checks("platform") and not _PLATFORM.fullmatch(platform):
        found.append(FieldViolation(f"{prefix}.platform", f"{platform!r} is not os/arch[/variant]"))
    if checks("zones"):
        for i, zone in enumerate(spec.zones):
            if not _ZONE.fullmatch(zone):
                found.append(FieldViolation(f"{prefix}.zones[{i}]", f"{zone!r} is not a zone name"))
            elif zone not in known_zones:
                found.append(
                    FieldViolation(
                        f"{prefix}.zones[{i}]",
                        f"unknown zone {zone!r}; known zones: {', '.join(sorted(known_zones)) or 'none'}",
                    )
                )
        if len(set(spec.zones)) != len(spec.zones):
            found.append(FieldViolation(f"{prefix}.zones", "zones must not repeat"))
    if found:
        raise InvalidArgument(
            reason="INVALID_FIELD",
            message="; ".join(f"{v.field}: {v.description}" for v in found),
            violations=tuple(found),
        )
    return CacheSpec(
        images=spec.images,
        cache_size_gib=size,
        retention_days=spec.retention_days,
        display_name=spec.display_name,
        labels=tuple(sorted(spec.labels)),
        registry_credentials=spec.registry_credentials,
        plain_http_registries=spec.plain_http_registries,
        insecure_registries=spec.insecure_registries,
        platform=platform,
        zones=spec.zones,
    )


def check_page_size(
    page_size: int, *, field: str = "page_size", default: int = 100, maximum: int = 1000
) -> int:
    """AIP-158: 0 means the default; negative is an error; above the maximum is clamped."""
    if page_size < 0:
        raise InvalidArgument(
            reason="INVALID_FIELD",
            message=f"{field}: must not be negative; got {page_size}",
            violations=(FieldViolation(field, "must not be negative"),),
        )
    return min(page_size or default, maximum)


def check_disk_id(disk_id: str, *, field: str = "disk_id") -> str:
    """Disk ids are DNS labels so they can name volumes on every provider."""
    if not DISK_ID_PATTERN.fullmatch(disk_id):
        raise InvalidArgument(
            reason="INVALID_FIELD",
            message=f"{field}: {disk_id!r} must be 1-63 lowercase letters, digits or '-'",
            violations=(FieldViolation(field, "must be 1-63 lowercase letters, digits or '-'"),),
        )
    return disk_id
