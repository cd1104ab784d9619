"""The registry service end to end: real gRPC server, local provider, real OCI registries, skopeo.

Each test runs a `RegistryApp` (the production wiring) on a fresh data directory, on SQLite and
PostgreSQL, against `docker-registry` processes holding images the tests pushed.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.cache_registry.server import RegistryApp, RegistryConfig, ZoneConfig
from snapcache.demo.oci_images import ImageSpec, LayerSpec, build_image, push_image
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from tests.support.oci_fixtures import PRIVATE_PASSWORD, OciRegistry, PushedImages

pytestmark = pytest.mark.e2e

TERMINAL = {pb.ImageCache.READY, pb.ImageCache.FAILED, pb.ImageCache.UPDATE_FAILED, pb.ImageCache.EXPIRED}


class Client:
    """A stub with the waiting helpers the tests share."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = api_grpc.CacheRegistryServiceStub(self.channel)

    def create(self, images: list[str], **fields: object) -> pb.ImageCache:
        return self.stub.CreateImageCache(
            api.CreateImageCacheRequest(image_cache=pb.ImageCache(images=images, **fields)),
            timeout=10,  # type: ignore[arg-type]
        )

    def get(self, name: str) -> pb.ImageCache:
        return self.stub.GetImageCache(api.GetImageCacheRequest(name=name), timeout=10)

    def wait(self, name: str, *, timeout: float = 60, zones_settled: bool = True) -> pb.ImageCache:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cache = self.get(name)
            settled = not zones_settled or all(
                z.state != pb.ZoneAvailability.HYDRATING for z in cache.zone_availability
            )
            if cache.state in TERMINAL and settled:
                return cache
            time.sleep(0.05)
        raise AssertionError(f"{name} did not settle: {self.get(name)}")

    def events(self, name: str) -> list[pb.ImageCacheEvent]:
        return list(
            self.stub.ListImageCacheEvents(api.ListImageCacheEventsRequest(parent=name), timeout=10).events
        )


@pytest.fixture
def app(tmp_path: Path, database_url: str) -> Iterator[RegistryApp]:
    config = RegistryConfig(
        data_dir=tmp_path / "data",
        listen="127.0.0.1:0",
        database_url=database_url,
        zones=(ZoneConfig("zone-a", max_disks=2), ZoneConfig("zone-b", root=tmp_path / "zone-b-storage")),
        worker_poll_seconds=0.1,
        grpc_workers=8,
    )
    started = RegistryApp(config).start()
    try:
        yield started
    finally:
        started.stop(0)


@pytest.fixture
def client(app: RegistryApp) -> Iterator[Client]:
    made = Client(app.port)
    yield made
    made.channel.close()


def skopeo_digest(layout: str, ref: str) -> str:
    result = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{layout}:{ref}"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    inspected = subprocess.run(
        ["skopeo", "inspect", f"oci:{layout}:{ref}"], capture_output=True, text=True, timeout=30
    )
    assert inspected.returncode == 0, inspected.stderr
    return str(json.loads(inspected.stdout)["Digest"])


def leftovers(app: RegistryApp) -> dict[str, list[str]]:
    inventory = app.provider.inventory()
    root = app.config.data_dir / "provider"
    temporaries = [str(p) for p in root.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]
    return {
        "builders": sorted(inventory.builder_disks),
        "disks": sorted(inventory.disks),
        "temporaries": temporaries,
    }


def test_build_snapshot_zones_and_disk_on_real_registries(
    app: RegistryApp, client: Client, pushed_images: PushedImages, tmp_path: Path
) -> None:
    registry, private = pushed_images.registry, pushed_images.private_registry
    config = tmp_path / "docker-config.json"
    auth = f"snap:{PRIVATE_PASSWORD}".encode()
    import base64

    config.write_text(json.dumps({"auths": {private.host: {"auth": base64.b64encode(auth).decode()}}}))
    images = [
        str(pushed_images.web.reference),
        str(pushed_images.worker.reference),
        str(pushed_images.base.reference),
        str(pushed_images.private.reference),
    ]
    created = client.create(
        images,
        cache_size_gib=1,
        plain_http_registries=[registry.host, private.host],
        registry_credentials=[pb.RegistryCredentialRef(docker_config_path=str(config))],
    )
    cache = client.wait(created.name)
    assert cache.state == pb.ImageCache.READY, cache.state_message

    recorded = {c.image: c for c in cache.cached_images}
    assert recorded[images[0]].manifest_digest == pushed_images.web.digest
    assert recorded[images[1]].manifest_digest == pushed_images.worker.digest
    assert recorded[images[2]].index_digest == pushed_images.base.digest
    assert recorded[images[2]].manifest_digest == pushed_images.base.manifest_digest()
    assert recorded[images[2]].platform == "linux/amd64"
    assert recorded[images[3]].manifest_digest == pushed_images.private.digest
    for image in cache.cached_images:
        assert image.compressed_bytes > 0 and image.uncompressed_bytes >= image.compressed_bytes
    assert recorded[images[0]].layer_count == 3
    assert cache.progress.bytes_done == cache.progress.bytes_total > 0
    assert {z.zone: z.state for z in cache.zone_availability} == {
        "zone-a": pb.ZoneAvailability.AVAILABLE,
        "zone-b": pb.ZoneAvailability.AVAILABLE,
    }
    reasons = [e.reason for e in client.events(created.name)]
    for reason in ("BuildStarted", "ImagePulled", "SnapshotCreated", "BuilderReleased", "ZoneAvailable"):
        assert reason in reasons
    assert leftovers(app)["builders"] == []

    disk = client.stub.ProvisionDisk(
        api.ProvisionDiskRequest(parent=created.name, zone="zone-b", disk_id="node-1"), timeout=10
    )
    assert disk.location.startswith(str(tmp_path / "zone-b-storage"))
    for image in cache.cached_images:
        assert skopeo_digest(disk.location, image.normalized_image) == image.manifest_digest
    # the disk shares inodes with the zone copy: provisioning copied no bytes
    blobs = [p for p in Path(disk.location, "blobs", "sha256").iterdir()]
    assert blobs and all(p.stat().st_nlink >= 2 for p in blobs)

    assert client.stub.ReleaseDisk(api.ReleaseDiskRequest(name=disk.name), timeout=10).released
    assert not Path(disk.location).exists()


