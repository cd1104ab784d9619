"""The node agent's Kubernetes edge: the pods bound to this node, its zone, and events on pods.

The only module of this wing that imports the Kubernetes client (see ``.importlinter``).

- ``NodePods``: a list, then a watch from the list's resourceVersion, of the pods with
  ``spec.nodeName=NODE`` (a field selector: the API server filters, so a 5,000-node cluster
  costs each agent only its own pods). A dropped watch resumes from the last version seen; a 410
  Gone (the version was compacted) relists. Pods that have finished (Succeeded, Failed) are left
  out: they need no disk. Until the first list, ``synced()`` is False and the agent does not
  reconcile, so a restarted agent never takes "no pods known yet" for "no pods".
- events on pods go through the ground floor's ``snapcache.pod_events.PodEvents`` (built on
  the API client this module makes), so a slow API server never holds up provisioning.
- ``node_zone``: the zone label of this node's Node object, for an agent not given ``--zone``
  (a DaemonSet spans zones; the downward API does not expose node labels).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import orjson
import urllib3
from kubernetes import client as kube_client
from kubernetes import watch as kube_watch
from kubernetes.client.exceptions import ApiException

from snapcache.node_zones import zone_of
from snapcache.pod_requests import PodInfo, pod_info

log = logging.getLogger(__name__)

_GONE = 410
_FINISHED = frozenset({"Succeeded", "Failed"})


def node_zone(api_client: kube_client.ApiClient, node: str) -> str | None:
    """The zone of Node ``node`` from its labels; None without one; ``ValueError`` if unreadable."""
    core = kube_client.CoreV1Api(api_client)
    try:
        response = core.read_node(node, _preload_content=False, _request_timeout=30)
    except ApiException as exc:
        raise ValueError(f"cannot read node {node} for its zone: {exc.status} {exc.reason}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise ValueError(f"cannot read node {node} for its zone: {type(exc).__name__}") from None
    document = orjson.loads(response.data)  # type: ignore[attr-defined]
    return zone_of((document.get("metadata") or {}).get("labels"))


def _running(raw: Mapping[str, Any]) -> bool:
    status = raw.get("status") or {}
    return status.get("phase") not in _FINISHED


class NodePods:
    """The pods bound to one node, followed in a thread."""

    def __init__(
        self,
        api_client: kube_client.ApiClient,
        *,
        node: str,
        on_change: Callable[[], None] = lambda: None,
        watch_timeout_seconds: int = 60,
        retry_seconds: float = 1.0,
        max_retry_seconds: float = 30.0,
    ) -> None:
        self._core = kube_client.CoreV1Api(api_client)
        self._selector = f"spec.nodeName={node}"
        self._pods: dict[str, PodInfo] = {}
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._on_change = on_change
        self._watch_timeout = watch_timeout_seconds
        self._retry = retry_seconds
        self._max_retry = max_retry_seconds
        self._thread: threading.Thread | None = None
        self._watch: kube_watch.Watch | None = None
        self.relists = 0

    def pods(self) -> dict[str, PodInfo]:
        """A copy of uid -> pod for the pods on the node that have not finished."""
        with self._lock:
            return dict(self._pods)

    def synced(self) -> bool:
        """True once the first list has been loaded."""
        return self._synced.is_set()

    def wait_synced(self, timeout: float) -> bool:
        """Wait for the first list."""
        return self._synced.wait(timeout)

    def start(self) -> None:
        """Start following the node's pods."""
        self._thread = threading.Thread(target=self._run, name="node-agent-pods", daemon=True)
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
                    log.info("pod watch expired (410 Gone); relisting")
                    version = ""
                    continue
                log.warning("pod watch: Kubernetes API error %s %s; retrying", exc.status, exc.reason)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                log.warning("pod watch: cannot reach the Kubernetes API (%s); retrying", type(exc).__name__)
            except Exception:  # the watch must outlive a bug; it retries from a fresh list
                log.exception("pod watch failed; relisting")
                version = ""
            failures += 1
            self._stopping.wait(min(self._retry * 2 ** min(failures - 1, 10), self._max_retry))

    def _list(self) -> str:
        response = self._core.list_pod_for_all_namespaces(
            field_selector=self._selector, _preload_content=False, _request_timeout=60
        )
        document = orjson.loads(response.data)  # type: ignore[attr-defined]
        pods = {}
        for item in document.get("items") or ():
            pod = pod_info(item)
            if pod.uid and _running(item):
                pods[pod.uid] = pod
        with self._lock:
            self._pods = pods
        self.relists += 1
        self._synced.set()
        self._on_change()
        version = str((document.get("metadata") or {}).get("resourceVersion") or "")
        log.info("%d pod(s) on the node (%s) at resourceVersion %s", len(pods), self._selector, version)
        return version

    def _follow(self, version: str) -> str:
        self._watch = self.make_watch()
        for event in self._watch.stream(  # type: ignore[no-untyped-call]
            self._core.list_pod_for_all_namespaces,
            field_selector=self._selector,
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
                raise ApiException(status=int(raw.get("code") or 500), reason=str(raw.get("reason")))
            version = str((raw.get("metadata") or {}).get("resourceVersion") or version)
            if kind == "BOOKMARK":
                continue
            pod = pod_info(raw)
            if not pod.uid:
                continue
            with self._lock:
                if kind == "DELETED" or not _running(raw):
                    changed = self._pods.pop(pod.uid, None) is not None
                else:
                    changed = self._pods.get(pod.uid) != pod
                    self._pods[pod.uid] = pod
            if changed:
                self._on_change()
        return version

    def make_watch(self) -> kube_watch.Watch:
        """A new watch (a seam for tests)."""
        return kube_watch.Watch()  # type: ignore[no-untyped-call]
