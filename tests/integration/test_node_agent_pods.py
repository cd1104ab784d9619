"""The node agent provisioning disks for the pods bound to its node, against real components.

The suite's kube-apiserver (Node and Pod objects created here with ``spec.nodeName``: there is
no kubelet), a real registry service (``RegistryApp``, local provider, caches built from demo
images in a real OCI registry) and a real matcher (``MatcherApp``). Zones: ``zone-a`` (no limit)
and ``zone-full`` (one disk, taken by another node). Each test has its own namespace and nodes;
the cluster is shared by the session.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from kubernetes import client as k8s

from services.cache_registry.server import RegistryApp, RegistryConfig, ZoneConfig
from services.matcher.server import MatcherApp, MatcherConfig
from services.node_agent.disk_plans import disk_id_for
from services.node_agent.server import NodeAgentApp, NodeAgentConfig
from snapcache.demo.oci_images import push_demo_images
from snapcache.demo.registry_server import RegistryServer
from snapcache.images import parse_image_reference
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from tests.support.kube_cluster import KubeCluster
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

USE = "snapcache.io/use-image-cache"


@dataclass
class World:
    upstream: RegistryServer
    registry: RegistryApp
    matcher: MatcherApp
    cache_id: str
    image: str
    root_a: Path  # zone-a's disks (another node's disk is there too)
    root_full: Path  # zone-full's disks: at capacity
    kubeconfig: Path


def _wait_ready(stub: api_grpc.CacheRegistryServiceStub, name: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        cache = stub.GetImageCache(api.GetImageCacheRequest(name=name), timeout=10)
        available = all(z.state == pb.ZoneAvailability.AVAILABLE for z in cache.zone_availability)
        if cache.state == pb.ImageCache.READY and len(cache.zone_availability) == 2 and available:
            return
        assert cache.state != pb.ImageCache.FAILED, cache.state_message
        assert time.monotonic() < deadline, cache
        time.sleep(0.05)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, kube_cluster: KubeCluster) -> Iterator[World]:
    root = tmp_path_factory.mktemp("node-agent-pods")
    upstream = RegistryServer(root / "upstream")
    upstream.start()
    registry: RegistryApp | None = None
    matcher: MatcherApp | None = None
    try:
        push_demo_images(upstream.url)
        registry = RegistryApp(
            RegistryConfig(
                data_dir=root / "registry",
                listen="127.0.0.1:0",
                zones=(ZoneConfig("zone-a"), ZoneConfig("zone-full", max_disks=1)),
                worker_poll_seconds=0.05,
                grpc_workers=8,
            )
        ).start()
        image = f"{upstream.host}/demo/web:1.0"
        with grpc.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
            stub = api_grpc.CacheRegistryServiceStub(channel)
            created = stub.CreateImageCache(
                api.CreateImageCacheRequest(
                    image_cache=pb.ImageCache(images=[image], plain_http_registries=[upstream.host])
                ),
                timeout=10,
            )
            _wait_ready(stub, created.name)
            other_a = stub.ProvisionDisk(
                api.ProvisionDiskRequest(parent=created.name, zone="zone-a", disk_id="other-node-a"),
                timeout=10,
            )
            other_full = stub.ProvisionDisk(
                api.ProvisionDiskRequest(parent=created.name, zone="zone-full", disk_id="other-node-full"),
                timeout=10,
            )
        matcher = MatcherApp(
            MatcherConfig(
                registry_target=f"127.0.0.1:{registry.port}", listen="127.0.0.1:0", hit_flush_seconds=0.2
            )
        ).start(wait_loaded_seconds=10)
        yield World(
            upstream=upstream,
            registry=registry,
            matcher=matcher,
            cache_id=created.name.removeprefix("imageCaches/"),
            image=image,
            root_a=Path(other_a.location).parent,
            root_full=Path(other_full.location).parent,
            kubeconfig=kube_cluster.write_kubeconfig(root / "kubeconfig"),
        )
    finally:
        if matcher is not None:
            matcher.stop(0)
        if registry is not None:
            registry.stop(0)
        upstream.close()


@pytest.fixture
def core(kube_cluster: KubeCluster) -> Iterator[k8s.CoreV1Api]:
    with kube_cluster.api_client() as client:
        yield k8s.CoreV1Api(client)


@pytest.fixture
def namespace(kube_cluster: KubeCluster) -> str:
    return kube_cluster.create_namespace("node-agent")


def _node(core: k8s.CoreV1Api, zone: str) -> str:
    name = f"agent-node-{uuid.uuid4().hex[:8]}"
    capacity = {"cpu": "4", "memory": "8Gi", "pods": "110"}
    core.create_node(
        k8s.V1Node(
            metadata=k8s.V1ObjectMeta(name=name, labels={"topology.kubernetes.io/zone": zone}),
            status=k8s.V1NodeStatus(capacity=capacity, allocatable=capacity),
        )
    )
    return name


def _pod(
    core: k8s.CoreV1Api, namespace: str, node: str, image: str, annotations: dict[str, str] | None = None
) -> str:
    """A pod bound to ``node``; returns its uid."""
    created = core.create_namespaced_pod(
        namespace,
        k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(generate_name="web-", annotations=annotations),
            spec=k8s.V1PodSpec(node_name=node, containers=[k8s.V1Container(name="web", image=image)]),
        ),
    )
    return str(created.metadata.uid)


def _delete_pods(core: k8s.CoreV1Api, namespace: str) -> None:
    for pod in core.list_namespaced_pod(namespace).items:
        core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)


def _events(core: k8s.CoreV1Api, namespace: str, uid: str) -> list[k8s.CoreV1Event]:
    return list(core.list_namespaced_event(namespace, field_selector=f"involvedObject.uid={uid}").items)


def _event(core: k8s.CoreV1Api, namespace: str, uid: str, reason: str) -> k8s.CoreV1Event | None:
    return next((e for e in _events(core, namespace, uid) if e.reason == reason), None)


def _live_disks(world: World) -> set[str]:
    with grpc.insecure_channel(f"127.0.0.1:{world.registry.port}") as channel:
        listed = api_grpc.CacheRegistryServiceStub(channel).ListDisks(
            api.ListDisksRequest(parent=f"imageCaches/{world.cache_id}"), timeout=10
        )
    return {disk.name.rpartition("/")[2] for disk in listed.disks}


def _agent(world: World, node: str, disk_root: Path, **options: Any) -> NodeAgentApp:
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "upstream_plain_http": frozenset({world.upstream.host}),
        "default_registry": world.upstream.host,
        "rescan_seconds": 0.1,
        "matcher_target": f"127.0.0.1:{world.matcher.port}",
        "registry_target": f"127.0.0.1:{world.registry.port}",
        "node_name": node,
        "kubeconfig": world.kubeconfig,
        "disk_grace_seconds": 1.0,
        "reconcile_seconds": 0.1,
        "provision_retry_seconds": 0.5,
        **options,
    }
    return NodeAgentApp(NodeAgentConfig(disk_root=disk_root, **settings)).start()


def _metric(agent: NodeAgentApp, name: str, **labels: str) -> float:
    value = agent.metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)


def test_opted_in_pods_share_one_disk_in_their_zone_released_after_the_grace_period(
    world: World, core: k8s.CoreV1Api, namespace: str
) -> None:
    node = _node(core, "zone-a")
    agent = _agent(world, node, world.root_a)  # no zone given: read from the Node's label
    disk_id = disk_id_for(cache_id=world.cache_id, node=node)
    try:
        assert agent.zone == "zone-a"
        first = _pod(core, namespace, node, world.image, {USE: "auto"})
        ready = eventually(
            lambda: _event(core, namespace, first, "ImageCacheDiskReady"), what="a ready event"
        )
        assert ready.type == "Normal" and disk_id in ready.message and "zone-a" in ready.message
        assert ready.source.component == "snapcache-node-agent"
        assert disk_id in _live_disks(world) and (world.root_a / disk_id).is_dir()
        # the mirror serves this node's disk, and not the other node's under the same root
        assert agent.catalogue.disk_ids == [disk_id]
        assert agent.catalogue.manifests(parse_image_reference(world.image))

        # a second pod of the same cache (TKE's annotation, the manual id) shares the disk
        second = _pod(
            core, namespace, node, world.image, {"eks.tke.cloud.tencent.com/use-image-cache": world.cache_id}
        )
        eventually(
            lambda: _event(core, namespace, second, "ImageCacheDiskReady"), what="the second ready event"
        )
        # a pod that did not opt in gets nothing and changes nothing
        plain = _pod(core, namespace, node, world.image)
        eventually(
            lambda: agent.pod_disks is not None and plain in agent.pod_disks.wanted(), what="the plain pod"
        )
        assert agent.pod_disks is not None and agent.pod_disks.wanted()[plain] == ""
        assert {d for d in _live_disks(world) if node in d} == {disk_id}
        assert _metric(agent, "snapcache_node_agent_pods_accelerated_total") == 2
        assert _metric(agent, "snapcache_node_agent_provisioning_seconds_count") == 1
        assert _events(core, namespace, plain) == []

        # all gone: the disk is kept through the grace period, then released
        _delete_pods(core, namespace)
        gone_at = time.monotonic()
        eventually(lambda: disk_id not in _live_disks(world), what="the disk's release")
        assert time.monotonic() - gone_at >= 0.8
        assert not (world.root_a / disk_id).exists()
        eventually(lambda: agent.catalogue.disk_ids == [], what="the catalogue to drop the disk")
        assert len(_events(core, namespace, first)) == 1  # de-duplicated across rounds
    finally:
        agent.stop()
    assert "other-node-a" in _live_disks(world)  # another node's disk is none of this agent's business


def test_a_restarted_agent_adopts_its_disks_and_leaks_none(
    world: World, core: k8s.CoreV1Api, namespace: str
) -> None:
    node = _node(core, "zone-a")
    disk_id = disk_id_for(cache_id=world.cache_id, node=node)
    first = _agent(world, node, world.root_a, zone="zone-a")
    try:
        pod = _pod(core, namespace, node, world.image, {USE: "auto"})
        eventually(lambda: _event(core, namespace, pod, "ImageCacheDiskReady"), what="a ready event")
    finally:
        first.stop()
    assert disk_id in _live_disks(world)  # a stopped agent leaves its disks for the next one

    again = _agent(world, node, world.root_a, zone="zone-a")
    try:
        assert again.keeper is not None and again.keeper.disk_ids == {disk_id}  # adopted at start-up
        assert again.catalogue.disk_ids == [disk_id]
        time.sleep(0.5)  # rounds run with the pod still there: the disk stays, nothing is provisioned
        assert disk_id in _live_disks(world)
        assert _metric(again, "snapcache_node_agent_provisioning_seconds_count") == 0
        _delete_pods(core, namespace)
        eventually(lambda: disk_id not in _live_disks(world), what="the adopted disk's release")
        assert not (world.root_a / disk_id).exists()
    finally:
        again.stop()
    assert not [d for d in _live_disks(world) if node in d]


def test_a_zone_out_of_capacity_gives_a_warning_and_the_pod_pulls(
    world: World, core: k8s.CoreV1Api, namespace: str
) -> None:
    node = _node(core, "zone-full")
    agent = _agent(world, node, world.root_full)
    try:
        pod = _pod(core, namespace, node, world.image, {USE: world.cache_id})
        failed = eventually(
            lambda: _event(core, namespace, pod, "ImageCacheDiskFailed"), what="a warning event"
        )
        assert failed.type == "Warning"
        assert "ZONE_CAPACITY_EXHAUSTED" in failed.message and "pulls its images" in failed.message
        assert agent.keeper is not None and agent.keeper.disk_ids == frozenset()
        assert agent.catalogue.disk_ids == []  # the mirror passes this pod's pulls through
        reason = "ZONE_CAPACITY_EXHAUSTED"
        eventually(  # retried later, refused again, and said once
            lambda: _metric(agent, "snapcache_node_agent_provisioning_failures_total", reason=reason) >= 2,
            what="a retry",
        )
        assert len(_events(core, namespace, pod)) == 1
        assert _metric(agent, "snapcache_node_agent_pods_accelerated_total") == 0
    finally:
        agent.stop()
    assert not [d for d in _live_disks(world) if node in d]


def test_a_matcher_that_cannot_answer_fails_open(world: World, core: k8s.CoreV1Api, namespace: str) -> None:
    node = _node(core, "zone-a")
    agent = _agent(
        world,
        node,
        world.root_a,
        matcher_target="127.0.0.1:1",  # nothing listens there
        matcher_timeout_seconds=0.5,
    )
    try:
        pod = _pod(core, namespace, node, world.image, {USE: "auto"})
        eventually(
            lambda: (
                _metric(
                    agent, "snapcache_node_agent_provisioning_failures_total", reason="MATCHER_UNAVAILABLE"
                )
                >= 1
            ),
            what="the matcher's failure to be counted",
        )
        assert agent.keeper is not None and agent.keeper.disk_ids == frozenset()
        assert _events(core, namespace, pod) == []  # the pod pulls; nothing to say yet
    finally:
        agent.stop()


def test_a_named_cache_not_in_the_nodes_zone_gives_a_warning(
    world: World, core: k8s.CoreV1Api, namespace: str
) -> None:
    node = _node(core, "zone-elsewhere")  # no snapshot of any cache there
    agent = _agent(world, node, world.root_a)
    try:
        pod = _pod(core, namespace, node, world.image, {USE: world.cache_id})
        failed = eventually(
            lambda: _event(core, namespace, pod, "ImageCacheDiskFailed"), what="a warning event"
        )
        assert failed.type == "Warning" and "MANUAL_NOT_AVAILABLE" in failed.message
        assert agent.keeper is not None and agent.keeper.disk_ids == frozenset()
        reason = "MANUAL_NOT_AVAILABLE"
        assert _metric(agent, "snapcache_node_agent_provisioning_failures_total", reason=reason) == 1
    finally:
        agent.stop()


def test_the_command_provisions_for_its_nodes_pods_and_stops_on_sigterm(
    world: World, core: k8s.CoreV1Api, namespace: str
) -> None:
    """``snapcache node-agent`` with the DaemonSet's flags, as a process: the options reach the agent."""
    node = _node(core, "zone-a")
    disk_id = disk_id_for(cache_id=world.cache_id, node=node)
    command = [
        sys.executable, "-m", "snapcache_cli.main", "node-agent",
        "--listen", "127.0.0.1:0",
        "--disk-root", str(world.root_a),
        "--upstream-plain-http", world.upstream.host,
        "--matcher", f"127.0.0.1:{world.matcher.port}",
        "--registry", f"127.0.0.1:{world.registry.port}",
        "--kubeconfig", str(world.kubeconfig),
        "--disk-grace-seconds", "0",
    ]  # fmt: skip
    environment = {**os.environ, "NODE_NAME": node}  # as the DaemonSet's downward API sets it
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert f"disks for the pods of node {node} in zone zone-a" in line, line
        pod = _pod(core, namespace, node, world.image, {USE: "auto"})
        eventually(lambda: _event(core, namespace, pod, "ImageCacheDiskReady"), what="a ready event")
        assert disk_id in _live_disks(world)
        _delete_pods(core, namespace)
        eventually(lambda: disk_id not in _live_disks(world), what="the release (no grace)")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
