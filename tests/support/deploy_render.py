"""deploy/ rendered as a cluster would get it: ``kubectl kustomize`` of each overlay, as plain dicts.

Shared by the pure manifest tests and the ones against the real kube-apiserver. Also the two
honest translations those tests need: `for_kube_1_20` (the test apiserver is v1.20.2, deploy/
targets current clusters) and `relocate` (RBAC applied for real into the shared test cluster under
names of its own).
"""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = ("embedded", "ha")
NAMESPACE = "snapcache-system"
NODE_NAMESPACE = "snapcache-node"  # the node agent alone: its pods need the host

Manifest = dict[str, Any]

RBAC_KINDS = ("ServiceAccount", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}


def kubectl() -> str:
    """Path of kubectl (it renders kustomize the way `kubectl apply -k` does), or fail saying so."""
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl is not installed: the deploy/ tests render the overlays with `kubectl kustomize` "
            "(any kubectl 1.27+, e.g. Debian's or the distribution's kubectl package)",
            pytrace=False,
        )
    return path


@functools.cache
def _render(overlay: str) -> tuple[Manifest, ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize deploy/overlays/{overlay} failed:\n{result.stderr}", pytrace=False)
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(overlay: str) -> list[Manifest]:
    """The overlay's objects (a fresh copy each call: tests may change what they get)."""
    return copy.deepcopy(list(_render(overlay)))


def find(objects: Sequence[Manifest], kind: str, name: str) -> Manifest:
    """The one object of ``kind`` named ``name`` (a ConfigMap may carry kustomize's hash suffix)."""
    found = [
        obj
        for obj in objects
        if obj["kind"] == kind
        and (
            obj["metadata"]["name"] == name
            or (kind == "ConfigMap" and obj["metadata"]["name"].startswith(f"{name}-"))
        )
    ]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def of_kind(objects: Sequence[Manifest], kind: str) -> list[Manifest]:
    """Every object of ``kind``."""
    return [obj for obj in objects if obj["kind"] == kind]


def containers(deployment: Manifest) -> list[Manifest]:
    """The init and regular containers of a Deployment's pod template."""
    spec = deployment["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _probes(deployment: Manifest) -> Iterator[Manifest]:
    for container in containers(deployment):
        for key in ("startupProbe", "readinessProbe", "livenessProbe"):
            if key in container:
                yield container[key]


def for_kube_1_20(obj: Manifest) -> Manifest:
    """``obj`` as the v1.20.2 test apiserver can check it; everything else is left as it is.

    - ``policy/v1`` PodDisruptionBudget is served from 1.21 on; 1.20 has the same spec
      (minAvailable, selector) under ``policy/v1beta1``.
    - ``grpc`` probes are 1.24+: 1.20 would silently drop the field and then refuse the probe for
      having no handler. A ``tcpSocket`` probe on the same port keeps the rest of the probe
      (timings, thresholds) under the server's validation.

    What current clusters need (policy/v1, grpc probes naming the real health services) is
    asserted separately, on the untranslated objects.
    """
    converted = copy.deepcopy(obj)
    if converted["kind"] == "PodDisruptionBudget" and converted["apiVersion"] == "policy/v1":
        converted["apiVersion"] = "policy/v1beta1"
    if converted["kind"] == "Deployment":
        for probe in _probes(converted):
            if "grpc" in probe:
                probe["tcpSocket"] = {"port": probe.pop("grpc")["port"]}
    return converted


def relocate(objects: Sequence[Manifest], *, namespace: str, suffix: str) -> list[Manifest]:
    """The RBAC objects among ``objects``, moved from snapcache-system (and snapcache-node) to ``namespace``.

    Cluster-scoped roles and bindings of snapcache's own get ``suffix`` (and references to them
    follow), so several runs against one shared cluster never touch each other's grants. Roles of
    the cluster (``system:kube-scheduler``) and other namespaces (``kube-system``) stay as they are.
    """
    rbac = [copy.deepcopy(obj) for obj in objects if obj["kind"] in RBAC_KINDS]
    own_cluster_roles = {obj["metadata"]["name"] for obj in rbac if obj["kind"] == "ClusterRole"}
    for obj in rbac:
        metadata = obj["metadata"]
        if metadata.get("namespace") in (NAMESPACE, NODE_NAMESPACE):
            metadata["namespace"] = namespace
        if obj["kind"] in CLUSTER_SCOPED:
            metadata["name"] += suffix
        elif obj["kind"] in ("Role", "RoleBinding") and metadata.get("namespace") != namespace:
            metadata["name"] += suffix  # e.g. the scheduler's RoleBinding in kube-system
        if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            for subject in obj.get("subjects", []):
                if subject.get("namespace") in (NAMESPACE, NODE_NAMESPACE):
                    subject["namespace"] = namespace
            role_ref = obj["roleRef"]
            if role_ref["kind"] == "ClusterRole" and role_ref["name"] in own_cluster_roles:
                role_ref["name"] += suffix
    return rbac


def quantity(text: str | int | float) -> float:
    """A Kubernetes resource quantity (``250m``, ``2``, ``512Mi``, ``2Gi``) as a number."""
    value = str(text)
    suffixes = {
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    for suffix in sorted(suffixes, key=len, reverse=True):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * suffixes[suffix]
    return float(value)
