"""Kubernetes Events on pods, off the request path: the extender's and the node agent's.

`emit` only puts on a bounded queue and returns: a slow or unreachable API server must never
delay a scheduling answer or a disk's provisioning, so a full queue drops the event (counted).
Events are de-duplicated per pod and reason (a pod retried over many scheduling cycles gets one
event, not one per cycle). Each wing passes the API client its own Kubernetes module built, and
its component name, which the event's source shows.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import urllib3
from kubernetes import client as kube_client
from kubernetes.client.exceptions import ApiException

from snapcache.pod_requests import PodInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Event:
    pod: PodInfo
    reason: str
    message: str
    warning: bool


class PodEvents:
    """Writes events in a thread from a bounded queue."""

    def __init__(
        self,
        api_client: kube_client.ApiClient,
        *,
        component: str,
        thread_name: str = "pod-events",
        max_queued: int = 1000,
        remember: int = 10_000,
        on_sent: Callable[[], None] = lambda: None,
        on_dropped: Callable[[], None] = lambda: None,
    ) -> None:
        self._core = kube_client.CoreV1Api(api_client)
        self._component = component
        self._thread_name = thread_name
        self._queue: queue.Queue[_Event | None] = queue.Queue(maxsize=max_queued)
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._remember = remember
        self._lock = threading.Lock()
        self._on_sent = on_sent
        self._on_dropped = on_dropped
        self._thread: threading.Thread | None = None

    def emit(self, pod: PodInfo, *, reason: str, message: str, warning: bool) -> None:
        """Queue one event unless this pod already has one with this reason; never blocks."""
        if not pod.uid or not pod.name or not pod.namespace:
            return
        key = (pod.uid, reason)
        with self._lock:
            if key in self._seen:
                return
            self._seen[key] = None
            if len(self._seen) > self._remember:
                self._seen.popitem(last=False)
        try:
            self._queue.put_nowait(_Event(pod, reason, message, warning))
        except queue.Full:
            self._on_dropped()

    def start(self) -> None:
        """Start the writer thread."""
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after what is queued now (bounded wait)."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=1)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            try:
                self._write(event)
                self._on_sent()
            except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                self._on_dropped()
                log.warning(
                    "cannot write event %s on pod %s/%s: %s",
                    event.reason,
                    event.pod.namespace,
                    event.pod.name,
                    exc,
                )
            except Exception:
                self._on_dropped()
                log.exception("writing a pod event failed")

    def _write(self, event: _Event) -> None:
        now = datetime.datetime.now(datetime.UTC)
        pod = event.pod
        body = kube_client.CoreV1Event(
            metadata=kube_client.V1ObjectMeta(generate_name=f"{pod.name[:200]}."),
            involved_object=kube_client.V1ObjectReference(
                kind="Pod", api_version="v1", namespace=pod.namespace, name=pod.name, uid=pod.uid
            ),
            reason=event.reason,
            message=event.message[:1024],
            type="Warning" if event.warning else "Normal",
            source=kube_client.V1EventSource(component=self._component),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        self._core.create_namespaced_event(pod.namespace, body, _request_timeout=10)
