"""The gRPC edge of the registry: decode, call one use case, encode. Errors map in one place."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import grpc

from services.cache_registry.messages import (
    EncodedCaches,
    disk_to_proto,
    event_to_proto,
    image_cache_message,
    list_response,
    spec_from_proto,
    watch_response,
)
from services.cache_registry.model import ChangeType, ImageCache
from services.cache_registry.service import CacheRegistry, Heartbeat, MatchHits
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb

SERVICE_NAME = api.DESCRIPTOR.services_by_name["CacheRegistryService"].full_name


class CacheRegistryServicer(api_grpc.CacheRegistryServiceServicer):
    """`snapcache.v1.CacheRegistryService` over a `CacheRegistry`."""

    def __init__(self, registry: CacheRegistry) -> None:
        self._registry = registry
        self._encoded = EncodedCaches()

    def _wire(self, body: bytes | ImageCache) -> bytes:
        """The wire form of a cache as read: stored by the registry, or encoded here once."""
        return body if isinstance(body, bytes) else self._encoded.encode(body)

    def _message(self, cache: ImageCache) -> pb.ImageCache:
        return image_cache_message(self._encoded.encode(cache))

    def CreateImageCache(
        self, request: api.CreateImageCacheRequest, context: grpc.ServicerContext
    ) -> pb.ImageCache:
        cache = self._registry.create(
            spec=spec_from_proto(request.image_cache), cache_id=request.image_cache_id
        )
        return self._message(cache)

    def GetImageCache(
        self, request: api.GetImageCacheRequest, context: grpc.ServicerContext
    ) -> pb.ImageCache:
        return image_cache_message(self._wire(self._registry.read(name=request.name).body))

    def ListImageCaches(
        self, request: api.ListImageCachesRequest, context: grpc.ServicerContext
    ) -> api.ListImageCachesResponse:
        page = self._registry.list_caches(
            page_size=request.page_size, page_token=request.page_token, filter_text=request.filter
        )
        return list_response(
            [self._wire(c.body) for c in page.caches],
            next_page_token=page.next_page_token,
            revision=page.revision,
        )

    def UpdateImageCache(
        self, request: api.UpdateImageCacheRequest, context: grpc.ServicerContext
    ) -> pb.ImageCache:
        cache = self._registry.update(
            name=request.image_cache.name,
            changes=spec_from_proto(request.image_cache),
            paths=list(request.update_mask.paths),
            etag=request.image_cache.etag,
        )
        return self._message(cache)

    def DeleteImageCache(
        self, request: api.DeleteImageCacheRequest, context: grpc.ServicerContext
    ) -> pb.ImageCache:
        return self._message(self._registry.delete(name=request.name, etag=request.etag, force=request.force))

    def ListImageCacheEvents(
        self, request: api.ListImageCacheEventsRequest, context: grpc.ServicerContext
    ) -> api.ListImageCacheEventsResponse:
        page = self._registry.list_events(
            parent=request.parent, page_size=request.page_size, page_token=request.page_token
        )
        return api.ListImageCacheEventsResponse(
            events=[event_to_proto(e) for e in page.events], next_page_token=page.next_page_token
        )

    def WatchImageCaches(
        self, request: api.WatchImageCachesRequest, context: grpc.ServicerContext
    ) -> Iterator[api.WatchImageCachesResponse]:
        response = api.WatchImageCachesResponse
        for item in self._registry.watch(
            start_revision=request.start_revision, name=request.name, is_active=context.is_active
        ):
            if isinstance(item, Heartbeat):
                yield response(type=response.PROGRESS, revision=item.revision)
            else:
                yield watch_response(
                    change_type=response.UPSERT if item.type is ChangeType.UPSERT else response.DELETE,
                    revision=item.revision,
                    wire=self._encoded.encode(item.cache),
                )

    def ProvisionDisk(self, request: api.ProvisionDiskRequest, context: grpc.ServicerContext) -> pb.Disk:
        disk = self._registry.provision_disk(
            parent=request.parent, zone=request.zone, disk_id=request.disk_id, holder=request.holder
        )
        return disk_to_proto(disk)

    def ReleaseDisk(
        self, request: api.ReleaseDiskRequest, context: grpc.ServicerContext
    ) -> api.ReleaseDiskResponse:
        return api.ReleaseDiskResponse(released=self._registry.release_disk(name=request.name))

    def ListDisks(
        self, request: api.ListDisksRequest, context: grpc.ServicerContext
    ) -> api.ListDisksResponse:
        return api.ListDisksResponse(
            disks=[disk_to_proto(d) for d in self._registry.list_disks(parent=request.parent)]
        )

    def ReportMatches(
        self, request: api.ReportMatchesRequest, context: grpc.ServicerContext
    ) -> api.ReportMatchesResponse:
        hits = [
            MatchHits(
                name=m.name,
                count=m.count,
                last_matched_time=(
                    m.last_matched_time.ToDatetime(tzinfo=UTC)
                    if m.HasField("last_matched_time")
                    else datetime.now(UTC)
                ),
            )
            for m in request.matches
        ]
        applied, unknown = self._registry.report_matches(hits=hits)
        return api.ReportMatchesResponse(applied=applied, unknown=unknown)
