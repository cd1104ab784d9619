"""The node agent's pod watch against the real kube-apiserver: its node's pods only, a 410 relists.

A watch that resumes from a resourceVersion the apiserver no longer has (etcd compacted it) gets
an ERROR event with code 410 (Gone): the watch must relist and keep following, not loop on the
dead version nor go blind. The test cluster serves pod watches from etcd (see `kube_cluster`),
so compacting etcd makes a real 410.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from services.node_agent.kube_pods import NodePods
from tests.support.kube_cluster import KubeCluster
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture
def core(kube_cluster: KubeCluster) -> Iterator[k8s.CoreV1Api]:
    with kube_cluster.api_client() as client:
        yield k8s.CoreV1Api(client)


def _pod(core: k8s.CoreV1Api, namespace: str, node: str) -> str:
    created = core.create_namespaced_pod(
        namespace,
        k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(generate_name="p-"),
            spec=k8s.V1PodSpec(node_name=node, containers=[k8s.V1Container(name="c", image="nginx")]),
        ),
    )
    return str(created.metadata.uid)


@pytest.fixture
def stale(kube_cluster: KubeCluster, core: k8s.CoreV1Api) -> str:
    """A resourceVersion from before a pod's last changes, compacted away in etcd."""
    namespace = kube_cluster.create_namespace("pod-churn")
    created = core.create_namespaced_pod(
        namespace,
        k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(name="churn"),
            spec=k8s.V1PodSpec(node_name="churn-node", containers=[k8s.V1Container(name="c", image="nginx")]),
        ),
    )
    version = str(created.metadata.resource_version)
    for i in range(3):
        core.patch_namespaced_pod("churn", namespace, {"metadata": {"labels": {"snapcache-churn": str(i)}}})
    now = core.list_namespaced_pod(namespace).metadata.resource_version
    compacted = httpx.post(f"{kube_cluster.etcd_url}/v3/kv/compaction", json={"revision": now}, timeout=10)
    assert compacted.status_code == 200, compacted.text
    return version


def test_a_watch_from_a_compacted_version_is_a_410(kube_cluster: KubeCluster, stale: str) -> None:
    with kube_cluster.api_client() as client:
        pods = NodePods(client, node="nowhere", watch_timeout_seconds=5)
        with pytest.raises(ApiException) as raised:
            pods.following.watch_once(stale)
    assert raised.value.status == 410


def test_the_watch_follows_its_nodes_pods_and_relists_after_a_410(
    kube_cluster: KubeCluster, core: k8s.CoreV1Api, stale: str
) -> None:
    namespace = kube_cluster.create_namespace("pod-watch")
    node = f"watch-node-{uuid.uuid4().hex[:8]}"
    mine = _pod(core, namespace, node)
    theirs = _pod(core, namespace, f"other-{node}")
    with kube_cluster.api_client() as client:
        pods = NodePods(client, node=node, watch_timeout_seconds=5, retry_seconds=0.05)
        real_list = pods.following.list_once
        first = threading.Event()

        def list_then_resume_from_a_stale_version() -> str:
            # the first list is real, but the watch resumes from a version the apiserver has
            # dropped: what an agent that lost its connection for a long while would do
            version = real_list()
            if not first.is_set():
                first.set()
                return stale
            return version

        pods.following.list_once = list_then_resume_from_a_stale_version  # type: ignore[method-assign]
        pods.start()
        try:
            eventually(lambda: pods.relists >= 2, what="a relist after the 410")
            assert set(pods.pods()) == {mine}  # the field selector: this node's pods only
            late = _pod(core, namespace, node)
            eventually(lambda: late in pods.pods(), what="the watch after the relist")
            # a finished pod needs no disk
            name = next(
                p.metadata.name for p in core.list_namespaced_pod(namespace).items if p.metadata.uid == late
            )
            core.patch_namespaced_pod_status(name, namespace, {"status": {"phase": "Succeeded"}})
            eventually(lambda: late not in pods.pods(), what="the finished pod dropped")
            core.delete_collection_namespaced_pod(namespace, grace_period_seconds=0)
            eventually(lambda: pods.pods() == {}, what="the deletes seen")
            assert pods.relists == 2  # one relist for one 410, not a loop
            assert theirs not in pods.pods()
        finally:
            pods.stop()
