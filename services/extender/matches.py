"""The matcher's answer as plain domain values: what the extender's pure core scores and filters.

The gRPC edge (`matcher_client`) converts the proto into these, so the core never sees a proto;
a matcher that is down or too slow becomes an answer whose decision is UNKNOWN (fail open).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Decisions as the matcher names them (MatchImageCachesResponse.Decision), plus UNKNOWN.
MATCHED: Final = "MATCHED"
NO_MATCH: Final = "NO_MATCH"
MANUAL_NOT_FOUND: Final = "MANUAL_NOT_FOUND"
UNKNOWN: Final = "UNKNOWN"

# Actions (MatchImageCachesResponse.Action).
USE_CACHE: Final = "USE_CACHE"
PULL_IMAGES: Final = "PULL_IMAGES"
REJECT: Final = "REJECT"


@dataclass(frozen=True, slots=True)
class MatchQuery:
    """What the extender asks the matcher for one pod."""

    images: tuple[str, ...]
    manual_id: str = ""  # "imc-xxxxxxxx" for a manual match, "" for automatic
    strict: bool = False
    zones: tuple[str, ...] = ()  # zones of the candidate nodes; () = any zone
    validate_only: bool = True
    # who asks: a cached private image only for pods of its Secret's namespace naming it
    namespace: str = ""
    image_pull_secrets: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Candidate:
    """A qualifying cache and where a disk can be made from it."""

    image_cache: str  # "imageCaches/imc-..."
    rank: int  # 1 = best
    available_zones: frozenset[str]
    hydrating_zones: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class MatchAnswer:
    """The matcher's decision for a pod, or UNKNOWN when it could not be asked."""

    decision: str
    action: str = PULL_IMAGES
    image_cache: str = ""
    message: str = ""
    candidates: tuple[Candidate, ...] = ()

    @property
    def known(self) -> bool:
        """False when the matcher was down, slow or never asked: every answer fails open."""
        return self.decision != UNKNOWN

    @classmethod
    def unknown(cls, why: str) -> MatchAnswer:
        """The fail-open answer."""
        return cls(decision=UNKNOWN, message=why)

    def usable_zones(self) -> frozenset[str]:
        """Zones where a disk of a qualifying cache can be provisioned now."""
        if self.action != USE_CACHE:
            return frozenset()
        zones: set[str] = set()
        for candidate in self.candidates:
            zones |= candidate.available_zones
        return frozenset(zones)
