"""One round of per-pod provisioning: the node's pods -> their caches -> this node's disks -> events.

Each round takes the pods bound to this node (from the pod watch) and:

- reads each pod's opt-in with the cluster's one grammar (``snapcache.pod_requests``: the
  extender reads the same annotations), and asks the matcher **once per opted-in pod** for a
  cache usable in this node's zone (the manual id, if any, goes with it). The answer is kept
  while the pod lives (its images cannot change without a new request, which asks again); a
  matcher that could not answer is asked again after ``retry_seconds``, the pod pulling through
  the mirror meanwhile (fail open). Once the matcher fails in a round, the round's other new
  pods are not asked (they are asked next time): a hung matcher costs one timeout per round,
  not one per pod;
- hands pod -> cache to the ``DiskKeeper`` (one disk per cache per node, shared, released after
  the grace period, refused provisioning retried later);
- says on each pod what became of it, once per outcome: ``ImageCacheDiskReady`` when its cache's
  disk is attached, ``ImageCacheDiskFailed`` (Warning) with the registry's reason when it could
  not be provisioned (the pod pulls its images as it would without snapcache), and for a pod
  that named its cache (``imc-...``) when the matcher says it cannot be used in this zone.

No transport here: the matcher and the event writer are ports, time is a callable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from services.node_agent.disk_keeper import DiskKeeper
from services.node_agent.disk_plans import DiskPlan
from snapcache.images import InvalidImageReference, parse_image_reference
from snapcache.pod_requests import Mode, PodInfo, PodRequest, pod_request

READY: Final = "ImageCacheDiskReady"
FAILED: Final = "ImageCacheDiskFailed"
MATCHER_UNAVAILABLE: Final = "MATCHER_UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class Lookup:
    """The matcher's choice for one pod in this node's zone."""

    cache_id: str = ""  # "imc-..." to provision; "" when the pod pulls
    known: bool = True  # False when the matcher could not be asked (fail open, asked again later)
    why: str = ""  # the decision or the failure, for logs and events
    decision: str = ""  # the matcher's decision (MATCHED, MANUAL_NOT_AVAILABLE...); "" if not asked


class CacheLookup(Protocol):
    """The matcher (``matcher_lookup.MatcherLookup``)."""

    def lookup(self, request: PodRequest, *, zone: str) -> Lookup:
        """The cache this pod should use in ``zone``; never raises (fail open)."""
        ...


class EventSink(Protocol):
    """Events on pods (``kube_pods.PodEvents``): queued, de-duplicated per pod and reason."""

    def emit(self, pod: PodInfo, *, reason: str, message: str, warning: bool) -> None:
        """Queue one event; never blocks."""
        ...


@dataclass(slots=True)
class _Pod:
    request: PodRequest
    lookup: Lookup
    asked_at: float
    said: str = ""  # the last outcome reported on the pod ("ready", or the refusal's reason)


class PodDisks:
    """Keeps the node's disks as its pods' caches want, and tells the pods."""

    def __init__(
        self,
        *,
        keeper: DiskKeeper,
        matcher: CacheLookup,
        events: EventSink,
        default_mode: Mode = Mode.OFF,
        retry_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_accelerated: Callable[[], None] = lambda: None,
        on_failure: Callable[[str], None] = lambda _reason: None,
        on_disks_changed: Callable[[], None] = lambda: None,
        on_pending: Callable[[frozenset[str]], None] = lambda _names: None,
        on_ready: Callable[[PodRequest], None] = lambda _request: None,
    ) -> None:
        self._keeper = keeper
        self._matcher = matcher
        self._events = events
        self._default_mode = default_mode
        self._retry = retry_seconds
        self._clock = clock
        self._on_accelerated = on_accelerated
        self._on_failure = on_failure
        self._on_disks_changed = on_disks_changed
        self._on_pending = on_pending
        self._on_ready = on_ready
        self._pods: dict[str, _Pod] = {}  # uid -> what was asked and said

    def wanted(self) -> dict[str, str]:
        """Pod uid -> cache id, as of the last round."""
        return {uid: pod.lookup.cache_id for uid, pod in self._pods.items()}

    def round(self, pods: Mapping[str, PodInfo]) -> DiskPlan:
        """One round over all the pods on the node (uid -> pod)."""
        now = self._clock()
        for uid in [uid for uid in self._pods if uid not in pods]:
            del self._pods[uid]
        requests = {uid: pod_request(pod, default_mode=self._default_mode) for uid, pod in pods.items()}
        # new opted-in pods: their images are held in the mirror until the matcher and the disk answer
        self._on_pending(
            self._pending()
            | _repositories(r for uid, r in requests.items() if r.wants_cache and uid not in self._pods)
        )
        matcher_down: Lookup | None = None
        for uid in pods:
            request = requests[uid]
            known = self._pods.get(uid)
            stale = known is not None and not known.lookup.known and now - known.asked_at >= self._retry
            if known is None or known.request != request or stale:
                lookup = self._ask(request, matcher_down)
                if not lookup.known:
                    matcher_down = lookup
                self._pods[uid] = _Pod(request, lookup, now)
        self._on_pending(self._pending())
        plan = self._keeper.reconcile(self.wanted())
        if plan.provision or plan.release:
            self._on_disks_changed()
        for uid, state in self._pods.items():
            if state.lookup.cache_id:
                self._tell(pods[uid], state)
            elif state.request.mode is Mode.MANUAL and state.lookup.known and state.request.wants_cache:
                self._tell_unusable(pods[uid], state)
        # only now: ``on_ready`` (told above) may have made the images pending for another reason
        # (the snapshot seeder), which must be in place before this hold is lifted
        self._on_pending(self._pending())
        return plan

    def _pending(self) -> frozenset[str]:
        """Repositories of pods whose cache has neither a disk nor a refusal yet."""
        waiting = (
            state.request
            for state in self._pods.values()
            if state.lookup.cache_id
            and self._keeper.disk_of(state.lookup.cache_id) is None
            and self._keeper.refusal(state.lookup.cache_id) is None
        )
        return _repositories(waiting)

    def _ask(self, request: PodRequest, matcher_down: Lookup | None) -> Lookup:
        if not request.wants_cache:
            return Lookup(why=request.problem or "the pod does not use an image cache")
        if matcher_down is not None:
            return matcher_down
        lookup = self._matcher.lookup(request, zone=self._keeper.zone)
        if not lookup.known:
            self._on_failure(MATCHER_UNAVAILABLE)
        return lookup

    def _tell_unusable(self, pod: PodInfo, state: _Pod) -> None:
        if state.said:
            return
        state.said = "unusable"
        self._on_failure(state.lookup.decision or "NOT_USABLE")
        self._events.emit(
            pod,
            reason=FAILED,
            message=f"image cache {state.request.manual_id} cannot be used in zone {self._keeper.zone}: "
            f"{state.lookup.why}; the pod pulls its images from their registries",
            warning=True,
        )

    def _tell(self, pod: PodInfo, state: _Pod) -> None:
        cache_id = state.lookup.cache_id
        disk_id = self._keeper.disk_of(cache_id)
        zone = self._keeper.zone
        if disk_id is not None:
            if state.said != "ready":
                state.said = "ready"
                self._on_accelerated()
                self._on_ready(state.request)
                self._events.emit(
                    pod,
                    reason=READY,
                    message=f"disk {disk_id} of image cache {cache_id} is attached on node "
                    f"{self._keeper.node} (zone {zone}); the pod's cached images are served from it",
                    warning=False,
                )
            return
        refusal = self._keeper.refusal(cache_id)
        if refusal is not None and state.said != (refusal.reason or refusal.code):
            state.said = refusal.reason or refusal.code
            self._events.emit(
                pod,
                reason=FAILED,
                message=f"no disk of image cache {cache_id} in zone {zone}: {refusal}; "
                "the pod pulls its images from their registries",
                warning=True,
            )


def _repositories(requests: Iterable[PodRequest]) -> frozenset[str]:
    names = set()
    for request in requests:
        for image in request.images:
            try:
                names.add(parse_image_reference(image).name)
            except InvalidImageReference:
                continue  # the matcher refuses it too: the pod pulls
    return frozenset(names)
