"""The node cache as its list + watch loop's target: lists replace the index, events edit it."""

from __future__ import annotations

from kubernetes import client as kube_client

from services.extender.node_cache import NodeZoneCache


def node(name: str, zone: str | None = None) -> dict[str, object]:
    labels = {"topology.kubernetes.io/zone": zone} if zone else {}
    return {"metadata": {"name": name, "resourceVersion": "1", "labels": labels}}


def test_a_list_replaces_the_index_and_events_edit_it() -> None:
    cache = NodeZoneCache(kube_client.ApiClient(kube_client.Configuration()))
    cache.replace([node("n1", "a"), node("n2", "b"), node("bare")])
    before = cache.zones()
    assert (cache.zone("n1"), cache.zone("n2"), cache.zone("bare"), cache.size()) == ("a", "b", None, 3)
    cache.apply("ADDED", node("n3", "c"))
    cache.apply("MODIFIED", node("n1", "z"))
    cache.apply("DELETED", node("n2"))
    cache.apply("ADDED", {"metadata": {}})  # nameless: ignored
    assert (cache.zone("n1"), cache.zone("n2"), cache.zone("n3"), cache.size()) == ("z", None, "c", 3)
    cache.replace([node("n4", "d")])  # a relist: exactly what was listed, in a new index
    assert (cache.zone("n1"), cache.zone("n4"), cache.size()) == (None, "d", 1)
    assert cache.zones() is not before and before.get("n1") == "z"  # readers of the old one unharmed
