"""The node agent on a real node: a kubelet and containerd run the pods, snapcache serves their images.

One module-scoped stack (``tests.support.node_stack``): etcd, kube-apiserver, kube-controller-
manager, kube-scheduler calling the extender, containerd and a kubelet on this machine; an
upstream ``docker-registry`` whose access log tells every blob it served; the cache registry
(local provider), the matcher, and ``snapcache node-agent`` as a process (grace period 2 s).
Two caches: ``demo/big:1.0`` (~200 MiB in five layers) and ``demo/small:1.0`` with
``demo/small2:1.0`` (small layers). Every image has a ``/pause`` top layer, so its container really runs. A third cache
holds ``team/secret:1.0`` from a registry with htpasswd auth, built with the namespace's pull
Secret (so it is recorded as private). The agent seeds containerd's snapshots from the disks, as
deployed. Between tests images (and seeded snapshots) are removed from containerd, so each pod pulls.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from snapcache.demo.oci_images import ImageSpec, LayerSpec, MiB
from tests.support.node_stack import PULL_SECRET, USE, CacheSpec, NodeStack, running_node_stack, unique

pytestmark = pytest.mark.e2e

BIG = ImageSpec(
    "demo/big",
    "1.0",
    [
        LayerSpec(80 * MiB, seed=8101),
        LayerSpec(60 * MiB, seed=8102, file_count=3),
        LayerSpec(40 * MiB, seed=8103, file_count=8),
        LayerSpec(20 * MiB, seed=8104, file_count=20),
    ],
)
SMALL = ImageSpec(
    "demo/small",
    "1.0",
    [LayerSpec(2 * MiB, seed=8201), LayerSpec(512 * 1024, seed=8202), LayerSpec(32 * 1024, seed=8203)],
)
SECRET = ImageSpec("team/secret", "1.0", [LayerSpec(3 * MiB, seed=8401), LayerSpec(128 * 1024, seed=8402)])
SMALL2 = ImageSpec("demo/small2", "1.0", [LayerSpec(1 * MiB, seed=8301), LayerSpec(256 * 1024, seed=8302)])
AUTO = {USE: "auto"}


def eventually(check: Callable[[], Any], *, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeStack]:
    with running_node_stack(
        tmp_path_factory.mktemp("real-node"),
        images=[BIG, SMALL, SMALL2],
        private_images=[SECRET],
        caches=[
            CacheSpec(["demo/big:1.0"]),
            CacheSpec(["demo/small:1.0", "demo/small2:1.0"]),
            CacheSpec(["team/secret:1.0"], private=True),
        ],
        grace_seconds=2.0,
    ) as running:
        yield running


@pytest.fixture
def clean(stack: NodeStack) -> Iterator[NodeStack]:
    """The test's pods deleted, the images forgotten and every disk released afterwards."""
    assert stack.agent.process is not None and stack.agent.process.poll() is None, stack.agent.read_log()
    yield stack
    api, core = stack.node.core()
    with api:
        names = [p.metadata.name for p in core.list_namespaced_pod(stack.namespace).items]
    for name in names:
        stack.delete_pod(
            name, force_after=20
        )  # a pod a loaded kubelet keeps must not leak into the next test
    stack.forget_images("demo/big:1.0", "demo/small:1.0", "demo/small2:1.0")
    assert stack.private is not None
    stack.forget_images("team/secret:1.0", host=stack.private.host)
    eventually(lambda: stack.disk_dirs() == [], what="every disk released", timeout=30)


def _layer_digests(stack: NodeStack, key: str) -> set[str]:
    """The image's own layers (its top ``/pause`` layer is the sandbox image's too: already there)."""
    return {layer.digest for layer in stack.images[key].layers[:-1]}


