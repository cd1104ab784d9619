"""ImageCache resources through the Kubernetes API: followed in memory, and the operator's writes.

The only module of the operator that imports the Kubernetes client (checked by `.importlinter`;
why this client and not kopf: the package docstring).
Reads: one list, then a watch from its resourceVersion, by the project's one list + watch loop
(`snapcache.kube_list_watch`: a dropped watch resumes, a 410 Gone relists), into a map by name
that the reconciler reads, so a reconcile costs no API read. Writes, with exactly the verbs of
deploy/base/operator/rbac.yaml: finalizers by a merge patch guarded by resourceVersion
(409 -> `ResourceConflict`), status by a merge patch of the status subresource, events by create.
The answer of every write goes back into the map (unless the watch already brought something
newer, or the deletion), so the next reconcile sees it.

The operator never reads Secrets; ImageCaches only name them. API errors are logged with their
status and reason, never their response bodies.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import urllib3
from kubernetes import client as kube_client
from kubernetes.client.exceptions import ApiException

from services.operator.model import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    EventSpec,
    ImageCacheResource,
    KubeApiError,
    ResourceConflict,
    ResourceGone,
)
from snapcache.kube_list_watch import ListWatch

log = logging.getLogger(__name__)

COMPONENT = "snapcache-operator"
# Events of a cluster-scoped object go to namespace default (as kubectl and the scheduler do for Nodes).
EVENTS_NAMESPACE = "default"
_REQUEST_TIMEOUT = 15


def _newer(candidate: str, held: str) -> bool:
    """Whether resourceVersion ``candidate`` is not older than ``held``.

    resourceVersions are opaque; etcd's are integers, and comparing them only keeps the map from
    going back to an older version when a write's answer and the watch cross. Non-integers: the
    later arrival wins.
    """
    try:
        return int(candidate) >= int(held)
    except ValueError:
        return True


def _json_object(value: object) -> Mapping[str, Any]:
    """The client types custom objects as ``object``; they are JSON objects (dicts)."""
    if not isinstance(value, Mapping):
        raise KubeApiError(f"the API server answered {type(value).__name__}, not an object")
    return value


def _status_message(body: object) -> str:
    """The API server's own `Status.message` (it names the object, field and verb)."""
    try:
        status = json.loads(body) if isinstance(body, str | bytes) else None
    except ValueError:
        return ""
    message = status.get("message", "") if isinstance(status, dict) else ""
    return message if isinstance(message, str) else ""


def _api_failure(exc: ApiException) -> Exception:
    status = exc.status or 0
    if status == 409:
        return ResourceConflict(f"HTTP 409 {exc.reason}")
    if status == 404:
        return ResourceGone(f"HTTP 404 {exc.reason}")
    said = _status_message(exc.body)
    return KubeApiError(f"HTTP {status} {exc.reason}" + (f": {said}" if said else ""))


