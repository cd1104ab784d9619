"""The operator's calls to the cache registry, and the conversion of its protos to core values.

Create, Get, Update (a FieldMask of the differing fields, no etag: an ImageCache owns its
cache's fields, so its spec wins over whatever changed meanwhile) and Delete, each with a
deadline. A failed call leaves as `RegistryRefusal` carrying the gRPC code, the ErrorInfo reason
and the message, which the registry writes for people and never fills with secrets.

Credentials cross this edge as references only: `namespace/name` of a Secret becomes a
`RegistryCredentialRef.secret`; the registry reads the Secret when it builds.
"""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
from google.protobuf import field_mask_pb2, timestamp_pb2

from services.operator.model import (
    BuildProgress,
    CacheSpec,
    CacheState,
    CacheView,
    RegistryRefusal,
    ZoneAvailability,
)
from snapcache.cache_names import cache_name
from snapcache.rpc_errors import error_info
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb

DEFAULT_RPC_TIMEOUT_SECONDS = 10.0


def _time(value: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    if not present:
        return None
    return datetime.fromtimestamp(value.seconds + value.nanos / 1e9, tz=UTC)


def cache_view(message: pb.ImageCache) -> CacheView:
    """The core's view of an ImageCache message."""
    credentials = tuple(
        ref.secret if ref.WhichOneof("source") == "secret" else ref.docker_config_path
        for ref in message.registry_credentials
    )
    spec = CacheSpec(
        images=tuple(message.images),
        cache_size_gib=message.cache_size_gib,
        retention_days=message.retention_days,
        credentials=credentials,
        plain_http_registries=tuple(message.plain_http_registries),
        insecure_registries=tuple(message.insecure_registries),
        platform=message.platform,
        zones=tuple(message.zones),
        display_name=message.display_name,
        labels=tuple(sorted(message.labels.items())),
    )
    progress = message.progress
    return CacheView(
        cache_id=message.name.removeprefix("imageCaches/"),
        state=CacheState(pb.ImageCache.State.Name(message.state)),
        spec=spec,
        revision=message.revision,
        state_reason=message.state_reason,
        state_message=message.state_message,
        progress=BuildProgress(
            phase=""
            if progress.phase == pb.BuildProgress.PHASE_UNSPECIFIED
            else pb.BuildProgress.Phase.Name(progress.phase),
            bytes_done=progress.bytes_done,
            bytes_total=progress.bytes_total,
            attempt=progress.attempt,
        ),
        zones=tuple(
            ZoneAvailability(zone=z.zone, state=pb.ZoneAvailability.State.Name(z.state), message=z.message)
            for z in message.zone_availability
        ),
        expire_time=_time(message.expire_time, message.HasField("expire_time")),
        ready_time=_time(message.ready_time, message.HasField("ready_time")),
        last_matched_time=_time(message.last_matched_time, message.HasField("last_matched_time")),
        image_count=len(message.cached_images),
        snapshot_size_bytes=message.snapshot_size_bytes,
        disk_count=message.disk_count,
    )


def cache_message(cache_id: str, spec: CacheSpec) -> pb.ImageCache:
    """The ImageCache message asking for ``spec``."""
    return pb.ImageCache(
        name=cache_name(cache_id),
        display_name=spec.display_name,
        labels=dict(spec.labels),
        images=list(spec.images),
        cache_size_gib=spec.cache_size_gib,
        retention_days=spec.retention_days,
        registry_credentials=[pb.RegistryCredentialRef(secret=ref) for ref in spec.credentials],
        plain_http_registries=list(spec.plain_http_registries),
        insecure_registries=list(spec.insecure_registries),
        platform=spec.platform,
        zones=list(spec.zones),
    )


def refusal(error: grpc.RpcError) -> RegistryRefusal:
    """The `RegistryRefusal` of a failed call."""
    if not isinstance(error, grpc.Call):
        return RegistryRefusal(code="UNKNOWN", reason="", message=type(error).__name__)
    code: grpc.StatusCode = error.code()
    try:
        info = error_info(error)
    except ValueError:  # a rich status disagreeing with the call's own: keep the call's
        info = None
    return RegistryRefusal(code=code.name, reason=info.reason if info else "", message=error.details() or "")


class RegistryClient:
    """Unary calls to the registry over a channel the caller owns (the `reconciler.Registry` port)."""

    def __init__(
        self, channel: grpc.Channel, *, timeout_seconds: float = DEFAULT_RPC_TIMEOUT_SECONDS
    ) -> None:
        self._stub = api_grpc.CacheRegistryServiceStub(channel)
        self._timeout = timeout_seconds

    def create(self, cache_id: str, spec: CacheSpec) -> CacheView:
        """CreateImageCache with the client-chosen id."""
        request = api.CreateImageCacheRequest(
            image_cache=cache_message(cache_id, spec), image_cache_id=cache_id
        )
        try:
            return cache_view(self._stub.CreateImageCache(request, timeout=self._timeout))
        except grpc.RpcError as error:
            raise refusal(error) from None

    def get(self, cache_id: str) -> CacheView | None:
        """GetImageCache; None when the registry has no such cache."""
        try:
            found = self._stub.GetImageCache(
                api.GetImageCacheRequest(name=cache_name(cache_id)), timeout=self._timeout
            )
        except grpc.RpcError as error:
            failure = refusal(error)
            if failure.code == "NOT_FOUND":
                return None
            raise failure from None
        return cache_view(found)

    def update(self, cache_id: str, spec: CacheSpec, paths: tuple[str, ...]) -> CacheView:
        """UpdateImageCache of the fields named in ``paths``."""
        request = api.UpdateImageCacheRequest(
            image_cache=cache_message(cache_id, spec), update_mask=field_mask_pb2.FieldMask(paths=list(paths))
        )
        try:
            return cache_view(self._stub.UpdateImageCache(request, timeout=self._timeout))
        except grpc.RpcError as error:
            raise refusal(error) from None

    def delete(self, cache_id: str, *, force: bool) -> CacheView:
        """DeleteImageCache (the cache is returned in DELETING)."""
        request = api.DeleteImageCacheRequest(name=cache_name(cache_id), force=force)
        try:
            return cache_view(self._stub.DeleteImageCache(request, timeout=self._timeout))
        except grpc.RpcError as error:
            raise refusal(error) from None
