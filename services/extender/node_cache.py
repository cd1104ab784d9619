"""Node name -> zone, kept in memory by list + watch (NodeNames mode sends names only).

With `nodeCacheCapable: true` the scheduler sends node names, not Node objects; their zones come
from here. A full list, then a watch from the list's resourceVersion, by the project's one list +
watch loop (`snapcache.kube_list_watch`: a dropped watch resumes from the last version seen; a 410
Gone, the version compacted, relists). Until the first list and without Kubernetes access every
node is zone-less (score 0, strict pods fail open on nothing: they see no usable zone); the
`node_cache_synced` metric says so. The only module of this wing
that imports the Kubernetes client (its events on pods go through `snapcache.pod_events`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubernetes import client as kube_client

from services.extender.node_index import NodeIndex
from snapcache.kube_list_watch import ListWatch
from snapcache.node_zones import zone_of


class NodeZoneCache:
    """Zones of the cluster's nodes, followed in a thread (the target of a `ListWatch`)."""

    def __init__(
        self,
        api_client: kube_client.ApiClient,
        *,
        watch_timeout_seconds: int = 60,
        retry_seconds: float = 1.0,
        max_retry_seconds: float = 30.0,
    ) -> None:
        self._zones = NodeIndex()
        self.following = ListWatch(
            kube_client.CoreV1Api(api_client).list_node,
            self,
            what="nodes",
            watch_timeout_seconds=watch_timeout_seconds,
            retry_seconds=retry_seconds,
            max_retry_seconds=max_retry_seconds,
        )

    def zone(self, name: str) -> str | None:
        """The node's zone; None for a node without one or not (yet) known."""
        return self._zones.get(name)

    def zones(self) -> NodeIndex:
        """The current name -> zone index (read-only for callers; replaced whole on a relist)."""
        return self._zones

    @property
    def relists(self) -> int:
        """Full lists done, the first included."""
        return self.following.relists

    def synced(self) -> bool:
        """True once the first list has been loaded."""
        return self.following.synced()

    def size(self) -> int:
        """Nodes known."""
        return len(self._zones)

    def wait_synced(self, timeout: float) -> bool:
        """Wait for the first list."""
        return self.following.wait_synced(timeout)

    def start(self) -> None:
        """Start following the nodes."""
        self.following.start()

    def stop(self) -> None:
        """Stop following."""
        self.following.stop()

    def replace(self, items: Sequence[Mapping[str, Any]]) -> None:
        """A full list: a new index, swapped in whole (readers never see a half-built one)."""
        zones = NodeIndex()
        for item in items:
            metadata = item.get("metadata") or {}
            zones.set(metadata.get("name", ""), zone_of(metadata.get("labels")))
        self._zones = zones

    def apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        """One watch event: a node added, relabelled or deleted."""
        metadata = obj.get("metadata") or {}
        name = metadata.get("name")
        if not name:
            return
        if kind == "DELETED":
            self._zones.remove(name)
        else:
            self._zones.set(name, zone_of(metadata.get("labels")))
