"""What the CLI prints: tables and descriptions for people, protobuf JSON for programs.

Pure functions from API messages to text; the current time is a parameter so output is testable.
JSON keeps the proto field names (``cache_size_gib``, not ``cacheSizeGib``), so a script's keys
are the ones in the ``.proto`` files.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from snapcache.images import InvalidImageReference, familiar_name, parse_image_reference
from snapcache.v1 import image_cache_pb2 as pb

_BYTE_UNITS: Final = ("B", "KiB", "MiB", "GiB", "TiB")
_NONE: Final = "-"


def to_json(message: Message) -> str:
    """Protobuf JSON with proto field names, for ``-o json``."""
    return json_format.MessageToJson(message, preserving_proto_field_name=True)


def to_dict(message: Message) -> dict[str, object]:
    """The same as `to_json`, as a dict to embed in a larger JSON document."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


# -- scalars --


def format_bytes(count: int) -> str:
    """``0 B``, ``512 B``, ``966.7 KiB``, ``1.5 GiB``."""
    value = float(count)
    for unit in _BYTE_UNITS:
        if abs(value) < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(delta: timedelta) -> str:
    """kubectl-style short durations: ``42s``, ``5m``, ``3h``, ``12d``."""
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{max(seconds, 0)}s"
    if seconds < 2 * 3600:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def timestamp(value: Timestamp) -> datetime:
    """A protobuf timestamp as an aware UTC datetime."""
    return value.ToDatetime(tzinfo=UTC)


def format_time(message: Message, field: str) -> str:
    """A timestamp field as ``2026-01-01 12:00:00Z``, or ``-`` when unset."""
    if not message.HasField(field):
        return _NONE
    value: Timestamp = getattr(message, field)
    return timestamp(value).strftime("%Y-%m-%d %H:%M:%SZ")


def image_label(text: str) -> str:
    """An image as people write it (``nginx:1.25``); the text as given when it does not parse."""
    try:
        return familiar_name(parse_image_reference(text))
    except InvalidImageReference:
        return text


# -- enums --


def state_name(cache: pb.ImageCache) -> str:
    """``READY``, ``CREATING``, ..."""
    return pb.ImageCache.State.Name(cache.state)


def phase_name(progress: pb.BuildProgress) -> str:
    """``PULLING``, ``SNAPSHOTTING``, ...; ``-`` when no build runs."""
    if progress.phase == pb.BuildProgress.PHASE_UNSPECIFIED:
        return _NONE
    return pb.BuildProgress.Phase.Name(progress.phase)


def zone_summary(cache: pb.ImageCache) -> str:
    """``local-a:AVAILABLE,local-b:HYDRATING``; ``-`` before any zone copy exists."""
    if not cache.zone_availability:
        return _NONE
    return ",".join(
        f"{zone.zone}:{pb.ZoneAvailability.State.Name(zone.state)}" for zone in cache.zone_availability
    )


def all_zones_settled(cache: pb.ImageCache) -> bool:
    """Every zone copy has left HYDRATING (and at least one zone copy exists)."""
    return bool(cache.zone_availability) and all(
        zone.state != pb.ZoneAvailability.HYDRATING for zone in cache.zone_availability
    )


