"""Filter: every node passes, except for strict pods, whose nodes must be in a usable zone.

A strict pod (``snapcache.io/image-cache-strict: "true"``) wants to start from a cache or not at
all; a node in a zone where no qualifying cache's disk can be provisioned now is rejected with a
reason a person can act on (which cache, which zones would do, what the matcher said). A rejected
node is data, not an error. When the matcher could not be asked the filter fails open: strict or
not, every node passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.extender.matches import MatchAnswer
from services.extender.pods import PodRequest


@dataclass(frozen=True, slots=True)
class FilterOutcome:
    """Indexes of passing nodes and a reason per rejected node name."""

    passing: list[int]
    failed: dict[str, str] = field(default_factory=dict)


def filter_nodes(
    request: PodRequest, answer: MatchAnswer, names: Sequence[str], zones: Sequence[str | None]
) -> FilterOutcome:
    """Which of the nodes (``names`` with their ``zones``) the pod may run on."""
    if not request.strict or not request.wants_cache or not answer.known:
        return FilterOutcome(passing=list(range(len(names))))
    usable = answer.usable_zones()
    wanted = request.manual_id or "a matching image cache"
    if usable:
        where = f"{wanted} can be used in zone(s) {', '.join(sorted(usable))}"
    else:
        where = f"{wanted} cannot be used in any zone: {answer.message or answer.decision}"
    passing: list[int] = []
    failed: dict[str, str] = {}
    for position, (name, zone) in enumerate(zip(names, zones, strict=True)):
        if zone is not None and zone in usable:
            passing.append(position)
        elif zone is None:
            failed[name] = f"strict image-cache pod: node has no zone label (or is unknown); {where}"
        else:
            failed[name] = f"strict image-cache pod: not usable in zone {zone}; {where}"
    return FilterOutcome(passing=passing, failed=failed)
