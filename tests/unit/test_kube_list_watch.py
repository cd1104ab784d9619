"""The list + watch loop's logic through its seams: when it resumes, when it relists, what it hands on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from snapcache.kube_list_watch import ListWatch


class Target:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def replace(self, items: Sequence[Mapping[str, Any]]) -> None:
        self.calls.append(("replace", [i["metadata"]["name"] for i in items]))

    def apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        self.calls.append((kind, obj["metadata"]["name"]))


def never_called(*_args: object, **_kwargs: object) -> object:
    raise AssertionError("the list call is replaced in these tests")


def test_resumes_from_the_last_version_and_relists_only_on_410_or_a_target_failure() -> None:
    loop = ListWatch(never_called, Target(), what="things", retry_seconds=0.01)
    calls: list[str] = []
    lists = iter(["10", "20", "30"])
    follows = iter(
        [
            lambda v: "15",  # the watch timed out normally: resume from the last version seen
            lambda v: (_ for _ in ()).throw(urllib3.exceptions.ProtocolError("dropped")),  # resume too
            lambda v: (_ for _ in ()).throw(ApiException(status=403, reason="Forbidden")),  # resume too
            lambda v: (_ for _ in ()).throw(ApiException(status=410, reason="Gone")),  # relist
            lambda v: (_ for _ in ()).throw(KeyError("a bug in the target")),  # relist
            lambda v: loop._stopping.set() or v,
        ]
    )

    def fake_list() -> str:
        version = next(lists)
        calls.append(f"list->{version}")
        return version

    def fake_watch(version: str) -> str:
        calls.append(f"watch({version})")
        result: str = next(follows)(version)
        return result

    loop.list_once = fake_list  # type: ignore[method-assign]
    loop.watch_once = fake_watch  # type: ignore[method-assign]
    loop.run()
    assert calls == [
        "list->10",
        "watch(10)",
        "watch(15)",
        "watch(15)",
        "watch(15)",
        "list->20",
        "watch(20)",
        "list->30",
        "watch(30)",
    ]


class FakeWatch:
    """Yields scripted watch events."""

    def __init__(self, events: list[dict[str, object]]) -> None:
        self.events = events

    def stream(self, *_args: object, **kwargs: object) -> list[dict[str, object]]:
        assert kwargs["resource_version"] == "7" and kwargs["allow_watch_bookmarks"] is True
        return self.events

    def stop(self) -> None:
        pass


def event(kind: str, name: str, version: str) -> dict[str, object]:
    return {"type": kind, "raw_object": {"metadata": {"name": name, "resourceVersion": version}}}


def test_events_reach_the_target_bookmarks_move_the_version_and_an_error_410_raises() -> None:
    target = Target()
    loop = ListWatch(never_called, target, what="things")
    events = [
        event("ADDED", "a", "8"),
        event("MODIFIED", "a", "9"),
        event("DELETED", "a", "10"),
        {"type": "BOOKMARK", "raw_object": {"metadata": {"resourceVersion": "12"}}},
    ]
    loop.make_watch = lambda: FakeWatch(events)  # type: ignore[assignment,return-value]
    assert loop.watch_once("7") == "12"
    assert target.calls == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    expired = [{"type": "ERROR", "raw_object": {"kind": "Status", "code": 410, "reason": "Expired"}}]
    loop.make_watch = lambda: FakeWatch(expired)  # type: ignore[assignment,return-value]
    with pytest.raises(ApiException) as caught:
        loop.watch_once("7")
    assert caught.value.status == 410
