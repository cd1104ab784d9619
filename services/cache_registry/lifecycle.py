"""The image cache state machine: one table of legal transitions.

Every state change in the registry goes through `next_state`, so an illegal request (updating a
cache that is being deleted, deleting one twice) is refused the same way everywhere, with
FAILED_PRECONDITION and reason ILLEGAL_STATE_TRANSITION.
"""

from __future__ import annotations

import enum

from services.cache_registry.model import CacheState
from snapcache.errors import FailedPrecondition


class Trigger(enum.Enum):
    """What happens to a cache."""

    BUILD_SUCCEEDED = "BUILD_SUCCEEDED"
    BUILD_FAILED = "BUILD_FAILED"
    REBUILD = "REBUILD"  # the user changed what the snapshot holds
    DELETE = "DELETE"
    EXPIRE = "EXPIRE"


S = CacheState
T = Trigger

TRANSITIONS: dict[tuple[CacheState, Trigger], CacheState] = {
    (S.CREATING, T.BUILD_SUCCEEDED): S.READY,
    (S.CREATING, T.BUILD_FAILED): S.FAILED,
    (S.CREATING, T.REBUILD): S.CREATING,  # the running build is abandoned for the new spec
    (S.CREATING, T.DELETE): S.DELETING,
    (S.CREATING, T.EXPIRE): S.EXPIRED,
    (S.READY, T.REBUILD): S.UPDATING,
    (S.READY, T.DELETE): S.DELETING,
    (S.READY, T.EXPIRE): S.EXPIRED,
    (S.UPDATING, T.BUILD_SUCCEEDED): S.READY,
    (S.UPDATING, T.BUILD_FAILED): S.UPDATE_FAILED,
    (S.UPDATING, T.REBUILD): S.UPDATING,
    (S.UPDATING, T.DELETE): S.DELETING,
    (S.UPDATING, T.EXPIRE): S.EXPIRED,
    (S.FAILED, T.REBUILD): S.CREATING,  # fixing the spec of a failed cache retries it
    (S.FAILED, T.DELETE): S.DELETING,
    (S.FAILED, T.EXPIRE): S.EXPIRED,
    (S.UPDATE_FAILED, T.REBUILD): S.UPDATING,
    (S.UPDATE_FAILED, T.DELETE): S.DELETING,
    (S.UPDATE_FAILED, T.EXPIRE): S.EXPIRED,
    (S.EXPIRED, T.DELETE): S.DELETING,
}

# States in which a build is wanted (the worker runs one).
BUILDING_STATES = frozenset({S.CREATING, S.UPDATING})
# States in which the cache holds a usable snapshot that pods may be matched to.
SERVING_STATES = frozenset({S.READY})
# States in which a snapshot (current or previous) may exist and disks may be provisioned.
PROVISIONABLE_STATES = frozenset({S.READY})
# States that no longer change on their own.
TERMINAL_STATES = frozenset({S.FAILED, S.EXPIRED})


def can(state: CacheState, trigger: Trigger) -> bool:
    """Whether ``trigger`` is legal in ``state``."""
    return (state, trigger) in TRANSITIONS


def next_state(state: CacheState, trigger: Trigger) -> CacheState:
    """The state after ``trigger``; FailedPrecondition if the transition is illegal."""
    try:
        return TRANSITIONS[(state, trigger)]
    except KeyError:
        raise FailedPrecondition(
            reason="ILLEGAL_STATE_TRANSITION",
            message=f"cannot {trigger.value.lower().replace('_', ' ')} a cache in state {state.value}",
            metadata={"state": state.value, "trigger": trigger.value},
        ) from None
