"""A cached private image is served from the node's disk only to a client its registry lets pull it.

Real components: a ``docker-registry`` with htpasswd (Basic) auth holding a private image; the
suite's kube-apiserver holding the dockerconfigjson Secret the cache registry builds with (so the
cache records the image as ``requires_credentials``); the registry service (local provider), the
matcher (which gives the cache only to a pod naming that Secret in its imagePullSecrets); a node
agent provisioning for a Pod bound to its Node (no kubelet: the Pod object is enough). The
mirror is then asked as containerd would, with and without credentials; the private registry's
access log tells what reached it (a credential check is a HEAD; a download a GET).
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import pytest
from kubernetes import client as k8s

from services.cache_registry.server import RegistryApp, RegistryConfig, ZoneConfig
from services.matcher.server import MatcherApp, MatcherConfig
from services.node_agent.server import NodeAgentApp, NodeAgentConfig
from snapcache.demo.oci_images import BuiltImage, ImageSpec, LayerSpec, build_image, push_image
from snapcache.demo.registry_server import RegistryServer
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from tests.support.kube_cluster import KubeCluster

pytestmark = pytest.mark.e2e

USER, PASSWORD = "snap", "pr1vate-Pa55"
SPEC = ImageSpec(
    "team/secret-app", "1.0", [LayerSpec(1024 * 1024, seed=8801), LayerSpec(64 * 1024, seed=8802)]
)
ZONE = "zone-a"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class World:
    upstream: RegistryServer
    agent: NodeAgentApp
    image: BuiltImage
    cache_id: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, kube_cluster: KubeCluster) -> Iterator[World]:
    root = tmp_path_factory.mktemp("node-agent-private")
    upstream = RegistryServer(root / "upstream", users={USER: PASSWORD})
    upstream.start()
    stops = [upstream.close]
    try:
        image = build_image(SPEC)
        push_image(upstream.url, image, auth=(USER, PASSWORD))
        namespace = kube_cluster.create_namespace("private")
        config = json.dumps({"auths": {upstream.host: {"username": USER, "password": PASSWORD}}})
        with kube_cluster.api_client() as client:
            core = k8s.CoreV1Api(client)
            core.create_namespaced_secret(
                namespace,
                k8s.V1Secret(
                    metadata=k8s.V1ObjectMeta(name="pull"),
                    type="kubernetes.io/dockerconfigjson",
                    string_data={".dockerconfigjson": config},
                ),
            )
            node = f"private-node-{uuid.uuid4().hex[:8]}"
            capacity = {"cpu": "4", "memory": "8Gi", "pods": "110"}
            core.create_node(
                k8s.V1Node(
                    metadata=k8s.V1ObjectMeta(name=node, labels={"topology.kubernetes.io/zone": ZONE}),
                    status=k8s.V1NodeStatus(capacity=capacity, allocatable=capacity),
                )
            )
        stops.append(lambda: _delete_node(kube_cluster, node))
        kubeconfig = kube_cluster.write_kubeconfig(root / "kubeconfig")
        zone_root = root / "zone-a"
        registry = RegistryApp(
            RegistryConfig(
                data_dir=root / "registry",
                listen="127.0.0.1:0",
                zones=(ZoneConfig(ZONE, root=zone_root),),
                worker_poll_seconds=0.05,
                grpc_workers=8,
                kubeconfig=kubeconfig,
                kube_in_cluster=False,
            )
        ).start()
        stops.append(lambda: registry.stop(0))
        reference = f"{upstream.host}/{SPEC.repository}:{SPEC.tag}"
        with grpc.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
            stub = api_grpc.CacheRegistryServiceStub(channel)
            created = stub.CreateImageCache(
                api.CreateImageCacheRequest(
                    image_cache=pb.ImageCache(
                        images=[reference],
                        plain_http_registries=[upstream.host],
                        registry_credentials=[pb.RegistryCredentialRef(secret=f"{namespace}/pull")],
                    )
                ),
                timeout=10,
            )
            deadline = time.monotonic() + 60
            while True:
                cache = stub.GetImageCache(api.GetImageCacheRequest(name=created.name), timeout=10)
                available = all(z.state == pb.ZoneAvailability.AVAILABLE for z in cache.zone_availability)
                if cache.state == pb.ImageCache.READY and cache.zone_availability and available:
                    break
                assert cache.state != pb.ImageCache.FAILED, cache.state_message
                assert time.monotonic() < deadline, cache
                time.sleep(0.05)
            assert [i.requires_credentials for i in cache.cached_images] == [True]
        matcher = MatcherApp(
            MatcherConfig(
                registry_target=f"127.0.0.1:{registry.port}", listen="127.0.0.1:0", hit_flush_seconds=0.2
            )
        ).start(wait_loaded_seconds=10)
        stops.append(lambda: matcher.stop(0))
        (zone_root / "disks").mkdir(parents=True, exist_ok=True)
        agent = NodeAgentApp(
            NodeAgentConfig(
                disk_root=zone_root / "disks",
                listen="127.0.0.1:0",
                upstream_plain_http=frozenset({upstream.host}),
                default_registry=upstream.host,
                rescan_seconds=0.1,
                matcher_target=f"127.0.0.1:{matcher.port}",
                registry_target=f"127.0.0.1:{registry.port}",
                node_name=node,
                kubeconfig=kubeconfig,
                reconcile_seconds=0.1,
            )
        ).start()
        stops.append(agent.stop)
        with kube_cluster.api_client() as client:
            k8s.CoreV1Api(client).create_namespaced_pod(
                namespace,
                k8s.V1Pod(
                    metadata=k8s.V1ObjectMeta(
                        name="app", annotations={"snapcache.io/use-image-cache": "auto"}
                    ),
                    spec=k8s.V1PodSpec(
                        node_name=node,
                        image_pull_secrets=[k8s.V1LocalObjectReference(name="pull")],
                        containers=[k8s.V1Container(name="app", image=reference)],
                    ),
                ),
            )
        deadline = time.monotonic() + 30
        while not agent.catalogue.disk_ids:  # the pod may pull it: its disk is attached
            assert time.monotonic() < deadline, "the private cache's disk was not attached"
            time.sleep(0.05)
        yield World(upstream, agent, image, created.name.removeprefix("imageCaches/"))
    finally:
        for stop in reversed(stops):
            stop()


def _delete_node(cluster: KubeCluster, node: str) -> None:
    with cluster.api_client() as client:
        k8s.CoreV1Api(client).delete_node(node)


def _requests(world: World, since: int) -> list[str]:
    return re.findall(r'"((?:GET|HEAD) /v2/team/secret-app/[^ ]+)', world.upstream.read_log()[since:])


def _metric(agent: NodeAgentApp, name: str, **labels: str) -> float:
    return float(agent.metrics.registry.get_sample_value(name, labels) or 0.0)


def test_without_credentials_the_registry_answers_with_its_challenge(world: World) -> None:
    ns = {"ns": world.upstream.host}
    with httpx.Client(base_url=f"http://127.0.0.1:{world.agent.port}", timeout=10) as client:
        answer = client.get(f"/v2/{SPEC.repository}/manifests/{SPEC.tag}", params=ns)
        assert answer.status_code == 401 and "basic" in answer.headers["www-authenticate"].lower()
        blob = world.image.layers[0].digest
        assert client.get(f"/v2/{SPEC.repository}/blobs/{blob}", params=ns).status_code == 401
    assert _metric(world.agent, "snapcache_node_agent_private_checks_total", result="refused") >= 2
    disk_answers = _metric(
        world.agent, "snapcache_node_agent_requests_total", kind="manifest", source="disk", code="200"
    )
    assert disk_answers == 0


def test_with_credentials_the_registry_refuses_the_mirror_refuses_too(world: World) -> None:
    since = len(world.upstream.read_log())
    with httpx.Client(base_url=f"http://127.0.0.1:{world.agent.port}", timeout=10) as client:
        answer = client.get(
            f"/v2/{SPEC.repository}/manifests/{SPEC.tag}",
            params={"ns": world.upstream.host},
            headers={"Authorization": _basic(USER, "wrong")},
        )
    assert answer.status_code == 401
    assert any(line.startswith("HEAD ") for line in _requests(world, since))  # the check


def test_with_credentials_the_registry_accepts_the_image_comes_from_the_disk(world: World) -> None:
    since = len(world.upstream.read_log())
    served = _metric(world.agent, "snapcache_node_agent_served_bytes_total", source="disk")
    auth = {"Authorization": _basic(USER, PASSWORD)}
    with httpx.Client(base_url=f"http://127.0.0.1:{world.agent.port}", timeout=10) as client:
        manifest = client.get(
            f"/v2/{SPEC.repository}/manifests/{SPEC.tag}",
            params={"ns": world.upstream.host},
            headers={**auth, "Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        assert manifest.status_code == 200 and manifest.content == world.image.manifest_bytes
        for digest in (world.image.config_digest, *(layer.digest for layer in world.image.layers)):
            blob = client.get(
                f"/v2/{SPEC.repository}/blobs/{digest}", params={"ns": world.upstream.host}, headers=auth
            )
            assert blob.status_code == 200 and len(blob.content) > 0
    requests = _requests(world, since)
    assert [r for r in requests if r.startswith("GET ")] == []  # nothing downloaded from the registry
    assert len([r for r in requests if r.startswith("HEAD ")]) == 1  # one check, cached for the blobs
    assert (
        _metric(world.agent, "snapcache_node_agent_served_bytes_total", source="disk") > served + 1024 * 1024
    )
    assert _metric(world.agent, "snapcache_node_agent_private_checks_total", result="allowed") >= 4