def test_a_cached_pod_runs_with_no_blob_from_upstream_and_an_uncached_one_pulls(clean: NodeStack) -> None:
    stack = clean
    big_layers = _layer_digests(stack, "demo/big:1.0")
    # no annotation: pulled from the upstream registry through the mirror, as without snapcache
    since = len(stack.upstream.read_log())
    passed_before = stack.agent.metric("snapcache_node_agent_served_bytes_total", source="upstream")
    plain = unique("plain")
    stack.pod(plain, "demo/big:1.0")
    stack.wait_running(plain, timeout=180)
    assert big_layers <= set(stack.upstream_blob_gets(since, "demo/big"))
    own_layers = sum(layer.size for layer in stack.images["demo/big:1.0"].layers[:-1])
    passed = stack.agent.metric("snapcache_node_agent_served_bytes_total", source="upstream") - passed_before
    assert passed >= own_layers  # passed through the mirror, counted as such
    assert stack.disk_dirs() == []  # nobody asked for a disk
    stack.delete_pod(plain)
    stack.forget_images("demo/big:1.0")
    assert not [n for n in stack.node.image_names() if "demo/big" in n]

    served_before = stack.agent.metric("snapcache_node_agent_served_bytes_total", source="disk")
    seeded_before = stack.agent.metric("snapcache_node_agent_seeded_layers_total", how="seeded")
    seeded_bytes_before = stack.agent.metric("snapcache_node_agent_seeded_bytes_total")
    accelerated_before = stack.agent.metric("snapcache_node_agent_pods_accelerated_total")
    since = len(stack.upstream.read_log())
    cached = unique("cached")
    stack.pod(cached, "demo/big:1.0", annotations=AUTO)
    pod = stack.wait_running(cached, timeout=180)
    assert pod.spec.node_name == stack.node.name
    assert stack.upstream_blob_gets(since, "demo/big") == []  # not one blob from upstream
    cache_id = stack.caches["demo/big:1.0"]
    assert [d for d in stack.live_disks(cache_id)] == stack.disk_dirs() and len(stack.disk_dirs()) == 1
    reasons = eventually(
        lambda: {r for r, component, _ in stack.events(cached) if component == "snapcache-node-agent"},
        what="the agent's event",
    )
    assert "ImageCacheDiskReady" in reasons
    # every layer was written into containerd's snapshotter from the disk's diffs while the kubelet
    # set up the sandbox: its pull fetched the manifest and config (from the disk) and no layer
    layers = stack.images["demo/big:1.0"].layers
    assert stack.agent.metric(
        "snapcache_node_agent_seeded_layers_total", how="seeded"
    ) - seeded_before == len(layers)
    seeded_bytes = stack.agent.metric("snapcache_node_agent_seeded_bytes_total") - seeded_bytes_before
    assert seeded_bytes >= sum(layer.uncompressed_size for layer in layers)
    assert stack.agent.metric("snapcache_node_agent_seeding_seconds_count", result="complete") >= 1
    served = stack.agent.metric("snapcache_node_agent_served_bytes_total", source="disk") - served_before
    assert 0 < served < 64 * 1024  # the manifest and the config
    assert stack.agent.metric("snapcache_node_agent_pods_accelerated_total") == accelerated_before + 1
    assert stack.agent.metric("snapcache_node_agent_disks_attached") == 1
    assert stack.agent.metric("snapcache_node_agent_provisioning_seconds_count") >= 1


def test_two_pods_of_one_cache_share_one_disk_released_after_both_are_gone(clean: NodeStack) -> None:
    stack = clean
    cache_id = stack.caches["demo/small:1.0"]
    since = len(stack.upstream.read_log())
    first, second = unique("share-1"), unique("share-2")
    stack.pod(first, "demo/small:1.0", annotations=AUTO)
    stack.wait_running(first)
    stack.pod(second, "demo/small:1.0", annotations={USE: cache_id})  # the cache by its id
    stack.wait_running(second)
    assert stack.upstream_blob_gets(since, "demo/small") == []
    (disk,) = stack.live_disks(cache_id)
    assert stack.disk_dirs() == [disk]
    for name in (first, second):
        assert "ImageCacheDiskReady" in eventually(
            lambda name=name: {r for r, _, _ in stack.events(name)}, what=f"{name}'s events"
        )
    stack.delete_pod(first)
    time.sleep(3)  # past the 2 s grace period: the other pod still uses the disk
    assert stack.live_disks(cache_id) == [disk] and stack.disk_dirs() == [disk]
    stack.delete_pod(second)
    eventually(lambda: stack.live_disks(cache_id) == [] and stack.disk_dirs() == [], what="the disk released")
    assert stack.agent.metric("snapcache_node_agent_disks_attached") == 0


def test_the_agent_killed_while_a_pod_starts_leaves_the_pod_running_and_no_disk(clean: NodeStack) -> None:
    stack = clean
    cache_id = stack.caches["demo/small:1.0"]
    name = unique("killed")
    stack.pod(name, "demo/small:1.0", annotations=AUTO)
    eventually(lambda: stack.read_pod(name).spec.node_name, what="the pod bound")
    stack.agent.kill()  # SIGKILL: the mirror containerd was told to use is gone mid-start
    pod = stack.wait_running(name)  # containerd falls back to the registry itself (hosts.toml server)
    assert pod.status.phase == "Running"
    stack.agent.start()  # same port: hosts.toml stays right; the disk (if any) is adopted
    eventually(lambda: stack.live_disks(cache_id) == stack.disk_dirs() != [], what="the pod's disk held")
    stack.delete_pod(name)
    eventually(lambda: stack.live_disks(cache_id) == [] and stack.disk_dirs() == [], what="no disk leaked")


