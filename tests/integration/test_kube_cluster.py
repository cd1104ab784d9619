"""The test control plane itself: the apiserver answers as configured, kube-scheduler binds pods."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tests.support.kube_cluster import KubeCluster

pytestmark = pytest.mark.e2e


def test_apiserver_enforces_rbac_for_the_limited_user(kube_cluster: KubeCluster, tmp_path: Path) -> None:
    namespace = kube_cluster.create_namespace("rbac")
    with kube_cluster.api_client(user="limited") as client, pytest.raises(ApiException) as caught:
        k8s.CoreV1Api(client).list_namespaced_secret(namespace)
    assert caught.value.status == 403
    with kube_cluster.api_client() as client:
        assert k8s.VersionApi(client).get_code().git_version == "v1.20.2"
    kubeconfig = kube_cluster.write_kubeconfig(tmp_path / "kubeconfig")
    assert str(kube_cluster.ca_path) in kubeconfig.read_text()


def _node(name: str) -> k8s.V1Node:
    capacity = {"cpu": "4", "memory": "8Gi", "pods": "110"}
    return k8s.V1Node(
        metadata=k8s.V1ObjectMeta(name=name, labels={"kubernetes.io/hostname": name}),
        status=k8s.V1NodeStatus(
            capacity=capacity,
            allocatable=capacity,
            conditions=[k8s.V1NodeCondition(type="Ready", status="True")],
        ),
    )


def test_scheduler_starts_healthy_and_binds_a_pod_to_a_node(
    kube_cluster: KubeCluster, tmp_path: Path
) -> None:
    config = kube_cluster.write_scheduler_config(tmp_path / "scheduler.yaml")
    scheduler = kube_cluster.start_scheduler(config)
    try:
        response = httpx.get(scheduler.healthz_url, verify=False, timeout=5)  # curl -k
        assert response.status_code == 200 and response.text == "ok"

        namespace = kube_cluster.create_namespace("sched")
        node_name = f"node-{uuid.uuid4().hex[:8]}"
        with kube_cluster.api_client() as client:
            core = k8s.CoreV1Api(client)
            created = core.create_node(_node(node_name))  # status is accepted on create
            assert created.status.allocatable["cpu"] == "4"
            try:
                core.create_namespaced_pod(
                    namespace,
                    k8s.V1Pod(
                        metadata=k8s.V1ObjectMeta(name="app"),
                        spec=k8s.V1PodSpec(
                            # other tests may add nodes to the shared cluster: pin the choice
                            node_selector={"kubernetes.io/hostname": node_name},
                            containers=[k8s.V1Container(name="app", image="demo/web:1.0")],
                        ),
                    ),
                )
                deadline = time.monotonic() + 30
                bound = ""
                while time.monotonic() < deadline and not bound:
                    bound = core.read_namespaced_pod("app", namespace).spec.node_name or ""
                    time.sleep(0.1)
                assert bound == node_name, scheduler.process.read_log()
                reasons = [e.reason for e in core.list_namespaced_event(namespace).items]
                assert "Scheduled" in reasons
            finally:
                core.delete_node(node_name)
    finally:
        kube_cluster.stop_scheduler(scheduler)
    assert not scheduler.process.alive()
