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
from snapcache.node_zones import ZONE_LABEL
from snapcache.pod_requests import PodRequest


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
    # One reason for every node it applies to: the scheduler counts identical reasons
    # ("0/3 nodes are available: 3 <reason>") instead of repeating each.
    if usable:
        elsewhere = (
            f"strict image-cache pod: {wanted} can be provisioned only in zone(s) {', '.join(sorted(usable))}"
        )
    else:
        elsewhere = (
            f"strict image-cache pod: {wanted} cannot be provisioned in any zone "
            f"({answer.message or answer.decision})"
        )
    zoneless = f"strict image-cache pod: node has no {ZONE_LABEL} label (or is unknown to the extender)"
    passing: list[int] = []
    failed: dict[str, str] = {}
    for position, (name, zone) in enumerate(zip(names, zones, strict=True)):
        if zone is not None and zone in usable:
            passing.append(position)
        else:
            failed[name] = elsewhere if zone is not None else zoneless
    return FilterOutcome(passing=passing, failed=failed)
