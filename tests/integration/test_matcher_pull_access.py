"""A cache never bypasses registry authorization: end to end, on a real control plane.

A tenant's namespace holds a ``kubernetes.io/dockerconfigjson`` Secret for a private registry
(a real ``docker-registry`` with htpasswd basic auth). The real registry app reads the Secret as a
least-privileged user and builds a cache of the tenant's private image and a public one; the real
matcher follows it over gRPC. Pods are real Pod objects in the kube-apiserver, read back as the API
serves them and turned into requests by the ground floor's `pod_requests`, then asked about the
way the node agent asks (`MatcherLookup`), straight over gRPC, and as kube-scheduler asks the
real extender (the Pod's JSON as the API served it, in an ExtenderArgs):

- a pod in the Secret's namespace that names it gets the cache;
- a pod of another namespace (even one naming a Secret of the same name there) or one that does
  not name it does not, with rejection NOT_AUTHORIZED, and the answer to the stranger reveals
  neither the Secret nor its namespace;
- the public image of the same cache still matches for anyone; a manual match obeys the rule.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import pytest
from kubernetes import client as k8s

from services.cache_registry.server import RegistryApp, RegistryConfig
from services.extender.server import ExtenderApp, ExtenderConfig
from services.matcher.index_sync import SyncSettings
from services.matcher.server import MatcherApp, MatcherConfig
from services.node_agent.matcher_lookup import MatcherLookup
from snapcache.pod_requests import USE_ANNOTATION, Mode, PodRequest, pod_info, pod_request
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc
from tests.support.kube_cluster import KubeCluster
from tests.support.oci_fixtures import PRIVATE_PASSWORD, PRIVATE_USER, PushedImages
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

SECRET = "regcred"
ZONE = "local-a"
NOT_AUTHORIZED = mpb.Rejection.NOT_AUTHORIZED
_DECISIONS = mpb.MatchImageCachesResponse.Decision


def _dockerconfigjson(host: str) -> str:
    auth = base64.b64encode(f"{PRIVATE_USER}:{PRIVATE_PASSWORD}".encode()).decode()
    return json.dumps({"auths": {host: {"auth": auth}}})


def _pull_secret(core: k8s.CoreV1Api, namespace: str, host: str) -> None:
    core.create_namespaced_secret(
        namespace,
        k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name=SECRET),
            type="kubernetes.io/dockerconfigjson",
            string_data={".dockerconfigjson": _dockerconfigjson(host)},
        ),
    )


@dataclass
class World:
    """The cluster, the registry app, the matcher and the cache built from the tenant's Secret."""

    core: k8s.CoreV1Api
    tenant: str  # the namespace of the Secret the cache was built with
    stranger: str  # another namespace, with a Secret of the same name and the same password
    cache: pb.ImageCache
    private_image: str
    public_image: str
    matcher: mpb_grpc.MatcherServiceStub
    lookup: MatcherLookup
    matcher_address: str

    def pod(
        self, namespace: str, name: str, *images: str, pull_secrets: tuple[str, ...] = (), **annotations: str
    ) -> PodRequest:
        """Create a Pod, read it back as the API serves it, and make the request the node agent would."""
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "annotations": {USE_ANNOTATION: "auto", **annotations}},
            "spec": {
                "containers": [{"name": f"c{i}", "image": image} for i, image in enumerate(images)],
                "imagePullSecrets": [{"name": secret} for secret in pull_secrets],
            },
        }
        self.core.create_namespaced_pod(namespace, body)
        served = self.core.read_namespaced_pod(name, namespace, _preload_content=False)
        return pod_request(pod_info(json.loads(served.data)), default_mode=Mode.OFF)

    def ask(self, request: PodRequest, **fields: Any) -> mpb.MatchImageCachesResponse:
        """MatchImageCaches for ``request`` as a preview (no hit counted)."""
        return self.matcher.MatchImageCaches(
            mpb.MatchImageCachesRequest(
                images=request.images,
                namespace=request.namespace,
                image_pull_secrets=request.image_pull_secrets,
                zones=[ZONE],
                validate_only=True,
                **fields,
            ),
            timeout=5,
        )


