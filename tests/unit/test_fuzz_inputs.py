"""Fuzzing the parsers that take input from outside (hypothesis, bounded so the file runs in seconds).

Each property says what the only acceptable outcomes are: the parser's own error type, or a value
that round-trips; for the extender, a 200 or a 400 through the real HTTP server, never a 500, a
dropped connection or an exception. Inputs are both random and built near the grammar (a checksum
that is right, JSON of the right shape with the wrong types), since random bytes rarely get past
a parser's first check.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.extender.api import decode_args
from services.extender.decisions import DecisionCache
from services.extender.http_app import ExtenderHTTPServer, ExtenderRoutes, serve_in_thread
from services.extender.matches import Candidate, MatchAnswer, MatchQuery
from services.extender.metrics import ExtenderMetrics
from services.extender.scheduling import NoEvents, Scheduling
from services.matcher.match_requests import build_request
from snapcache import page_tokens
from snapcache.errors import InvalidArgument, SnapcacheError
from snapcache.images import InvalidImageReference, parse_image_reference
from snapcache.pod_requests import Mode

pytestmark = pytest.mark.filterwarnings(
    # hypothesis imports libcst to print a failing example; that import warns (see test_images)
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning",
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Near the grammar: the characters references are made of, so parts of the parser beyond the
# first check are reached.
REFERENCE_TEXT = st.text(alphabet="abcAB019-._/:@+sha256cdef ", max_size=60)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


# --- image references ------------------------------------------------------------------------


@FAST
@given(st.one_of(st.text(max_size=300), REFERENCE_TEXT))
@example("docker.io/library/nginx")
@example("localhost:5000/a@sha256:" + "a" * 64)
@example("a" * 300)
def test_image_reference_only_raises_its_own_error_and_round_trips(text: str) -> None:
    try:
        ref = parse_image_reference(text)
    except InvalidImageReference:
        return
    normalized = str(ref)
    again = parse_image_reference(normalized)
    assert str(again) == normalized  # the normalized form is a fixed point
    assert (again.registry, again.repository, again.tag, again.digest) == (
        ref.registry,
        ref.repository,
        ref.tag,
        ref.digest,
    )


@FAST
@given(JSON)
def test_image_reference_of_any_decoded_json_value_raises_its_own_error(value: Any) -> None:
    if isinstance(value, str):
        return
    with pytest.raises(InvalidImageReference):
        parse_image_reference(value)


# --- page tokens -----------------------------------------------------------------------------

SCOPE = "events:imc-abcdefgh"


def _signed(payload: bytes, scope: str = SCOPE) -> str:
    """A token with a correct checksum around any payload: what a client can forge."""
    body = payload + b"." + page_tokens._checksum(payload, scope).encode()
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


def _decoded_or_invalid(token: str, expect: dict[str, type]) -> dict[str, Any] | None:
    try:
        return page_tokens.decode(token, scope=SCOPE, expect=expect)
    except InvalidArgument as exc:
        assert exc.reason == "INVALID_PAGE_TOKEN"
        return None


@FAST
@given(
    st.one_of(
        st.text(max_size=500), st.binary(max_size=400).map(lambda b: base64.urlsafe_b64encode(b).decode())
    )
)
def test_any_text_or_bytes_as_a_page_token_is_invalid_page_token(token: str) -> None:
    assert _decoded_or_invalid(token, {"after": int}) is None


@FAST
@given(st.one_of(st.binary(max_size=300), JSON.map(lambda v: json.dumps(v).encode())))
@example(b"[" * 2500)  # nested past the interpreter's stack: was a RecursionError (INTERNAL)
@example(b'{"v":1,"after":"x"}')  # was int("x") in the events listing: INTERNAL
@example(b'{"v":1,"after":99999999999999999999999}')  # past SQL's integers
def test_forged_tokens_with_a_good_checksum_decode_to_the_expected_types_or_are_refused(
    payload: bytes,
) -> None:
    cursor = _decoded_or_invalid(_signed(payload), {"after": int})
    if cursor is not None:
        after = cursor.get("after", 0)
        assert type(after) is int and 0 <= after < 2**63


@FAST
@given(st.dictionaries(st.sampled_from(["after", "x"]), JSON, max_size=2))
def test_issued_tokens_round_trip(cursor: dict[str, Any]) -> None:
    token = page_tokens.encode(cursor, scope=SCOPE)
    assert page_tokens.decode(token, scope=SCOPE) == cursor


# --- the extender's JSON input ---------------------------------------------------------------


def _pod(annotations: Any, containers: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "uid": "u", "annotations": annotations},
        "spec": {"containers": containers},
    }


# Shaped like the scheduler's ExtenderArgs, with random values where the types matter.
EXTENDER_ARGS = st.fixed_dictionaries(
    {},
    optional={
        "Pod": st.one_of(
            JSON,
            st.builds(
                _pod,
                st.one_of(JSON, st.just({"snapcache.io/use-image-cache": "auto"})),
                st.one_of(
                    JSON, st.lists(st.fixed_dictionaries({"name": JSON, "image": REFERENCE_TEXT}), max_size=3)
                ),
            ),
        ),
        "NodeNames": st.one_of(JSON, st.lists(st.one_of(st.text(max_size=8), JSON), max_size=5)),
        "Nodes": st.one_of(JSON, st.fixed_dictionaries({"items": st.lists(JSON, max_size=3)})),
    },
)
BODIES = st.one_of(
    st.binary(max_size=300),
    JSON.map(lambda v: json.dumps(v).encode()),  # json, not orjson: integers past 64 bits too
    EXTENDER_ARGS.map(lambda v: json.dumps(v).encode()),
)


@FAST
@given(BODIES)
def test_decode_args_raises_only_invalid_argument(body: bytes) -> None:
    with contextlib.suppress(InvalidArgument):
        decode_args(body)


class _Matcher:
    """Answers every pod with one candidate in zone-a (no gRPC: the HTTP edge is under test)."""

    def __call__(self, query: MatchQuery) -> MatchAnswer:
        return MatchAnswer(
            decision="MATCHED",
            action="USE_CACHE",
            image_cache="imageCaches/imc-abcdefgh",
            candidates=(Candidate("imageCaches/imc-abcdefgh", 1, frozenset({"zone-a"})),),
        )


@pytest.fixture(scope="module")
def extender() -> Iterator[tuple[http.client.HTTPConnection, ExtenderMetrics]]:
    metrics = ExtenderMetrics(node_cache_synced=lambda: True, node_cache_size=lambda: 1)
    scheduling = Scheduling(
        match=_Matcher(),
        node_zones=lambda: {"n1": "zone-a", "n2": None},
        decisions=DecisionCache(ttl_seconds=0.001),
        events=NoEvents(),
        default_mode=Mode.AUTO,
    )
    routes = ExtenderRoutes(scheduling=scheduling, metrics=metrics)
    server = ExtenderHTTPServer(("127.0.0.1", 0), routes, max_body_bytes=64 * 1024, socket_timeout=5)
    thread = serve_in_thread(server)
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
    try:
        yield connection, metrics
    finally:
        connection.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES, verb=st.sampled_from(["filter", "prioritize"]))
def test_the_http_app_answers_any_body_with_200_or_400(
    extender: tuple[http.client.HTTPConnection, ExtenderMetrics], body: bytes, verb: str
) -> None:
    connection, _metrics = extender
    connection.request("POST", f"/{verb}", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = response.read()
    assert response.status in (200, 400), (response.status, answer)
    decoded = orjson.loads(answer)  # always JSON, also for a 400
    if response.status == 400:
        assert decoded["reason"] and decoded["code"] == 400


def test_the_fuzzed_http_app_never_failed_open(
    extender: tuple[http.client.HTTPConnection, ExtenderMetrics],
) -> None:
    """A 200 made by the fail-open path hides an exception: the counter says there was none."""
    _connection, metrics = extender
    assert b'snapcache_extender_fail_open_total{code="EXTENDER_ERROR"}' not in metrics.render()


# --- the matcher's request building ----------------------------------------------------------


@FAST
@given(
    images=st.lists(st.one_of(REFERENCE_TEXT, st.text(max_size=40)), max_size=6),
    image_cache=st.one_of(st.just(""), st.just("imc-abcdefgh"), st.text(max_size=20)),
    policy=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    min_images_covered=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    strict=st.booleans(),
    zones=st.lists(st.text(max_size=10), max_size=4),
    max_candidates=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    max_rejections=st.integers(min_value=-(2**31), max_value=2**31 - 1),
)
def test_build_request_returns_a_request_or_invalid_argument(**fields: Any) -> None:
    try:
        request = build_request(**fields)
    except SnapcacheError as exc:
        assert isinstance(exc, InvalidArgument), exc
        assert exc.violations  # every refusal names its fields
        return
    assert request is not None
