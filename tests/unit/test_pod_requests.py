"""The pod opt-in grammar on the ground floor, as the node agent reads a Pod from the API server."""

from __future__ import annotations

from typing import Any

import pytest

from snapcache.pod_requests import Mode, pod_info, pod_request


def _pod(annotations: Any = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"uid": "u-1", "namespace": "ns", "name": "web", "annotations": annotations},
        "spec": spec,
    }


def test_a_pod_object_is_read_with_its_containers_in_order() -> None:
    info = pod_info(
        _pod(
            {"snapcache.io/use-image-cache": "auto", "other": 3},
            initContainers=[{"name": "init", "image": "busybox"}],
            containers=[{"name": "app", "image": "nginx:1.25"}, "junk"],
        )
    )
    assert (info.uid, info.namespace, info.name) == ("u-1", "ns", "web")
    assert info.annotations == {"snapcache.io/use-image-cache": "auto"}  # a non-string value is dropped
    assert info.init_images == (("init", "busybox"),)
    assert info.images == (("app", "nginx:1.25"),)
    request = pod_request(info, default_mode=Mode.OFF)
    assert request.wants_cache
    assert request.images == ("docker.io/library/busybox:latest", "docker.io/library/nginx:1.25")


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({}, ("", "", "", (), ())),
        ({"metadata": "x", "spec": []}, ("", "", "", (), ())),
        ({"metadata": {"name": 5}, "spec": {"containers": {"a": 1}}}, ("", "", "", (), ())),
    ],
)
def test_a_malformed_pod_reads_as_empty_fields(
    document: dict[str, Any], expected: tuple[object, ...]
) -> None:
    info = pod_info(document)
    assert (info.uid, info.namespace, info.name, info.init_images, info.images) == expected
    assert pod_request(info, default_mode=Mode.AUTO).problem == "the pod has no container images"


def test_an_empty_image_makes_the_pod_pull() -> None:
    info = pod_info(
        _pod({"eks.tke.cloud.tencent.com/use-image-cache": "imc-0000000a"}, containers=[{"name": "a"}])
    )
    request = pod_request(info, default_mode=Mode.OFF)
    assert request.mode is Mode.MANUAL and request.manual_id == "imc-0000000a"
    assert not request.wants_cache and "not valid" in request.problem


@pytest.mark.parametrize(
    ("pull_secrets", "expected"),
    [
        ([{"name": "team-pull"}, {"name": "shared"}], ("team-pull", "shared")),
        ([{"name": "a"}, {"name": "a"}, {"name": "b"}], ("a", "b")),  # distinct, first order kept
        ([{"name": ""}, {"name": 7}, "b", {}, None, {"name": "ok"}], ("ok",)),  # unusable entries
        ({"name": "not-a-list"}, ()),
        (None, ()),
    ],
)
def test_image_pull_secrets_are_read_into_the_request(pull_secrets: Any, expected: tuple[str, ...]) -> None:
    info = pod_info(
        _pod(
            {"snapcache.io/use-image-cache": "auto"},
            containers=[{"name": "app", "image": "nginx:1.25"}],
            imagePullSecrets=pull_secrets,
        )
    )
    assert info.image_pull_secrets == expected
    request = pod_request(info, default_mode=Mode.OFF)
    assert (request.namespace, request.image_pull_secrets) == ("ns", expected)


def test_a_manual_request_carries_the_pods_namespace_and_pull_secrets() -> None:
    info = pod_info(
        _pod(
            {"snapcache.io/use-image-cache": "imc-0000000a"},
            containers=[{"name": "app", "image": "registry.example.com/team/app:2"}],
            imagePullSecrets=[{"name": "team-pull"}],
        )
    )
    request = pod_request(info, default_mode=Mode.OFF)
    assert request.mode is Mode.MANUAL
    assert (request.namespace, request.image_pull_secrets) == ("ns", ("team-pull",))
