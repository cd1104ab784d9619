"""The extender's use cases: filter and prioritize one pod over its candidate nodes.

Pure of transports: the matcher, the node-zone lookup and the pod events are ports handed in by
the wiring (`server`), so tests drive this with plain functions. Data flows one way: decoded
request -> pod request -> (one matcher answer, reused by prioritize) -> outcome -> events.
Pods that do not ask for a cache are answered at once (all pass, every score 0) without a call.

Where the time goes (bench/extender.py): with thousands of node names, what is done per name;
so names are placed in zones by the node cache's `NodeIndex` (C-level bulk operations) and scores
are worked out per zone and written per score. The matcher is asked after the names are placed,
with their exact zones: overlapping the call with the placing was measured and gains nothing,
as grpcio's call needs the GIL to progress and placing names holds it (bench/extender.py notes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.extender import matches
from services.extender.api import ExtenderArgs
from services.extender.decisions import DecisionCache, RecentPlacements
from services.extender.filtering import FilterOutcome, filter_nodes
from services.extender.matches import MatchAnswer, MatchQuery
from services.extender.node_index import NodeIndex, PlacedNodes
from services.extender.scoring import zone_scores
from snapcache.node_zones import zone_of
from snapcache.pod_requests import Mode, PodInfo, PodRequest, pod_request

MatchSource = Callable[[MatchQuery], MatchAnswer]
# The node cache's current name -> zone map (None: the node has no zone): its `NodeIndex`, which
# places thousands of names at C speed; any other mapping (tests) is indexed per request.
NodeZones = Callable[[], Mapping[str, str | None]]


@dataclass(frozen=True, slots=True)
class HostScores:
    """Prioritize's answer: (score, hosts) per score above 0; hosts not listed score 0."""

    groups: list[tuple[int, list[str]]]
    plain: bool = True  # every host can be written between JSON quotes as it is

    def by_host(self) -> dict[str, int]:
        """Each listed host's score."""
        return {host: score for score, hosts in self.groups for host in hosts}


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
    placements: RecentPlacements[PlacedNodes] = field(default_factory=RecentPlacements)

    def wants_cache(self, pod: PodInfo) -> bool:
        """True when the pod asks for an image cache (and can be matched)."""
        return pod_request(pod, default_mode=self.default_mode).wants_cache

    def zones(self, args: ExtenderArgs) -> list[str | None]:
        """Each node's zone: from the request's Node objects, else from the node cache."""
        if args.nodes is not None:
            return [zone_of(labels) for labels in args.node_labels]
        return list(map(self.node_zones().get, args.node_names))

    # --- NodeNames requests (nodeCacheCapable): the names placed by the node index --------------

    def filter_names(
        self, pod: PodInfo, names: Callable[[], Sequence[str]], *, names_key: bytes | memoryview = b""
    ) -> tuple[Sequence[str], FilterOutcome]:
        """The names and which of them pass: every one, except for strict pods (`filtering`).

        ``names_key``: the names' text as sent; the placed names are kept under it for the
        pod's prioritize call.
        """
        request = pod_request(pod, default_mode=self.default_mode)
        if not request.wants_cache:
            self._explain_unmatchable(pod, request)
            node_names = names()
            return node_names, FilterOutcome(passing=list(range(len(node_names))))
        placed = self._index().locate(names())
        answer = self._answer(pod, request, placed.zones, reuse=False)
        if pod.uid and names_key:
            self.placements.put(pod.uid, names_key, placed)
        return placed.names, self._filter_outcome(request, answer, placed)

    def prioritize_names(
        self, pod: PodInfo, names: Callable[[], Sequence[str]], *, names_key: bytes | memoryview = b""
    ) -> HostScores:
        """Scores by zone (see `scoring`); no groups = no opinion (every node 0).

        After the pod's filter call with the same names (``names_key``), its placed names and
        answer are reused: no matcher call, and the names are neither decoded nor looked up again.
        """
        request = pod_request(pod, default_mode=self.default_mode)
        if not request.wants_cache:
            return HostScores([])
        placed = self.placements.get(pod.uid, names_key) if pod.uid and names_key else None
        if placed is None:
            placed = self._index().locate(names())
        answer = self._answer(pod, request, placed.zones, reuse=True)
        return _host_scores(answer, placed)

    # --- any request (full Nodes too) ------------------------------------------------------------

    def filter(self, args: ExtenderArgs) -> FilterOutcome:
        """Every node passes, except nodes a strict pod cannot use (see `filtering`)."""
        request = pod_request(args.pod, default_mode=self.default_mode)
        if not request.wants_cache:
            self._explain_unmatchable(args.pod, request)
            return FilterOutcome(passing=list(range(len(args.node_names))))
        placed = self._place(args)
        answer = self._answer(args.pod, request, placed.zones, reuse=False)
        return self._filter_outcome(request, answer, placed)

    def prioritize_hosts(self, args: ExtenderArgs) -> HostScores:
        """Scores by zone for any request."""
        request = pod_request(args.pod, default_mode=self.default_mode)
        if not request.wants_cache:
            return HostScores([])
        placed = self._place(args)
        answer = self._answer(args.pod, request, placed.zones, reuse=True)
        return _host_scores(answer, placed)

    def prioritize(self, args: ExtenderArgs) -> list[int]:
        """A score 0-10 per node, in the request's order (see `scoring`); [] = no opinion.

        An empty answer gives every node 0 (the scheduler adds the listed hosts' scores only),
        without listing thousands of zeros for a pod that uses no cache.
        """
        scores = self.prioritize_hosts(args)
        if not scores.groups:
            return []
        by_host = scores.by_host()
        return [by_host.get(name, 0) for name in args.node_names]

    # --- the matcher answer ------------------------------------------------------------------------

    def _index(self) -> NodeIndex:
        nodes = self.node_zones()
        return nodes if isinstance(nodes, NodeIndex) else NodeIndex(nodes)

    def _place(self, args: ExtenderArgs) -> PlacedNodes:
        if args.nodes is not None:
            return PlacedNodes.name_by_name(args.node_names, [zone_of(labels) for labels in args.node_labels])
        return self._index().locate(args.node_names)

    def _filter_outcome(self, request: PodRequest, answer: MatchAnswer, placed: PlacedNodes) -> FilterOutcome:
        if not request.strict or not answer.known:
            return FilterOutcome(passing=list(range(len(placed.names))))
        return filter_nodes(request, answer, placed.names, placed.zone_list())

    def _answer(
        self, pod: PodInfo, request: PodRequest, zones: tuple[str, ...], *, reuse: bool
    ) -> MatchAnswer:
        if reuse and pod.uid:
            kept = self.decisions.get(pod.uid)
            if kept is not None:
                return kept
        first = bool(pod.uid) and self.decisions.first_match(pod.uid)
        query = MatchQuery(
            images=request.images,
            manual_id=request.manual_id,
            strict=request.strict,
            zones=zones,
            validate_only=not first,
            namespace=request.namespace,
            image_pull_secrets=request.image_pull_secrets,
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


def _host_scores(answer: MatchAnswer, placed: PlacedNodes) -> HostScores:
    scores = zone_scores(answer)
    if not scores:
        return HostScores([])
    return HostScores(placed.scored(scores), plain=placed.plain)
