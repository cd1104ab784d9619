"""Matching a pod's images to caches: the policies, the search, and the explanation.

Pure: takes the index, a validated request and the time; returns a decision, ranked candidates
and the rejected caches with a reason each. The search is exact (the tests hold it against a
brute-force reference) but does not look at every cache:

- EXACT (TKE): a qualifying cache holds every pod image: the intersection of the images'
  postings, rarest first (a C-level set operation). A small intersection is judged and sorted;
  a large one (a pod of common images only) is walked in the rarest posting's TKE order
  (smaller cache, newer, name), stopping at the first caches that qualify.
- BYTES_COVERED / IMAGES_COVERED (Huawei size / quantity): postings are read rarest first. After
  reading some of them, a cache not seen yet lacks all their images, which bounds its score (the
  count, or the sum of the other postings' largest bytes); the search stops once the candidates
  it holds beat that bound, or once an unseen cache could not reach `min_covered`.

A cache holding one of the pod's images privately (its registry required credentials) qualifies
only if the pod may use the credentials that pulled it (`pull_access`; rejection NOT_AUTHORIZED);
caches holding only public images skip that check.

Rejections are the closest misses among the caches examined (most images covered first). When a
cache qualifies, only caches holding every image were examined; with no match, a bounded number
of caches holding some of the images is. When more caches share an image with the pod than were
examined or listed, the answer says it is truncated.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from typing import Any

from services.matcher.index import CacheEntry, CacheIndex, CacheState, HeldImage, Posting
from services.matcher.match_requests import MatchRequest, PodImage, Policy
from services.matcher.pull_access import first_refusal

RankKey = tuple[int, int, int, str]

# How many caches holding some of the pod's images a search that found no candidate examines to
# explain the miss (at least, and twice the rejections asked for); bounds the cost of a
# pod whose images are common but never together.
EXPLAIN_BUDGET = 32
# Up to this many caches holding every image are always sorted and judged outright.
# A pod whose rarest image is in more caches than WALK_FIRST is first searched by walking that
# image's posting in TKE's order for at most WALK_BUDGET steps.
WALK_FIRST = 512
WALK_BUDGET = 256
SMALL_INTERSECTION = 32


class Decision(enum.Enum):
    """What the matcher concluded (numbers as in the API)."""

    MATCHED = 1
    NO_MATCH = 2
    MANUAL_NOT_FOUND = 3
    MANUAL_NOT_READY = 4
    MANUAL_NOT_AVAILABLE = 5
    MANUAL_TOO_FEW_IMAGES = 6
    MANUAL_NOT_AUTHORIZED = 7


class Action(enum.Enum):
    """What the caller should do (numbers as in the API)."""

    USE_CACHE = 1
    PULL_IMAGES = 2
    REJECT = 3


class RejectReason(enum.Enum):
    """Why a cache did not qualify (numbers as in the API)."""

    NOT_READY = 1
    EXPIRED = 2
    MISSING_IMAGES = 3
    TOO_FEW_IMAGES = 4
    NOT_AVAILABLE_IN_ZONES = 5
    NOT_AUTHORIZED = 6


@dataclass(frozen=True, slots=True)
class Coverage:
    """What a cache holds of the pod's images."""

    covered: tuple[tuple[PodImage, HeldImage], ...]
    missing: tuple[PodImage, ...]
    bytes_covered: int

    @property
    def count(self) -> int:
        """How many of the pod's distinct images the cache holds."""
        return len(self.covered)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A cache that qualifies."""

    entry: CacheEntry
    coverage: Coverage
    available_zones: tuple[str, ...]
    hydrating_zones: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Rejection:
    """A cache that was considered and did not qualify."""

    entry: CacheEntry
    reason: RejectReason
    coverage: Coverage
    hydrating_zones: tuple[str, ...]
    message: str


@dataclass(frozen=True, slots=True)
class MatchOutcome:
    """The answer to a match request."""

    decision: Decision
    action: Action
    candidates: tuple[Candidate, ...]
    rejections: tuple[Rejection, ...]
    rejections_truncated: bool
    message: str

    @property
    def chosen(self) -> Candidate | None:
        """The cache to use, when the decision is MATCHED."""
        return self.candidates[0] if self.decision is Decision.MATCHED else None


def coverage_of(entry: CacheEntry, images: tuple[PodImage, ...]) -> Coverage:
    """Which of ``images`` ``entry`` holds."""
    covered: list[tuple[PodImage, HeldImage]] = []
    missing: list[PodImage] = []
    total = 0
    for image in images:
        held = entry.held(image.key)
        if held is None:
            missing.append(image)
        else:
            covered.append((image, held))
            total += held.compressed_bytes
    return Coverage(tuple(covered), tuple(missing), total)


def rank_key(policy: Policy, entry: CacheEntry, count: int, bytes_covered: int) -> RankKey:
    """The policy's sort key for a cache holding ``count`` images / ``bytes_covered``: smaller first."""
    if policy is Policy.EXACT:
        return (0, entry.cache_size_gib, -entry.create_time_ns, entry.name)
    score = bytes_covered if policy is Policy.BYTES_COVERED else count
    return (-score, 0, -entry.create_time_ns, entry.name)


