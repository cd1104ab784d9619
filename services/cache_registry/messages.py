"""Conversions between `snapcache.v1` protos and the registry's domain values (the edge only).

Every ImageCache the API sends is parsed from one serialized form, `encode_cache`'s, whether the
store kept it (`ImageCacheWire`) or the edge just made it: upb lays out map fields by how a
message was built (a copied message reorders them), so parsing the same bytes is what makes Get,
List and Watch send identical bytes for one version. Responses holding caches are parsed from
their submessages' bytes too (`list_response`, `watch_response`) rather than copying messages in.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from google.protobuf import timestamp_pb2

from services.cache_registry.model import (
    BuildPhase,
    CacheEvent,
    CacheSpec,
    CacheState,
    CredentialRef,
    Disk,
    EventType,
    ImageCache,
    ZoneState,
)
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import image_cache_pb2 as pb

_STATE = {
    CacheState.CREATING: pb.ImageCache.CREATING,
    CacheState.READY: pb.ImageCache.READY,
    CacheState.UPDATING: pb.ImageCache.UPDATING,
    CacheState.FAILED: pb.ImageCache.FAILED,
    CacheState.UPDATE_FAILED: pb.ImageCache.UPDATE_FAILED,
    CacheState.DELETING: pb.ImageCache.DELETING,
    CacheState.EXPIRED: pb.ImageCache.EXPIRED,
}
_ZONE_STATE = {
    ZoneState.HYDRATING: pb.ZoneAvailability.HYDRATING,
    ZoneState.AVAILABLE: pb.ZoneAvailability.AVAILABLE,
    ZoneState.UNAVAILABLE: pb.ZoneAvailability.UNAVAILABLE,
}
_PHASE = {
    BuildPhase.NONE: pb.BuildProgress.PHASE_UNSPECIFIED,
    BuildPhase.QUEUED: pb.BuildProgress.QUEUED,
    BuildPhase.PULLING: pb.BuildProgress.PULLING,
    BuildPhase.SNAPSHOTTING: pb.BuildProgress.SNAPSHOTTING,
    BuildPhase.RELEASING_BUILDER: pb.BuildProgress.RELEASING_BUILDER,
    BuildPhase.DONE: pb.BuildProgress.DONE,
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)
_EVENT_TYPE = {EventType.NORMAL: pb.ImageCacheEvent.NORMAL, EventType.WARNING: pb.ImageCacheEvent.WARNING}


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A proto Timestamp, or None for an unset time (all our datetimes are aware, in UTC)."""
    if value is None:
        return None
    seconds = (value - _EPOCH) // _SECOND
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=value.microsecond * 1000)


def encode_cache(cache: ImageCache) -> bytes:
    """The serialized ImageCache of a cache version (deterministic: same value, same bytes)."""
    return cache_to_proto(cache).SerializeToString(deterministic=True)


class ImageCacheWire:
    """`encode_cache` as the store's `CacheEncoder`: the form kept next to each cache version."""

    # A changed message (its descriptor) or a new release of `cache_to_proto` (bump the suffix)
    # gets a new format, so bytes written by an older encoding are never served.
    format = f"snapcache.v1.ImageCache/{hashlib.sha256(pb.DESCRIPTOR.serialized_pb).hexdigest()[:16]}/1"

    def encode(self, cache: ImageCache) -> bytes:
        """The wire form of ``cache``."""
        return encode_cache(cache)


class EncodedCaches:
    """`encode_cache` results by (id, revision), so each version is encoded once for every reader.

    The revision is unique registry-wide (a cache deleted and created again restarts at version 1,
    and a DELETE feed entry repeats the last version under a new revision).
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, cache: ImageCache) -> bytes:
        """The wire form of ``cache``."""
        key = (cache.cache_id, cache.revision)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        wire = encode_cache(cache)
        with self._lock:
            self._items[key] = wire
            if len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return wire


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """``payload`` as length-delimited field ``number`` of an enclosing message."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


_LIST_CACHES = api.ListImageCachesResponse.DESCRIPTOR.fields_by_name["image_caches"].number
_WATCH_CACHE = api.WatchImageCachesResponse.DESCRIPTOR.fields_by_name["image_cache"].number


def image_cache_message(wire: bytes) -> pb.ImageCache:
    """The ImageCache message of a wire form."""
    return pb.ImageCache.FromString(wire)


