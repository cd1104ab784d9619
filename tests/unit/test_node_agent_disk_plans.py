"""The node agent's disk planning: one disk per cache per node, shared, released after a grace period."""

from __future__ import annotations

import re

import pytest

from services.node_agent.disk_plans import DiskPlan, NodeDisk, disk_id_for, plan_disks

A, B, C = "imc-aaaaaaaa", "imc-bbbbbbbb", "imc-cccccccc"
GRACE = 60.0
NOW = 1000.0


def disk(cache_id: str, idle_since: float | None = None, suffix: str = "n1") -> NodeDisk:
    return NodeDisk(cache_id=cache_id, disk_id=f"{cache_id}-{suffix}", idle_since=idle_since)


@pytest.mark.parametrize(
    ("wanted", "disks", "retry_at", "expected"),
    [
        pytest.param({}, [], {}, DiskPlan(), id="nothing-wanted-nothing-held"),
        pytest.param({"p1": A}, [], {}, DiskPlan(provision=(A,)), id="first-pod-provisions"),
        pytest.param(
            {"p1": A, "p2": A, "p3": B}, [], {}, DiskPlan(provision=(A, B)), id="one-disk-per-cache-shared"
        ),
        pytest.param({"p1": ""}, [], {}, DiskPlan(), id="pod-without-cache"),
        pytest.param({"p1": A}, [disk(A)], {}, DiskPlan(keep=(disk(A),)), id="held-and-used"),
        pytest.param(
            {"p1": A}, [disk(A, idle_since=NOW - 30)], {}, DiskPlan(keep=(disk(A),)), id="reused-within-grace"
        ),
        pytest.param(
            {}, [disk(A)], {}, DiskPlan(keep=(disk(A, idle_since=NOW),)), id="last-pod-gone-clock-starts"
        ),
        pytest.param(
            {},
            [disk(A, idle_since=NOW - 59)],
            {},
            DiskPlan(keep=(disk(A, idle_since=NOW - 59),)),
            id="in-grace",
        ),
        pytest.param(
            {}, [disk(A, idle_since=NOW - 60)], {}, DiskPlan(release=(disk(A, NOW - 60),)), id="grace-over"
        ),
        pytest.param(
            {"p1": A},
            [disk(A, suffix="n1"), disk(A, suffix="n2", idle_since=NOW - 100)],
            {},
            DiskPlan(keep=(disk(A, suffix="n1"),), release=(disk(A, suffix="n2", idle_since=NOW - 100),)),
            id="duplicate-disk-of-a-cache-goes",
        ),
        pytest.param(
            {"p1": A, "p2": C}, [], {A: NOW + 5}, DiskPlan(provision=(C,)), id="failed-cache-backs-off"
        ),
        pytest.param({"p1": A}, [], {A: NOW}, DiskPlan(provision=(A,)), id="backoff-over"),
    ],
)
def test_plan_disks(
    wanted: dict[str, str], disks: list[NodeDisk], retry_at: dict[str, float], expected: DiskPlan
) -> None:
    assert plan_disks(wanted=wanted, disks=disks, now=NOW, grace_seconds=GRACE, retry_at=retry_at) == expected


def test_a_disk_released_only_once_its_grace_ran_out_over_rounds() -> None:
    disks = [disk(A)]
    for now, released in ((NOW, False), (NOW + 30, False), (NOW + 59.9, False), (NOW + 60, True)):
        plan = plan_disks(wanted={}, disks=disks, now=now, grace_seconds=GRACE)
        assert bool(plan.release) is released
        disks = list(plan.keep)


@pytest.mark.parametrize(
    "node",
    ["worker-1", "ip-10-0-0-1.eu-west-1.compute.internal", "N" * 253, "a.b", "a-b", "-x-", "ÄÖ"],
)
def test_disk_ids_fit_the_registry_grammar_and_are_stable(node: str) -> None:
    disk_id = disk_id_for(cache_id=A, node=node)
    assert re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", disk_id), disk_id
    assert disk_id.startswith(A + "-")
    assert disk_id == disk_id_for(cache_id=A, node=node)
    assert disk_id != disk_id_for(cache_id=B, node=node)


def test_node_names_that_fold_alike_get_different_disks() -> None:
    assert disk_id_for(cache_id=A, node="a.b") != disk_id_for(cache_id=A, node="a-b")
    assert disk_id_for(cache_id=A, node="x" * 100 + "1") != disk_id_for(cache_id=A, node="x" * 100 + "2")