class ImageCacheResources:
    """The cluster's ImageCaches, followed in a thread, and the writes the reconciler makes."""

    def __init__(
        self,
        api_client: kube_client.ApiClient,
        *,
        on_change: Callable[[str], None],
        watch_timeout_seconds: int = 60,
        retry_seconds: float = 1.0,
        max_retry_seconds: float = 30.0,
    ) -> None:
        self._api = api_client
        self._custom = kube_client.CustomObjectsApi(api_client)
        self._core = kube_client.CoreV1Api(api_client)
        self._on_change = on_change
        self._objects: dict[str, ImageCacheResource] = {}
        self._names: dict[
            str, str
        ] = {}  # uid -> name (entries of deleted resources are checked, then pruned)
        self._lock = threading.Lock()
        self.following = ListWatch(
            self._custom.list_cluster_custom_object,
            self,
            what="ImageCaches",
            list_args=(GROUP, VERSION, PLURAL),
            watch_timeout_seconds=watch_timeout_seconds,
            retry_seconds=retry_seconds,
            max_retry_seconds=max_retry_seconds,
        )
        self.server = str(api_client.configuration.host)

    @property
    def relists(self) -> int:
        """Full lists done, the first included."""
        return self.following.relists

    # --- reading -------------------------------------------------------------------------------

    def get(self, name: str) -> ImageCacheResource | None:
        """The resource as last seen, or None."""
        with self._lock:
            return self._objects.get(name)

    def names(self) -> list[str]:
        """Every resource's name."""
        with self._lock:
            return list(self._objects)

    def name_for_uid(self, uid: str) -> str | None:
        """The name of the resource with this uid, if it is known."""
        with self._lock:
            name = self._names.get(uid)
            found = self._objects.get(name) if name is not None else None
            return name if found is not None and found.uid == uid else None

    def synced(self) -> bool:
        """True once the first list has been loaded."""
        return self.following.synced()

    def wait_synced(self, timeout: float) -> bool:
        """Wait for the first list."""
        return self.following.wait_synced(timeout)

    # --- following (snapcache.kube_list_watch's target) ---------------------------------------

    def start(self) -> None:
        """Start following the resources."""
        self.following.start()

    def stop(self) -> None:
        """Stop following and close the client."""
        self.following.stop()
        self._api.close()  # type: ignore[no-untyped-call]

    def replace(self, items: Sequence[Mapping[str, Any]]) -> None:
        """A full list: the map becomes exactly these resources; each one's reconcile is asked for."""
        fresh = {}
        for item in items:
            resource = ImageCacheResource.from_object(item)
            fresh[resource.name] = resource
        with self._lock:
            gone = set(self._objects) - set(fresh)
            self._objects = fresh
            self._names = {r.uid: r.name for r in fresh.values()}
        for name in [*fresh, *gone]:
            self._on_change(name)

    def apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        """One watch event into the map, unless the answer of one of our writes is newer."""
        if not (obj.get("metadata") or {}).get("name"):
            return
        resource = ImageCacheResource.from_object(obj)
        with self._lock:
            held = self._objects.get(resource.name)
            if kind == "DELETED":
                self._objects.pop(resource.name, None)
                self._names.pop(resource.uid, None)
            # the answer of one of our writes may already be newer than this event
            elif (
                held is None
                or held.uid != resource.uid
                or _newer(resource.resource_version, held.resource_version)
            ):
                self._objects[resource.name] = resource
                self._names[resource.uid] = resource.name
        self._on_change(resource.name)

    def _remember(self, obj: Mapping[str, Any]) -> ImageCacheResource:
        resource = ImageCacheResource.from_object(obj)
        with self._lock:
            held = self._objects.get(resource.name)
            # only a newer version of what is held: a resource the watch saw deleted meanwhile stays gone
            if (
                held is not None
                and held.uid == resource.uid
                and _newer(resource.resource_version, held.resource_version)
            ):
                self._objects[resource.name] = resource
        return resource

    # --- writing (the reconciler's `Resources` port) --------------------------------------------

    def set_finalizers(self, resource: ImageCacheResource, finalizers: tuple[str, ...]) -> ImageCacheResource:
        """Write the finalizer list, if the resource has not changed since it was read."""
        body = {"metadata": {"finalizers": list(finalizers), "resourceVersion": resource.resource_version}}
        try:
            answer = self._custom.patch_cluster_custom_object(
                GROUP, VERSION, PLURAL, resource.name, body, _request_timeout=_REQUEST_TIMEOUT
            )
        except ApiException as exc:
            raise _api_failure(exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeApiError(type(exc).__name__) from None
        return self._remember(_json_object(answer))

    def patch_status(self, resource: ImageCacheResource, patch: Mapping[str, Any]) -> None:
        """Merge-patch the status subresource."""
        try:
            answer = self._custom.patch_cluster_custom_object_status(
                GROUP,
                VERSION,
                PLURAL,
                resource.name,
                {"status": dict(patch)},
                _request_timeout=_REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            raise _api_failure(exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeApiError(type(exc).__name__) from None
        self._remember(_json_object(answer))

    def record_event(self, resource: ImageCacheResource, event: EventSpec) -> None:
        """Create an event on the resource; a failure is logged, never raised (events are best effort)."""
        now = datetime.datetime.now(datetime.UTC)
        body = kube_client.CoreV1Event(
            metadata=kube_client.V1ObjectMeta(generate_name=f"{resource.name[:200]}."),
            involved_object=kube_client.V1ObjectReference(
                api_version=API_VERSION,
                kind=KIND,
                name=resource.name,
                uid=resource.uid,
                resource_version=resource.resource_version or None,
            ),
            reason=event.reason,
            message=event.message[:1024],
            type=event.type,
            source=kube_client.V1EventSource(component=COMPONENT),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        try:
            self._core.create_namespaced_event(EVENTS_NAMESPACE, body, _request_timeout=_REQUEST_TIMEOUT)
        except ApiException as exc:
            log.warning(
                "cannot record event %s on ImageCache %s: HTTP %s %s",
                event.reason,
                resource.name,
                exc.status,
                exc.reason,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning(
                "cannot record event %s on ImageCache %s: %s", event.reason, resource.name, type(exc).__name__
            )
