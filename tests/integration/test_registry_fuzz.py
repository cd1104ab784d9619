"""Property-based bad input through the registry's use cases: a malformed request writes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.cache_registry import store
from services.cache_registry.model import CacheSpec
from snapcache.errors import InvalidArgument
from snapcache.images import InvalidImageReference, parse_image_reference
from tests.support.fake_provider import FakeProvider
from tests.support.registry_harness import Harness, build_harness, close_harness


@pytest.fixture(scope="module")
def sqlite_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    path: Path = tmp_path_factory.mktemp("fuzz") / "registry.db"
    built = build_harness(f"sqlite:///{path}", FakeProvider())
    yield built
    close_harness(built)


def _valid(text: str) -> bool:
    try:
        parse_image_reference(text)
    except InvalidImageReference:
        return False
    return True


reference_like = st.text(alphabet="abcXYZ019:/@._-+ \t", min_size=0, max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(images=st.lists(st.one_of(reference_like, st.text(max_size=30)), min_size=0, max_size=4))
def test_malformed_images_are_refused_and_nothing_is_written(
    sqlite_harness: Harness, images: list[str]
) -> None:
    with sqlite_harness.database.transaction(write=False) as session:
        before = store.current_revision(session)
    normalized = [str(parse_image_reference(i)) for i in images if _valid(i)]
    should_pass = bool(images) and len(normalized) == len(images) and len(set(normalized)) == len(normalized)
    try:
        created = sqlite_harness.registry.create(
            spec=CacheSpec(images=tuple(images), cache_size_gib=0, retention_days=0)
        )
    except InvalidArgument as exc:
        assert not should_pass, exc.message
        assert exc.violations and all(v.field.startswith("image_cache.images") for v in exc.violations)
        with sqlite_harness.database.transaction(write=False) as session:
            assert store.current_revision(session) == before, "a refused create must write nothing"
        return
    assert should_pass
    assert list(created.spec.images) == images