@pytest.fixture
def world(
    kube_cluster: KubeCluster, pushed_images: PushedImages, tmp_path: Path, sqlite_url: str
) -> Iterator[World]:
    host = pushed_images.private_registry.host
    tenant = kube_cluster.create_namespace("tenant")
    stranger = kube_cluster.create_namespace("stranger")
    kube_cluster.allow_secret_reading(tenant)
    with kube_cluster.api_client() as client:
        core = k8s.CoreV1Api(client)
        _pull_secret(core, tenant, host)
        _pull_secret(core, stranger, host)
        registry = RegistryApp(
            RegistryConfig(
                data_dir=tmp_path / "registry",
                listen="127.0.0.1:0",
                database_url=sqlite_url,
                worker_poll_seconds=0.1,
                kubeconfig=kube_cluster.write_kubeconfig(tmp_path / "kubeconfig", user="limited"),
                kube_in_cluster=False,
            )
        ).start()
        matcher: MatcherApp | None = None
        lookup: MatcherLookup | None = None
        try:
            with grpc.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
                cache = _build(
                    api_grpc.CacheRegistryServiceStub(channel), pushed_images, f"{tenant}/{SECRET}"
                )
            matcher = MatcherApp(
                MatcherConfig(
                    registry_target=f"127.0.0.1:{registry.port}",
                    listen="127.0.0.1:0",
                    status_check_seconds=0.1,
                    sync=SyncSettings(
                        live_window_seconds=2.0, backoff_initial_seconds=0.05, backoff_max_seconds=0.2
                    ),
                )
            ).start(wait_loaded_seconds=10)
            lookup = MatcherLookup(f"127.0.0.1:{matcher.port}")
            with grpc.insecure_channel(f"127.0.0.1:{matcher.port}") as matcher_channel:
                yield World(
                    core=core,
                    tenant=tenant,
                    stranger=stranger,
                    cache=cache,
                    private_image=str(pushed_images.private.reference),
                    public_image=str(pushed_images.web.reference),
                    matcher=mpb_grpc.MatcherServiceStub(matcher_channel),
                    lookup=lookup,
                    matcher_address=f"127.0.0.1:{matcher.port}",
                )
        finally:
            if lookup is not None:
                lookup.close()
            if matcher is not None:
                matcher.stop(0)
            registry.stop(0)


def _build(stub: api_grpc.CacheRegistryServiceStub, pushed: PushedImages, secret: str) -> pb.ImageCache:
    """A cache of the tenant's private image and a public one, READY and AVAILABLE in ZONE."""
    created = stub.CreateImageCache(
        api.CreateImageCacheRequest(
            image_cache=pb.ImageCache(
                images=[str(pushed.private.reference), str(pushed.web.reference)],
                cache_size_gib=1,
                plain_http_registries=[pushed.private_registry.host, pushed.registry.host],
                registry_credentials=[pb.RegistryCredentialRef(secret=secret)],
            )
        ),
        timeout=10,
    )
    found: list[pb.ImageCache] = [created]

    def available() -> bool:
        found[0] = cache = stub.GetImageCache(api.GetImageCacheRequest(name=created.name), timeout=10)
        assert cache.state != pb.ImageCache.FAILED, cache.state_message
        return cache.state == pb.ImageCache.READY and any(
            z.zone == ZONE and z.state == pb.ZoneAvailability.AVAILABLE for z in cache.zone_availability
        )

    eventually(available, what=f"{created.name} READY in {ZONE}", timeout=60)
    return found[0]


def test_the_build_records_the_private_image_and_the_secret_that_pulled_it(world: World) -> None:
    recorded = {
        c.image: (c.requires_credentials, [r.secret for r in c.authorized_by])
        for c in world.cache.cached_images
    }
    assert recorded == {
        world.private_image: (True, [f"{world.tenant}/{SECRET}"]),
        world.public_image: (False, []),  # its registry needed no credentials
    }


