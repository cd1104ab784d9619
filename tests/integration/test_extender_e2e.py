"""The extender with the real kube-apiserver and kube-scheduler (v1.20.2), a real registry and matcher.

Three Nodes in three zones; a cache AVAILABLE only in zone-a (the provider's copies to zone-b and
zone-c fail). The scheduler (a second profile, `snapcache-scheduler`, configured from
deploy/base/scheduler/snapcache-scheduler.yaml rendered as v1beta1) calls the extender in NodeNames
mode; the extender knows node zones from its own list + watch of the apiserver and writes events
on the pods. Each test works in a namespace of its own; the cluster is shared by the session.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from kubernetes import client as k8s

from services.extender.server import ExtenderApp, ExtenderConfig
from services.matcher.index_sync import SyncSettings
from services.matcher.server import MatcherApp, MatcherConfig
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import image_cache_pb2 as pb
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc
from tests.support.fake_provider import FakeProvider
from tests.support.kube_cluster import KubeCluster, Scheduler
from tests.support.registry_harness import Harness, build_harness, close_harness

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).parents[2] / "deploy" / "base" / "scheduler" / "snapcache-scheduler.yaml"
SCHEDULER_NAME = "snapcache-scheduler"
ZONES = ("zone-a", "zone-b", "zone-c")
CACHE = "imc-0000000a"  # busybox:1.36 + nginx:1.25, AVAILABLE in zone-a only
NOWHERE = "imc-0000000b"  # redis:7, READY but AVAILABLE nowhere
WAIT = 30.0


def eventually(check: Callable[[], Any], *, what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})")


@dataclass
class Stack:
    cluster: KubeCluster
    harness: Harness
    matcher: MatcherApp
    extender: ExtenderApp
    scheduler: Scheduler
    nodes: dict[str, str]  # name -> zone
    group: str

    def core(self) -> Iterator[k8s.CoreV1Api]:
        with self.cluster.api_client() as client:
            yield k8s.CoreV1Api(client)


def matcher_config(registry_port: int, listen: str = "127.0.0.1:0") -> MatcherConfig:
    return MatcherConfig(
        registry_target=f"127.0.0.1:{registry_port}",
        listen=listen,
        hit_flush_seconds=0.1,
        status_check_seconds=0.1,
        sync=SyncSettings(live_window_seconds=1.0, backoff_initial_seconds=0.05, backoff_max_seconds=0.2),
    )


def node(name: str, zone: str, group: str) -> k8s.V1Node:
    capacity = {"cpu": "4", "memory": "8Gi", "pods": "110"}
    return k8s.V1Node(
        metadata=k8s.V1ObjectMeta(
            name=name,
            labels={
                "kubernetes.io/hostname": name,
                "topology.kubernetes.io/zone": zone,
                "snapcache-e2e": group,
            },
        ),
        status=k8s.V1NodeStatus(
            capacity=capacity,
            allocatable=capacity,
            conditions=[k8s.V1NodeCondition(type="Ready", status="True")],
        ),
    )


def create_cache(harness: Harness, cache_id: str, *images: str) -> None:
    harness.stub.CreateImageCache(
        api.CreateImageCacheRequest(image_cache=pb.ImageCache(images=list(images)), image_cache_id=cache_id)
    )
    harness.settle()


def rendered_extender(url: str) -> dict[str, Any]:
    """The deploy config's extender, pointed at the test's extender (v1beta1 has the same fields)."""
    document = yaml.safe_load(DEPLOY.read_text())
    assert document["apiVersion"] == "kubescheduler.config.k8s.io/v1"
    assert [p["schedulerName"] for p in document["profiles"]] == [SCHEDULER_NAME]
    [extender] = document["extenders"]
    assert extender["nodeCacheCapable"] is True and extender["ignorable"] is True
    return {**extender, "urlPrefix": url}


@pytest.fixture(scope="module")
def stack(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("extender-e2e")
    provider = FakeProvider(
        zone_names=ZONES, fail_zone={"zone-b": "zone-b is full", "zone-c": "zone-c is full"}
    )
    harness = build_harness(f"sqlite:///{workdir / 'registry.db'}", provider)
    group = uuid.uuid4().hex[:8]
    nodes = {f"{zone}-{group}": zone for zone in ZONES}
    started: list[Callable[[], None]] = [lambda: close_harness(harness)]
    try:
        create_cache(harness, CACHE, "busybox:1.36", "nginx:1.25")
        provider.fail_zone["zone-a"] = "zone-a is full"
        create_cache(harness, NOWHERE, "redis:7")
        del provider.fail_zone["zone-a"]
        matcher = MatcherApp(matcher_config(harness.server.port)).start(wait_loaded_seconds=10)
        built: list[Stack] = []
        # whichever matcher runs at the end (a test may replace it): a leaked one would retry
        # a stopped registry forever
        started.append(lambda: (built[0].matcher if built else matcher).stop(0))
        with kube_cluster.api_client() as client:
            core = k8s.CoreV1Api(client)
            for name, zone in nodes.items():
                core.create_node(node(name, zone, group))
        started.append(lambda: _delete_nodes(kube_cluster, nodes))
        extender = ExtenderApp(
            ExtenderConfig(
                matcher_target=f"127.0.0.1:{matcher.port}",
                listen="127.0.0.1:0",
                kubeconfig=kube_cluster.write_kubeconfig(workdir / "extender-kubeconfig"),
                matcher_budget_seconds=0.5,
                node_watch_timeout_seconds=30,
            )
        ).start(wait_nodes_seconds=10)
        started.append(extender.stop)
        cache = extender.node_cache
        assert cache is not None
        eventually(lambda: all(cache.zone(n) == z for n, z in nodes.items()), what="the node cache")
        config = kube_cluster.write_scheduler_config(
            workdir / "scheduler.yaml",
            extenders=[rendered_extender(f"http://127.0.0.1:{extender.port}/")],
            scheduler_name=SCHEDULER_NAME,
        )
        scheduler = kube_cluster.start_scheduler(config)
        started.append(lambda: kube_cluster.stop_scheduler(scheduler))
        built.append(Stack(kube_cluster, harness, matcher, extender, scheduler, nodes, group))
        yield built[0]
    finally:
        for stop in reversed(started):
            stop()


def _delete_nodes(cluster: KubeCluster, nodes: dict[str, str]) -> None:
    with cluster.api_client() as client:
        core = k8s.CoreV1Api(client)
        for name in nodes:
            core.delete_node(name)


def create_pod(
    stack: Stack,
    namespace: str,
    annotations: dict[str, str],
    *,
    image: str = "nginx:1.25",
    init_image: str = "busybox:1.36",
    name: str = "app",
) -> str:
    with stack.cluster.api_client() as client:
        k8s.CoreV1Api(client).create_namespaced_pod(
            namespace,
            k8s.V1Pod(
                metadata=k8s.V1ObjectMeta(name=name, annotations=annotations),
                spec=k8s.V1PodSpec(
                    scheduler_name=SCHEDULER_NAME,
                    node_selector={"snapcache-e2e": stack.group},  # only this module's nodes
                    init_containers=[k8s.V1Container(name="init", image=init_image)] if init_image else None,
                    containers=[k8s.V1Container(name="app", image=image)],
                ),
            ),
        )
    return name


def bound_node(stack: Stack, namespace: str, name: str) -> str:
    def node_name() -> str:
        with stack.cluster.api_client() as client:
            return str(k8s.CoreV1Api(client).read_namespaced_pod(name, namespace).spec.node_name or "")

    found: str = eventually(node_name, what=f"pod {namespace}/{name} to be bound")
    return found


def events(stack: Stack, namespace: str, reason: str) -> list[k8s.CoreV1Event]:
    with stack.cluster.api_client() as client:
        items = k8s.CoreV1Api(client).list_namespaced_event(namespace).items
    return [e for e in items if e.reason == reason]


def test_the_cache_is_available_in_zone_a_only(stack: Stack) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.matcher.port}") as channel:
        answer = mpb_grpc.MatcherServiceStub(channel).MatchImageCaches(
            mpb.MatchImageCachesRequest(images=["nginx:1.25", "busybox:1.36"], validate_only=True), timeout=5
        )
    assert answer.image_cache == f"imageCaches/{CACHE}"
    assert list(answer.candidates[0].available_zones) == ["zone-a"]


def test_annotated_pods_are_bound_in_the_zone_of_their_cache_with_an_event(stack: Stack) -> None:
    namespace = stack.cluster.create_namespace("ext-auto")
    # three pods: one of three zones by chance each time would pass 1 in 27
    names = [
        create_pod(stack, namespace, {"snapcache.io/use-image-cache": "auto"}, name=f"app-{n}")
        for n in range(3)
    ]
    assert [stack.nodes[bound_node(stack, namespace, name)] for name in names] == ["zone-a"] * 3
    matched = eventually(
        lambda: len(found := events(stack, namespace, "ImageCacheMatched")) == 3 and found,
        what="ImageCacheMatched",
    )
    assert {e.involved_object.name for e in matched} == set(names)
    assert all(CACHE in e.message and "zone-a" in e.message for e in matched), matched[0].message
    assert all(e.type == "Normal" and e.source.component == "snapcache-extender" for e in matched)


def test_a_tke_annotated_pod_with_a_manual_cache_is_bound_in_zone_a(stack: Stack) -> None:
    namespace = stack.cluster.create_namespace("ext-tke")
    name = create_pod(stack, namespace, {"eks.tke.cloud.tencent.com/use-image-cache": CACHE})
    assert stack.nodes[bound_node(stack, namespace, name)] == "zone-a"


def failed_scheduling(stack: Stack, namespace: str) -> str:
    found = events(stack, namespace, "FailedScheduling")
    return found[-1].message if found else ""


def test_a_strict_pod_whose_cache_is_available_nowhere_stays_pending_with_the_reason(stack: Stack) -> None:
    namespace = stack.cluster.create_namespace("ext-strict")
    annotations = {"snapcache.io/use-image-cache": NOWHERE, "snapcache.io/image-cache-strict": "true"}
    name = create_pod(stack, namespace, annotations, image="redis:7", init_image="")
    message: str = eventually(lambda: failed_scheduling(stack, namespace), what="FailedScheduling")
    assert "0/" in message and "strict image-cache pod" in message and NOWHERE in message, message
    print(f"FailedScheduling: {message}")
    with stack.cluster.api_client() as client:
        pod = k8s.CoreV1Api(client).read_namespaced_pod(name, namespace)
    assert pod.status.phase == "Pending" and not pod.spec.node_name
    [missed] = eventually(lambda: events(stack, namespace, "ImageCacheMissed"), what="ImageCacheMissed")
    assert NOWHERE in missed.message and missed.type == "Warning"


def test_an_unannotated_pod_schedules_as_usual(stack: Stack) -> None:
    namespace = stack.cluster.create_namespace("ext-plain")
    name = create_pod(stack, namespace, {})
    assert bound_node(stack, namespace, name) in stack.nodes
    assert not [e for e in _all_events(stack, namespace) if (e.reason or "").startswith("ImageCache")]


def _all_events(stack: Stack, namespace: str) -> list[k8s.CoreV1Event]:
    with stack.cluster.api_client() as client:
        return list(k8s.CoreV1Api(client).list_namespaced_event(namespace).items)


def test_with_the_matcher_stopped_pods_still_schedule(stack: Stack) -> None:
    port = stack.matcher.port
    stack.matcher.stop(0)
    try:
        namespace = stack.cluster.create_namespace("ext-down")
        auto = create_pod(stack, namespace, {"snapcache.io/use-image-cache": "auto"}, name="auto")
        assert bound_node(stack, namespace, auto) in stack.nodes
        # even a strict pod: the extender fails open rather than keeping pods from running
        strict = {"snapcache.io/use-image-cache": NOWHERE, "snapcache.io/image-cache-strict": "true"}
        name = create_pod(stack, namespace, strict, image="redis:7", init_image="", name="strict")
        assert bound_node(stack, namespace, name) in stack.nodes
        metrics = stack.extender.routes.get("/metrics")[2].decode()
        assert 'snapcache_extender_fail_open_total{code="UNAVAILABLE"}' in metrics
    finally:
        stack.matcher = MatcherApp(
            matcher_config(stack.harness.server.port, listen=f"127.0.0.1:{port}")
        ).start(wait_loaded_seconds=10)


def test_the_node_cache_follows_node_changes(stack: Stack) -> None:
    cache = stack.extender.node_cache
    assert cache is not None
    name = f"late-{stack.group}"
    with stack.cluster.api_client() as client:
        core = k8s.CoreV1Api(client)
        core.create_node(node(name, "zone-d", f"other-{stack.group}"))  # not this module's pods' nodes
        try:
            eventually(lambda: cache.zone(name) == "zone-d", what="a new node in the cache")
            core.patch_node(name, {"metadata": {"labels": {"topology.kubernetes.io/zone": None}}})
            core.patch_node(
                name, {"metadata": {"labels": {"failure-domain.beta.kubernetes.io/zone": "zone-old"}}}
            )
            eventually(lambda: cache.zone(name) == "zone-old", what="the beta label after a relabel")
        finally:
            core.delete_node(name)
    eventually(lambda: cache.zone(name) is None and cache.size() >= 3, what="the deleted node gone")
