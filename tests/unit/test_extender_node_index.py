"""The node index (zone ids per name) against a plain dict, and the NodeNames path of the core.

The index places a request's names with C-level bulk operations; every property here compares it
with the obvious per-name reference. The core's NodeNames path starts the matcher call before the
names are decoded, guessing the zones; the tests pin down when it asks again and what it reuses.
"""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.extender.api import (
    decode_args,
    decode_node_names,
    encode_all_names_pass,
    encode_filter_result,
    encode_host_priorities,
    encode_score_groups,
    split_node_names,
)
from services.extender.decisions import DecisionCache
from services.extender.http_app import ExtenderRoutes
from services.extender.matches import Candidate, MatchAnswer, MatchQuery
from services.extender.metrics import ExtenderMetrics
from services.extender.node_index import NodeIndex, PlacedNodes
from services.extender.scheduling import NoEvents, Scheduling
from snapcache.errors import InvalidArgument
from snapcache.pod_requests import Mode, PodInfo

NAMES = st.sampled_from([f"n{i}" for i in range(12)] + ["ghost", "node-a.example.com"])
ZONE = st.one_of(st.none(), st.sampled_from(["za", "zb", "zc", "zd"]))


def reference_groups(zones: dict[str, str | None], names: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        zone = zones.get(name)
        if zone:
            groups.setdefault(zone, []).append(name)
    return groups


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(NAMES, ZONE, max_size=14),
    st.lists(st.tuples(NAMES, ZONE, st.booleans()), max_size=10),
    st.lists(NAMES, max_size=30),
)
def test_index_places_names_as_a_dict_would(
    first: dict[str, str | None], changes: list[tuple[str, str | None, bool]], names: list[str]
) -> None:
    index = NodeIndex(first)
    zones = dict(first)
    for name, zone, delete in changes:  # what the watch does
        if delete:
            index.remove(name)
            zones.pop(name, None)
        else:
            index.set(name, zone)
            zones[name] = zone
    assert dict(index) == zones and len(index) == len(zones)
    assert all(index.get(name) == zones.get(name) for name in names)
    placed = index.locate(names)
    expected = reference_groups(zones, names)
    assert placed.zones == tuple(sorted(expected))
    assert placed.groups() == expected
    assert placed.zone_list() == [zones.get(name) for name in names]


def test_more_zones_than_ids_are_still_placed_name_by_name() -> None:
    zones = {f"n{i}": f"zone-{i}" for i in range(300)}
    index = NodeIndex(zones)
    names = ["n0", "n299", "n299", "ghost", "n5"]
    placed = index.locate(names)
    assert placed.groups() == {"zone-0": ["n0"], "zone-299": ["n299", "n299"], "zone-5": ["n5"]}
    assert index["n299"] == "zone-299" and len(set(index.values())) == 300
    index.remove("n299")
    index.set("n5", "zone-0")
    assert index.locate(names).groups() == {"zone-0": ["n0", "n5"]}


def test_a_name_that_needs_escaping_is_written_by_the_json_encoder() -> None:
    index = NodeIndex({'odd"name': "za", "plain": "za"})
    placed = index.locate(['odd"name', "plain"])
    assert not placed.plain
    body = encode_score_groups([(7, placed.groups()["za"])], plain=placed.plain)
    assert orjson.loads(body) == [{"Host": 'odd"name', "Score": 7}, {"Host": "plain", "Score": 7}]
    assert index.locate(["plain"]).plain


def test_score_groups_are_exact_json_and_refuse_bad_scores() -> None:
    body = encode_score_groups([(10, ["a", "b"]), (3, ["c"]), (5, [])], plain=True)
    assert body == b'[{"Host":"a","Score":10},{"Host":"b","Score":10},{"Host":"c","Score":3}]'
    assert body == encode_host_priorities(["a", "b", "c"], [10, 10, 3])
    assert encode_score_groups([], plain=True) == b"[]"
    for bad in (11, -1, 2.5, True):
        with pytest.raises(ValueError, match="0 to 10"):
            encode_score_groups([(bad, ["a"])], plain=True)  # type: ignore[list-item]


def test_split_names_and_the_all_pass_answer_match_the_whole_decode() -> None:
    document = {"Pod": {"metadata": {"uid": "u"}}, "Nodes": None, "NodeNames": ["a", "b\\u0063", "d"]}
    body = orjson.dumps(document).replace(b"b\\\\u0063", b"b\\u0063")
    split = split_node_names(body)
    assert split is not None
    pod, text = split
    assert pod.uid == "u" and decode_node_names(text) == ["a", "bc", "d"]
    args = decode_args(body)
    whole = encode_filter_result(args, passing=range(3), failed={})
    assert orjson.loads(encode_all_names_pass(text)) == orjson.loads(whole)
    for bad, message in ((b"[1]", r"NodeNames\[0\]"), (b"{}", "must be an array"), (b"[", "not valid JSON")):
        with pytest.raises(InvalidArgument, match=message):
            decode_node_names(bad)


# --- the core's NodeNames path ---------------------------------------------------------------


def answer_in(*zones: str) -> MatchAnswer:
    return MatchAnswer(
        decision="MATCHED",
        action="USE_CACHE",
        image_cache="imageCaches/imc-abcd1234",
        candidates=(Candidate("imageCaches/imc-abcd1234", 1, frozenset(zones)),),
    )