def test_only_pods_allowed_to_use_the_secret_get_the_cache(world: World) -> None:
    cache_id = world.cache.name.removeprefix("imageCaches/")
    images = (world.private_image, world.public_image)
    owner = world.pod(world.tenant, "owner", *images, pull_secrets=(SECRET,))
    assert (owner.namespace, owner.image_pull_secrets) == (world.tenant, (SECRET,))  # as the API served it
    eventually(
        lambda: world.ask(owner).decision == _DECISIONS.Value("MATCHED"), what="the matcher to know the cache"
    )
    found = world.lookup.lookup(owner, zone=ZONE)
    assert (found.cache_id, found.decision) == (cache_id, "MATCHED")

    # another namespace, naming a Secret of the same name there: not the Secret that pulled the image
    stranger = world.pod(world.stranger, "stranger", *images, pull_secrets=(SECRET,))
    refused = world.lookup.lookup(stranger, zone=ZONE)
    assert (refused.cache_id, refused.decision) == ("", "NO_MATCH")
    answer = world.ask(stranger)
    (rejection,) = answer.rejections
    assert rejection.image_cache == world.cache.name and rejection.reason == NOT_AUTHORIZED
    assert f"pods in namespace {world.stranger} may not use" in rejection.message
    said = str(answer)
    assert world.tenant not in said and SECRET not in said  # nothing of the other tenant's Secret

    # the Secret's own namespace, not naming it
    forgetful = world.pod(world.tenant, "forgetful", *images)
    answer = world.ask(forgetful)
    assert answer.decision == _DECISIONS.Value("NO_MATCH") and answer.rejections[0].reason == NOT_AUTHORIZED
    assert f"pulled with Secret {SECRET}, which the pod does not list in imagePullSecrets" in answer.message
    assert world.lookup.lookup(forgetful, zone=ZONE).cache_id == ""


def test_the_public_image_of_the_cache_matches_for_anyone(world: World) -> None:
    cache_id = world.cache.name.removeprefix("imageCaches/")
    anyone = world.pod(world.stranger, "public-only", world.public_image)
    found = world.lookup.lookup(anyone, zone=ZONE)
    assert (found.cache_id, found.decision) == (cache_id, "MATCHED")


def test_a_manual_match_obeys_the_rule(world: World) -> None:
    cache_id = world.cache.name.removeprefix("imageCaches/")
    images = (world.private_image, world.public_image)
    stranger = world.pod(
        world.stranger, "manual-stranger", *images, pull_secrets=(SECRET,), **{USE_ANNOTATION: cache_id}
    )
    assert stranger.manual_id == cache_id
    refused = world.lookup.lookup(stranger, zone=ZONE)
    assert (refused.cache_id, refused.decision) == ("", "MANUAL_NOT_AUTHORIZED")
    owner = world.pod(
        world.tenant, "manual-owner", *images, pull_secrets=(SECRET,), **{USE_ANNOTATION: cache_id}
    )
    found = world.lookup.lookup(owner, zone=ZONE)
    assert (found.cache_id, found.decision) == (cache_id, "MATCHED")


def _node(name: str, zone: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}}


def test_the_extender_steers_only_pods_allowed_to_use_the_secret(world: World) -> None:
    """kube-scheduler's prioritize (full Nodes mode) through the real extender and matcher: the
    owner's node in the cache's zone scores; the stranger's nodes score nothing."""
    images = (world.private_image, world.public_image)
    owner = world.pod(world.tenant, "steered-owner", *images, pull_secrets=(SECRET,))
    eventually(
        lambda: world.ask(owner).decision == _DECISIONS.Value("MATCHED"), what="the matcher to know the cache"
    )
    world.pod(world.stranger, "steered-stranger", *images, pull_secrets=(SECRET,))
    extender = ExtenderApp(
        ExtenderConfig(matcher_target=world.matcher_address, listen="127.0.0.1:0", matcher_budget_seconds=2.0)
    )
    extender.start()
    try:
        nodes = {"items": [_node("node-in-zone", ZONE), _node("node-elsewhere", "other-zone")]}

        def prioritize(namespace: str, name: str) -> list[dict[str, Any]]:
            served = world.core.read_namespaced_pod(name, namespace, _preload_content=False)
            body = orjson.dumps({"Pod": json.loads(served.data), "Nodes": nodes})
            answer = httpx.post(f"http://127.0.0.1:{extender.port}/prioritize", content=body, timeout=10)
            assert answer.status_code == 200, answer.text
            scores: list[dict[str, Any]] = answer.json()
            return scores

        assert {"Host": "node-in-zone", "Score": 10} in prioritize(world.tenant, "steered-owner")
        assert all(s["Score"] == 0 for s in prioritize(world.stranger, "steered-stranger"))
    finally:
        extender.stop()
