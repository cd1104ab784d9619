"""The extender's node cache against the real kube-apiserver: a watch from a compacted version.

A watch that starts from a resourceVersion the apiserver no longer has (etcd compacted it, or it
fell out of the watch cache) gets an ERROR event with code 410 (Gone). The node cache must read
that as "relist", list again and keep following, not loop on the dead version nor go blind. The
test cluster serves node watches from etcd (see `kube_cluster`), so compacting etcd makes a real
410.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from services.extender.node_cache import NodeZoneCache
from tests.support.kube_cluster import KubeCluster
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e


def _node(name: str, zone: str) -> k8s.V1Node:
    capacity = {"cpu": "1", "memory": "1Gi", "pods": "10"}
    return k8s.V1Node(
        metadata=k8s.V1ObjectMeta(name=name, labels={"topology.kubernetes.io/zone": zone}),
        status=k8s.V1NodeStatus(capacity=capacity, allocatable=capacity),
    )


@pytest.fixture
def core(kube_cluster: KubeCluster) -> Iterator[k8s.CoreV1Api]:
    with kube_cluster.api_client() as client:
        yield k8s.CoreV1Api(client)


@pytest.fixture
def churned(kube_cluster: KubeCluster, core: k8s.CoreV1Api) -> Iterator[tuple[str, str]]:
    """A node, and a resourceVersion from before its last changes, compacted away in etcd."""
    name = f"churn-{uuid.uuid4().hex[:8]}"
    created = core.create_node(_node(name, "zone-x"))
    stale = str(created.metadata.resource_version)
    for i in range(3):
        core.patch_node(name, {"metadata": {"labels": {"snapcache-churn": str(i)}}})
    now = core.list_node().metadata.resource_version
    compacted = httpx.post(f"{kube_cluster.etcd_url}/v3/kv/compaction", json={"revision": now}, timeout=10)
    assert compacted.status_code == 200, compacted.text
    try:
        yield name, stale
    finally:
        core.delete_node(name)


def test_a_watch_from_a_compacted_version_is_a_410(
    kube_cluster: KubeCluster, churned: tuple[str, str]
) -> None:
    _, stale = churned
    with kube_cluster.api_client() as client:
        cache = NodeZoneCache(client, watch_timeout_seconds=5)
        with pytest.raises(ApiException) as raised:
            cache.following.watch_once(stale)
    assert raised.value.status == 410


def test_the_cache_relists_after_a_410_and_keeps_following(
    kube_cluster: KubeCluster, core: k8s.CoreV1Api, churned: tuple[str, str]
) -> None:
    name, stale = churned
    with kube_cluster.api_client() as client:
        cache = NodeZoneCache(client, watch_timeout_seconds=5, retry_seconds=0.05)
        real_list = cache.following.list_once
        first = threading.Event()

        def list_then_resume_from_a_stale_version() -> str:
            # The first list is real, but the watch resumes from a version the apiserver has
            # dropped since: what a cache that lost its connection for a long while would do.
            version = real_list()
            if not first.is_set():
                first.set()
                return stale
            return version

        cache.following.list_once = list_then_resume_from_a_stale_version  # type: ignore[method-assign]
        cache.start()
        try:
            eventually(lambda: cache.relists >= 2, what="a relist after the 410")
            assert cache.zone(name) == "zone-x"
            late = f"late-{uuid.uuid4().hex[:8]}"
            core.create_node(_node(late, "zone-y"))
            try:
                eventually(lambda: cache.zone(late) == "zone-y", what="the watch after the relist")
            finally:
                core.delete_node(late)
            eventually(lambda: cache.zone(late) is None, what="the delete seen")
            assert cache.relists == 2  # one relist for one 410, not a loop
        finally:
            cache.stop()
