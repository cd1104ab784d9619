"""The extender's pure core, table-driven: annotations, images, zones, the formula, the filter, reuse."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from services.extender import matches
from services.extender.api import decode_args
from services.extender.decisions import DecisionCache
from services.extender.filtering import filter_nodes
from services.extender.matcher_client import match_request
from services.extender.matches import Candidate, MatchAnswer, MatchQuery
from services.extender.scheduling import Scheduling
from services.extender.scoring import node_scores, zone_scores
from snapcache.node_zones import zone_of
from snapcache.pod_requests import Mode, PodInfo, PodRequest, parse_default_mode, pod_request


def pod(
    annotations: dict[str, str] | None = None, *images: str, init: tuple[str, ...] = (), uid: str = "u1"
) -> PodInfo:
    return PodInfo(
        uid=uid,
        namespace="ns",
        name="p",
        annotations=annotations or {},
        init_images=tuple((f"i{n}", image) for n, image in enumerate(init)),
        images=tuple((f"c{n}", image) for n, image in enumerate(images or ("nginx:1.25",))),
    )


NGINX = "docker.io/library/nginx:1.25"


@pytest.mark.parametrize(
    ("annotations", "default", "mode", "manual", "strict"),
    [
        ({}, Mode.OFF, Mode.OFF, "", False),
        ({}, Mode.AUTO, Mode.AUTO, "", False),
        ({"snapcache.io/use-image-cache": "auto"}, Mode.OFF, Mode.AUTO, "", False),
        ({"snapcache.io/use-image-cache": "AUTO "}, Mode.OFF, Mode.AUTO, "", False),
        ({"snapcache.io/use-image-cache": "imc-abcd1234"}, Mode.OFF, Mode.MANUAL, "imc-abcd1234", False),
        (
            {"snapcache.io/use-image-cache": "imageCaches/imc-abcd1234"},
            Mode.OFF,
            Mode.MANUAL,
            "imc-abcd1234",
            False,
        ),
        ({"eks.tke.cloud.tencent.com/use-image-cache": "auto"}, Mode.OFF, Mode.AUTO, "", False),
        (
            {"eks.tke.cloud.tencent.com/use-image-cache": "imc-0000000a"},
            Mode.OFF,
            Mode.MANUAL,
            "imc-0000000a",
            False,
        ),
        # snapcache's annotation wins over TKE's
        (
            {"snapcache.io/use-image-cache": "off", "eks.tke.cloud.tencent.com/use-image-cache": "auto"},
            Mode.OFF,
            Mode.OFF,
            "",
            False,
        ),
        ({"snapcache.io/use-image-cache": "false"}, Mode.AUTO, Mode.OFF, "", False),
        (
            {"snapcache.io/use-image-cache": "auto", "snapcache.io/image-cache-strict": "true"},
            Mode.OFF,
            Mode.AUTO,
            "",
            True,
        ),
        (
            {"snapcache.io/use-image-cache": "auto", "snapcache.io/image-cache-strict": "no"},
            Mode.OFF,
            Mode.AUTO,
            "",
            False,
        ),
        ({"snapcache.io/image-cache-strict": "true"}, Mode.AUTO, Mode.AUTO, "", True),
    ],
)
def test_annotations_give_the_mode(
    annotations: dict[str, str], default: Mode, mode: Mode, manual: str, strict: bool
) -> None:
    request = pod_request(pod(annotations), default_mode=default)
    assert (request.mode, request.manual_id, request.strict) == (
        mode,
        manual,
        strict if mode is not Mode.OFF else False,
    )
    assert request.wants_cache == (mode is not Mode.OFF)


def test_a_malformed_cache_id_is_a_problem_not_a_crash() -> None:
    request = pod_request(pod({"snapcache.io/use-image-cache": "imc-abc"}), default_mode=Mode.OFF)
    assert not request.wants_cache
    assert "neither auto nor an image cache id" in request.problem


@pytest.mark.parametrize(
    ("init", "images", "expected", "problem"),
    [
        ((), ("nginx:1.25",), (NGINX,), ""),
        (
            ("busybox",),
            ("nginx:1.25", "docker.io/library/nginx:1.25"),
            ("docker.io/library/busybox:latest", NGINX),
            "",
        ),
        ((), ("Nginx:1",), (), "image of container 'c0' is not valid"),
        (("bad image",), ("nginx",), (), "image of init container 'i0' is not valid"),
        ((), tuple(f"app{n}:1" for n in range(65)), (), "65 distinct images"),
    ],
)
def test_images_of_init_and_regular_containers_are_normalized_once(
    init: tuple[str, ...], images: tuple[str, ...], expected: tuple[str, ...], problem: str
) -> None:
    request = pod_request(
        pod({"snapcache.io/use-image-cache": "auto"}, *images, init=init), default_mode=Mode.OFF
    )
    assert request.images == expected
    assert problem in request.problem if problem else not request.problem


def test_default_mode_flag() -> None:
    assert parse_default_mode("auto") is Mode.AUTO and parse_default_mode("off") is Mode.OFF
    with pytest.raises(ValueError, match="off or auto"):
        parse_default_mode("on")


@pytest.mark.parametrize(
    ("labels", "zone"),
    [
        ({"topology.kubernetes.io/zone": "a"}, "a"),
        ({"failure-domain.beta.kubernetes.io/zone": "b"}, "b"),
        ({"topology.kubernetes.io/zone": "a", "failure-domain.beta.kubernetes.io/zone": "b"}, "a"),
        ({"topology.kubernetes.io/zone": ""}, None),
        ({}, None),
        (None, None),
    ],
)
def test_zone_from_labels(labels: dict[str, str] | None, zone: str | None) -> None:
    assert zone_of(labels) == zone


def answer(
    *candidates: Candidate, decision: str = matches.MATCHED, action: str = matches.USE_CACHE
) -> MatchAnswer:
    return MatchAnswer(decision=decision, action=action, message="said the matcher", candidates=candidates)


def cand(rank: int, available: set[str], hydrating: set[str] | None = None) -> Candidate:
    return Candidate(
        f"imageCaches/imc-0000000{rank}", rank, frozenset(available), frozenset(hydrating or set())
    )


@pytest.mark.parametrize(
    ("the_answer", "zones", "scores"),
    [
        (answer(cand(1, {"a"})), ["a", "b", None], [10, 0, 0]),
        (answer(cand(1, {"a"}, {"b"})), ["a", "b", "c"], [10, 3, 0]),
        (answer(cand(1, {"a"}), cand(2, {"b"}), cand(3, {"c"})), ["a", "b", "c"], [10, 7, 6]),
        (answer(cand(1, {"a"}), cand(2, {"a", "b"})), ["a", "b"], [10, 7]),
        (answer(cand(1, set(), {"a"}), cand(2, {"a"})), ["a"], [7]),  # AVAILABLE beats hydrating
        (answer(*[cand(r, {f"z{r}"}) for r in range(1, 8)]), ["z6", "z7"], [5, 5]),  # the floor
        (
            answer(cand(2, set(), {"a"}), cand(3, set(), {"b"}), cand(4, set(), {"c"})),
            ["a", "b", "c"],
            [2, 1, 1],
        ),
        (answer(decision=matches.NO_MATCH, action=matches.PULL_IMAGES), ["a"], [0]),
        (MatchAnswer.unknown("down"), ["a", None], [0, 0]),
    ],
)
def test_the_formula(the_answer: MatchAnswer, zones: list[str | None], scores: list[int]) -> None:
    got = node_scores(the_answer, zones)
    assert got == scores
    assert all(isinstance(s, int) and 0 <= s <= 10 for s in got)


def test_zone_scores_are_bounded_for_any_rank() -> None:
    for rank in range(1, 120):
        for score in zone_scores(answer(cand(rank, {"a"}, {"b"}))).values():
            assert 1 <= score <= 10


STRICT = PodRequest(Mode.AUTO, strict=True, images=(NGINX,))


@pytest.mark.parametrize(
    ("request_", "the_answer", "passing", "failed"),
    [
        (PodRequest(Mode.AUTO, images=(NGINX,)), answer(cand(1, {"a"})), [0, 1, 2], {}),
        (
            STRICT,
            answer(cand(1, {"a"})),
            [0],
            {"n-b": "can be provisioned only in zone(s) a", "n-none": "no topology.kubernetes.io/zone label"},
        ),
        (
            STRICT,
            answer(cand(1, {"a"}), cand(2, {"b"})),
            [0, 1],
            {"n-none": "no topology.kubernetes.io/zone label"},
        ),
        (
            STRICT,
            answer(decision=matches.NO_MATCH, action=matches.REJECT),
            [],
            {"n-a": "cannot be provisioned in any zone (said the matcher)"},
        ),
        (STRICT, MatchAnswer.unknown("down"), [0, 1, 2], {}),  # fail open
    ],
)
def test_filter(
    request_: PodRequest, the_answer: MatchAnswer, passing: list[int], failed: dict[str, str]
) -> None:
    outcome = filter_nodes(request_, the_answer, ["n-a", "n-b", "n-none"], ["a", "b", None])
    assert outcome.passing == passing
    for name, text in failed.items():
        assert text in outcome.failed[name]
    assert set(outcome.failed) | {["n-a", "n-b", "n-none"][i] for i in passing} == {"n-a", "n-b", "n-none"}


def test_decision_cache_expires_and_counts_once() -> None:
    now = [0.0]
    cache = DecisionCache(ttl_seconds=5, max_entries=2, clock=lambda: now[0])
    cache.put("u1", answer())
    assert cache.get("u1") == answer()
    now[0] = 6
    assert cache.get("u1") is None
    cache.put("u1", answer())
    cache.put("u2", answer())
    cache.put("u3", answer())
    assert cache.get("u1") is None  # bounded
    assert cache.first_match("u1")
    cache.counted("u1")
    assert not cache.first_match("u1")


def test_decision_cache_drops_expired_answers_as_new_ones_come() -> None:
    # Pods that are never asked about again (each has its UID) leave with the TTL, not with the
    # bound: the collector would otherwise walk thousands of dead answers (decisions module).
    now = [0.0]
    cache = DecisionCache(ttl_seconds=5, max_entries=10_000, clock=lambda: now[0])
    for second in range(20):
        now[0] = float(second)
        cache.put(f"u{second}", answer())
    assert len(cache) == 6  # put at 14..19 s; the one from 14 s expires after 19 s
    assert [cache.get(f"u{second}") for second in (13, 14, 19)] == [None, answer(), answer()]
    now[0] = 30.0
    cache.put("late", answer())
    assert len(cache) == 1


@dataclass
class Recorder:
    answers: list[MatchAnswer]
    queries: list[MatchQuery] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)

    def match(self, query: MatchQuery) -> MatchAnswer:
        self.queries.append(query)
        return self.answers[min(len(self.queries), len(self.answers)) - 1]

    def emit(self, pod: PodInfo, *, reason: str, message: str, warning: bool) -> None:
        self.events.append((reason, message))


def scheduling(recorder: Recorder, zones: dict[str, str]) -> Scheduling:
    return Scheduling(
        match=recorder.match,
        node_zones=lambda: zones,
        decisions=DecisionCache(ttl_seconds=60),
        events=recorder,
    )


def args(annotations: dict[str, str], names: list[str], uid: str = "u1") -> bytes:
    import orjson

    return orjson.dumps(
        {
            "Pod": {
                "metadata": {"name": "p", "namespace": "ns", "uid": uid, "annotations": annotations},
                "spec": {"containers": [{"name": "c", "image": "nginx:1.25"}]},
            },
            "NodeNames": names,
        }
    )


def test_one_matcher_call_per_cycle_and_one_hit_per_pod() -> None:
    recorder = Recorder([answer(cand(1, {"a"}))])
    core = scheduling(recorder, {"n-a": "a", "n-b": "b"})
    request = decode_args(args({"snapcache.io/use-image-cache": "auto"}, ["n-a", "n-b", "n-x"]))
    assert core.filter(request).passing == [0, 1, 2]
    assert core.prioritize(request) == [10, 0, 0]
    assert len(recorder.queries) == 1  # prioritize reused the filter's answer
    assert recorder.queries[0].validate_only is False and recorder.queries[0].zones == ("a", "b")
    core.filter(request)  # the next cycle asks again, as a preview
    assert [q.validate_only for q in recorder.queries] == [False, True]
    assert recorder.events[0][0] == "ImageCacheMatched" and "zone a" in recorder.events[0][1]


def test_unannotated_pods_are_answered_without_the_matcher() -> None:
    recorder = Recorder([answer(cand(1, {"a"}))])
    core = scheduling(recorder, {"n-a": "a"})
    request = decode_args(args({}, ["n-a", "n-b"]))
    assert core.filter(request).passing == [0, 1]
    assert core.prioritize(request) == []  # no opinion: every node 0
    assert recorder.queries == [] and recorder.events == []


@pytest.mark.parametrize(
    ("the_answer", "event"),
    [
        (
            MatchAnswer(decision=matches.MANUAL_NOT_FOUND, message="no cache imc-abcd1234"),
            "ImageCacheNotFound",
        ),
        (MatchAnswer(decision=matches.NO_MATCH, message="nothing holds nginx"), "ImageCacheMissed"),
        (MatchAnswer.unknown("matcher call failed: UNAVAILABLE"), "ImageCacheMissed"),
    ],
)
def test_events_say_what_happened(the_answer: MatchAnswer, event: str) -> None:
    recorder = Recorder([the_answer])
    core = scheduling(recorder, {})
    core.filter(decode_args(args({"snapcache.io/use-image-cache": "imc-abcd1234"}, ["n"])))
    assert recorder.events[0][0] == event
    assert recorder.queries[0].manual_id == "imc-abcd1234"


def test_a_pod_with_a_bad_annotation_gets_a_missed_event_and_no_call() -> None:
    recorder = Recorder([answer()])
    core = scheduling(recorder, {})
    assert core.filter(decode_args(args({"snapcache.io/use-image-cache": "yes please"}, ["n"]))).passing == [
        0
    ]
    assert recorder.queries == []
    assert recorder.events[0][0] == "ImageCacheMissed"


def test_prioritize_without_a_filter_call_asks_the_matcher_itself() -> None:
    recorder = Recorder([answer(cand(1, {"a"}))])
    core = scheduling(recorder, {"n-a": "a"})
    assert core.prioritize(
        decode_args(args({"snapcache.io/use-image-cache": "auto"}, ["n-a"], uid="u9"))
    ) == [10]
    assert len(recorder.queries) == 1


def test_the_query_says_who_asks_namespace_and_pull_secrets() -> None:
    import orjson

    recorder = Recorder([answer(cand(1, {"a"}))])
    core = scheduling(recorder, {"n-a": "a"})
    body = orjson.loads(args({"snapcache.io/use-image-cache": "auto"}, ["n-a"]))
    body["Pod"]["spec"]["imagePullSecrets"] = [{"name": "regcred"}, {"name": "other"}, {"name": "regcred"}]
    core.prioritize(decode_args(orjson.dumps(body)))
    (query,) = recorder.queries
    assert (query.namespace, query.image_pull_secrets) == ("ns", ("regcred", "other"))
    request = match_request(query)
    assert (request.namespace, list(request.image_pull_secrets)) == ("ns", ["regcred", "other"])
