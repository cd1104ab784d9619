"""The state machine table: every legal transition, and refusals for the rest."""

from __future__ import annotations

import itertools

import pytest

from services.cache_registry.lifecycle import TRANSITIONS, Trigger, can, next_state
from services.cache_registry.model import CacheState as S
from snapcache.errors import FailedPrecondition

EXPECTED = {
    (S.CREATING, Trigger.BUILD_SUCCEEDED): S.READY,
    (S.CREATING, Trigger.BUILD_FAILED): S.FAILED,
    (S.UPDATING, Trigger.BUILD_SUCCEEDED): S.READY,
    (S.UPDATING, Trigger.BUILD_FAILED): S.UPDATE_FAILED,
    (S.READY, Trigger.REBUILD): S.UPDATING,
    (S.FAILED, Trigger.REBUILD): S.CREATING,
    (S.UPDATE_FAILED, Trigger.REBUILD): S.UPDATING,
    (S.READY, Trigger.EXPIRE): S.EXPIRED,
    (S.EXPIRED, Trigger.DELETE): S.DELETING,
    (S.READY, Trigger.DELETE): S.DELETING,
}


@pytest.mark.parametrize(("start", "trigger"), list(EXPECTED))
def test_documented_transitions(start: S, trigger: Trigger) -> None:
    assert next_state(start, trigger) is EXPECTED[(start, trigger)]


@pytest.mark.parametrize(
    ("start", "trigger"),
    [
        (S.DELETING, Trigger.DELETE),
        (S.DELETING, Trigger.REBUILD),
        (S.DELETING, Trigger.BUILD_SUCCEEDED),
        (S.EXPIRED, Trigger.REBUILD),
        (S.EXPIRED, Trigger.EXPIRE),
        (S.READY, Trigger.BUILD_SUCCEEDED),
        (S.FAILED, Trigger.BUILD_FAILED),
    ],
)
def test_illegal_transitions_are_failed_precondition(start: S, trigger: Trigger) -> None:
    assert not can(start, trigger)
    with pytest.raises(FailedPrecondition) as caught:
        next_state(start, trigger)
    assert caught.value.reason == "ILLEGAL_STATE_TRANSITION"
    assert start.value in caught.value.message


def test_table_is_closed_and_deleting_is_a_sink() -> None:
    for state, trigger in itertools.product(S, Trigger):
        if (state, trigger) in TRANSITIONS:
            assert TRANSITIONS[(state, trigger)] in S
    assert all(start is not S.DELETING for start, _ in TRANSITIONS)
    # every state but DELETING can be deleted
    assert {s for s in S if can(s, Trigger.DELETE)} == set(S) - {S.DELETING}
