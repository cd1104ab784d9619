"""The extender through its real HTTP server on port 0, with requests captured from kube-scheduler 1.20.

The matcher is a scripted `MatcherService` on a real gRPC server (its real behaviour is covered by
the end-to-end test); what is checked here is the contract: exact keys and types, the full list of
passing nodes, and that bad input gets a 4xx with a message quickly, never a 500 or a hang.
"""

from __future__ import annotations

import copy
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from services.extender.node_index import NodeIndex
from services.extender.server import ExtenderApp, ExtenderConfig
from snapcache.grpc_server import RunningServer, ServiceBinding, create_server
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc

FIXTURES = Path(__file__).parents[1] / "fixtures" / "extender"
ZONES = {"n1a": "z1", "n1b": "z1", "n2a": "z2", "n2b": "z2", "n3a": "z3", "n3b": "z3"}
Response = mpb.MatchImageCachesResponse


def fixture(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((FIXTURES / f"kube-scheduler-1.20-{name}.json").read_text())
    return document


def with_annotations(request: dict[str, Any], annotations: dict[str, str], uid: str = "") -> dict[str, Any]:
    request = copy.deepcopy(request)
    request["Pod"]["metadata"]["annotations"] = annotations
    if uid:
        request["Pod"]["metadata"]["uid"] = uid
    return request


@dataclass
class ScriptedMatcher(mpb_grpc.MatcherServiceServicer):
    """Answers with `answer`; records requests; sleeps `delay` seconds first."""

    answer: mpb.MatchImageCachesResponse = field(default_factory=mpb.MatchImageCachesResponse)
    requests: list[mpb.MatchImageCachesRequest] = field(default_factory=list)
    delay: float = 0.0

    def MatchImageCaches(
        self, request: mpb.MatchImageCachesRequest, context: grpc.ServicerContext
    ) -> mpb.MatchImageCachesResponse:
        self.requests.append(request)
        if self.delay:
            time.sleep(self.delay)
        return self.answer


def matched_in(*zones: str, hydrating: tuple[str, ...] = ()) -> mpb.MatchImageCachesResponse:
    return Response(
        decision=Response.MATCHED,
        action=Response.USE_CACHE,
        image_cache="imageCaches/imc-0000000a",
        message="imc-0000000a holds every image",
        candidates=[
            mpb.MatchCandidate(
                image_cache="imageCaches/imc-0000000a",
                rank=1,
                available_zones=list(zones),
                hydrating_zones=list(hydrating),
            )
        ],
    )


@dataclass
class Running:
    matcher: ScriptedMatcher
    grpc_server: RunningServer
    app: ExtenderApp
    client: httpx.Client

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.app.port}"

    def post(self, verb: str, body: Any) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.client.post(f"{self.url}/snapcache/{verb}", content=content)


@pytest.fixture
def running() -> Iterator[Running]:
    matcher = ScriptedMatcher()
    grpc_server = create_server(
        "127.0.0.1:0",
        [
            ServiceBinding(
                "snapcache.v1.MatcherService", mpb_grpc.add_MatcherServiceServicer_to_server, matcher
            )
        ],
        max_workers=4,
    )
    app = ExtenderApp(
        ExtenderConfig(
            matcher_target=f"127.0.0.1:{grpc_server.port}",
            listen="127.0.0.1:0",
            url_prefix="/snapcache/",
            matcher_budget_seconds=0.3,
            max_body_bytes=16 * 1024 * 1024,
            socket_timeout_seconds=1.0,
        )
    )
    index = NodeIndex(ZONES)
    app.scheduling.node_zones = lambda: index  # the node cache's seam (no Kubernetes here)
    app.start()
    try:
        with httpx.Client(timeout=10) as client:
            yield Running(matcher, grpc_server, app, client)
    finally:
        app.stop()
        grpc_server.stop(0)


STRICT_AUTO = {"snapcache.io/use-image-cache": "auto", "snapcache.io/image-cache-strict": "true"}


def test_filter_nodenames_strict_exact_json(running: Running) -> None:
    running.matcher.answer = matched_in("z2")
    request = with_annotations(fixture("filter-request-nodenames"), STRICT_AUTO)
    response = running.post("filter", request)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"Nodes", "NodeNames", "FailedNodes", "FailedAndUnresolvableNodes", "Error"}
    assert body["Nodes"] is None and body["Error"] == ""
    assert body["NodeNames"] == ["n2a", "n2b"]
    assert set(body["FailedNodes"]) == {"n1a", "n1b", "n3a", "n3b"}
    assert body["FailedAndUnresolvableNodes"] == body["FailedNodes"]
    assert set(body["FailedNodes"].values()) == {
        "strict image-cache pod: a matching image cache can be provisioned only in zone(s) z2"
    }
    [asked] = running.matcher.requests
    assert list(asked.images) == ["docker.io/library/nginx:1.25"]
    assert asked.strict and sorted(asked.zones) == ["z1", "z2", "z3"] and not asked.validate_only


