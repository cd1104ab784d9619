"""The extender's use cases: filter and prioritize one pod over its candidate nodes.

Pure of transports: the matcher, the node-zone lookup and the pod events are ports handed in by
the wiring (`server`), so tests drive this with plain functions. Data flows one way: decoded
request -> pod request -> (one matcher answer, reused by prioritize) -> outcome -> events.
Pods that do not ask for a cache are answered at once (all pass, every score 0) without a call.

Where the time goes (bench/extender.py): the matcher's round trip is the largest share of an
annotated call, so it is started as soon as the pod is known (`start_match`) and the node names
are decoded and placed in zones (`node_index`) while it runs. The query carries the zones of the
candidate nodes, unknown until the names are placed: it is sent with the zones the cluster's
nodes are in now, which is what a request over a large cluster covers, and asked again with the
exact zones when the names turn out to cover fewer (the first ask then counted the pod's hit, so
the second one is a preview). Scores are worked out per zone and written per zone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
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


class PendingAnswer(Protocol):
    """A matcher call under way."""

    def result(self) -> MatchAnswer:
        """Wait for the answer (fail-open UNKNOWN when the call fails)."""

    def cancel(self) -> None:
        """Give up on the call."""


StartMatch = Callable[[MatchQuery], PendingAnswer]


class _Answered:
    """An answer known at once (a kept answer, or a matcher port without `start_match`)."""

    def __init__(self, answer: MatchAnswer) -> None:
        self._answer = answer

    def result(self) -> MatchAnswer:
        return self._answer

    def cancel(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class _Asked:
    query: MatchQuery | None  # None: a kept answer, no call
    pending: PendingAnswer
    first: bool


@dataclass(frozen=True, slots=True)
class HostScores:
    """Prioritize's answer: (score, hosts) per scored zone; hosts not listed score 0."""

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
    start_match: StartMatch | None = None  # the matcher call, started without waiting for it
    placements: RecentPlacements[PlacedNodes] = field(default_factory=RecentPlacements)

    def wants_cache(self, pod: PodInfo) -> bool:
        """True when the pod asks for an image cache (and can be matched)."""
        return pod_request(pod, default_mode=self.default_mode).wants_cache

    def zones(self, args: ExtenderArgs) -> list[str | None]:
        """Each node's zone: from the request's Node objects, else from the node cache."""
        if args.nodes is not None:
            return [zone_of(labels) for labels in args.node_labels]
        return list(map(self.node_zones().get, args.node_names))

    # --- NodeNames requests (nodeCacheCapable): names decoded while the matcher works -----------

    def filter_names(
        self, pod: PodInfo, names: Callable[[], Sequence[str]], *, names_key: bytes = b""
    ) -> tuple[Sequence[str], FilterOutcome]:
        """The decoded names and which of them pass: every one, except for strict pods (`filtering`).

        ``names_key``: the names' text as sent; the placed names are kept under it for the
        pod's prioritize call.
        """
        request = pod_request(pod, default_mode=self.default_mode)
        if not request.wants_cache:
            self._explain_unmatchable(pod, request)
            node_names = names()
            return node_names, FilterOutcome(passing=list(range(len(node_names))))
        index = self._index()
        placed, answer = self._placed_answer(
            pod, request, lambda: index.locate(names()), guess=index.zones_in_use(), reuse=False
        )
        if pod.uid and names_key:
            self.placements.put(pod.uid, names_key, placed)
        return placed.names, self._filter_outcome(request, answer, placed)

    def prioritize_names(
        self, pod: PodInfo, names: Callable[[], Sequence[str]], *, names_key: bytes = b""
    ) -> HostScores:
        """Scores by zone (see `scoring`); no groups = no opinion (every node 0).

        After the pod's filter call with the same names (``names_key``), its placed names and
        answer are reused: no matcher call and no name is looked up again.
        """
        request = pod_request(pod, default_mode=self.default_mode)
        if not request.wants_cache:
            return HostScores([])
        index = self._index()
        placed = self.placements.get(pod.uid, names_key) if pod.uid and names_key else None
        if placed is not None:
            kept = placed
            placed, answer = self._placed_answer(pod, request, lambda: kept, guess=kept.zones, reuse=True)
        else:
            placed, answer = self._placed_answer(
                pod, request, lambda: index.locate(names()), guess=index.zones_in_use(), reuse=True
            )
        return _host_scores(answer, placed)

    # --- any request (full Nodes too) ------------------------------------------------------------

    def filter(self, args: ExtenderArgs) -> FilterOutcome:
        """Every node passes, except nodes a strict pod cannot use (see `filtering`)."""
        request = pod_request(args.pod, default_mode=self.default_mode)
        if not request.wants_cache:
            self._explain_unmatchable(args.pod, request)
            return FilterOutcome(passing=list(range(len(args.node_names))))
        placed = self._place(args)
        _, answer = self._placed_answer(args.pod, request, lambda: placed, guess=placed.zones, reuse=False)
        return self._filter_outcome(request, answer, placed)

    def prioritize_hosts(self, args: ExtenderArgs) -> HostScores:
        """Scores by zone for any request."""
        request = pod_request(args.pod, default_mode=self.default_mode)
        if not request.wants_cache:
            return HostScores([])
        placed = self._place(args)
        _, answer = self._placed_answer(args.pod, request, lambda: placed, guess=placed.zones, reuse=True)
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

    def _placed_answer(
        self,
        pod: PodInfo,
        request: PodRequest,
        place: Callable[[], PlacedNodes],
        *,
        guess: tuple[str, ...],
        reuse: bool,
    ) -> tuple[PlacedNodes, MatchAnswer]:
        """The nodes placed in zones and the matcher's answer, the call overlapping the placing."""
        asked = self._ask(pod, request, guess, reuse=reuse)
        try:
            placed = place()
            if asked.query is not None and asked.query.zones == placed.zones:
                placed.groups()  # while the matcher works: each zone's names
        except BaseException:
            asked.pending.cancel()
            raise
        if asked.query is None:
            return placed, asked.pending.result()
        query = asked.query
        if query.zones == placed.zones:
            answer = asked.pending.result()
        else:  # the names cover other zones than guessed: ask about theirs
            asked.pending.cancel()
            query = replace(query, zones=placed.zones, validate_only=True)
            answer = self._start(query).result()
        if pod.uid:
            self.decisions.put(pod.uid, answer)
            if asked.first and answer.known:
                self.decisions.counted(pod.uid)
        self._report(pod, answer, placed.zones)
        return placed, answer

    def _ask(self, pod: PodInfo, request: PodRequest, zones: tuple[str, ...], *, reuse: bool) -> _Asked:
        if reuse and pod.uid:
            kept = self.decisions.get(pod.uid)
            if kept is not None:
                return _Asked(None, _Answered(kept), first=False)
        first = bool(pod.uid) and self.decisions.first_match(pod.uid)
        query = MatchQuery(
            images=request.images,
            manual_id=request.manual_id,
            strict=request.strict,
            zones=zones,
            validate_only=not first,
        )
        return _Asked(query, self._start(query), first=first)

    def _start(self, query: MatchQuery) -> PendingAnswer:
        if self.start_match is not None:
            return self.start_match(query)
        return _Answered(self.match(query))

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
    groups = placed.groups()
    scored = [(scores[zone], groups[zone]) for zone in placed.zones if scores.get(zone)]
    return HostScores(scored, plain=placed.plain)
