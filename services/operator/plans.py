"""What to do for one ImageCache, given the registry's cache: the operator's decision table.

Level-based: the decision depends only on the resource as stored and the cache as the registry's
feed last reported it, never on which event woke the operator, so the same inputs after a
restart give the same step and any step may run twice without harm (creates carry the
deterministic id, updates set absolute values, deletes of a DELETING cache are no-ops).

| resource | cache | step |
|---|---|---|
| being deleted, without our finalizer | any | nothing (not ours, or already done) |
| being deleted | absent, or another resource's | remove the finalizer (once the registry confirms) |
| being deleted | DELETING | wait for the feed to report it gone |
| being deleted | any other state | delete it (with force if annotated) |
| live, spec invalid (or refused as invalid at this generation) | any | nothing; Synced False |
| live | absent, and the status settled this generation (Failed, Expired) | nothing |
| live | absent | create |
| live | another resource's (an id collision) | nothing; Synced False CacheIdTaken |
| live | DELETING (deleted through the API) | wait, then create |
| live | EXPIRED | nothing; Synced False CacheExpired |
| live | differs from the spec | update the differing fields (rebuilds if images, size, platform) |
| live | zones differ | Synced False ZonesImmutable (other fields still updated) |

A live resource without the finalizer gets it first, before anything is created.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.operator.cache_specs import SpecError, desired_spec, update_paths, zones_differ
from services.operator.model import (
    FINALIZER,
    FORCE_DELETE_ANNOTATION,
    CacheSpec,
    CacheState,
    CacheView,
    ImageCacheResource,
)
from services.operator.statuses import SETTLED_PHASES, Sync, condition


class Step(enum.Enum):
    """The registry-side step of a plan."""

    NOTHING = "nothing"
    WAIT = "wait"  # for the registry to finish deleting; the feed wakes the operator
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    REMOVE_FINALIZER = "remove-finalizer"


@dataclass(frozen=True)
class Plan:
    """One reconcile's decision."""

    step: Step
    add_finalizer: bool = False
    desired: CacheSpec | None = None
    paths: tuple[str, ...] = ()  # for UPDATE
    force: bool = False  # for DELETE
    # the Synced outcome when the plan itself decides it (no registry call settles it)
    sync: Sync | None = None


def _refused_at_this_generation(resource: ImageCacheResource) -> Sync | None:
    """The stored InvalidSpec outcome, if the registry refused exactly this generation."""
    synced = condition(resource.status, "Synced")
    if (
        synced.get("reason") == "InvalidSpec"
        and resource.status.get("observedGeneration") == resource.generation
    ):
        return Sync.invalid_spec(
            str(synced.get("message", "")), detail_reason=str(resource.status.get("reason", "INVALID_FIELD"))
        )
    return None


def _settled(resource: ImageCacheResource, cache_id: str) -> bool:
    status = resource.status
    return (
        status.get("phase") in SETTLED_PHASES
        and status.get("observedGeneration") == resource.generation
        and status.get("imageCacheId") == cache_id
    )


def plan_for(resource: ImageCacheResource, cache: CacheView | None, *, cache_id: str) -> Plan:
    """The step for ``resource`` given its cache (None: the registry has none with its id)."""
    ours = FINALIZER in resource.finalizers
    if resource.deleting:
        if not ours:
            return Plan(Step.NOTHING)
        if cache is None or cache.owner_uid != resource.uid:
            return Plan(Step.REMOVE_FINALIZER)
        if cache.state is CacheState.DELETING:
            return Plan(Step.WAIT)
        force = resource.annotations.get(FORCE_DELETE_ANNOTATION, "").lower() == "true"
        return Plan(Step.DELETE, force=force)
    add = not ours
    try:
        desired = desired_spec(resource)
    except SpecError as exc:
        return Plan(Step.NOTHING, add_finalizer=add, sync=Sync.invalid_spec(str(exc)))
    refused = _refused_at_this_generation(resource)
    if refused is not None:
        return Plan(Step.NOTHING, add_finalizer=add, sync=refused)
    if cache is None:
        if _settled(resource, cache_id):
            return Plan(Step.NOTHING, add_finalizer=add)
        return Plan(Step.CREATE, add_finalizer=add, desired=desired)
    if cache.owner_uid != resource.uid:
        return Plan(Step.NOTHING, add_finalizer=add, sync=cache_id_taken(cache_id))
    if cache.state is CacheState.DELETING:
        return Plan(Step.WAIT, add_finalizer=add)
    if cache.state is CacheState.EXPIRED:
        return Plan(
            Step.NOTHING,
            add_finalizer=add,
            sync=Sync.problem(
                "CacheExpired",
                f"image cache imageCaches/{cache_id} expired and cannot change; delete this ImageCache "
                "and create it again to build a new cache",
            ),
        )
    paths = update_paths(desired, cache.spec)
    sync = None
    if zones_differ(desired, cache.spec):
        sync = Sync.problem(
            "ZonesImmutable",
            f"spec.zones cannot change after creation (the cache keeps "
            f"{', '.join(cache.spec.zones) or 'every zone'}); delete this ImageCache and create it again "
            "to move it",
        )
    if paths:
        return Plan(Step.UPDATE, add_finalizer=add, desired=desired, paths=paths, sync=sync)
    return Plan(Step.NOTHING, add_finalizer=add, sync=sync)


def cache_id_taken(cache_id: str) -> Sync:
    """The outcome when the derived id names a cache that belongs to something else."""
    return Sync.problem(
        "CacheIdTaken",
        f"the registry already has imageCaches/{cache_id}, which was not made for this ImageCache; "
        "delete this ImageCache and create it again (a new uid gives a new id)",
    )
