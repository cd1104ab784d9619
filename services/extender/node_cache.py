"""Node name -> zone, kept in memory by list + watch (NodeNames mode sends names only).

With `nodeCacheCapable: true` the scheduler sends node names, not Node objects; their zones come
from here. A full list, then a watch from the list's resourceVersion; a dropped watch resumes
from the last version seen; a 410 Gone (the version was compacted) relists. Until the first list
and without Kubernetes access every node is zone-less (score 0, strict pods fail open on nothing:
they see no usable zone); the `node_cache_synced` metric says so. The only module of this wing
that imports the Kubernetes client (its events on pods go through `snapcache.pod_events`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import orjson
import urllib3
from kubernetes import client as kube_client
from kubernetes import watch as kube_watch
from kubernetes.client.exceptions import ApiException

from services.extender.node_index import NodeIndex
from snapcache.node_zones import zone_of

log = logging.getLogger(__name__)

_GONE = 410


class NodeZoneCache:
    """Zones of the cluster's nodes, followed in a thread."""

    def __init__(
        self,
        api_client: kube_client.ApiClient,
        *,
        watch_timeout_seconds: int = 60,
        retry_seconds: float = 1.0,
        max_retry_seconds: float = 30.0,
    ) -> None:
        self._core = kube_client.CoreV1Api(api_client)
        self._zones = NodeIndex()
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._watch_timeout = watch_timeout_seconds
        self._retry = retry_seconds
        self._max_retry = max_retry_seconds
        self._thread: threading.Thread | None = None
        self._watch: kube_watch.Watch | None = None
        self.make_watch = kube_watch.Watch  # a seam for tests
        self.relists = 0

    def zone(self, name: str) -> str | None:
        """The node's zone; None for a node without one or not (yet) known."""
        return self._zones.get(name)

    def zones(self) -> NodeIndex:
        """The current name -> zone index (read-only for callers; replaced whole on a relist)."""
        return self._zones

    def synced(self) -> bool:
        """True once the first list has been loaded."""
        return self._synced.is_set()

    def size(self) -> int:
        """Nodes known."""
        return len(self._zones)

    def wait_synced(self, timeout: float) -> bool:
        """Wait for the first list."""
        return self._synced.wait(timeout)

    def start(self) -> None:
        """Start following the nodes."""
        self._thread = threading.Thread(target=self._run, name="extender-node-cache", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following (the watch ends at its next event or timeout; the thread is a daemon)."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()  # type: ignore[no-untyped-call]
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        version = ""
        failures = 0
        while not self._stopping.is_set():
            try:
                if not version:
                    version = self._list()
                version = self._follow(version)
                failures = 0
                continue
            except ApiException as exc:
                if exc.status == _GONE:
                    log.info("node watch expired (410 Gone); relisting")
                    version = ""
                    continue
                # 403 (no RBAC for nodes) and friends: NodeNames requests see zone-less nodes
                log.warning("node cache: Kubernetes API error %s %s; retrying", exc.status, exc.reason)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                log.warning("node cache: cannot reach the Kubernetes API (%s); retrying", type(exc).__name__)
            except Exception:  # the cache must outlive a bug; it retries from a fresh list
                log.exception("node cache failed; relisting")
                version = ""
            failures += 1
            self._stopping.wait(min(self._retry * 2 ** min(failures - 1, 10), self._max_retry))

    def _list(self) -> str:
        # Raw JSON through orjson: deserializing thousands of V1Node models costs seconds.
        response = self._core.list_node(_preload_content=False, _request_timeout=60)
        document = orjson.loads(response.data)  # type: ignore[attr-defined]
        zones = NodeIndex()
        for item in document.get("items") or ():
            metadata = item.get("metadata") or {}
            zones.set(metadata.get("name", ""), zone_of(metadata.get("labels")))
        self._zones = zones  # one reference swap: readers never see a half-built index
        self.relists += 1
        self._synced.set()
        version = str((document.get("metadata") or {}).get("resourceVersion") or "")
        log.info("node cache listed %d nodes at resourceVersion %s", len(zones), version)
        return version

    def _follow(self, version: str) -> str:
        self._watch = self.make_watch()  # type: ignore[no-untyped-call]
        for event in self._watch.stream(  # type: ignore[no-untyped-call]
            self._core.list_node,
            resource_version=version,
            timeout_seconds=self._watch_timeout,
            allow_watch_bookmarks=True,
            _request_timeout=self._watch_timeout + 10,
        ):
            if self._stopping.is_set():
                break
            kind = event.get("type")
            raw: Mapping[str, Any] = event.get("raw_object") or {}
            if kind == "ERROR":
                if raw.get("code") == _GONE:
                    raise ApiException(status=_GONE, reason="Gone")
                raise ApiException(status=int(raw.get("code") or 500), reason=str(raw.get("reason")))
            metadata = raw.get("metadata") or {}
            version = str(metadata.get("resourceVersion") or version)
            name = metadata.get("name")
            if kind == "BOOKMARK" or not name:
                continue
            if kind == "DELETED":
                self._zones.remove(name)
            else:
                self._zones.set(name, zone_of(metadata.get("labels")))
        return version