def _zones(entry: CacheEntry, wanted: frozenset[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if not wanted:
        return entry.available_zones, entry.hydrating_zones
    return (
        tuple(z for z in entry.available_zones if z in wanted),
        tuple(z for z in entry.hydrating_zones if z in wanted),
    )


def judge(
    entry: CacheEntry, coverage: Coverage, request: MatchRequest, now_ns: int, *, need_images: bool = True
) -> Candidate | Rejection:
    """Whether ``entry`` qualifies for ``request``; a rejection names the first reason."""
    available, hydrating = _zones(entry, request.zones)
    if need_images and coverage.count < request.min_covered:
        if request.policy is Policy.EXACT and not request.manual:
            missing = ", ".join(image.normalized for image in coverage.missing)
            return Rejection(
                entry, RejectReason.MISSING_IMAGES, coverage, hydrating, f"{entry.name} lacks {missing}"
            )
        return Rejection(
            entry,
            RejectReason.TOO_FEW_IMAGES,
            coverage,
            hydrating,
            f"{entry.name} holds {coverage.count} of the pod's {len(request.images)} images, "
            f"fewer than the {request.min_covered} required",
        )
    private = entry.private
    if private is not None:  # only caches holding private images pay for the rule
        refused = first_refusal(
            private, coverage.covered, namespace=request.namespace, pull_secrets=request.pull_secrets
        )
        if refused is not None:
            image, why = refused
            return Rejection(
                entry,
                RejectReason.NOT_AUTHORIZED,
                coverage,
                hydrating,
                f"{entry.name} holds {image.normalized}, {why}",
            )
    if entry.state is not CacheState.READY:
        message = f"{entry.name} is {entry.state.name}, not READY"
        return Rejection(entry, RejectReason.NOT_READY, coverage, hydrating, message)
    if entry.expired(now_ns):
        return Rejection(entry, RejectReason.EXPIRED, coverage, hydrating, f"{entry.name} has expired")
    if not available:
        where = f"any of the zones {', '.join(sorted(request.zones))}" if request.zones else "any zone"
        still = f" (still hydrating in {', '.join(hydrating)})" if hydrating else ""
        return Rejection(
            entry,
            RejectReason.NOT_AVAILABLE_IN_ZONES,
            coverage,
            hydrating,
            f"{entry.name} is not available in {where}{still}",
        )
    return Candidate(entry, coverage, available, hydrating)


class _Backwards:
    """A sort key ordered backwards, so heapq's min-heap keeps the worst item on top."""

    __slots__ = ("key",)

    def __init__(self, key: tuple[Any, ...]) -> None:
        self.key = key

    def __lt__(self, other: _Backwards) -> bool:
        return bool(self.key > other.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Backwards) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


class _Rejections:
    """The closest rejections offered so far (most images covered, then rank), at most ``limit``.

    A rejection is only built (message and all) when it would be listed, so walking a long
    posting of caches that lack an image costs a comparison each.
    """

    def __init__(self, policy: Policy, limit: int) -> None:
        self._policy = policy
        self._limit = limit
        self._heap: list[tuple[_Backwards, Rejection]] = []
        self.overflow = False

    def offer(
        self,
        entry: CacheEntry,
        count: int,
        bytes_covered: int,
        build: Rejection | Callable[[], Rejection],
    ) -> None:
        """Keep the rejection (made by ``build`` if not made yet) if among the closest so far."""
        key = (-count, rank_key(self._policy, entry, count, bytes_covered))
        if len(self._heap) < self._limit:
            heapq.heappush(self._heap, (_Backwards(key), build if isinstance(build, Rejection) else build()))
            return
        self.overflow = True
        if key < self._heap[0][0].key:
            heapq.heapreplace(
                self._heap, (_Backwards(key), build if isinstance(build, Rejection) else build())
            )

    def offer_verdict(self, verdict: Rejection) -> None:
        """Keep a rejection already made."""
        coverage = verdict.coverage
        self.offer(verdict.entry, coverage.count, coverage.bytes_covered, verdict)

    def ordered(self) -> tuple[Rejection, ...]:
        """The kept rejections, closest first."""
        return tuple(rejection for _, rejection in sorted(self._heap, key=lambda item: item[0].key))


def _search_exact(
    index: CacheIndex, request: MatchRequest, now_ns: int, rejections: _Rejections
) -> tuple[list[Candidate], bool]:
    images = request.images
    postings = sorted((index.posting(image.key) for image in images), key=len)
    rarest = postings[0]
    if len(postings) > 1 and len(rarest) > WALK_FIRST:
        walked = _walk(rarest, postings[1:], request, now_ns)
        if walked is not None:
            found, rejected = walked
            for rejection in rejected:
                rejections.offer_verdict(rejection)
            return found, True
    holding = rarest.intersection(*postings[1:]) if len(postings) > 1 else rarest
    candidates: list[Candidate] = []
    stopped_early = False
    # Judge the intersection in order, or walk the rarest posting's ordered list, whichever
    # reaches the first `max_candidates` qualifying caches in fewer steps.
    walk_steps = request.max_candidates * len(rarest) / max(len(holding), 1)
    if len(holding) <= SMALL_INTERSECTION or len(holding) <= walk_steps:
        for entry in sorted(holding, key=_exact_order):
            verdict = judge(entry, coverage_of(entry, images), request, now_ns)
            if isinstance(verdict, Rejection):
                rejections.offer_verdict(verdict)
            elif len(candidates) < request.max_candidates:
                candidates.append(verdict)
    else:
        # Many caches hold every image (the pod runs common images only): walk the rarest
        # posting in TKE's order and stop at the first caches that qualify.
        left = len(holding)
        for entry in rarest.ordered:
            if entry not in holding:
                continue
            left -= 1
            verdict = judge(entry, coverage_of(entry, images), request, now_ns)
            if isinstance(verdict, Rejection):
                rejections.offer_verdict(verdict)
                continue
            candidates.append(verdict)
            if len(candidates) == request.max_candidates:
                stopped_early = left > 0
                break
    if not candidates:
        return candidates, _explain_more(postings, set(holding), request, now_ns, rejections)
    # Caches holding only some of the images were not examined: the rejections are complete
    # only if there are none, i.e. every posting is the intersection itself.
    return candidates, stopped_early or any(len(p) > len(holding) for p in postings)


def _walk(
    rarest: Posting, others: Sequence[Posting], request: MatchRequest, now_ns: int
) -> tuple[list[Candidate], list[Rejection]] | None:
    """The best caches holding every image, found by walking the rarest posting in TKE's order.

    For pods whose rarest image is still common: intersecting tens of thousands of entries costs
    more than walking to the first caches that qualify. Gives up (None) after WALK_BUDGET steps,
    and the caller intersects instead.
    """
    candidates: list[Candidate] = []
    rejected: list[Rejection] = []
    for steps, entry in enumerate(rarest.ordered):
        if steps == WALK_BUDGET:
            return None
        if not all(entry in posting for posting in others):
            continue
        verdict = judge(entry, coverage_of(entry, request.images), request, now_ns)
        if isinstance(verdict, Rejection):
            rejected.append(verdict)
            continue
        candidates.append(verdict)
        if len(candidates) == request.max_candidates:
            return candidates, rejected
    return None


def _exact_order(entry: CacheEntry) -> tuple[int, int, str]:
    return (entry.cache_size_gib, -entry.create_time_ns, entry.name)


def _explain_more(
    postings: Iterable[Posting],
    seen: set[CacheEntry],
    request: MatchRequest,
    now_ns: int,
    rejections: _Rejections,
) -> bool:
    """Look at caches holding some of the images, to explain a miss. True if cut short.

    Counts first (cheap), then builds rejections only for the closest of those examined.
    """
    budget = max(EXPLAIN_BUDGET, 2 * request.max_rejections)
    examined: list[tuple[tuple[int, RankKey], CacheEntry, int]] = []
    cut = False
    postings = tuple(postings)
    by_bytes = request.policy is Policy.BYTES_COVERED
    for posting in postings:
        for entry in posting:
            if entry in seen:
                continue
            if len(examined) == budget:
                cut = True
                break
            seen.add(entry)
            if by_bytes:
                count, bytes_covered = _count(entry, request)
            else:
                # Set membership (a C-level hash probe per image) instead of scanning the
                # cache's images for each key.
                count, bytes_covered = sum(entry in other for other in postings), 0
            key = (-count, rank_key(request.policy, entry, count, bytes_covered))
            examined.append((key, entry, bytes_covered))
        if cut:
            break
    closest = heapq.nsmallest(request.max_rejections, examined, key=itemgetter(0))
    for (negative_count, _), entry, bytes_covered in closest:
        rejections.offer(entry, -negative_count, bytes_covered, partial(_rejection, entry, request, now_ns))
    if len(examined) > len(closest):
        rejections.overflow = True
    return cut


def _count(entry: CacheEntry, request: MatchRequest) -> tuple[int, int]:
    """How many of the pod's images ``entry`` holds, and their bytes (only BYTES_COVERED needs them)."""
    if request.policy is not Policy.BYTES_COVERED:
        return sum(1 for image in request.images if entry.held(image.key) is not None), 0
    count = total = 0
    for image in request.images:
        held = entry.held(image.key)
        if held is not None:
            count += 1
            total += held.compressed_bytes
    return count, total


def _rejection(entry: CacheEntry, request: MatchRequest, now_ns: int) -> Rejection:
    verdict = judge(entry, coverage_of(entry, request.images), request, now_ns)
    if not isinstance(verdict, Rejection):  # only called for caches short of images
        raise AssertionError(f"{entry.name} qualifies")
    return verdict


def _search_partial(
    index: CacheIndex, request: MatchRequest, now_ns: int, rejections: _Rejections
) -> tuple[list[Candidate], bool]:
    images = request.images
    policy = request.policy
    by_bytes = policy is Policy.BYTES_COVERED
    postings = sorted((index.posting(image.key) for image in images), key=len)
    best: list[tuple[_Backwards, Candidate]] = []  # the best so far, worst on top
    seen: set[CacheEntry] = set()
    for read, posting in enumerate(postings, start=1):
        for entry in posting:
            if entry in seen:
                continue
            seen.add(entry)
            coverage = coverage_of(entry, images)
            verdict = judge(entry, coverage, request, now_ns)
            if isinstance(verdict, Rejection):
                rejections.offer_verdict(verdict)
                continue
            key = _Backwards(rank_key(policy, entry, coverage.count, coverage.bytes_covered))
            if len(best) < request.max_candidates:
                heapq.heappush(best, (key, verdict))
            elif key.key < best[0][0].key:
                heapq.heapreplace(best, (key, verdict))
        rest = postings[read:]
        if not rest:
            break
        # A cache not seen yet holds none of the images read so far: at most len(rest) images
        # and the sum of the rest's largest bytes.
        if len(rest) < request.min_covered:
            return _ranked(best), True
        if len(best) == request.max_candidates:
            bound = sum(p.max_bytes for p in rest) if by_bytes else len(rest)
            if -best[0][0].key[0] > bound:
                return _ranked(best), True
    return _ranked(best), False


def _ranked(best: list[tuple[_Backwards, Candidate]]) -> list[Candidate]:
    return [candidate for _, candidate in sorted(best, key=lambda item: item[0].key)]


def match(index: CacheIndex, request: MatchRequest, *, now_ns: int) -> MatchOutcome:
    """Answer ``request`` from ``index`` at time ``now_ns``."""
    rejections = _Rejections(request.policy, request.max_rejections)
    if request.manual:
        return _match_manual(index, request, now_ns, rejections)
    if request.policy is Policy.EXACT:
        candidates, stopped_early = _search_exact(index, request, now_ns, rejections)
    else:
        candidates, stopped_early = _search_partial(index, request, now_ns, rejections)
    listed = rejections.ordered()
    truncated = rejections.overflow or stopped_early
    if candidates:
        best = candidates[0]
        return MatchOutcome(
            Decision.MATCHED,
            Action.USE_CACHE,
            tuple(candidates),
            listed,
            truncated,
            f"matched {best.entry.name}: {_summary(best, request)}",
        )
    return MatchOutcome(
        Decision.NO_MATCH,
        Action.REJECT if request.strict else Action.PULL_IMAGES,
        (),
        listed,
        truncated,
        _no_match_message(request, listed) + _fallback(request),
    )


def _match_manual(
    index: CacheIndex, request: MatchRequest, now_ns: int, rejections: _Rejections
) -> MatchOutcome:
    entry = index.get(request.manual)
    if entry is None:
        return MatchOutcome(
            Decision.MANUAL_NOT_FOUND,
            Action.REJECT if request.strict else Action.PULL_IMAGES,
            (),
            (),
            False,
            f"image cache {request.manual} does not exist" + _fallback(request),
        )
    coverage = coverage_of(entry, request.images)
    verdict = judge(entry, coverage, request, now_ns, need_images=request.min_covered_given)
    if isinstance(verdict, Candidate):
        return MatchOutcome(
            Decision.MATCHED,
            Action.USE_CACHE,
            (verdict,),
            (),
            False,
            f"matched {entry.name} as asked: {_summary(verdict, request)}",
        )
    decision = {
        RejectReason.NOT_READY: Decision.MANUAL_NOT_READY,
        RejectReason.EXPIRED: Decision.MANUAL_NOT_READY,
        RejectReason.NOT_AVAILABLE_IN_ZONES: Decision.MANUAL_NOT_AVAILABLE,
        RejectReason.TOO_FEW_IMAGES: Decision.MANUAL_TOO_FEW_IMAGES,
        RejectReason.MISSING_IMAGES: Decision.MANUAL_TOO_FEW_IMAGES,
        RejectReason.NOT_AUTHORIZED: Decision.MANUAL_NOT_AUTHORIZED,
    }[verdict.reason]
    return MatchOutcome(
        decision,
        Action.REJECT if request.strict else Action.PULL_IMAGES,
        (),
        (verdict,),
        False,
        verdict.message + _fallback(request),
    )


def _summary(candidate: Candidate, request: MatchRequest) -> str:
    entry = candidate.entry
    zones = ", ".join(candidate.available_zones)
    text = (
        f"holds {candidate.coverage.count} of {len(request.images)} images, "
        f"{entry.cache_size_gib} GiB, available in {zones}"
    )
    stale = [image.normalized for image, _ in candidate.coverage.covered if image.possibly_stale]
    if stale:
        text += f"; possibly stale (matched by tag latest): {', '.join(stale)}"
    return text


def _no_match_message(request: MatchRequest, listed: tuple[Rejection, ...]) -> str:
    if not listed:
        return f"no cache holds any of the pod's {len(request.images)} images"
    return f"no cache qualifies; the closest: {listed[0].message}"


def _fallback(request: MatchRequest) -> str:
    return "; rejecting the pod (strict)" if request.strict else "; the pod pulls its images"
