"""The extender's wire types: ExtenderArgs decoding and the exact JSON of its answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.extender.api import (
    decode_args,
    encode_filter_result,
    encode_host_priorities,
    names_request_without_cache_key,
    peek_pod,
)
from snapcache.errors import InvalidArgument

FIXTURES = Path(__file__).parents[1] / "fixtures" / "extender"


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"kube-scheduler-1.20-{name}.json").read_text())


def test_decodes_the_real_schedulers_nodenames_request() -> None:
    args = decode_args((FIXTURES / "kube-scheduler-1.20-filter-request-nodenames.json").read_bytes())
    assert args.nodes is None and not args.full_nodes
    assert args.node_names == ("n1b", "n2a", "n3a", "n1a", "n2b", "n3b")
    assert args.pod.name == "p-strict" and args.pod.namespace == "default"
    assert args.pod.uid == "765d48d6-215b-49b8-92e4-eb76e4bdd8f5"
    assert args.pod.images == (("c0", "nginx:1.25"),)
    assert args.pod.annotations["snapcache.io/image-cache-strict"] == "true"


def test_decodes_the_real_schedulers_full_nodes_request() -> None:
    args = decode_args((FIXTURES / "kube-scheduler-1.20-filter-request-nodes.json").read_bytes())
    assert args.full_nodes and args.nodes is not None
    assert args.node_names == ("n1a", "n2a", "n3a", "n1b", "n2b", "n3b")
    assert [labels["topology.kubernetes.io/zone"] for labels in args.node_labels] == [
        "z1",
        "z2",
        "z3",
        "z1",
        "z2",
        "z3",
    ]


BAD = [
    (b"{", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[]", "body: must be an object, not array"),
    (b'"x"', "must be an object, not string"),
    (b"{}", "Pod: is required"),
    (b'{"Pod": null, "NodeNames": []}', "Pod: is required"),
    (b'{"Pod": 3, "NodeNames": []}', "Pod: must be an object, not int"),
    (b'{"Pod": {}, "NodeNames": []}', "Pod.metadata: must be an object, not null"),
    (b'{"Pod": {"metadata": {"uid": 5}}, "NodeNames": []}', "Pod.metadata.uid: must be a string"),
    (b'{"Pod": {"metadata": {"annotations": {"a": 1}}}, "NodeNames": []}', "Pod.metadata.annotations['a']"),
    (b'{"Pod": {"metadata": {}, "spec": {"containers": {}}}, "NodeNames": []}', "must be an array"),
    (
        b'{"Pod": {"metadata": {}, "spec": {"containers": [{"image": 7}]}}, "NodeNames": []}',
        "image: must be a string",
    ),
    (b'{"Pod": {"metadata": {}, "spec": {"initContainers": [1]}}, "NodeNames": []}', "initContainers[0]"),
    (b'{"Pod": {"metadata": {}}, "NodeNames": "n1"}', "NodeNames: must be an array, not string"),
    (b'{"Pod": {"metadata": {}}, "NodeNames": ["n1", 2]}', "NodeNames[1]: must be a string"),
    (b'{"Pod": {"metadata": {}}}', "one of NodeNames"),
    (b'{"Pod": {"metadata": {}}, "Nodes": []}', "Nodes: must be an object, not array"),
    (b'{"Pod": {"metadata": {}}, "Nodes": {"items": {}}}', "Nodes.items: must be an array"),
    (b'{"Pod": {"metadata": {}}, "Nodes": {"items": [{"metadata": {"name": 1}}]}}', "metadata.name"),
    (
        b'{"Pod": {"metadata": {}}, "Nodes": {"items": [{"metadata": {"labels": []}}]}}',
        "labels: must be an object",
    ),
]


@pytest.mark.parametrize(("body", "message"), BAD)
def test_bad_requests_are_invalid_arguments_naming_the_field(body: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode_args(body)
    assert message in str(caught.value)
    assert caught.value.reason == "INVALID_EXTENDER_ARGS"


def test_filter_result_in_nodenames_mode_has_exact_keys_and_every_passing_node() -> None:
    args = decode_args(orjson.dumps({"Pod": {"metadata": {}}, "NodeNames": ["a", "b", "c"]}))
    body = encode_filter_result(args, passing=[0, 2], failed={"b": "why"})
    assert orjson.loads(body) == {
        "Nodes": None,
        "NodeNames": ["a", "c"],
        "FailedNodes": {"b": "why"},
        "FailedAndUnresolvableNodes": {"b": "why"},
        "Error": "",
    }


def test_filter_result_in_full_nodes_mode_echoes_the_passing_node_objects() -> None:
    request = fixture("filter-request-nodes")
    args = decode_args(orjson.dumps(request))
    answer = orjson.loads(encode_filter_result(args, passing=range(6), failed={}))
    assert answer["NodeNames"] is None
    assert answer["Nodes"]["items"] == request["Nodes"]["items"]
    assert answer["FailedNodes"] == {} and answer["Error"] == ""


def test_host_priorities_are_integers_under_capitalised_keys() -> None:
    body = encode_host_priorities(["a", "b"], [10, 0])
    assert body == b'[{"Host":"a","Score":10},{"Host":"b","Score":0}]'
    assert encode_host_priorities([], []) == b"[]"


def test_host_priorities_escape_odd_names_and_refuse_out_of_range_scores() -> None:
    odd = ['a"b', "c\\d", "é", "n\n"]
    assert orjson.loads(encode_host_priorities(odd, [1, 2, 3, 4])) == [
        {"Host": h, "Score": s} for h, s in zip(odd, [1, 2, 3, 4], strict=True)
    ]
    for bad in ([11], [-1], [2.5]):
        with pytest.raises(ValueError, match="0 to 10"):
            encode_host_priorities(["a"], bad)  # type: ignore[arg-type]
    names = [f"node-{i}.zone-a.example.com" for i in range(300)]
    scores = [i % 11 for i in range(300)]
    assert orjson.loads(encode_host_priorities(names, scores)) == [
        {"Host": h, "Score": s} for h, s in zip(names, scores, strict=True)
    ]


def compact(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


POD = {"metadata": {"name": "p", "namespace": "ns", "uid": "u", "annotations": {"a": "b"}}}


@pytest.mark.parametrize(
    "body",
    [
        compact({"Pod": POD, "Nodes": None, "NodeNames": ["n1", "n2"]}),
        compact({"Pod": POD, "Nodes": None, "NodeNames": []}) + b"\n",
        # the marker inside the pod: a key (not last) and a string (its quotes escaped)
        compact(
            {
                "Pod": {**POD, "x": {"y": 1, "Nodes": None, "NodeNames": [1]}},
                "Nodes": None,
                "NodeNames": ["n"],
            }
        ),
        compact({"Pod": {**POD, "s": ',"Nodes":null,"NodeNames":['}, "Nodes": None, "NodeNames": ["n"]}),
    ],
)
def test_peek_pod_reads_the_same_pod_as_the_full_decoder(body: bytes) -> None:
    assert peek_pod(body) == decode_args(body).pod


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"Pod": POD, "Nodes": None, "NodeNames": ["n"]}).encode(),  # not compact: full decode
        compact({"NodeNames": ["n"], "Pod": POD, "Nodes": None}),
        compact({"Pod": POD, "Nodes": {"items": []}, "NodeNames": None}),
        compact({"Pod": {"metadata": 3}, "Nodes": None, "NodeNames": ["n"]}),
        b'{"Pod":{"metadata":{}},"Nodes":null,"NodeNames":[',
    ],
)
def test_peek_pod_declines_anything_else(body: bytes) -> None:
    assert peek_pod(body) is None


@settings(max_examples=300, deadline=None)
@given(
    names=st.lists(st.text(max_size=12), max_size=8),
    separator=st.sampled_from([(",", ":"), (", ", ": "), (",", ": ")]),
    ascii_only=st.booleans(),
)
def test_node_names_read_by_splitting_equal_the_json_parse(
    names: list[str], separator: tuple[str, str], ascii_only: bool
) -> None:
    document = {"Pod": POD, "Nodes": None, "NodeNames": names}
    body = json.dumps(document, separators=separator, ensure_ascii=ascii_only).encode()
    assert decode_args(body).node_names == tuple(names)


@pytest.mark.parametrize(
    "names_json",
    [
        b'["a""b"]',
        b'["a",]',
        b'["a",1]',
        b'["a"\x01]',
        b'["a","b\x05"]',
        b'[,"a"]',
        b'["a" "b"]',
        b'["\xff"]',
    ],
)
def test_malformed_node_names_are_refused(names_json: bytes) -> None:
    body = b'{"Pod":' + compact(POD) + b',"Nodes":null,"NodeNames":' + names_json + b"}"
    with pytest.raises(InvalidArgument):
        decode_args(body)


def names_body(pod: object, names: object = ("n1", "n2")) -> bytes:
    return compact(
        {"Pod": pod, "Nodes": None, "NodeNames": list(names) if isinstance(names, tuple) else names}
    )


@pytest.mark.parametrize(
    ("body", "without"),
    [
        (names_body({"metadata": {"uid": "u", "annotations": {"team": "a"}}}), True),
        (names_body({"metadata": {"uid": 5}}), True),  # field types are not checked: no 400 here
        (names_body({"metadata": {"annotations": {"snapcache.io/use-image-cache": "auto"}}}), False),
        (
            names_body({"metadata": {"annotations": {"eks.tke.cloud.tencent.com/use-image-cache": "x"}}}),
            False,
        ),
        (names_body({"metadata": {"labels": {"note": "use-image-cache"}}}), False),  # text anywhere
        (names_body({"metadata": {"annotations": {"a": "<b>"}}}).replace(b"<", b"\\u003c"), False),
        (names_body(None), False),
        (names_body([]), False),
        (b'{"Pod":{"metadata":{},"Nodes":null,"NodeNames":["n1"]}', False),  # not JSON
        (json.dumps({"Pod": {}, "Nodes": None, "NodeNames": []}).encode(), False),  # not the layout
    ],
)
def test_a_pod_without_the_annotations_text_is_known_without_decoding_it(body: bytes, without: bool) -> None:
    assert names_request_without_cache_key(body) is without


def test_an_annotation_key_spelled_with_escapes_is_never_taken_for_none() -> None:
    body = names_body({"metadata": {"annotations": {"snapcache.io/use-image-cache": "auto"}}})
    escaped = body.replace(b"use-image-cache", b"use-image-c\\u0061che")
    assert not names_request_without_cache_key(escaped)
    assert decode_args(escaped).pod.annotations == {"snapcache.io/use-image-cache": "auto"}
