"""The real `snapcache serve` process: grpcurl against it, and `kill -9` mid-pull then a restart.

Runs the real `snapcache serve` process on a data directory, kills it with SIGKILL once the
build's progress shows bytes pulled, starts it again on the same data directory, and checks that
the cache ends READY, that finished blobs were not fetched twice, and that nothing is left over.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest

from snapcache.demo.oci_images import ImageSpec, LayerSpec, build_image, push_image
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc
from tests.support.oci_fixtures import OciRegistry, PushedImages
from tests.support.rate_limited_proxy import RateLimitedProxy

pytestmark = pytest.mark.e2e

BLOB_GET = re.compile(r'"GET /v2/[^ ]+/blobs/(sha256:[0-9a-f]{64}) HTTP/1\.1" (\d+)')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(
    data_dir: Path, port: int, database_url: str, *, matcher_port: int = 0, extra_args: tuple[str, ...] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    command = [
        sys.executable,
        "-m",
        "snapcache_cli.main",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(data_dir),
        "--zone",
        "zone-a",
        "--matcher-listen",
        f"127.0.0.1:{matcher_port or free_port()}",
        "--extender-listen",
        "off",
        *extra_args,
    ]
    if database_url:
        command += ["--database-url", database_url]
    with open(data_dir.parent / f"serve-{port}.log", "ab") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        channel.close()
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def blob_fetches(registry: OciRegistry) -> Counter[str]:
    """Completed blob downloads per digest, from the registry's access log."""
    return Counter(d for d, status in BLOB_GET.findall(registry.server.read_log()) if status == "200")


