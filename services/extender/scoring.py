"""Prioritize: a score 0-10 per node from the matcher's answer and the node's zone.

The formula (also in the README, "Scheduling"), per node, from its zone:

==========================================================  =======================
the node's zone is ...                                       score
==========================================================  =======================
AVAILABLE for the best candidate (rank 1)                    10
AVAILABLE for a lower-ranked candidate of rank r (best r)    max(9 - r, 5): 7, 6, 5
HYDRATING for some candidate of rank r (none AVAILABLE)      max(4 - r, 1): 3, 2, 1
anything else, no zone, unknown node, no answer              0
==========================================================  =======================

Why: a disk can be made at once only where the snapshot is AVAILABLE, and that is the whole
point (the pod starts without pulling), so those zones get the top band; the best candidate's
zone wins because the ranking already encodes the policy's preference (EXACT: smallest disk;
BYTES_COVERED: most bytes saved), but any AVAILABLE candidate still saves the pull, so every
AVAILABLE zone scores at least 5, above any hydrating zone. A HYDRATING zone may become AVAILABLE
before the pod needs its disk, so it gets a small tie-breaking preference over zones with
nothing, but never outranks a zone that works now. A node without a zone cannot be tied to a
snapshot copy, so it gets 0, as does every node when the matcher could not be asked (neutral:
the in-tree plugins decide alone). Integers only: the scheduler rejects a float.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat

from services.extender.api import MAX_SCORE, MIN_SCORE
from services.extender.matches import MatchAnswer

AVAILABLE_FLOOR = 5
HYDRATING_TOP = 3


def zone_scores(answer: MatchAnswer) -> dict[str | None, int]:
    """The score of every zone the answer mentions (zones it does not mention score 0)."""
    scores: dict[str | None, int] = {}
    if not answer.known:
        return scores
    for candidate in answer.candidates:
        available = MAX_SCORE if candidate.rank <= 1 else max(MAX_SCORE - 1 - candidate.rank, AVAILABLE_FLOOR)
        hydrating = max(HYDRATING_TOP + 1 - candidate.rank, MIN_SCORE + 1)
        for zone in candidate.available_zones:
            scores[zone] = max(scores.get(zone, MIN_SCORE), available)
        for zone in candidate.hydrating_zones:
            scores[zone] = max(scores.get(zone, MIN_SCORE), hydrating)
    return scores


def node_scores(answer: MatchAnswer, zones: Sequence[str | None]) -> list[int]:
    """One score per node, in the order of ``zones`` (each node's zone, None when it has none)."""
    by_zone = zone_scores(answer)
    if not by_zone:
        return [MIN_SCORE] * len(zones)
    # map over dict.get: C speed for thousands of nodes; None (no zone) is never a key
    return list(map(by_zone.get, zones, repeat(MIN_SCORE)))
