"""One reconcile of one ImageCache: plan, do the registry step, write the status, announce changes.

The use case between the two edges, which it reaches through the `Resources` and `Registry`
protocols (`kube_resources` and `registry_client` in production, fakes in unit tests), so it
imports neither a Kubernetes nor a gRPC client. It returns when to look again: None when only a
change (of the resource, or of its cache in the feed) should wake it, a delay after a failure it
cannot settle itself (backing off per resource), or 0 to go again at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from services.operator.cache_book import CacheBook
from services.operator.cache_specs import cache_id_for, rebuilds
from services.operator.model import (
    FINALIZER,
    CacheSpec,
    CacheView,
    EventSpec,
    ImageCacheResource,
    KubeApiError,
    RegistryRefusal,
    ResourceConflict,
    ResourceGone,
)
from services.operator.plans import Plan, Step, cache_id_taken, plan_for
from services.operator.statuses import APPLIED, Sync, events_between, merge_patch, status_for

log = logging.getLogger(__name__)


class Resources(Protocol):
    """The ImageCache resources (the Kubernetes edge)."""

    def get(self, name: str) -> ImageCacheResource | None:
        """The resource as last seen, or None if it does not exist."""
        ...

    def set_finalizers(self, resource: ImageCacheResource, finalizers: tuple[str, ...]) -> ImageCacheResource:
        """Write the finalizers, guarded by its resourceVersion; `ResourceConflict`, `ResourceGone`."""
        ...

    def patch_status(self, resource: ImageCacheResource, patch: Mapping[str, Any]) -> None:
        """Merge-patch the status subresource; `ResourceGone` if the resource is gone."""
        ...

    def record_event(self, resource: ImageCacheResource, event: EventSpec) -> None:
        """Record an event on the resource (best effort)."""
        ...


class Registry(Protocol):
    """The cache registry (the gRPC edge); failures raise `RegistryRefusal`."""

    def create(self, cache_id: str, spec: CacheSpec) -> CacheView:
        """CreateImageCache with this id."""
        ...

    def get(self, cache_id: str) -> CacheView | None:
        """GetImageCache; None for NOT_FOUND."""
        ...

    def update(self, cache_id: str, spec: CacheSpec, paths: tuple[str, ...]) -> CacheView:
        """UpdateImageCache of the named fields."""
        ...

    def delete(self, cache_id: str, *, force: bool) -> CacheView:
        """DeleteImageCache."""
        ...


@dataclass(frozen=True)
class RetrySettings:
    """Backoff after failures the operator cannot settle by itself."""

    initial_seconds: float = 0.5
    max_seconds: float = 60.0
    blocked_seconds: float = 60.0  # a deletion refused (live disks): look again this often
    conflict_seconds: float = 0.1


@dataclass
class _Outcome:
    cache: CacheView | None
    sync: Sync
    events: list[EventSpec] = field(default_factory=list)
    retry: bool = False  # back off and try again
    again: bool = False  # look again at once (something was learnt)
    done: bool = False  # the finalizer is gone: no status to write


class Reconciler:
    """Reconciles ImageCaches by name."""

    def __init__(
        self,
        *,
        resources: Resources,
        registry: Registry,
        book: CacheBook,
        clock: Callable[[], datetime],
        retry: RetrySettings | None = None,
    ) -> None:
        self._resources = resources
        self._registry = registry
        self._book = book
        self._clock = clock
        self._retry = retry or RetrySettings()
        self._failures: dict[str, int] = {}

    def reconcile(self, name: str) -> float | None:
        """Bring one ImageCache and its cache into agreement; return when to look again."""
        resource = self._resources.get(name)
        if resource is None:
            self._failures.pop(name, None)
            return None
        cache_id = cache_id_for(resource.uid)
        plan = plan_for(resource, self._book.get(cache_id), cache_id=cache_id)
        try:
            if plan.add_finalizer:
                resource = self._resources.set_finalizers(resource, (*resource.finalizers, FINALIZER))
            outcome = self._run(resource, plan, cache_id)
            if not outcome.done:
                self._write_status(resource, cache_id, outcome)
        except ResourceConflict:
            return self._retry.conflict_seconds  # the watch brings the newer version meanwhile
        except ResourceGone:
            self._failures.pop(name, None)
            return None
        except KubeApiError as exc:
            log.warning("ImageCache %s: Kubernetes API error (%s); retrying", name, exc)
            return self._backoff(name)
        if outcome.again:
            return 0.0
        if outcome.retry:
            return self._backoff(name)
        self._failures.pop(name, None)
        if outcome.sync.reason == "DeletionBlocked":
            return self._retry.blocked_seconds
        return None

    def _backoff(self, name: str) -> float:
        failures = self._failures.get(name, 0) + 1
        self._failures[name] = failures
        delay: float = self._retry.initial_seconds * 2.0 ** min(failures - 1, 20)  # no float overflow
        return min(delay, self._retry.max_seconds)

    def _write_status(self, resource: ImageCacheResource, cache_id: str, outcome: _Outcome) -> None:
        status = status_for(
            resource=resource, cache_id=cache_id, cache=outcome.cache, sync=outcome.sync, now=self._clock()
        )
        patch = merge_patch(resource.status, status)
        if patch:
            self._resources.patch_status(resource, patch)
        for event in outcome.events + events_between(resource.status, status):
            self._resources.record_event(resource, event)

    # --- the registry step ---------------------------------------------------------------------

    def _run(self, resource: ImageCacheResource, plan: Plan, cache_id: str) -> _Outcome:
        cache = self._book.get(cache_id)
        base = plan.sync or APPLIED
        if resource.deleting and FINALIZER not in resource.finalizers:
            return _Outcome(cache, base, done=True)  # not (or no longer) ours: write nothing
        try:
            if plan.step is Step.CREATE:
                assert plan.desired is not None
                return self._create(resource, cache_id, plan.desired)
            if plan.step is Step.UPDATE:
                assert plan.desired is not None
                updated = self._remember(self._registry.update(cache_id, plan.desired, plan.paths))
                rebuild = rebuilds(plan.paths)
                log.info(
                    "ImageCache %s: updated imageCaches/%s (%s)%s",
                    resource.name,
                    cache_id,
                    ", ".join(plan.paths),
                    "; rebuilding" if rebuild else "",
                )
                message = f"updated {', '.join(plan.paths)} of imageCaches/{cache_id}"
                return _Outcome(
                    updated,
                    base,
                    [
                        EventSpec(
                            "Normal",
                            "Updating" if rebuild else "Updated",
                            message + ("; rebuilding" if rebuild else ""),
                        )
                    ],
                )
            if plan.step is Step.DELETE:
                deleting = self._remember(self._registry.delete(cache_id, force=plan.force))
                log.info("ImageCache %s: deleting imageCaches/%s", resource.name, cache_id)
                return _Outcome(
                    deleting,
                    APPLIED,
                    [EventSpec("Normal", "Deleting", f"deleting image cache imageCaches/{cache_id}")],
                )
            if plan.step is Step.REMOVE_FINALIZER:
                return self._release(resource, cache_id)
        except RegistryRefusal as refusal:
            return self._refused(resource, plan, cache_id, cache, refusal)
        return _Outcome(cache, base)

    def _remember(self, cache: CacheView) -> CacheView:
        self._book.put(cache)
        return cache

    def _create(self, resource: ImageCacheResource, cache_id: str, desired: CacheSpec) -> _Outcome:
        try:
            created = self._remember(self._registry.create(cache_id, desired))
        except RegistryRefusal as refusal:
            if refusal.code != "ALREADY_EXISTS":
                raise
            # made before a restart (or by another replica): adopt it if it is this resource's
            found = self._registry.get(cache_id)
            if found is None:  # deleted in between: try again
                return _Outcome(None, APPLIED, again=True)
            if found.owner_uid != resource.uid:
                return _Outcome(None, cache_id_taken(cache_id))
            self._remember(found)
            log.info("ImageCache %s: adopted the existing imageCaches/%s", resource.name, cache_id)
            return _Outcome(found, APPLIED, again=True)  # again: update it if it differs
        log.info(
            "ImageCache %s: created imageCaches/%s (%d image(s), %d GiB)",
            resource.name,
            cache_id,
            len(desired.images),
            desired.cache_size_gib,
        )
        return _Outcome(
            created,
            APPLIED,
            [
                EventSpec(
                    "Normal",
                    "Created",
                    f"created image cache imageCaches/{cache_id} with {len(desired.images)} image(s) on "
                    f"{desired.cache_size_gib} GiB; building",
                )
            ],
        )

    def _release(self, resource: ImageCacheResource, cache_id: str) -> _Outcome:
        """Remove the finalizer once the registry confirms the cache is gone (or not this resource's)."""
        found = self._registry.get(cache_id)
        if found is not None and found.owner_uid == resource.uid:
            self._remember(found)  # the feed had not told yet: delete (or wait for) it first
            return _Outcome(found, APPLIED, again=True)
        held = self._book.get(cache_id)
        if held is not None and found is None:
            self._book.remove(cache_id, revision=held.revision)
        kept = tuple(f for f in resource.finalizers if f != FINALIZER)
        self._resources.set_finalizers(resource, kept)
        log.info(
            "ImageCache %s: image cache imageCaches/%s is gone; finalizer removed", resource.name, cache_id
        )
        return _Outcome(None, APPLIED, done=True)

    def _refused(
        self,
        resource: ImageCacheResource,
        plan: Plan,
        cache_id: str,
        cache: CacheView | None,
        refusal: RegistryRefusal,
    ) -> _Outcome:
        what = f"{plan.step.value} imageCaches/{cache_id}"
        if refusal.transient:
            log.warning("ImageCache %s: cannot %s: %s; retrying", resource.name, what, refusal)
            sync = Sync.problem(
                "RegistryUnavailable",
                f"cannot {what} now ({refusal.code}: {refusal.message}); retrying",
                observed=False,
            )
            return _Outcome(cache, sync, retry=True)
        if refusal.code == "NOT_FOUND":
            # the feed had not told yet that it is gone: forget it and decide again
            if cache is not None:
                self._book.remove(cache_id, revision=cache.revision)
            return _Outcome(None, APPLIED, again=True)
        log.warning("ImageCache %s: the registry refused to %s: %s", resource.name, what, refusal)
        if refusal.code == "INVALID_ARGUMENT":
            return _Outcome(
                cache, Sync.invalid_spec(refusal.message, detail_reason=refusal.reason or "INVALID_FIELD")
            )
        if plan.step is Step.DELETE and refusal.reason == "DISKS_IN_USE":
            sync = Sync.problem(
                "DeletionBlocked",
                f"the registry refused to delete imageCaches/{cache_id}: {refusal.message}; the finalizer "
                f"stays until they are released (or annotate this ImageCache with "
                f'snapcache.io/force-delete: "true" to delete it anyway)',
                detail_reason=refusal.reason,
            )
            return _Outcome(cache, sync)
        sync = Sync.problem(
            "RegistryRefused",
            f"the registry refused to {what}: {refusal.code} {refusal.reason}: {refusal.message}",
            detail_reason=refusal.reason,
        )
        return _Outcome(cache, sync, retry=True)