def test_unknown_image_fails_with_reason(app: RegistryApp, client: Client, oci_registry: OciRegistry) -> None:
    created = client.create([f"{oci_registry.host}/demo/nope:1.0"], plain_http_registries=[oci_registry.host])
    cache = client.wait(created.name)
    assert cache.state == pb.ImageCache.FAILED
    assert cache.state_reason == "IMAGE_NOT_FOUND" and "demo/nope:1.0" in cache.state_message
    assert leftovers(app) == {"builders": [], "disks": [], "temporaries": []}


def test_wrong_credentials_fail_without_leaking(
    app: RegistryApp, client: Client, pushed_images: PushedImages, tmp_path: Path
) -> None:
    private = pushed_images.private_registry
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"auths": {private.host: {"username": "snap", "password": "WRONG-pass-42"}}})
    )
    created = client.create(
        [str(pushed_images.private.reference)],
        plain_http_registries=[private.host],
        registry_credentials=[pb.RegistryCredentialRef(docker_config_path=str(config))],
    )
    cache = client.wait(created.name)
    assert cache.state == pb.ImageCache.FAILED and cache.state_reason == "REGISTRY_AUTH_FAILED"
    assert private.host in cache.state_message
    everything = str(cache) + "".join(str(e) for e in client.events(created.name))
    assert "WRONG-pass-42" not in everything and PRIVATE_PASSWORD not in everything


def test_registry_down_retries_then_fails(
    app: RegistryApp, client: Client, fresh_oci_registry: OciRegistry
) -> None:
    host = fresh_oci_registry.host
    fresh_oci_registry.server.stop()
    created = client.create([f"{host}/demo/web:1.0"], plain_http_registries=[host])
    cache = client.wait(created.name, timeout=90)
    assert cache.state == pb.ImageCache.FAILED and cache.state_reason == "REGISTRY_UNREACHABLE"
    reasons = [e.reason for e in client.events(created.name)]
    assert reasons.count("BuildRetrying") == 2
    assert leftovers(app) == {"builders": [], "disks": [], "temporaries": []}


def test_cache_too_small_says_what_would_fit(
    app: RegistryApp, client: Client, fresh_oci_registry: OciRegistry
) -> None:
    huge = build_image(
        ImageSpec("demo/huge", "1.0", [LayerSpec(int(1.5 * 1024**3), compressible=True, seed=7)])
    )
    push_image(fresh_oci_registry.url, huge)
    created = client.create(
        [f"{fresh_oci_registry.host}/demo/huge:1.0"],
        cache_size_gib=1,
        plain_http_registries=[fresh_oci_registry.host],
    )
    cache = client.wait(created.name)
    assert cache.state == pb.ImageCache.FAILED and cache.state_reason == "CACHE_TOO_SMALL"
    assert "uncompressed" in cache.state_message and "cache size is 1 GiB" in cache.state_message
    assert "2 GiB would fit" in cache.state_message
    assert leftovers(app) == {"builders": [], "disks": [], "temporaries": []}


def test_zone_capacity_is_enforced(app: RegistryApp, client: Client, pushed_images: PushedImages) -> None:
    created = client.create(
        [str(pushed_images.worker.reference)], plain_http_registries=[pushed_images.registry.host]
    )
    assert client.wait(created.name).state == pb.ImageCache.READY
    for disk_id in ("d1", "d2"):
        client.stub.ProvisionDisk(
            api.ProvisionDiskRequest(parent=created.name, zone="zone-a", disk_id=disk_id)
        )
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.ProvisionDisk(api.ProvisionDiskRequest(parent=created.name, zone="zone-a", disk_id="d3"))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sorted(app.provider.inventory().disks) == ["d1", "d2"]


def test_delete_removes_everything_on_disk(
    app: RegistryApp, client: Client, pushed_images: PushedImages
) -> None:
    created = client.create(
        [str(pushed_images.web.reference)], plain_http_registries=[pushed_images.registry.host]
    )
    assert client.wait(created.name).state == pb.ImageCache.READY
    client.stub.ProvisionDisk(api.ProvisionDiskRequest(parent=created.name, zone="zone-a", disk_id="d1"))
    client.stub.DeleteImageCache(api.DeleteImageCacheRequest(name=created.name, force=True))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            client.get(created.name)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the cache was not deleted")
    inventory = app.provider.inventory()
    assert not inventory.snapshots and not inventory.disks and not inventory.zone_snapshots
    app.provider.collect_garbage()
    cas = [p for p in (app.config.data_dir / "provider").rglob("sha256/*") if p.is_file()]
    assert cas == [], "no blob of a deleted cache may stay behind"
