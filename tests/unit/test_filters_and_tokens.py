"""List filters (AIP-160 subset) and opaque page tokens."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.cache_registry.filtering import CacheFilter, parse_filter
from services.cache_registry.model import CacheState
from snapcache import page_tokens
from snapcache.errors import InvalidArgument


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", CacheFilter()),
        ("state = READY", CacheFilter(states=frozenset({CacheState.READY}))),
        ("state=ready", CacheFilter(states=frozenset({CacheState.READY}))),
        ('image = "nginx"', CacheFilter(image="docker.io/library/nginx:latest")),
        ("image = nginx:1.25", CacheFilter(image="docker.io/library/nginx:1.25")),
        (
            'state = FAILED AND labels.team = "a b" AND image = redis',
            CacheFilter(
                states=frozenset({CacheState.FAILED}),
                image="docker.io/library/redis:latest",
                labels=(("team", "a b"),),
            ),
        ),
    ],
)
def test_filters_parse(text: str, expected: CacheFilter) -> None:
    assert parse_filter(text) == expected


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("state = NAPPING", "unknown state"),
        ("colour = red", "unknown field"),
        ("state READY", "cannot parse"),
        ("image = UPPER/case", "image"),
        ("state = READY AND state = FAILED", "once"),
        ("state = READY OR state = FAILED", "cannot parse"),
        ("x" * 3000, "2048"),
    ],
)
def test_bad_filters_name_the_problem(text: str, mentions: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(text)
    assert caught.value.reason == "INVALID_FILTER"
    assert mentions in caught.value.message


@given(st.text(max_size=200))
def test_filter_parser_never_crashes(text: str) -> None:
    with contextlib.suppress(InvalidArgument):
        parse_filter(text)


def test_page_token_round_trip_and_scope() -> None:
    token = page_tokens.encode({"after": "imc-aaaaaaaa"}, scope="caches:")
    assert page_tokens.decode(token, scope="caches:") == {"after": "imc-aaaaaaaa"}
    with pytest.raises(InvalidArgument):
        page_tokens.decode(token, scope="caches:state = READY")


@given(st.text(max_size=300))
def test_page_token_decoding_never_crashes(token: str) -> None:
    try:
        page_tokens.decode(token, scope="caches:")
    except InvalidArgument as exc:
        assert exc.reason == "INVALID_PAGE_TOKEN"


@given(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=255))
def test_any_single_byte_change_is_detected(position: int, value: int) -> None:
    token = page_tokens.encode({"after": "imc-abcdefgh"}, scope="caches:")
    raw = bytearray(token.encode())
    index = position % len(raw)
    replacement = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[value % 64]
    if chr(raw[index]) == replacement:
        return
    raw[index] = ord(replacement)
    try:
        decoded = page_tokens.decode(raw.decode(), scope="caches:")
    except InvalidArgument:
        return
    # base64 padding bits can change without changing the bytes: then the cursor is the same
    assert decoded == {"after": "imc-abcdefgh"}
