"""What the data-plane benchmarks share: a real OCI registry holding a large multi-layer image,
and a registry service on a fresh data directory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from services.cache_registry.server import RegistryApp, RegistryConfig, ZoneConfig
from snapcache.demo.oci_images import BuiltImage, ImageSpec, LayerSpec, build_image, push_image
from snapcache.demo.registry_server import RegistryServer
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb

MIB = 1024 * 1024


def big_image(total_mib: int, *, layers: int, repository: str = "bench/app", seed: int = 1) -> ImageSpec:
    """An image of ``layers`` incompressible layers adding up to ``total_mib`` MiB."""
    size = total_mib * MIB // layers
    return ImageSpec(repository, "1.0", [LayerSpec(size, seed=seed * 100 + i) for i in range(layers)])


@contextmanager
def oci_registry_with(spec: ImageSpec, workdir: Path) -> Iterator[tuple[RegistryServer, BuiltImage]]:
    """A running docker-registry holding the image built from ``spec``."""
    built = build_image(spec, blob_dir=workdir / "built-blobs")
    with RegistryServer(workdir / "oci-registry") as server:
        push_image(server.url, built)
        yield server, built


@contextmanager
def registry_service(workdir: Path, *, zones: tuple[str, ...] = ("zone-a",)) -> Iterator[RegistryApp]:
    """The production wiring of the registry on a fresh data directory (SQLite)."""
    app = RegistryApp(
        RegistryConfig(
            data_dir=workdir / "registry-data",
            listen="127.0.0.1:0",
            zones=tuple(ZoneConfig(z) for z in zones),
            worker_poll_seconds=0.05,
        )
    ).start()
    try:
        yield app
    finally:
        app.stop(0)


def stub_for(app: RegistryApp) -> tuple[grpc.Channel, api_grpc.CacheRegistryServiceStub]:
    """A channel and stub to a running registry service."""
    channel = grpc.insecure_channel(f"127.0.0.1:{app.port}")
    return channel, api_grpc.CacheRegistryServiceStub(channel)


def wait_ready(
    stub: api_grpc.CacheRegistryServiceStub,
    created: pb.ImageCache,
    *,
    zones: bool = False,
    timeout: float = 300,
) -> pb.ImageCache:
    """Follow the cache on the change feed until READY (and, with ``zones``, every zone AVAILABLE)."""
    stream = stub.WatchImageCaches(
        api.WatchImageCachesRequest(start_revision=created.revision, name=created.name), timeout=timeout
    )
    try:
        for change in stream:
            cache = change.image_cache
            if change.type != api.WatchImageCachesResponse.UPSERT:
                continue
            if cache.state == pb.ImageCache.FAILED:
                raise RuntimeError(f"build failed: {cache.state_reason}: {cache.state_message}")
            if cache.state == pb.ImageCache.READY and (
                not zones or all(z.state == pb.ZoneAvailability.AVAILABLE for z in cache.zone_availability)
            ):
                return cache
    finally:
        stream.cancel()
    raise TimeoutError(created.name)


def median_seconds(run: Callable[[], object], repeat: int) -> tuple[float, list[float]]:
    """Median wall time of ``repeat`` runs, and every sample."""
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples
