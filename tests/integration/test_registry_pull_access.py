"""The registry records which cached images need registry credentials, and whose.

A cache built with credentials may hold public and private images alike; the matcher may only
give the private ones to pods allowed to use the credentials that pulled them (docs/security.md),
so the build must tell them apart. The anonymous-access check runs against real registries of
each kind: open, basic auth (htpasswd), and Bearer tokens whose token service grants anonymous
pulls on some repositories only, as Docker Hub's does. Then a whole registry app builds caches
through it, and the records reach the API and the change feed; caches recorded before the
registry kept these facts read as private to every credential they name, on SQLite and
PostgreSQL alike.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.cache_registry.distribution import DistributionClient
from services.cache_registry.model import CacheId
from services.cache_registry.server import RegistryApp, RegistryConfig
from services.cache_registry.store import CacheRow
from snapcache.images import ImageReference
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from tests.support.fake_provider import FakeProvider
from tests.support.kube_cluster import free_port
from tests.support.oci_fixtures import OciRegistry, PushedImages
from tests.support.public_token_registry import PublicTokenRegistry, running_public_token_registry
from tests.support.registry_harness import Harness, build_harness, close_harness
from tests.support.token_auth import SigningKey

TERMINAL = {pb.ImageCache.READY, pb.ImageCache.FAILED}


@pytest.fixture(scope="module")
def public_token_registry(
    tmp_path_factory: pytest.TempPathFactory, token_signing_key: SigningKey
) -> Iterator[PublicTokenRegistry]:
    with running_public_token_registry(tmp_path_factory.mktemp("public-token"), token_signing_key) as running:
        yield running


def _anonymous(host: str) -> DistributionClient:
    return DistributionClient(plain_http_registries=frozenset({host}), timeout_seconds=5)


# ---------------------------------------------------------------------------------------------
# the anonymous-access check against real registries


@pytest.mark.e2e
def test_an_open_registry_serves_its_images_anonymously(pushed_images: PushedImages) -> None:
    web = pushed_images.web
    with _anonymous(web.reference.registry) as client:
        assert client.manifest_served(web.reference, web.manifest_digest())
        assert not client.manifest_served(web.reference, "sha256:" + "0" * 64)  # no such manifest


@pytest.mark.e2e
def test_a_basic_auth_registry_refuses_anonymous_requests(pushed_images: PushedImages) -> None:
    private = pushed_images.private
    registry = pushed_images.private_registry
    with _anonymous(registry.host) as client:
        assert not client.manifest_served(private.reference, private.manifest_digest())
    with DistributionClient.from_options(registry.pull_options()) as client:
        assert client.manifest_served(private.reference, private.manifest_digest())


@pytest.mark.e2e
def test_a_token_registry_serves_anonymous_tokens_for_public_repositories_only(
    public_token_registry: PublicTokenRegistry,
) -> None:
    public, private = public_token_registry.public, public_token_registry.private
    with _anonymous(public_token_registry.host) as client:
        assert client.manifest_served(public.reference, public.manifest_digest())
        assert not client.manifest_served(private.reference, private.manifest_digest())
    anonymous = [r for r in public_token_registry.tokens.requests if r.user == ""]
    assert anonymous and all(r.status == 200 for r in anonymous)  # asked as nobody, with a token
    with DistributionClient.from_options(public_token_registry.registry.pull_options()) as client:
        assert client.manifest_served(private.reference, private.manifest_digest())


def test_an_unreachable_registry_is_not_taken_for_a_public_one() -> None:
    host = f"127.0.0.1:{free_port()}"  # nothing listens there
    reference = ImageReference(registry=host, repository="team/app", tag="1.0", digest="")
    with _anonymous(host) as client:
        assert not client.manifest_served(reference, "sha256:" + "a" * 64)


# ---------------------------------------------------------------------------------------------
# a real build records it


def _docker_config(tmp_path: Path, registry: OciRegistry) -> str:
    credential = registry.credential
    assert credential is not None
    auth = base64.b64encode(f"{credential.username}:{credential.password}".encode()).decode()
    path = tmp_path / "docker-config.json"
    path.write_text(json.dumps({"auths": {registry.host: {"auth": auth}}}))
    return str(path)


@pytest.mark.e2e
def test_a_build_tells_public_from_private_images_behind_one_credential(
    tmp_path: Path, public_token_registry: PublicTokenRegistry, pushed_images: PushedImages
) -> None:
    config = _docker_config(tmp_path, public_token_registry.registry)
    ref = pb.RegistryCredentialRef(docker_config_path=config)
    app = RegistryApp(
        RegistryConfig(
            data_dir=tmp_path / "data",
            listen="127.0.0.1:0",
            worker_poll_seconds=0.1,
            kube_in_cluster=False,
            kubeconfig=None,
        )
    ).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = api_grpc.CacheRegistryServiceStub(channel)
            host = public_token_registry.host
            created = stub.CreateImageCache(
                api.CreateImageCacheRequest(
                    image_cache=pb.ImageCache(
                        images=[
                            str(public_token_registry.public.reference),
                            str(public_token_registry.private.reference),
                            str(pushed_images.web.reference),  # another registry, no credentials
                        ],
                        cache_size_gib=1,
                        plain_http_registries=[host, pushed_images.registry.host],
                        registry_credentials=[ref],
                    )
                ),
                timeout=10,
            )
            cache = _settled(stub, created.name)
            assert cache.state == pb.ImageCache.READY, cache.state_message
            recorded = {c.image: (c.requires_credentials, list(c.authorized_by)) for c in cache.cached_images}
            assert recorded == {
                str(public_token_registry.public.reference): (False, []),  # served anonymously
                str(public_token_registry.private.reference): (True, [ref]),
                str(pushed_images.web.reference): (False, []),  # pulled without credentials
            }
            events = stub.ListImageCacheEvents(api.ListImageCacheEventsRequest(parent=cache.name), timeout=10)
            pulled = {
                e.attributes["image"]: e.attributes["requires_credentials"]
                for e in events.events
                if e.reason == "ImagePulled"
            }
            assert pulled[str(public_token_registry.private.reference)] == "true"
            assert pulled[str(public_token_registry.public.reference)] == "false"
            # the change feed (what the matcher follows) carries the same record
            feed = stub.WatchImageCaches(api.WatchImageCachesRequest(name=cache.name), timeout=10)
            first = next(iter(feed))
            assert list(first.image_cache.cached_images) == list(cache.cached_images)
            feed.cancel()
    finally:
        app.stop(0)


def _settled(stub: api_grpc.CacheRegistryServiceStub, name: str, timeout: float = 60) -> pb.ImageCache:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cache = stub.GetImageCache(api.GetImageCacheRequest(name=name), timeout=10)
        if cache.state in TERMINAL:
            return cache
        time.sleep(0.05)
    raise AssertionError(f"{name} did not settle")


# ---------------------------------------------------------------------------------------------
# the records on both databases, and records written before the registry kept them


def test_builds_record_private_images_on_both_databases(harness: Harness, tmp_path: Path) -> None:
    config = tmp_path / "docker-config.json"
    config.write_text(
        json.dumps({"auths": {"registry.example.com": {"auth": base64.b64encode(b"u:p").decode()}}})
    )
    ref = pb.RegistryCredentialRef(docker_config_path=str(config))
    created = harness.stub.CreateImageCache(
        api.CreateImageCacheRequest(
            image_cache=pb.ImageCache(
                images=["registry.example.com/team/app:1.0", "nginx:1.25"], registry_credentials=[ref]
            )
        )
    )
    harness.settle()
    cache = harness.stub.GetImageCache(api.GetImageCacheRequest(name=created.name))
    assert cache.state == pb.ImageCache.READY
    # the fake provider never saw an anonymous pull succeed: what was pulled with credentials is private
    assert [(c.requires_credentials, list(c.authorized_by)) for c in cache.cached_images] == [
        (True, [ref]),
        (False, []),
    ]
    listed = harness.stub.ListImageCaches(api.ListImageCachesRequest())
    assert list(listed.image_caches[0].cached_images) == list(cache.cached_images)


def test_caches_recorded_before_read_private_to_every_credential_they_name(
    harness: Harness, database_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "docker-config.json"
    config.write_text(json.dumps({"auths": {}}))
    refs = [
        pb.RegistryCredentialRef(secret="team-a/regcred"),
        pb.RegistryCredentialRef(docker_config_path=str(config)),
    ]
    with_credentials = harness.stub.CreateImageCache(
        api.CreateImageCacheRequest(
            image_cache=pb.ImageCache(images=["nginx:1.25"], registry_credentials=refs[1:])
        )
    )
    without = harness.stub.CreateImageCache(
        api.CreateImageCacheRequest(image_cache=pb.ImageCache(images=["redis:7"]))
    )
    harness.settle()
    # As an older release wrote them: no access record in the documents, no wire form.
    with harness.database.transaction() as session:
        for name in (with_credentials.name, without.name):
            row = session.get(CacheRow, CacheId(name.removeprefix("imageCaches/")))
            assert row is not None
            doc = json.loads(json.dumps(row.doc))
            if name == with_credentials.name:
                doc["spec"]["registry_credentials"] = [
                    {"secret": r.secret, "docker_config_path": r.docker_config_path} for r in refs
                ]
            for image in doc["cached_images"]:
                del image["requires_credentials"], image["authorized_by"]
            row.doc = doc
            row.wire = None
            row.wire_format = None
            session.add(row)
    reader = build_harness(database_url, FakeProvider())  # a registry of the new release on that database
    try:
        old = reader.stub.GetImageCache(api.GetImageCacheRequest(name=with_credentials.name))
        (image,) = old.cached_images
        assert image.requires_credentials and list(image.authorized_by) == refs
        public = reader.stub.GetImageCache(api.GetImageCacheRequest(name=without.name))
        assert not public.cached_images[0].requires_credentials
        assert not public.cached_images[0].authorized_by
    finally:
        close_harness(reader)
