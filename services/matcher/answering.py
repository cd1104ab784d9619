"""One match answered: request -> outcome under the index lock -> hit recorded -> metrics.

The one implementation of a match as the matcher serves it, called by the gRPC servicer and by
an extender that runs the matcher in its own process (`snapcache_cli.colocated_matcher`): both
read the index the same way, record a hit for the same calls (not ``validate_only`` ones) and
count the same metrics, so a pod is answered and counted alike whichever way it was asked.

Safe from any thread: the index is read under `IndexSync`'s lock (a `threading.Lock`, also held
by the feed's thread for each change and for the swap of a fresh index), the hit reporter and
the Prometheus metrics take their own locks.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.matcher.hits import HitReporter
from services.matcher.index_sync import IndexSync
from services.matcher.match_requests import MatchRequest
from services.matcher.matching import MatchOutcome, match
from services.matcher.metrics import MatcherMetrics


@dataclass(frozen=True, slots=True)
class Answered:
    """A match's outcome and where the index stood when it was answered."""

    outcome: MatchOutcome
    revision: int
    staleness_seconds: float


def answer_match(
    request: MatchRequest,
    *,
    sync: IndexSync,
    hits: HitReporter,
    metrics: MatcherMetrics,
    validate_only: bool,
    now_ns: int,
) -> Answered:
    """Answer ``request``; raises `Unavailable` (INDEX_NOT_LOADED) before the first load."""
    with sync.reading() as index:
        outcome = match(index, request, now_ns=now_ns)
    revision, staleness = sync.position()
    chosen = outcome.chosen
    hit_bytes = None
    if chosen is not None and not validate_only:
        hits.record(chosen.entry.name, now_ns)
        hit_bytes = chosen.coverage.bytes_covered
    metrics.answered(outcome.decision, outcome.action, hit_bytes=hit_bytes)
    return Answered(outcome=outcome, revision=revision, staleness_seconds=staleness)
