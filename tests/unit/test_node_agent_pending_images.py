"""Manifests held while their pod's disk is on its way: what a round publishes, and the mirror's wait."""

from __future__ import annotations

import threading
import time

from services.node_agent.disk_keeper import DiskKeeper, DiskRefusal
from services.node_agent.pending_images import PendingImages
from services.node_agent.pod_disks import Lookup, PodDisks
from tests.unit.test_node_agent_pod_disks import FakeEvents, FakeMatcher, FakeRegistry, _pod

NGINX = "docker.io/library/nginx"


class RecordingRegistry(FakeRegistry):
    """Records what was pending at the moment the disk was asked for."""

    def __init__(self, pending: PendingImages, refuse: DiskRefusal | None = None) -> None:
        super().__init__(refuse=refuse)
        self.pending = pending
        self.pending_at_provision: list[frozenset[str]] = []

    def provision(self, *, cache_id: str, zone: str, disk_id: str) -> str:
        self.pending_at_provision.append(self.pending.names)
        return super().provision(cache_id=cache_id, zone=zone, disk_id=disk_id)


def _disks(registry: FakeRegistry, matcher: FakeMatcher, published: list[frozenset[str]]) -> PodDisks:
    keeper = DiskKeeper(registry=registry, node="n1", zone="zone-a", grace_seconds=10, retry_seconds=5)
    return PodDisks(
        keeper=keeper,
        matcher=matcher,
        events=FakeEvents(),
        on_pending=published.append,
    )


def test_a_new_pods_repositories_are_pending_until_its_disk_is_attached() -> None:
    pending = PendingImages()
    registry = RecordingRegistry(pending)
    published: list[frozenset[str]] = []

    def publish(names: frozenset[str]) -> None:
        published.append(names)
        pending.publish(names)

    keeper = DiskKeeper(registry=registry, node="n1", zone="zone-a", grace_seconds=10, retry_seconds=5)
    disks = PodDisks(keeper=keeper, matcher=FakeMatcher(), events=FakeEvents(), on_pending=publish)
    disks.round({"uid-a": _pod("a")})
    assert published[0] == {NGINX}  # before the matcher is asked
    assert registry.pending_at_provision == [frozenset({NGINX})]  # held while the disk is made
    assert published[-1] == frozenset() and pending.names == frozenset()


def test_nothing_is_pending_for_pods_that_do_not_opt_in_or_are_not_matched_or_refused() -> None:
    published: list[frozenset[str]] = []
    disks = _disks(FakeRegistry(), FakeMatcher(answer=Lookup(why="no cache")), published)
    disks.round({"uid-off": _pod("off", {}), "uid-a": _pod("a")})
    assert published[0] == {NGINX} and published[1:] == [frozenset(), frozenset()]
    refused = DiskRefusal(code="RESOURCE_EXHAUSTED", reason="ZONE_AT_CAPACITY", message="full")
    published.clear()
    disks = _disks(FakeRegistry(refuse=refused), FakeMatcher(), published)
    disks.round({"uid-a": _pod("a")})
    assert published[-1] == frozenset()  # refused: the pod pulls, nothing waits for it
    disks.round({"uid-a": _pod("a")})  # known pod, no disk, refusal remembered: not pending
    assert published[-3:] == [frozenset()] * 3


def test_wait_returns_at_once_when_settled_and_times_out_otherwise() -> None:
    pending = PendingImages()
    assert pending.wait(NGINX, 5) is None  # not pending: no wait
    pending.publish([NGINX])
    started = time.monotonic()
    assert pending.wait(NGINX, 0.05) is False
    assert time.monotonic() - started < 5
    threading.Timer(0.05, pending.publish, args=([],)).start()
    assert pending.wait(NGINX, 30) is True