def test_kill_during_pull_then_restart_resumes_to_ready(
    tmp_path: Path, fresh_oci_registry: OciRegistry, database_url: str, request: pytest.FixtureRequest
) -> None:
    spec = ImageSpec("crash/app", "1.0", [LayerSpec(24 * 1024 * 1024, seed=900 + i) for i in range(12)])
    built = build_image(spec, blob_dir=tmp_path / "blobs")
    push_image(fresh_oci_registry.url, built)
    fetched_by_push = blob_fetches(fresh_oci_registry)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # the registry reached through an 800 Mbit/s link: the 288 MiB pull lasts about 3 s, so the
    # kill lands mid-pull however loaded the machine (on loopback it can end before a poll sees it)
    upstream = urlsplit(fresh_oci_registry.url)
    link = RateLimitedProxy((str(upstream.hostname), int(upstream.port or 80)), bits_per_second=800e6).start()
    request.addfinalizer(link.stop)
    host = f"127.0.0.1:{link.port}"
    image = f"{host}/crash/app:1.0"

    port = free_port()
    with serve(data_dir, port, database_url) as process:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = api_grpc.CacheRegistryServiceStub(channel)
        created = stub.CreateImageCache(
            api.CreateImageCacheRequest(
                image_cache=pb.ImageCache(images=[image], cache_size_gib=1, plain_http_registries=[host])
            ),
            timeout=10,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            cache = stub.GetImageCache(api.GetImageCacheRequest(name=created.name), timeout=5)
            if cache.progress.phase == pb.BuildProgress.PULLING and cache.progress.bytes_done > 0:
                break
            assert cache.state == pb.ImageCache.CREATING, cache
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        channel.close()
    assert cache.progress.bytes_done < cache.progress.bytes_total, "killed too late to test a resume"
    builders = list((data_dir / "provider" / "builders").iterdir())
    assert len(builders) == 1, "the killed build leaves its builder disk for the resume"

    port = free_port()
    with serve(data_dir, port, database_url):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = api_grpc.CacheRegistryServiceStub(channel)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            cache = stub.GetImageCache(api.GetImageCacheRequest(name=created.name), timeout=5)
            zones_done = all(z.state == pb.ZoneAvailability.AVAILABLE for z in cache.zone_availability)
            if cache.state != pb.ImageCache.CREATING and zones_done:
                break
            time.sleep(0.05)
        assert cache.state == pb.ImageCache.READY, f"{cache.state_reason}: {cache.state_message}"
        assert cache.cached_images[0].manifest_digest == built.manifest_digest
        assert cache.progress.attempt == 2
        events = stub.ListImageCacheEvents(
            api.ListImageCacheEventsRequest(parent=created.name), timeout=5
        ).events
        assert [e.reason for e in events].count("BuildStarted") == 2
        channel.close()

    # blobs finished before the kill were not downloaded again
    fetched = blob_fetches(fresh_oci_registry) - fetched_by_push
    layers = [layer.digest for layer in built.layers]
    assert all(fetched[d] >= 1 for d in layers)
    assert sum(fetched[d] for d in layers) < 2 * len(layers), fetched
    # nothing orphaned: no builder disk, no partial download, no temporary snapshot
    assert not any((data_dir / "provider" / "builders").iterdir())
    leftovers = [
        p for p in (data_dir / "provider").rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")
    ]
    assert leftovers == []
    assert os.path.isdir(data_dir / "provider")


def test_grpcurl_list_describe_create_get(pushed_images: PushedImages, tmp_path: Path) -> None:
    port, matcher_port = free_port(), free_port()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with serve(data_dir, port, "", matcher_port=matcher_port):
        name = grpcurl_session(f"127.0.0.1:{port}", pushed_images)
        grpcurl_matcher_session(f"127.0.0.1:{matcher_port}", str(pushed_images.worker.reference), name)


def grpcurl(*args: str) -> str:
    result = subprocess.run(["grpcurl", "-plaintext", *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def grpcurl_matcher_session(address: str, image: str, cache_name: str) -> None:
    """The matcher beside the registry in `snapcache serve`: reflection, health, a real match."""
    assert "snapcache.v1.MatcherService" in grpcurl(address, "list").split()
    assert "rpc MatchImageCaches" in grpcurl(address, "describe", "snapcache.v1.MatcherService")
    health = json.dumps({"service": "snapcache.v1.MatcherService"})
    assert "SERVING" in grpcurl("-d", health, address, "grpc.health.v1.Health/Check")
    request = json.dumps({"images": [image], "validate_only": True})
    deadline = time.monotonic() + 60
    while True:
        answer = json.loads(grpcurl("-d", request, address, "snapcache.v1.MatcherService/MatchImageCaches"))
        if answer.get("decision") == "MATCHED" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert answer["decision"] == "MATCHED" and answer["action"] == "USE_CACHE", answer
    assert answer["image_cache"] == cache_name
    assert answer["candidates"][0]["covered_images"][0]["cached_image"] == image
    bad = subprocess.run(
        [
            "grpcurl",
            "-plaintext",
            "-d",
            json.dumps({"images": ["Not A Ref"]}),
            address,
            "snapcache.v1.MatcherService/MatchImageCaches",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode != 0 and "InvalidArgument" in bad.stderr and "INVALID_MATCH_REQUEST" in bad.stderr


def grpcurl_session(address: str, pushed_images: PushedImages) -> str:
    services = grpcurl(address, "list").split()
    assert {
        "snapcache.v1.CacheRegistryService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(services)
    described = grpcurl(address, "describe", "snapcache.v1.CacheRegistryService")
    assert "rpc CreateImageCache" in described and "rpc WatchImageCaches" in described
    assert "SERVING" in grpcurl(address, "grpc.health.v1.Health/Check")
    body = json.dumps(
        {
            "image_cache": {
                "images": [str(pushed_images.worker.reference)],
                "plain_http_registries": [pushed_images.registry.host],
            }
        }
    )
    created = json.loads(grpcurl("-d", body, address, "snapcache.v1.CacheRegistryService/CreateImageCache"))
    assert created["state"] == "CREATING" and created["name"].startswith("imageCaches/imc-")
    got = json.loads(
        grpcurl(
            "-d",
            json.dumps({"name": created["name"]}),
            address,
            "snapcache.v1.CacheRegistryService/GetImageCache",
        )
    )
    assert got["name"] == created["name"] and got["images"] == [str(pushed_images.worker.reference)]
    return str(created["name"])


def _match_private(matcher_port: int, image: str) -> mpb.MatchImageCachesResponse:
    """The matcher's answer for a pod naming no pull secret, once its index holds a READY cache."""
    with grpc.insecure_channel(f"127.0.0.1:{matcher_port}") as channel:
        stub = mpb_grpc.MatcherServiceStub(channel)
        deadline = time.monotonic() + 30
        while True:
            answer = stub.MatchImageCaches(
                mpb.MatchImageCachesRequest(images=[image], namespace="team-a", validate_only=True),
                timeout=10,
            )
            indexed = answer.decision == mpb.MatchImageCachesResponse.MATCHED or any(
                r.image_cache for r in answer.rejections
            )
            if indexed or time.monotonic() > deadline:
                return answer
            time.sleep(0.1)


def test_share_node_credentials_decides_who_gets_images_pulled_with_the_registry_s_docker_config(
    pushed_images: PushedImages, tmp_path: Path
) -> None:
    """`serve --share-node-credentials` reaches the matcher: off (the default), an image the
    registry pulled with its own docker config is matched for no pod; on, for every pod."""
    private = pushed_images.private_registry
    assert private.credential is not None
    auth = base64.b64encode(f"{private.credential.username}:{private.credential.password}".encode()).decode()
    docker_config = tmp_path / "docker-config.json"
    docker_config.write_text(json.dumps({"auths": {private.host: {"auth": auth}}}))
    image = str(pushed_images.private.reference)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    port, matcher_port = free_port(), free_port()
    with serve(data_dir, port, "", matcher_port=matcher_port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = api_grpc.CacheRegistryServiceStub(channel)
            created = stub.CreateImageCache(
                api.CreateImageCacheRequest(
                    image_cache=pb.ImageCache(
                        images=[image],
                        cache_size_gib=1,
                        plain_http_registries=[private.host],
                        registry_credentials=[
                            pb.RegistryCredentialRef(docker_config_path=str(docker_config))
                        ],
                    )
                ),
                timeout=10,
            )
            deadline = time.monotonic() + 60
            cache = created
            while cache.state != pb.ImageCache.READY and time.monotonic() < deadline:
                assert cache.state != pb.ImageCache.FAILED, cache.state_message
                time.sleep(0.1)
                cache = stub.GetImageCache(api.GetImageCacheRequest(name=created.name), timeout=10)
            assert cache.state == pb.ImageCache.READY
            assert [c.requires_credentials for c in cache.cached_images] == [True]
        unshared = _match_private(matcher_port, image)
        assert unshared.decision == mpb.MatchImageCachesResponse.NO_MATCH
        assert [(r.image_cache, r.reason) for r in unshared.rejections] == [
            (created.name, mpb.Rejection.NOT_AUTHORIZED)
        ]
    with serve(data_dir, port, "", matcher_port=matcher_port, extra_args=("--share-node-credentials",)):
        shared = _match_private(matcher_port, image)
        assert shared.decision == mpb.MatchImageCachesResponse.MATCHED, shared.message
        assert shared.image_cache == created.name