def test_filter_passes_every_node_for_a_non_strict_pod(running: Running) -> None:
    running.matcher.answer = matched_in("z2")
    request = with_annotations(fixture("filter-request-nodenames"), {"snapcache.io/use-image-cache": "auto"})
    body = running.post("filter", request).json()
    assert body["NodeNames"] == request["NodeNames"]  # the full list, in the scheduler's order
    assert body["FailedNodes"] == {} and body["FailedAndUnresolvableNodes"] == {}


def test_filter_full_nodes_mode_answers_node_objects(running: Running) -> None:
    running.matcher.answer = matched_in("z1")
    request = with_annotations(fixture("filter-request-nodes"), STRICT_AUTO)
    body = running.post("filter", request).json()
    assert body["NodeNames"] is None
    assert [n["metadata"]["name"] for n in body["Nodes"]["items"]] == ["n1a", "n1b"]
    assert body["Nodes"]["items"][0] == request["Nodes"]["items"][0]
    assert set(body["FailedNodes"]) == {"n2a", "n3a", "n2b", "n3b"}


def test_prioritize_reuses_the_filters_answer_and_scores_integers(running: Running) -> None:
    running.matcher.answer = matched_in("z2", hydrating=("z1",))
    annotations = {"snapcache.io/use-image-cache": "auto"}
    running.post("filter", with_annotations(fixture("filter-request-nodenames"), annotations))
    response = running.post(
        "prioritize", with_annotations(fixture("prioritize-request-nodenames"), annotations)
    )
    assert response.status_code == 200
    assert response.content == b'[{"Host":"n2a","Score":10},{"Host":"n2b","Score":10}]'
    assert len(running.matcher.requests) == 1
    full = with_annotations(fixture("filter-request-nodes"), annotations, uid="another-pod")
    # nodes that score 0 are left out (the scheduler gives a host it was not told about 0)
    scores = {h["Host"]: h["Score"] for h in running.post("prioritize", full).json()}
    assert scores == {"n1a": 3, "n1b": 3, "n2a": 10, "n2b": 10}


def compact(document: dict[str, Any]) -> bytes:
    """As kube-scheduler writes it (the fast path reads the pod without decoding the names)."""
    return json.dumps(document, separators=(",", ":")).encode()


@pytest.mark.parametrize("annotations", [{"snapcache.io/use-image-cache": "auto"}, STRICT_AUTO, {}])
def test_the_schedulers_compact_bodies_get_the_answers_any_other_layout_gets(
    running: Running, annotations: dict[str, str]
) -> None:
    running.matcher.answer = matched_in("z2", hydrating=("z1",))
    answers: dict[str, list[Any]] = {}
    for layout, encode in (("compact", compact), ("spaced", lambda d: json.dumps(d).encode())):
        for verb in ("filter", "prioritize"):
            request = with_annotations(
                fixture(f"{verb}-request-nodenames"), annotations, uid=f"{layout}-{verb}"
            )
            response = running.post(verb, encode(request))
            assert response.status_code == 200
            answers.setdefault(verb, []).append(response.json())
    assert answers["filter"][0] == answers["filter"][1]
    assert answers["prioritize"][0] == answers["prioritize"][1]
    if annotations:
        asked = [(tuple(q.zones), q.validate_only) for q in running.matcher.requests]
        every = ("z1", "z2", "z3")
        assert asked == [(every, False), (("z2",), False)] * 2  # each layout, the names' zones
        assert answers["prioritize"][0] == [{"Host": "n2a", "Score": 10}, {"Host": "n2b", "Score": 10}]
    else:
        assert running.matcher.requests == [] and answers["prioritize"][0] == []


def test_a_cycle_in_the_schedulers_layout_asks_the_matcher_once(running: Running) -> None:
    running.matcher.answer = matched_in("z2")
    annotations = {"snapcache.io/use-image-cache": "auto"}
    filter_request = with_annotations(fixture("filter-request-nodenames"), annotations, uid="cycle")
    body = running.post("filter", compact(filter_request)).json()
    assert body["NodeNames"] == filter_request["NodeNames"] and body["FailedNodes"] == {}
    prioritize = dict(filter_request)  # the nodes that passed: all of them
    assert running.post("prioritize", compact(prioritize)).content == (
        b'[{"Host":"n2a","Score":10},{"Host":"n2b","Score":10}]'
    )
    [asked] = running.matcher.requests
    assert sorted(asked.zones) == ["z1", "z2", "z3"] and not asked.validate_only


