"""deploy/ against the real kube-apiserver (v1.20.2) the suite starts.

Every rendered object of each overlay goes through a server-side apply: the Namespace for real
(namespaced objects cannot even be dry-run in a namespace that does not exist; applying it again
changes nothing), everything else, the CRD included, with ``--dry-run=server``, translated by `for_kube_1_20` where 1.20 lacks an API deploy/ uses for
current clusters (what those need is asserted in test_deploy_manifests.py). The server's answer
must keep every field that was sent: 1.20 silently drops fields it does not know, which would
otherwise pass a dry-run unnoticed.

RBAC is applied for real, moved into a namespace of this module's own (`relocate`), and each
ServiceAccount is asked with SubjectAccessReviews what its component needs (allowed) and a list of
what it must not do (refused).
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from tests.support.deploy_render import (
    OVERLAYS,
    Manifest,
    for_kube_1_20,
    kubectl,
    relocate,
    render,
)
from tests.support.kube_cluster import KubeCluster

pytestmark = pytest.mark.e2e

APPLIED_FIRST = ("Namespace",)
FIELD_MANAGER = "snapcache-deploy-test"
HOME = "<snapcache-system>"  # stands for the namespace the RBAC was relocated to
ELSEWHERE = "team-a"  # any other namespace (a SubjectAccessReview needs no real one)
GRANT_PROPAGATION_SECONDS = 15.0


def apply(kubeconfig: Path, objects: Sequence[Manifest], *extra: str) -> list[Manifest]:
    """``kubectl apply --server-side`` of ``objects``; the server's version of each, in order."""
    result = subprocess.run(
        [
            kubectl(),
            f"--kubeconfig={kubeconfig}",
            "apply",
            "--server-side",
            f"--field-manager={FIELD_MANAGER}",
            "--output=json",
            *extra,
            "--filename=-",
        ],
        input=yaml.safe_dump_all(objects),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl apply {' '.join(extra)} failed:\n{result.stderr}"
    answer = json.loads(result.stdout)
    items: list[Manifest] = answer["items"] if answer.get("kind") == "List" else [answer]
    assert [(i["kind"], i["metadata"]["name"]) for i in items] == [
        (o["kind"], o["metadata"]["name"]) for o in objects
    ]
    return items


def leaves(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """Paths of every leaf (scalars, empty maps and lists) of a decoded manifest."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from leaves(item, (*path, key))
    elif isinstance(value, list) and value:
        for index, item in enumerate(value):
            yield from leaves(item, (*path, index))
    else:
        yield path


def dropped_fields(sent: Manifest, kept: Manifest) -> list[str]:
    """Fields of ``sent`` the server did not keep (an API version that does not know them)."""
    missing = set(leaves(sent)) - set(leaves(kept))
    return sorted(".".join(map(str, path)) for path in missing)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_a_server_side_dry_run(
    overlay: str, kube_cluster: KubeCluster, tmp_path: Path
) -> None:
    kubeconfig = kube_cluster.write_kubeconfig(tmp_path / "kubeconfig.json")
    objects = render(overlay)
    first = [obj for obj in objects if obj["kind"] in APPLIED_FIRST]
    rest = [for_kube_1_20(obj) for obj in objects if obj["kind"] not in APPLIED_FIRST]
    # snapcache-system, and snapcache-node for the node agent
    assert sorted(obj["metadata"]["name"] for obj in first) == ["snapcache-node", "snapcache-system"]
    applied = apply(kubeconfig, first)
    checked = apply(kubeconfig, rest, "--dry-run=server")
    dropped = {
        f"{sent['kind']}/{sent['metadata']['name']}": fields
        for sent, kept in zip([*first, *rest], [*applied, *checked], strict=True)
        if (fields := dropped_fields(sent, kept))
    }
    assert dropped == {}


@dataclass(frozen=True)
class Access:
    """One request a ServiceAccount may or may not make (`HOME`: snapcache's own namespace)."""

    verb: str
    resource: str
    group: str = ""
    namespace: str = ""
    name: str = ""
    subresource: str = ""

    def __str__(self) -> str:
        resource = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        where = f" in {self.namespace}" if self.namespace else ""
        return f"{self.verb} {self.group or 'core'}/{resource}{' ' + self.name if self.name else ''}{where}"


# What each component does with the Kubernetes API (allowed), and what it must be refused.
ACCESS: dict[str, tuple[list[Access], list[Access]]] = {
    "registry": (
        [
            Access("get", "secrets", namespace=ELSEWHERE),
            Access("get", "secrets", namespace=HOME),
            Access("create", "tokenreviews", group="authentication.k8s.io"),  # serve --token-review
        ],
        [
            Access("create", "subjectaccessreviews", group="authorization.k8s.io"),
            Access("list", "secrets", namespace=ELSEWHERE),
            Access("list", "secrets"),
            Access("watch", "secrets", namespace=ELSEWHERE),
            Access("create", "secrets", namespace=HOME),
            Access("update", "secrets", namespace=ELSEWHERE),
            Access("get", "configmaps", namespace=ELSEWHERE),
            Access("list", "nodes"),
            Access("patch", "nodes"),
            Access("create", "events", namespace=ELSEWHERE),
            Access("list", "imagecaches", group="snapcache.io"),
        ],
    ),
    "extender": (
        [
            Access("list", "nodes"),
            Access("watch", "nodes"),
            Access("create", "events", namespace=ELSEWHERE),
            Access("create", "events", namespace=HOME),
        ],
        [
            Access("get", "secrets", namespace=ELSEWHERE),
            Access("list", "secrets"),
            Access("patch", "nodes"),
            Access("update", "nodes"),
            Access("delete", "nodes"),
            Access("get", "pods", namespace=ELSEWHERE),
            Access("delete", "pods", namespace=ELSEWHERE),
            Access("create", "pods", namespace=ELSEWHERE, subresource="binding", name="p"),
            Access("patch", "events", namespace=ELSEWHERE),
            Access("list", "imagecaches", group="snapcache.io"),
        ],
    ),
    "node-agent": (
        [
            # its node's pods (it asks with fieldSelector=spec.nodeName; RBAC cannot narrow by field)
            Access("list", "pods"),
            Access("watch", "pods"),
            Access("get", "nodes", name="node-1"),  # its zone label
            Access("create", "events", namespace=ELSEWHERE),
        ],
        [
            Access("get", "secrets", namespace=ELSEWHERE),
            Access("list", "secrets"),
            Access("list", "nodes"),
            Access("patch", "nodes", name="node-1"),
            Access("create", "pods", namespace=ELSEWHERE),
            Access("delete", "pods", namespace=ELSEWHERE),
            Access("patch", "pods", namespace=ELSEWHERE, name="p"),
            Access("patch", "pods", namespace=ELSEWHERE, subresource="status", name="p"),
            Access("patch", "events", namespace=ELSEWHERE),
            Access("list", "imagecaches", group="snapcache.io"),
        ],
    ),
    "matcher": (
        [],
        [
            Access("get", "secrets", namespace=HOME),
            Access("list", "nodes"),
            Access("get", "pods", namespace=ELSEWHERE),
            Access("create", "events", namespace=ELSEWHERE),
            Access("get", "configmaps", namespace=HOME),
            Access("create", "leases", group="coordination.k8s.io", namespace=HOME),
            Access("list", "imagecaches", group="snapcache.io"),
        ],
    ),
    "operator": (
        [
            Access("list", "imagecaches", group="snapcache.io"),
            Access("watch", "imagecaches", group="snapcache.io"),
            Access("patch", "imagecaches", group="snapcache.io", name="web"),
            Access("patch", "imagecaches", group="snapcache.io", name="web", subresource="status"),
            Access("update", "imagecaches", group="snapcache.io", name="web", subresource="finalizers"),
            # events of a cluster-scoped ImageCache live in namespace default
            Access("create", "events", namespace="default"),
            Access("patch", "events", namespace="default"),
        ],
        [
            Access("get", "secrets", namespace=ELSEWHERE),
            Access("list", "secrets"),
            Access("create", "imagecaches", group="snapcache.io"),
            Access("delete", "imagecaches", group="snapcache.io", name="web"),
            Access("list", "nodes"),
            Access("get", "pods", namespace=ELSEWHERE),
            Access("create", "leases", group="coordination.k8s.io", namespace=HOME),
            Access("update", "customresourcedefinitions", group="apiextensions.k8s.io"),
        ],
    ),
    "scheduler": (
        [
            Access("create", "pods", namespace=ELSEWHERE, subresource="binding", name="p"),
            Access("list", "nodes"),
            Access("watch", "pods"),
            Access("patch", "pods", namespace=ELSEWHERE, subresource="status", name="p"),
            Access("create", "leases", group="coordination.k8s.io", namespace=HOME),
            Access("get", "leases", group="coordination.k8s.io", namespace=HOME, name="snapcache-scheduler"),
            Access(
                "update", "leases", group="coordination.k8s.io", namespace=HOME, name="snapcache-scheduler"
            ),
            Access("get", "configmaps", namespace="kube-system", name="extension-apiserver-authentication"),
        ],
        [
            Access("get", "secrets", namespace=ELSEWHERE),
            Access("update", "leases", group="coordination.k8s.io", namespace=HOME, name="another-lease"),
            Access("get", "configmaps", namespace="kube-system", name="kube-proxy"),
            Access("create", "pods", namespace=ELSEWHERE),
            Access("delete", "nodes"),
            Access("list", "imagecaches", group="snapcache.io"),
        ],
    ),
}


@dataclass(frozen=True)
class Grants:
    """deploy/'s RBAC, applied for real under a namespace of its own."""

    namespace: str
    cluster: KubeCluster

    def allowed(self, service_account: str, access: Access) -> bool:
        namespace = self.namespace if access.namespace == HOME else access.namespace
        review = k8s.V1SubjectAccessReview(
            spec=k8s.V1SubjectAccessReviewSpec(
                user=f"system:serviceaccount:{self.namespace}:{service_account}",
                # the groups the apiserver gives a ServiceAccount token, so group grants count too
                groups=[
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{self.namespace}",
                    "system:authenticated",
                ],
                resource_attributes=k8s.V1ResourceAttributes(
                    verb=access.verb,
                    group=access.group,
                    resource=access.resource,
                    subresource=access.subresource or None,
                    namespace=namespace or None,
                    name=access.name or None,
                ),
            )
        )
        with self.cluster.api_client() as client:
            answer = k8s.AuthorizationV1Api(client).create_subject_access_review(review)
        assert answer.status is not None
        return bool(answer.status.allowed)


@pytest.fixture(scope="module")
def grants(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Grants:
    namespace = kube_cluster.create_namespace("snapcache-rbac")
    suffix = "-" + uuid.uuid4().hex[:8]
    rbac = relocate(render("embedded"), namespace=namespace, suffix=suffix)
    assert relocate(render("ha"), namespace=namespace, suffix=suffix) == rbac  # one RBAC for both
    kubeconfig = kube_cluster.write_kubeconfig(tmp_path_factory.mktemp("rbac") / "kubeconfig.json")
    apply(kubeconfig, rbac)
    return Grants(namespace=namespace, cluster=kube_cluster)


@pytest.mark.parametrize("component", list(ACCESS))
def test_service_account_can_do_its_job_and_nothing_else(grants: Grants, component: str) -> None:
    service_account = f"snapcache-{component}"
    needed, refused = ACCESS[component]
    # RBAC reaches the authorizer through its informers: wait until every needed grant is seen
    # (which also proves the bindings are in force before any refusal below is believed)
    deadline = time.monotonic() + GRANT_PROPAGATION_SECONDS
    missing = list(needed)
    while missing:
        missing = [access for access in missing if not grants.allowed(service_account, access)]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [str(a) for a in missing] == [], f"{service_account} cannot do what it needs"
    granted = [str(access) for access in refused if grants.allowed(service_account, access)]
    assert granted == [], f"{service_account} may do more than it needs"
