"""The extender's wiring applies its garbage-collector policy: what lives as long as the process is frozen."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from services.extender.matches import MatchAnswer, MatchQuery
from services.extender.server import ExtenderApp, ExtenderConfig


class NoMatcher:
    def match(self, query: MatchQuery) -> MatchAnswer:
        return MatchAnswer.unknown("not asked in these tests")

    def close(self) -> None:
        pass


class ListingNodeCache:
    """A node cache whose first list leaves objects behind (as the Kubernetes client's would)."""

    def __init__(self) -> None:
        self.left_behind: list[object] = []

    def start(self) -> None:
        pass

    def wait_synced(self, timeout: float) -> bool:
        self.left_behind = [object()]  # made while start() waits for the first list
        return True

    def stop(self) -> None:
        pass


def collectable(thing: object) -> bool:
    """True while the cyclic collector still walks ``thing`` (not frozen)."""
    return any(tracked is thing for tracked in gc.get_objects())


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the freeze is process-wide: the next test starts from a plain collector


def extender(*, freeze_gc: bool) -> ExtenderApp:
    config = ExtenderConfig(matcher_target="", listen="127.0.0.1:0", freeze_gc=freeze_gc)
    return ExtenderApp(config, matcher=lambda _fail_open: NoMatcher())


def test_start_freezes_what_was_built_and_what_the_first_node_list_left() -> None:
    built_before = [object()]
    app = extender(freeze_gc=True)
    nodes = ListingNodeCache()
    app.node_cache = nodes  # type: ignore[assignment]
    assert collectable(built_before) and collectable(app.scheduling)
    try:
        app.start(wait_nodes_seconds=1)
        assert nodes.left_behind, "the fake node cache was not waited for"
        assert not collectable(built_before)
        assert not collectable(app.scheduling)
        assert not collectable(nodes.left_behind)  # frozen after the wait, not before it
        made_by_requests = [object()]
        assert collectable(made_by_requests)  # only what existed at start-up is frozen
    finally:
        app.stop()


def test_freeze_gc_off_leaves_the_collector_alone() -> None:
    built_before = [object()]
    app = extender(freeze_gc=False)
    try:
        app.start()
        assert collectable(built_before) and collectable(app.scheduling)
    finally:
        app.stop()
