"""The node cache's loop: list, watch from the list's version, resume after a drop, relist on 410."""

from __future__ import annotations

import pytest
import urllib3
from kubernetes import client as kube_client
from kubernetes.client.exceptions import ApiException

from services.extender.node_cache import NodeZoneCache


def test_resumes_from_the_last_version_and_relists_only_on_410() -> None:
    cache = NodeZoneCache(kube_client.ApiClient(kube_client.Configuration()), retry_seconds=0.01)
    calls: list[str] = []
    lists = iter(["10", "20"])
    follows = iter(
        [
            lambda v: "15",  # the watch timed out normally: resume from the last version seen
            lambda v: (_ for _ in ()).throw(urllib3.exceptions.ProtocolError("dropped")),  # resume too
            lambda v: (_ for _ in ()).throw(ApiException(status=410, reason="Gone")),  # relist
            lambda v: cache._stopping.set() or v,
        ]
    )

    def fake_list() -> str:
        version = next(lists)
        calls.append(f"list->{version}")
        return version

    def fake_follow(version: str) -> str:
        calls.append(f"follow({version})")
        result: str = next(follows)(version)
        return result

    cache._list = fake_list  # type: ignore[method-assign]
    cache._follow = fake_follow  # type: ignore[method-assign]
    cache._run()
    assert calls == ["list->10", "follow(10)", "follow(15)", "follow(15)", "list->20", "follow(20)"]


class FakeWatch:
    """Yields scripted watch events."""

    def __init__(self, events: list[dict[str, object]]) -> None:
        self.events = events

    def stream(self, *_args: object, **kwargs: object) -> list[dict[str, object]]:
        assert kwargs["resource_version"] == "7"
        return self.events

    def stop(self) -> None:
        pass


def node_event(kind: str, name: str, version: str, zone: str | None = None) -> dict[str, object]:
    labels = {"topology.kubernetes.io/zone": zone} if zone else {}
    return {
        "type": kind,
        "raw_object": {"metadata": {"name": name, "resourceVersion": version, "labels": labels}},
    }


def test_watch_events_update_zones_and_an_expired_version_is_a_410() -> None:
    cache = NodeZoneCache(kube_client.ApiClient(kube_client.Configuration()))
    events = [
        node_event("ADDED", "n1", "8", "a"),
        node_event("ADDED", "n2", "9", "b"),
        node_event("MODIFIED", "n1", "10", "c"),
        node_event("DELETED", "n2", "11"),
        {"type": "BOOKMARK", "raw_object": {"metadata": {"resourceVersion": "12"}}},
    ]
    cache.make_watch = lambda: FakeWatch(events)  # type: ignore[assignment,return-value]
    assert cache._follow("7") == "12"
    assert (cache.zone("n1"), cache.zone("n2"), cache.size()) == ("c", None, 1)
    expired = [{"type": "ERROR", "raw_object": {"kind": "Status", "code": 410, "reason": "Expired"}}]
    cache.make_watch = lambda: FakeWatch(expired)  # type: ignore[assignment,return-value]
    with pytest.raises(ApiException) as caught:
        cache._follow("7")
    assert caught.value.status == 410