def test_unannotated_pod_is_answered_without_the_matcher(running: Running) -> None:
    request = with_annotations(fixture("filter-request-nodenames"), {})
    assert running.post("filter", request).json()["NodeNames"] == request["NodeNames"]
    prioritize = with_annotations(fixture("prioritize-request-nodenames"), {})
    # [] gives every node 0: the scheduler adds the scores of the hosts listed
    assert running.post("prioritize", prioritize).content == b"[]"
    # compact, as the scheduler writes it (read without decoding the node names), and not
    assert running.post("prioritize", json.dumps(prioritize, separators=(",", ":")).encode()).content == b"[]"
    assert running.post("prioritize", json.dumps(prioritize, indent=1).encode()).content == b"[]"
    assert running.matcher.requests == []


def test_unknown_node_names_pass_with_score_zero(running: Running) -> None:
    running.matcher.answer = matched_in("z1")
    annotations = {"snapcache.io/use-image-cache": "auto"}
    request = with_annotations(fixture("prioritize-request-nodenames"), annotations)
    request["NodeNames"] = ["n1a", "ghost-1", "ghost-2"]
    assert running.post("prioritize", request).json() == [{"Host": "n1a", "Score": 10}]  # ghosts: 0
    assert running.post("filter", request).json()["NodeNames"] == ["n1a", "ghost-1", "ghost-2"]
    strict = with_annotations(request, STRICT_AUTO, uid="strict-ghosts")
    body = running.post("filter", strict).json()
    assert (
        body["NodeNames"] == ["n1a"]
        and "label (or is unknown to the extender)" in body["FailedNodes"]["ghost-1"]
    )


def test_matcher_slow_or_down_fails_open_within_the_budget(running: Running) -> None:
    running.matcher.answer = matched_in("z1")
    running.matcher.delay = 2.0
    request = with_annotations(fixture("filter-request-nodenames"), STRICT_AUTO)
    started = time.monotonic()
    body = running.post("filter", request).json()
    assert time.monotonic() - started < 1.5
    assert body["NodeNames"] == request["NodeNames"] and body["FailedNodes"] == {}
    running.grpc_server.stop(0)
    prioritize = with_annotations(fixture("prioritize-request-nodenames"), STRICT_AUTO, uid="other")
    assert running.post("prioritize", prioritize).json() == []  # every node 0
    metrics = running.client.get(f"{running.url}/metrics").text
    assert 'snapcache_extender_fail_open_total{code="DEADLINE_EXCEEDED"} 1.0' in metrics
    assert 'snapcache_extender_fail_open_total{code="UNAVAILABLE"} 1.0' in metrics
    assert "snapcache_extender_node_cache_synced 0.0" in metrics


BAD_BODIES = [
    b"{not json",
    b"",
    b"null",
    b"[1, 2]",
    b'{"NodeNames": ["n1"]}',
    b'{"Pod": {"metadata": {"name": 5}}, "NodeNames": ["n1"]}',
    b'{"Pod": {"metadata": {}}, "NodeNames": [1]}',
    b'{"Pod": {"metadata": {}}, "Nodes": {"items": [{"metadata": []}]}}',
    b'{"Pod": {"metadata": {}, "spec": {"containers": "nginx"}}, "NodeNames": []}',
    "\udcff".encode("utf-8", "surrogatepass"),
]


@pytest.mark.parametrize("body", BAD_BODIES)
@pytest.mark.parametrize("verb", ["filter", "prioritize"])
def test_bad_input_is_a_400_with_a_message(running: Running, verb: str, body: bytes) -> None:
    response = running.post(verb, body)
    assert response.status_code == 400, response.text
    assert response.json()["Error"]
    assert response.json()["reason"] == "INVALID_EXTENDER_ARGS"


def test_a_50_mb_body_is_refused_quickly_and_the_server_keeps_answering(running: Running) -> None:
    body = b'{"Pod": {"metadata": {}}, "NodeNames": [' + b'"n",' * (50 * 1024 * 1024 // 4) + b'"n"]}'
    started = time.monotonic()
    response = running.post("filter", body)
    assert response.status_code == 413
    assert "over the limit" in response.json()["Error"]
    assert time.monotonic() - started < 5
    assert running.client.get(f"{running.url}/healthz").text == "ok"


def raw(running: Running, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", running.app.port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


def test_length_required_and_unknown_paths(running: Running) -> None:
    assert raw(running, b"POST /snapcache/filter HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 411")
    chunked = b"POST /snapcache/filter HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert raw(running, chunked).startswith(b"HTTP/1.1 411")
    assert running.post("bind", b"{}").status_code == 404
    assert running.client.get(f"{running.url}/nothing").status_code == 404
    assert running.client.get(f"{running.url}/healthz").text == "ok"


def test_a_client_that_stops_sending_does_not_hold_the_server(running: Running) -> None:
    with socket.create_connection(("127.0.0.1", running.app.port), timeout=5) as stalled:
        stalled.sendall(b"POST /snapcache/filter HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        request = with_annotations(fixture("filter-request-nodenames"), {})
        assert running.post("filter", request).status_code == 200  # served meanwhile
        stalled.settimeout(3)
        assert stalled.recv(100) == b""  # closed after the socket timeout, no answer
