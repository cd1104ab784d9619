"""The extender's use cases: filter and prioritize one pod over its candidate nodes.

Pure of transports: the matcher, the node-zone lookup and the pod events are ports handed in by
the wiring (`server`), so tests drive this with plain functions. Data flows one way: decoded
request -> pod request -> (one matcher answer, reused by prioritize) -> outcome -> events.
Pods that do not ask for a cache are answered at once (all pass, every score 0) without a call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.extender import matches
from services.extender.api import ExtenderArgs
from services.extender.decisions import DecisionCache
from services.extender.filtering import FilterOutcome, filter_nodes
from services.extender.matches import MatchAnswer, MatchQuery
from services.extender.scoring import node_scores
from snapcache.node_zones import zone_of
from snapcache.pod_requests import Mode, PodInfo, PodRequest, pod_request

MatchSource = Callable[[MatchQuery], MatchAnswer]
# The node cache's current name -> zone map (None: the node has no zone). A mapping rather than a
# function so thousands of names are looked up by `dict.get` at C speed, not a Python call each.
NodeZones = Callable[[], Mapping[str, str | None]]

EVENT_MATCHED = "ImageCacheMatched"
EVENT_MISSED = "ImageCacheMissed"
EVENT_NOT_FOUND = "ImageCacheNotFound"


class EventSink(Protocol):
    """Records an event on a pod without blocking (`snapcache.pod_events`)."""

    def emit(self, pod: PodInfo, *, reason: str, message: str, warning: bool) -> None:
        """Queue one event; drop it rather than wait."""


class NoEvents:
    """An event sink that records nothing (no Kubernetes access)."""

    def emit(self, pod: PodInfo, *, reason: str, message: str, warning: bool) -> None:
        """Drop the event."""


@dataclass
class Scheduling:
    """Filter and prioritize, given the ports."""

    match: MatchSource
    node_zones: NodeZones
    decisions: DecisionCache
    events: EventSink
    default_mode: Mode = Mode.OFF

    def zones(self, args: ExtenderArgs) -> list[str | None]:
        """Each node's zone: from the request's Node objects, else from the node cache."""
        if args.nodes is not None:
            return [zone_of(labels) for labels in args.node_labels]
        return list(map(self.node_zones().get, args.node_names))

    def filter(self, args: ExtenderArgs) -> FilterOutcome:
        """Every node passes, except nodes a strict pod cannot use (see `filtering`)."""
        request = pod_request(args.pod, default_mode=self.default_mode)
        if not request.wants_cache:
            self._explain_unmatchable(args.pod, request)
            return FilterOutcome(passing=list(range(len(args.node_names))))
        zones = self.zones(args)
        answer = self._answer(args.pod, request, zones, reuse=False)
        return filter_nodes(request, answer, args.node_names, zones)

    def wants_cache(self, pod: PodInfo) -> bool:
        """True when the pod asks for an image cache (and can be matched)."""
        return pod_request(pod, default_mode=self.default_mode).wants_cache

    def prioritize(self, args: ExtenderArgs) -> list[int]:
        """A score 0-10 per node, in the request's order (see `scoring`); [] = no opinion.

        An empty answer gives every node 0 (the scheduler adds the listed hosts' scores only),
        without listing thousands of zeros for a pod that uses no cache.
        """
        request = pod_request(args.pod, default_mode=self.default_mode)
        if not request.wants_cache:
            return []
        zones = self.zones(args)
        answer = self._answer(args.pod, request, zones, reuse=True)
        return node_scores(answer, zones)

    def _answer(
        self, pod: PodInfo, request: PodRequest, zones: Sequence[str | None], *, reuse: bool
    ) -> MatchAnswer:
        if reuse and pod.uid:
            kept = self.decisions.get(pod.uid)
            if kept is not None:
                return kept
        first = bool(pod.uid) and self.decisions.first_match(pod.uid)
        known_zones = set(zones)
        known_zones.discard(None)
        query = MatchQuery(
            images=request.images,
            manual_id=request.manual_id,
            strict=request.strict,
            zones=tuple(sorted(z for z in known_zones if z)),
            validate_only=not first,
        )
        answer = self.match(query)
        if pod.uid:
            self.decisions.put(pod.uid, answer)
            if first and answer.known:
                self.decisions.counted(pod.uid)
        self._report(pod, answer, query.zones)
        return answer

    def _explain_unmatchable(self, pod: PodInfo, request: PodRequest) -> None:
        if request.mode is not Mode.OFF and request.problem:
            self.events.emit(pod, reason=EVENT_MISSED, message=request.problem, warning=True)

    def _report(self, pod: PodInfo, answer: MatchAnswer, zones: Sequence[str]) -> None:
        if not answer.known:
            message = f"image cache matcher unavailable, the pod pulls its images: {answer.message}"
            self.events.emit(pod, reason=EVENT_MISSED, message=message, warning=True)
        elif answer.decision == matches.MATCHED and answer.candidates:
            best = answer.candidates[0]
            here = sorted(best.available_zones.intersection(zones)) or sorted(best.available_zones)
            cache = best.image_cache.removeprefix("imageCaches/")
            where = f"zone {', '.join(here)}" if here else "no zone yet"
            message = f"image cache {cache} matched; a disk can be provisioned in {where}"
            self.events.emit(pod, reason=EVENT_MATCHED, message=message, warning=False)
        elif answer.decision == matches.MANUAL_NOT_FOUND:
            self.events.emit(pod, reason=EVENT_NOT_FOUND, message=answer.message, warning=True)
        else:
            self.events.emit(pod, reason=EVENT_MISSED, message=answer.message, warning=True)