def list_response(
    wires: Iterable[bytes], *, next_page_token: str, revision: int
) -> api.ListImageCachesResponse:
    """A ListImageCachesResponse of caches' wire forms: one parse, no message built field by field."""
    response = api.ListImageCachesResponse.FromString(b"".join(_field(_LIST_CACHES, w) for w in wires))
    response.next_page_token = next_page_token
    response.revision = revision
    return response


def watch_response(
    *, change_type: api.WatchImageCachesResponse.ChangeType.ValueType, revision: int, wire: bytes
) -> api.WatchImageCachesResponse:
    """A WatchImageCachesResponse carrying the cache whose wire form is ``wire``."""
    response = api.WatchImageCachesResponse.FromString(_field(_WATCH_CACHE, wire))
    response.type = change_type
    response.revision = revision
    return response


def spec_from_proto(message: pb.ImageCache) -> CacheSpec:
    """The user-settable fields of an ImageCache message."""
    refs = []
    for ref in message.registry_credentials:
        refs.append(CredentialRef(secret=ref.secret, docker_config_path=ref.docker_config_path))
    return CacheSpec(
        images=tuple(message.images),
        cache_size_gib=message.cache_size_gib,
        retention_days=message.retention_days,
        display_name=message.display_name,
        labels=tuple(sorted(message.labels.items())),
        registry_credentials=tuple(refs),
        plain_http_registries=tuple(message.plain_http_registries),
        insecure_registries=tuple(message.insecure_registries),
        platform=message.platform,
        zones=tuple(message.zones),
    )


def _credential_ref(ref: CredentialRef) -> pb.RegistryCredentialRef:
    if ref.secret:
        return pb.RegistryCredentialRef(secret=ref.secret)
    return pb.RegistryCredentialRef(docker_config_path=ref.docker_config_path)


def cache_to_proto(cache: ImageCache) -> pb.ImageCache:
    """The full ImageCache message of a cache."""
    spec = cache.spec
    message = pb.ImageCache(
        name=cache.name,
        display_name=spec.display_name,
        labels=dict(spec.labels),
        images=list(spec.images),
        cache_size_gib=spec.cache_size_gib,
        retention_days=spec.retention_days,
        expire_time=timestamp(cache.expire_time),
        registry_credentials=[_credential_ref(r) for r in spec.registry_credentials],
        plain_http_registries=list(spec.plain_http_registries),
        insecure_registries=list(spec.insecure_registries),
        platform=spec.platform,
        zones=list(spec.zones),
        state=_STATE[cache.state],
        state_message=cache.state_message,
        state_reason=cache.state_reason,
        progress=pb.BuildProgress(
            phase=_PHASE[cache.progress.phase],
            bytes_done=cache.progress.bytes_done,
            bytes_total=cache.progress.bytes_total,
            attempt=cache.progress.attempt,
        ),
        cached_images=[
            pb.CachedImage(
                image=i.image,
                normalized_image=i.normalized_image,
                manifest_digest=i.manifest_digest,
                index_digest=i.index_digest,
                platform=i.platform,
                compressed_bytes=i.compressed_bytes,
                uncompressed_bytes=i.uncompressed_bytes,
                layer_count=i.layer_count,
                requires_credentials=i.requires_credentials,
                authorized_by=[_credential_ref(r) for r in i.authorized_by],
            )
            for i in cache.cached_images
        ],
        zone_availability=[
            pb.ZoneAvailability(
                zone=z.zone,
                state=_ZONE_STATE[z.state],
                message=z.message,
                update_time=timestamp(z.update_time),
            )
            for z in cache.zones
        ],
        snapshot_size_bytes=cache.snapshot_size_bytes,
        disk_count=cache.disk_count,
        create_time=timestamp(cache.create_time),
        update_time=timestamp(cache.update_time),
        ready_time=timestamp(cache.ready_time),
        last_matched_time=timestamp(cache.last_matched_time),
        match_count=cache.match_count,
        etag=cache.etag,
        revision=cache.revision,
    )
    return message


def event_to_proto(event: CacheEvent) -> pb.ImageCacheEvent:
    """An ImageCacheEvent message."""
    return pb.ImageCacheEvent(
        sequence=event.sequence,
        time=timestamp(event.time),
        type=_EVENT_TYPE[event.type],
        reason=event.reason,
        message=event.message,
        attributes=dict(event.attributes),
    )


def disk_to_proto(disk: Disk) -> pb.Disk:
    """A Disk message."""
    return pb.Disk(
        name=disk.name,
        zone=disk.zone,
        location=disk.location,
        snapshot_id=disk.snapshot_id,
        holder=disk.holder,
        create_time=timestamp(disk.create_time),
    )