def test_a_corrupt_blob_on_the_disk_is_detected_and_not_served(clean: NodeStack) -> None:
    stack = clean
    cache_id = stack.caches["demo/small:1.0"]
    holder = unique("holder")
    stack.pod(holder, "demo/small:1.0", annotations=AUTO)  # attaches the cache's disk
    stack.wait_running(holder)
    (disk,) = stack.disk_dirs()
    victim = stack.images["demo/small2:1.0"].layers[1]  # 256 KiB: checked whole before it is sent
    # both forms of the layer on the disk: the diff the agent seeds containerd from (the seeding
    # stops there, the layers below it seeded) and the blob the mirror serves the pull for the rest
    blobs = stack.disk_root / disk / "blobs" / "sha256"
    for digest, size in ((victim.digest, victim.size), (victim.diff_id, victim.uncompressed_size)):
        replacement = blobs / ".corrupt"
        replacement.write_bytes(b"\0" * size)  # same size, other bytes; the zone's copy is untouched
        replacement.replace(blobs / digest.removeprefix("sha256:"))
    # the agent sees the disk changed (blob directory's mtime) and reads it anew, which forgets the
    # disk's bad marks: let that happen first (rescans every 0.5 s) so the mark counted stays
    time.sleep(1.5)
    failures = stack.agent.metric("snapcache_node_agent_digest_failures_total", source="disk")
    since = len(stack.upstream.read_log())
    user = unique("user")
    stack.pod(user, "demo/small2:1.0", annotations={USE: cache_id})
    stack.wait_running(user)
    # only the corrupt blob came from upstream; the good ones from the disk
    assert stack.upstream_blob_gets(since, "demo/small2") == [victim.digest]
    assert stack.agent.metric("snapcache_node_agent_digest_failures_total", source="disk") == failures + 2
    assert stack.agent.metric("snapcache_node_agent_bad_blobs") == 2
    assert stack.agent.metric("snapcache_node_agent_seeding_seconds_count", result="partial") >= 1
    assert stack.live_disks(cache_id) == [disk]


def test_a_cached_private_image_reaches_only_a_pod_that_may_pull_it(clean: NodeStack) -> None:
    stack = clean
    assert stack.private is not None
    host = stack.private.host
    cache_id = stack.caches["team/secret:1.0"]
    # no pull secret: the matcher gives it no disk, and the registry refuses the pull

    def disk_manifests() -> float:
        return stack.agent.metric(
            "snapcache_node_agent_requests_total", kind="manifest", source="disk", code="200"
        )

    served_before = disk_manifests()
    stranger = unique("stranger")
    stack.pod(stranger, "team/secret:1.0", annotations={USE: cache_id}, host=host)

    def refused() -> str:
        statuses = stack.read_pod(stranger).status.container_statuses or []
        waiting = statuses[0].state.waiting if statuses and statuses[0].state else None
        return (
            waiting.reason
            if waiting is not None and waiting.reason in ("ErrImagePull", "ImagePullBackOff")
            else ""
        )

    eventually(refused, what="the pull refused", timeout=60)
    assert stack.disk_dirs() == []
    assert disk_manifests() == served_before  # nothing answered from a disk meanwhile
    stack.delete_pod(stranger, force=True)  # its image never pulled: nothing for the kubelet to redo
    # with the Secret: the pod runs from the disk. containerd first asks the mirror without
    # credentials (refused: the registry's challenge relayed), then with the pod's, which the
    # registry accepts: those requests are answered from the disk
    since = len(stack.private.read_log())
    refused_before = stack.agent.metric("snapcache_node_agent_private_checks_total", result="refused")
    allowed_before = stack.agent.metric("snapcache_node_agent_private_checks_total", result="allowed")
    member = unique("member")
    stack.pod(member, "team/secret:1.0", annotations={USE: cache_id}, host=host, pull_secrets=[PULL_SECRET])
    stack.wait_running(member)
    assert stack.live_disks(cache_id) == stack.disk_dirs() != []
    assert re.findall(r'"GET /v2/team/secret/blobs/', stack.private.read_log()[since:]) == []
    assert stack.agent.metric("snapcache_node_agent_private_checks_total", result="allowed") > allowed_before
    assert stack.agent.metric("snapcache_node_agent_private_checks_total", result="refused") > refused_before
    assert disk_manifests() > served_before
