"""The node agent's Kubernetes edge: the pods bound to this node, its zone, and events on pods.

The only module of this wing that imports the Kubernetes client (see ``.importlinter``).

- ``NodePods``: a list, then a watch from the list's resourceVersion, of the pods with
  ``spec.nodeName=NODE`` (a field selector: the API server filters, so a 5,000-node cluster
  costs each agent only its own pods), by the project's one list + watch loop
  (`snapcache.kube_list_watch`: a dropped watch resumes, a 410 Gone relists). Pods that have
  finished (Succeeded, Failed) are left out: they need no disk. Until the first list,
  ``synced()`` is False and the agent does not reconcile, so a restarted agent never takes "no
  pods known yet" for "no pods".
- events on pods go through the ground floor's ``snapcache.pod_events.PodEvents`` (built on
  the API client this module makes), so a slow API server never holds up provisioning.
- ``node_zone``: the zone label of this node's Node object, for an agent not given ``--zone``
  (a DaemonSet spans zones; the downward API does not expose node labels).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
import urllib3
from kubernetes import client as kube_client
from kubernetes.client.exceptions import ApiException

from snapcache.kube_list_watch import ListWatch
from snapcache.node_zones import zone_of
from snapcache.pod_requests import PodInfo, pod_info

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
    """The pods bound to one node, followed in a thread (the target of a `ListWatch`)."""

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
        self._pods: dict[str, PodInfo] = {}
        self._lock = threading.Lock()
        self._on_change = on_change
        self.following = ListWatch(
            kube_client.CoreV1Api(api_client).list_pod_for_all_namespaces,
            self,
            what=f"pods on {node}",
            list_kwargs={"field_selector": f"spec.nodeName={node}"},
            watch_timeout_seconds=watch_timeout_seconds,
            retry_seconds=retry_seconds,
            max_retry_seconds=max_retry_seconds,
        )

    def pods(self) -> dict[str, PodInfo]:
        """A copy of uid -> pod for the pods on the node that have not finished."""
        with self._lock:
            return dict(self._pods)

    @property
    def relists(self) -> int:
        """Full lists done, the first included."""
        return self.following.relists

    def synced(self) -> bool:
        """True once the first list has been loaded."""
        return self.following.synced()

    def wait_synced(self, timeout: float) -> bool:
        """Wait for the first list."""
        return self.following.wait_synced(timeout)

    def start(self) -> None:
        """Start following the node's pods."""
        self.following.start()

    def stop(self) -> None:
        """Stop following."""
        self.following.stop()

    def replace(self, items: Sequence[Mapping[str, Any]]) -> None:
        """A full list: exactly these pods (those not finished) are on the node."""
        pods = {}
        for item in items:
            pod = pod_info(item)
            if pod.uid and _running(item):
                pods[pod.uid] = pod
        with self._lock:
            self._pods = pods
        self._on_change()

    def apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        """One watch event; the agent is woken only when what it reads of the pods changed."""
        pod = pod_info(obj)
        if not pod.uid:
            return
        with self._lock:
            if kind == "DELETED" or not _running(obj):
                changed = self._pods.pop(pod.uid, None) is not None
            else:
                changed = self._pods.get(pod.uid) != pod
                self._pods[pod.uid] = pod
        if changed:
            self._on_change()
