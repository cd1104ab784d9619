"""The node agent's calls to the cache registry: provision and release this node's disks (gRPC edge).

``ProvisionDisk`` is idempotent per disk id (the agent derives it from cache and node, see
``disk_plans``), so a retried call, or one an agent restarted in the middle of, lands on the same
disk. A refused call leaves as ``DiskRefusal`` with the gRPC code, the ErrorInfo reason and the
registry's message (``SNAPSHOT_NOT_IN_ZONE``, ``ZONE_CAPACITY_EXHAUSTED``, a cache not READY).
``GetImageCache`` tells which of a held cache's images are private (``requires_credentials``):
the mirror serves those from the disk only to a client the registry itself lets pull them.
"""

from __future__ import annotations

import grpc

from services.node_agent.disk_keeper import DiskRefusal
from snapcache.cache_names import cache_name
from snapcache.images import InvalidImageReference, parse_image_reference
from snapcache.rpc_errors import error_info
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc

DEFAULT_RPC_TIMEOUT_SECONDS = 10.0


def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    return error.code() if isinstance(error, grpc.Call) else None


def _refusal(error: grpc.RpcError) -> DiskRefusal:
    code = _code(error)
    info = error_info(error) if isinstance(error, grpc.Call) else None
    return DiskRefusal(
        code=code.name if code is not None else "UNKNOWN",
        reason=info.reason if info is not None else "",
        message=str(error.details()) if isinstance(error, grpc.Call) else str(error),
    )


class RegistryDisks:
    """Provisions and releases disks of caches for one node."""

    def __init__(
        self, channel: grpc.Channel, *, holder: str, timeout_seconds: float = DEFAULT_RPC_TIMEOUT_SECONDS
    ) -> None:
        self._stub = api_grpc.CacheRegistryServiceStub(channel)
        self._holder = holder
        self._timeout = timeout_seconds

    def provision(self, *, cache_id: str, zone: str, disk_id: str) -> str:
        """Make (or find) the disk; return its location."""
        request = api.ProvisionDiskRequest(
            parent=cache_name(cache_id), zone=zone, disk_id=disk_id, holder=self._holder
        )
        try:
            disk = self._stub.ProvisionDisk(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise _refusal(exc) from None
        return str(disk.location)

    def private_repositories(self, cache_id: str) -> frozenset[str]:
        """``registry/repository`` of the cache's images its registry would not serve anonymously.

        Raises ``DiskRefusal`` when the registry cannot say (the caller then treats every
        repository on the disk as private: authorization is never widened for want of knowing).
        """
        try:
            cache = self._stub.GetImageCache(
                api.GetImageCacheRequest(name=cache_name(cache_id)), timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise _refusal(exc) from None
        names = set()
        for image in cache.cached_images:
            if image.requires_credentials:
                try:
                    names.add(parse_image_reference(image.normalized_image or image.image).name)
                except InvalidImageReference:
                    continue
        return frozenset(names)

    def release(self, *, cache_id: str, disk_id: str) -> bool:
        """Release the disk; ``False`` if it was already gone."""
        name = f"{cache_name(cache_id)}/disks/{disk_id}"
        try:
            answer = self._stub.ReleaseDisk(api.ReleaseDiskRequest(name=name), timeout=self._timeout)
        except grpc.RpcError as exc:
            if _code(exc) == grpc.StatusCode.NOT_FOUND:
                return False  # the cache is gone, and its disks with it
            raise _refusal(exc) from None
        return bool(answer.released)