# -- tables --


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, kubectl style; the last column is not padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = [cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _images_cell(cache: pb.ImageCache) -> str:
    if not cache.images:
        return _NONE
    first = image_label(cache.images[0])
    more = len(cache.images) - 1
    return f"{first} (+{more})" if more else first


def _size_cell(cache: pb.ImageCache) -> str:
    disk = f"{cache.cache_size_gib} GiB"
    return f"{format_bytes(cache.snapshot_size_bytes)} / {disk}" if cache.snapshot_size_bytes else disk


def _expires_cell(cache: pb.ImageCache, now: datetime) -> str:
    if not cache.HasField("expire_time"):
        return "never"
    left = timestamp(cache.expire_time) - now
    return "expired" if left.total_seconds() <= 0 else f"in {format_duration(left)}"


def cache_table(caches: Sequence[pb.ImageCache], *, now: datetime) -> str:
    """The ``cache list`` table."""
    rows = [
        [
            cache.name.removeprefix("imageCaches/"),
            state_name(cache),
            _images_cell(cache),
            _size_cell(cache),
            zone_summary(cache),
            format_duration(now - timestamp(cache.create_time)) if cache.HasField("create_time") else _NONE,
            _expires_cell(cache, now),
        ]
        for cache in caches
    ]
    return table(["ID", "STATE", "IMAGES", "SIZE", "ZONES", "AGE", "EXPIRES"], rows)


def events_table(events: Sequence[pb.ImageCacheEvent]) -> str:
    """The ``cache events`` table, oldest first."""
    rows = [
        [format_time(e, "time"), pb.ImageCacheEvent.Type.Name(e.type), e.reason, e.message] for e in events
    ]
    return table(["TIME", "TYPE", "REASON", "MESSAGE"], rows)


# -- descriptions --


def _field_lines(pairs: Sequence[tuple[str, str]]) -> list[str]:
    width = max(len(label) for label, _ in pairs) + 2
    return [f"{(label + ':').ljust(width)}{value}" for label, value in pairs]


def _progress_text(progress: pb.BuildProgress) -> str:
    parts = [phase_name(progress)]
    if progress.bytes_total:
        percent = 100 * progress.bytes_done // progress.bytes_total
        parts.append(
            f"{format_bytes(progress.bytes_done)} of {format_bytes(progress.bytes_total)} ({percent}%)"
        )
    if progress.attempt:
        parts.append(f"attempt {progress.attempt}")
    return ", ".join(parts)


def _credential_text(ref: pb.RegistryCredentialRef) -> str:
    if ref.WhichOneof("source") == "secret":
        return f"secret {ref.secret}"
    return f"docker config {ref.docker_config_path}"


def describe_cache(cache: pb.ImageCache, *, now: datetime) -> str:
    """The ``cache get`` view: what a person asks about a cache, on one screen."""
    pairs: list[tuple[str, str]] = [("Name", cache.name)]
    if cache.display_name:
        pairs.append(("Display name", cache.display_name))
    pairs.append(("State", state_name(cache)))
    if cache.state_reason:
        pairs.append(("Reason", cache.state_reason))
    if cache.state_message:
        pairs.append(("Message", cache.state_message))
    pairs += [
        ("Progress", _progress_text(cache.progress)),
        ("Cache size", f"{cache.cache_size_gib} GiB"),
        ("Snapshot size", format_bytes(cache.snapshot_size_bytes) if cache.snapshot_size_bytes else _NONE),
        ("Platform", cache.platform or _NONE),
        ("Zones wanted", ", ".join(cache.zones) or "all"),
        (
            "Retention",
            f"{cache.retention_days} days (expires {format_time(cache, 'expire_time')}, "
            f"{_expires_cell(cache, now)})"
            if cache.retention_days
            else "permanent",
        ),
    ]
    if cache.labels:
        pairs.append(("Labels", ", ".join(f"{k}={v}" for k, v in sorted(cache.labels.items()))))
    if cache.plain_http_registries:
        pairs.append(("Plain HTTP", ", ".join(cache.plain_http_registries)))
    if cache.insecure_registries:
        pairs.append(("Insecure TLS", ", ".join(cache.insecure_registries)))
    if cache.registry_credentials:
        pairs.append(("Credentials", ", ".join(_credential_text(r) for r in cache.registry_credentials)))
    pairs += [
        ("Disks", str(cache.disk_count)),
        ("Matches", f"{cache.match_count} (last {format_time(cache, 'last_matched_time')})"),
        ("Created", format_time(cache, "create_time")),
        ("Updated", format_time(cache, "update_time")),
        ("Ready", format_time(cache, "ready_time")),
        ("Etag", cache.etag or _NONE),
        ("Revision", str(cache.revision)),
    ]
    lines = _field_lines(pairs)
    lines.append("Images:")
    if cache.cached_images:
        rows = [
            [
                image_label(image.image),
                image.manifest_digest,
                image.platform,
                format_bytes(image.compressed_bytes),
                format_bytes(image.uncompressed_bytes),
                str(image.layer_count),
            ]
            for image in cache.cached_images
        ]
        image_table = table(["IMAGE", "DIGEST", "PLATFORM", "SIZE", "UNPACKED", "LAYERS"], rows)
        lines += ["  " + line for line in image_table.splitlines()]
        for image in cache.cached_images:
            if image.index_digest:
                lines.append(f"  ({image_label(image.image)} chosen from index {image.index_digest})")
    else:
        lines += [f"  {image_label(image)}  (not built yet)" for image in cache.images]
    lines.append("Zone availability:")
    if cache.zone_availability:
        rows = [
            [
                zone.zone,
                pb.ZoneAvailability.State.Name(zone.state),
                format_time(zone, "update_time"),
                zone.message,
            ]
            for zone in cache.zone_availability
        ]
        zone_table = table(["ZONE", "STATE", "SINCE", "MESSAGE"], rows)
        lines += ["  " + line for line in zone_table.splitlines()]
    else:
        lines.append("  -  (no zone copies yet)")
    return "\n".join(lines)


def describe_disk(disk: pb.Disk) -> str:
    """A provisioned disk: name, zone, where a node finds it, its snapshot."""
    return "\n".join(
        _field_lines(
            [
                ("Disk", disk.name),
                ("Zone", disk.zone),
                ("Location", disk.location),
                ("Snapshot", disk.snapshot_id),
                ("Holder", disk.holder or _NONE),
                ("Created", format_time(disk, "create_time")),
            ]
        )
    )
