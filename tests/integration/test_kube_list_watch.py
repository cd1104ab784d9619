"""The one list + watch loop (snapcache.kube_list_watch) against the real kube-apiserver.

It follows the ConfigMaps of a namespace of its own into a recording target: the list arrives
whole, then every change as an event; a watch that starts from a version etcd compacted away is
a 410 and one relist, after which it keeps following; a target that raises gets a fresh list;
stop ends the watch at once. The test cluster serves watches from etcd (see `kube_cluster`), so
compacting etcd makes a real 410.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx
import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from snapcache.kube_list_watch import ListWatch
from tests.support.kube_cluster import KubeCluster
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e


class Recorder:
    """A target that keeps name -> data, and counts what it was given."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, str]] = {}
        self.lists: list[list[str]] = []
        self.events: list[tuple[str, str]] = []
        self.fail_next_event = False
        self._lock = threading.Lock()

    def replace(self, items: Sequence[Mapping[str, Any]]) -> None:
        with self._lock:
            self.objects = {i["metadata"]["name"]: dict(i.get("data") or {}) for i in items}
            self.lists.append(sorted(self.objects))

    def apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        if self.fail_next_event:
            self.fail_next_event = False
            raise RuntimeError("a bug in the target")
        name = obj["metadata"]["name"]
        with self._lock:
            self.events.append((kind, name))
            if kind == "DELETED":
                self.objects.pop(name, None)
            else:
                self.objects[name] = dict(obj.get("data") or {})

    def data(self, name: str) -> dict[str, str] | None:
        with self._lock:
            return self.objects.get(name)


@pytest.fixture
def namespace(kube_cluster: KubeCluster) -> str:
    return kube_cluster.create_namespace("list-watch")


@pytest.fixture
def core(kube_cluster: KubeCluster) -> Iterator[k8s.CoreV1Api]:
    with kube_cluster.api_client() as client:
        yield k8s.CoreV1Api(client)


def _config_map(name: str, value: str) -> k8s.V1ConfigMap:
    return k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=name), data={"value": value})


def _loop(core: k8s.CoreV1Api, namespace: str, target: Recorder, **options: Any) -> ListWatch:
    return ListWatch(
        core.list_namespaced_config_map, target, what="config maps", list_args=(namespace,), **options
    )


def test_a_list_then_every_change_as_an_event(core: k8s.CoreV1Api, namespace: str) -> None:
    core.create_namespaced_config_map(namespace, _config_map("before", "1"))
    target = Recorder()
    loop = _loop(core, namespace, target, watch_timeout_seconds=5)
    loop.start()
    try:
        assert loop.wait_synced(20)
        assert target.lists == [["before"]]
        core.create_namespaced_config_map(namespace, _config_map("after", "2"))
        core.patch_namespaced_config_map("before", namespace, {"data": {"value": "3"}})
        core.delete_namespaced_config_map("after", namespace)
        eventually(lambda: ("DELETED", "after") in target.events, what="the delete")
        assert target.events == [("ADDED", "after"), ("MODIFIED", "before"), ("DELETED", "after")]
        assert target.objects == {"before": {"value": "3"}}
        assert loop.relists == 1  # watches that time out resume; they do not relist
    finally:
        started = time.monotonic()
        loop.stop()
        assert time.monotonic() - started < 3  # the watch is ended, not waited out


class PodRecorder(Recorder):
    """Pods by name, with their annotations as data."""

    def replace(self, items: Sequence[Mapping[str, Any]]) -> None:
        super().replace(
            [{"metadata": i["metadata"], "data": i["metadata"].get("annotations")} for i in items]
        )

    def apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        super().apply(kind, {"metadata": obj["metadata"], "data": obj["metadata"].get("annotations")})


def _pod(name: str, value: str) -> k8s.V1Pod:
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=name, annotations={"value": value}),
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="c", image="example.com/never-pulled:1")]),
    )


def test_a_compacted_version_is_a_410_then_one_relist(
    kube_cluster: KubeCluster, core: k8s.CoreV1Api, namespace: str
) -> None:
    # pods, as the test cluster serves their watches from etcd (no watch cache to hide the 410)
    created = core.create_namespaced_pod(namespace, _pod("churn", "0"))
    stale = str(created.metadata.resource_version)
    for i in range(3):
        core.patch_namespaced_pod("churn", namespace, {"metadata": {"annotations": {"value": str(i + 1)}}})
    now = core.list_namespaced_pod(namespace).metadata.resource_version
    compacted = httpx.post(f"{kube_cluster.etcd_url}/v3/kv/compaction", json={"revision": now}, timeout=10)
    assert compacted.status_code == 200, compacted.text

    target = PodRecorder()
    loop = ListWatch(
        core.list_namespaced_pod,
        target,
        what="pods",
        list_args=(namespace,),
        watch_timeout_seconds=5,
        retry_seconds=0.05,
    )
    with pytest.raises(ApiException) as raised:
        loop.watch_once(stale)
    assert raised.value.status == 410

    real_list = loop.list_once
    first = threading.Event()

    def list_then_resume_from_a_stale_version() -> str:
        # the first list is real, but the watch resumes from a version the apiserver has dropped
        # since: what a loop that lost its connection for a long while would do
        version = real_list()
        if not first.is_set():
            first.set()
            return stale
        return version

    loop.list_once = list_then_resume_from_a_stale_version  # type: ignore[method-assign]
    loop.start()
    try:
        eventually(lambda: loop.relists >= 2, what="a relist after the 410")
        assert target.data("churn") == {"value": "3"}
        core.create_namespaced_pod(namespace, _pod("late", "x"))
        eventually(lambda: target.data("late") == {"value": "x"}, what="the watch after the relist")
        assert loop.relists == 2  # one relist for one 410, not a loop
    finally:
        loop.stop()
        for name in ("churn", "late"):
            core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)


def test_a_target_that_raises_gets_a_fresh_list(core: k8s.CoreV1Api, namespace: str) -> None:
    target = Recorder()
    loop = _loop(core, namespace, target, watch_timeout_seconds=5, retry_seconds=0.05)
    loop.start()
    try:
        assert loop.wait_synced(20)
        target.fail_next_event = True
        core.create_namespaced_config_map(namespace, _config_map("lost", "1"))
        eventually(lambda: loop.relists == 2, what="the relist after the target's failure")
        assert target.data("lost") == {"value": "1"}  # the event it dropped came back by the list
        core.create_namespaced_config_map(namespace, _config_map("next", "2"))
        eventually(lambda: target.data("next") == {"value": "2"}, what="following after the relist")
    finally:
        loop.stop()


def test_without_access_it_keeps_retrying_and_never_syncs(kube_cluster: KubeCluster, namespace: str) -> None:
    with kube_cluster.api_client(user="limited") as client:
        target = Recorder()
        loop = ListWatch(
            k8s.CoreV1Api(client).list_namespaced_config_map,
            target,
            what="config maps",
            list_args=(namespace,),
            retry_seconds=0.05,
            max_retry_seconds=0.1,
        )
        loop.start()
        try:
            assert not loop.wait_synced(1.0)  # 403 after 403, retried, not given up
            assert loop.relists == 0 and target.lists == []
        finally:
            loop.stop()