class Recorder:
    """A matcher port that records its queries, and a names source that counts its calls."""

    def __init__(self, answer: MatchAnswer) -> None:
        self.answer = answer
        self.queries: list[MatchQuery] = []
        self.decoded = 0

    def match(self, query: MatchQuery) -> MatchAnswer:
        self.queries.append(query)
        return self.answer

    def names(self, names: list[str]) -> list[str]:
        self.decoded += 1
        return names


CLUSTER = {"a1": "za", "a2": "za", "b1": "zb", "c1": "zc", "none": None}


def core(recorder: Recorder) -> Scheduling:
    return Scheduling(
        match=recorder.match,
        node_zones=lambda: NodeIndex(CLUSTER),
        decisions=DecisionCache(ttl_seconds=60),
        events=NoEvents(),
        default_mode=Mode.AUTO,
    )


def pod(uid: str) -> PodInfo:
    return PodInfo(
        uid=uid, namespace="ns", name="p", annotations={}, init_images=(), images=(("c", "nginx"),)
    )


def test_the_matcher_is_asked_about_the_zones_of_the_names_and_scores_group_by_score() -> None:
    recorder = Recorder(
        MatchAnswer(
            decision="MATCHED",
            action="USE_CACHE",
            image_cache="imageCaches/imc-abcd1234",
            candidates=(
                Candidate("imageCaches/imc-abcd1234", 1, frozenset({"za", "zc"})),
                Candidate("imageCaches/imc-abcd1235", 2, frozenset({"zb"})),
            ),
        )
    )
    names = ["a1", "b1", "c1", "none", "a2", "ghost"]
    scores = core(recorder).prioritize_names(pod("u1"), lambda: recorder.names(names))
    [query] = recorder.queries
    assert query.zones == ("za", "zb", "zc") and not query.validate_only
    assert scores.groups == [(10, ["a1", "c1", "a2"]), (7, ["b1"])]
    assert core(recorder).prioritize_names(pod("u2"), lambda: ["b1", "ghost"]).groups == [(7, ["b1"])]
    assert recorder.queries[-1].zones == ("zb",)


def test_bad_names_are_refused_before_the_matcher_is_asked() -> None:
    recorder = Recorder(answer_in("za"))

    def bad() -> list[str]:
        return decode_node_names(b'["a1", 2]')

    with pytest.raises(InvalidArgument, match="must be a string"):
        core(recorder).filter_names(pod("u3"), bad)
    assert recorder.queries == []


def test_prioritize_after_filter_with_the_same_names_reuses_both_answer_and_placement() -> None:
    recorder = Recorder(answer_in("zb"))
    scheduling = core(recorder)
    names = ["a1", "b1", "c1"]
    text = orjson.dumps(names)
    seen, outcome = scheduling.filter_names(pod("u4"), lambda: recorder.names(names), names_key=text)
    assert list(seen) == names and outcome.passing == [0, 1, 2]
    scores = scheduling.prioritize_names(pod("u4"), lambda: recorder.names(names), names_key=text)
    assert scores.groups == [(10, ["b1"])]
    assert len(recorder.queries) == 1 and recorder.decoded == 1  # neither asked nor decoded again
    # other names (a strict pod's filter rejected some): placed again, the answer still reused
    scores = scheduling.prioritize_names(pod("u4"), lambda: recorder.names(["b1"]), names_key=b'["b1"]')
    assert scores.groups == [(10, ["b1"])] and len(recorder.queries) == 1 and recorder.decoded == 2
    # another pod with the same names: nothing of u4's is reused
    scheduling.prioritize_names(pod("u5"), lambda: recorder.names(names), names_key=text)
    assert len(recorder.queries) == 2 and recorder.decoded == 3


def test_strict_filter_on_the_names_path_rejects_by_zone() -> None:
    recorder = Recorder(answer_in("za"))
    strict = PodInfo(
        uid="u6",
        namespace="ns",
        name="p",
        annotations={"snapcache.io/image-cache-strict": "true"},
        init_images=(),
        images=(("c", "nginx"),),
    )
    _, outcome = core(recorder).filter_names(strict, lambda: ["a1", "b1", "none", "ghost"])
    assert outcome.passing == [0]
    assert set(outcome.failed) == {"b1", "none", "ghost"}


def test_placed_name_by_name_matches_the_index() -> None:
    names = ["a1", "b1", "none", "ghost", "a2"]
    by_index = NodeIndex(CLUSTER).locate(names)
    by_name = PlacedNodes.name_by_name(names, [CLUSTER.get(n) for n in names])
    assert by_index.groups() == by_name.groups() and by_index.zones == by_name.zones


def test_with_the_default_auto_an_unannotated_pod_is_matched_in_the_schedulers_layout() -> None:
    recorder = Recorder(answer_in("za"))
    metrics = ExtenderMetrics(node_cache_synced=lambda: True, node_cache_size=lambda: len(CLUSTER))
    body = orjson.dumps(
        {
            "Pod": {"metadata": {"uid": "u7"}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}},
            "Nodes": None,
            "NodeNames": ["a1", "b1"],
        }
    )
    for mode, scores in ((Mode.OFF, b"[]"), (Mode.AUTO, b'[{"Host":"a1","Score":10}]')):
        scheduling = core(recorder)
        scheduling.default_mode = mode
        routes = ExtenderRoutes(scheduling=scheduling, metrics=metrics)
        assert routes.post("/prioritize", body) == (200, "application/json", scores)
    assert len(recorder.queries) == 1
