"""The provisioning round's pure core: one matcher call per pod, disks through the keeper, one event per outcome."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.node_agent.disk_keeper import DiskKeeper, DiskRefusal
from services.node_agent.pod_disks import FAILED, MATCHER_UNAVAILABLE, READY, Lookup, PodDisks
from snapcache.pod_requests import Mode, PodInfo, PodRequest

CACHE = "imc-0000000a"


@dataclass
class FakeRegistry:
    refuse: DiskRefusal | None = None
    provisioned: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)

    def provision(self, *, cache_id: str, zone: str, disk_id: str) -> str:
        if self.refuse is not None:
            raise self.refuse
        self.provisioned.append(disk_id)
        return f"/disks/{disk_id}"

    def release(self, *, cache_id: str, disk_id: str) -> bool:
        self.released.append(disk_id)
        return True


@dataclass
class FakeMatcher:
    answer: Lookup = field(default_factory=lambda: Lookup(cache_id=CACHE))
    asked: list[PodRequest] = field(default_factory=list)

    def lookup(self, request: PodRequest, *, zone: str) -> Lookup:
        assert zone == "zone-a"
        self.asked.append(request)
        return self.answer


@dataclass
class FakeEvents:
    sent: list[tuple[str, str, bool]] = field(default_factory=list)

    def emit(self, pod: PodInfo, *, reason: str, message: str, warning: bool) -> None:
        self.sent.append((pod.name, reason, warning))


def _pod(name: str, annotations: dict[str, str] | None = None) -> PodInfo:
    return PodInfo(
        uid=f"uid-{name}",
        namespace="ns",
        name=name,
        annotations=annotations if annotations is not None else {"snapcache.io/use-image-cache": "auto"},
        init_images=(),
        images=(("app", "nginx:1.25"),),
    )


def _world(
    registry: FakeRegistry, matcher: FakeMatcher, **options: object
) -> tuple[PodDisks, FakeEvents, list[float], list[str]]:
    clock = [0.0]
    events = FakeEvents()
    failures: list[str] = []
    keeper = DiskKeeper(
        registry=registry, node="n1", zone="zone-a", grace_seconds=10, retry_seconds=5, clock=lambda: clock[0]
    )
    disks = PodDisks(
        keeper=keeper,
        matcher=matcher,
        events=events,
        retry_seconds=3,
        clock=lambda: clock[0],
        on_failure=failures.append,
        **options,  # type: ignore[arg-type]
    )
    return disks, events, clock, failures


def test_pods_of_one_cache_share_a_disk_and_each_is_told_once() -> None:
    registry, matcher = FakeRegistry(), FakeMatcher()
    disks, events, clock, _ = _world(registry, matcher)
    a, b = _pod("a"), _pod("b")
    disks.round({a.uid: a})
    disks.round({a.uid: a, b.uid: b})
    disks.round({a.uid: a, b.uid: b})
    assert len(registry.provisioned) == 1 and len(matcher.asked) == 2  # once per pod, not per round
    assert events.sent == [("a", READY, False), ("b", READY, False)]
    disks.round({})
    clock[0] = 10.0
    disks.round({})
    assert registry.released == registry.provisioned


def test_a_pod_that_did_not_opt_in_is_not_asked_about_unless_the_default_is_auto() -> None:
    plain = _pod("plain", annotations={})
    matcher = FakeMatcher()
    disks, events, _, _ = _world(FakeRegistry(), matcher)
    disks.round({plain.uid: plain})
    assert matcher.asked == [] and events.sent == [] and disks.wanted() == {plain.uid: ""}
    auto, _, _, _ = _world(FakeRegistry(), matcher, default_mode=Mode.AUTO)
    auto.round({plain.uid: plain})
    assert len(matcher.asked) == 1


def test_a_refused_disk_is_a_warning_once_and_the_pod_pulls() -> None:
    refusal = DiskRefusal(code="RESOURCE_EXHAUSTED", reason="ZONE_CAPACITY_EXHAUSTED", message="full")
    registry = FakeRegistry(refuse=refusal)
    disks, events, clock, _ = _world(registry, FakeMatcher())
    a = _pod("a")
    disks.round({a.uid: a})
    clock[0] = 6.0
    disks.round({a.uid: a})
    assert events.sent == [("a", FAILED, True)]
    registry.refuse = None
    clock[0] = 12.0
    disks.round({a.uid: a})
    assert events.sent[-1] == ("a", READY, False)


def test_a_matcher_that_cannot_answer_is_asked_again_later() -> None:
    matcher = FakeMatcher(answer=Lookup(known=False, why="matcher call failed: UNAVAILABLE"))
    disks, events, clock, failures = _world(FakeRegistry(), matcher)
    a = _pod("a")
    disks.round({a.uid: a})
    disks.round({a.uid: a})
    assert len(matcher.asked) == 1 and failures == [MATCHER_UNAVAILABLE] and events.sent == []
    matcher.answer = Lookup(cache_id=CACHE)
    clock[0] = 3.0
    disks.round({a.uid: a})
    assert len(matcher.asked) == 2 and events.sent == [("a", READY, False)]


def test_a_matcher_that_fails_is_asked_once_per_round_not_once_per_pod() -> None:
    matcher = FakeMatcher(answer=Lookup(known=False, why="matcher call failed: DEADLINE_EXCEEDED"))
    disks, _, clock, failures = _world(FakeRegistry(), matcher)
    pods = {pod.uid: pod for pod in (_pod("a"), _pod("b"), _pod("c"))}
    disks.round(pods)
    assert len(matcher.asked) == 1 and failures == [MATCHER_UNAVAILABLE]
    assert disks.wanted() == dict.fromkeys(pods, "")
    matcher.answer = Lookup(cache_id=CACHE)
    clock[0] = 3.0
    disks.round(pods)
    assert len(matcher.asked) == 4 and set(disks.wanted().values()) == {CACHE}


def test_a_named_cache_that_cannot_be_used_here_is_a_warning_once() -> None:
    why = "MANUAL_NOT_AVAILABLE: imc-0000000a has no snapshot in zone-a"
    matcher = FakeMatcher(answer=Lookup(why=why, decision="MANUAL_NOT_AVAILABLE"))
    disks, events, _, failures = _world(FakeRegistry(), matcher)
    named = _pod("named", annotations={"snapcache.io/use-image-cache": CACHE})
    auto = _pod("auto")
    disks.round({named.uid: named, auto.uid: auto})
    disks.round({named.uid: named, auto.uid: auto})
    assert events.sent == [("named", FAILED, True)]  # an automatic miss is the extender's to tell
    assert failures == ["MANUAL_NOT_AVAILABLE"]
