"""From a registry cache (and how the last exchange with the registry went) to an ImageCache's status.

The status is computed whole from what the registry reports, then diffed against the stored one
into a JSON merge patch: an unchanged status writes nothing, which is what keeps the operator's
own status writes (echoed back by the watch) from looping. Conditions follow the Kubernetes
conventions: `Ready` (the cache can serve pods now) and `Synced` (the registry holds this spec;
False says why not), each keeping its `lastTransitionTime` while its status stays.

Events are derived from the same diff (a phase entered, a Synced problem that is new), so an
operator restarted after writing a status does not announce the same transition twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.operator.model import CacheState, CacheView, EventSpec, ImageCacheResource

PHASES = {
    CacheState.UNSPECIFIED: "Pending",
    CacheState.CREATING: "Creating",
    CacheState.READY: "Ready",
    CacheState.UPDATING: "Updating",
    CacheState.FAILED: "Failed",
    CacheState.UPDATE_FAILED: "UpdateFailed",
    CacheState.DELETING: "Deleting",
    CacheState.EXPIRED: "Expired",
}
# Phases that stay when the registry later forgets the cache (it removes FAILED and EXPIRED
# records after a day): the operator must not build again a spec that already failed or expired.
SETTLED_PHASES = frozenset({"Failed", "Expired"})
_MIB = 1024 * 1024


@dataclass(frozen=True)
class Sync:
    """How the operator's last exchange with the registry about a resource went (`Synced`)."""

    ok: bool = True
    reason: str = "Applied"  # CamelCase condition reason
    message: str = ""
    observed: bool = True  # this generation was dealt with: applied, or refused for good
    rejected: bool = False  # the spec itself was refused as invalid
    detail_reason: str = ""  # the registry's UPPER_SNAKE reason, for status.reason

    @classmethod
    def problem(cls, reason: str, message: str, *, observed: bool = True, detail_reason: str = "") -> Sync:
        """A Synced=False outcome."""
        return cls(ok=False, reason=reason, message=message, observed=observed, detail_reason=detail_reason)

    @classmethod
    def invalid_spec(cls, message: str, *, detail_reason: str = "INVALID_FIELD") -> Sync:
        """The spec was refused; it is not sent again until the resource's generation changes."""
        return cls(
            ok=False,
            reason="InvalidSpec",
            message=message,
            observed=True,
            rejected=True,
            detail_reason=detail_reason,
        )


APPLIED = Sync()


def rfc3339(value: datetime) -> str:
    """A Kubernetes timestamp: UTC, seconds, `Z`."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def camel_case(reason: str) -> str:
    """`IMAGE_NOT_FOUND` -> `ImageNotFound` (condition reasons are CamelCase)."""
    return "".join(part.capitalize() for part in reason.split("_") if part)


def _progress(cache: CacheView) -> dict[str, Any]:
    progress = cache.progress
    if cache.state is CacheState.READY:
        percent = 100
    elif progress.bytes_total > 0:
        percent = min(100, progress.bytes_done * 100 // progress.bytes_total)
    else:
        percent = 0
    shown: dict[str, Any] = {
        "percent": percent,
        "bytesDone": progress.bytes_done,
        "bytesTotal": progress.bytes_total,
        "attempt": progress.attempt,
    }
    # no build phase: the key is left out, as the API server (1.20) refuses "" in a status string
    if progress.phase:
        shown["phase"] = progress.phase
    return shown


def _kept(resource: ImageCacheResource, cache_id: str) -> bool:
    """The stored status settled this generation (Failed or Expired) for this cache id."""
    old = resource.status
    return (
        old.get("phase") in SETTLED_PHASES
        and old.get("observedGeneration") == resource.generation
        and old.get("imageCacheId") == cache_id
    )


def _spec_image_count(resource: ImageCacheResource) -> int:
    images = resource.spec.get("images")
    return len(images) if isinstance(images, list) else 0


def status_for(
    *,
    resource: ImageCacheResource,
    cache_id: str,
    cache: CacheView | None,
    sync: Sync,
    now: datetime,
) -> dict[str, Any]:
    """The whole status an ImageCache should have now."""
    old = resource.status
    status: dict[str, Any] = {"imageCacheId": cache_id}
    problem = "" if sync.ok else sync.message
    if cache is not None:
        phase = "Deleting" if resource.deleting else PHASES[cache.state]
        reason = cache.state_reason
        message = "; ".join(m for m in (problem, cache.state_message) if m)
        status["imageCount"] = len(cache.spec.images)
        status["progress"] = _progress(cache)
        status["snapshotSizeBytes"] = cache.snapshot_size_bytes
        status["diskCount"] = cache.disk_count
        status["zoneAvailability"] = [
            {"zone": z.zone, "state": z.state, **({"message": z.message} if z.message else {})}
            for z in cache.zones
        ]
        for key, value in (
            ("expireDateTime", cache.expire_time),
            ("readyTime", cache.ready_time),
            ("lastMatchedTime", cache.last_matched_time),
        ):
            if value is not None:
                status[key] = rfc3339(value)
    elif resource.deleting:
        phase, reason, message = "Deleting", "", problem
        status["imageCount"] = _spec_image_count(resource)
    elif sync.rejected:
        phase, reason, message = "Failed", sync.detail_reason, problem
        status["imageCount"] = _spec_image_count(resource)
    elif _kept(resource, cache_id):
        # the registry forgot a failed or expired cache: what the stored status said still holds
        phase, reason, message = str(old["phase"]), str(old.get("reason", "")), str(old.get("message", ""))
        status["imageCount"] = old.get("imageCount", _spec_image_count(resource))
        for key in ("expireDateTime", "readyTime", "lastMatchedTime"):
            if key in old:
                status[key] = old[key]
    else:
        phase, reason, message = "Pending", "", problem
        status["imageCount"] = _spec_image_count(resource)
    status["phase"] = phase
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    observed = resource.generation if sync.observed else old.get("observedGeneration")
    if observed is not None:
        status["observedGeneration"] = observed
    ready = phase == "Ready"
    status["conditions"] = [
        _condition(
            old,
            kind="Ready",
            true=ready,
            reason="Ready" if ready else camel_case(reason) or phase,
            message=message,
            generation=resource.generation,
            now=now,
        ),
        _condition(
            old,
            kind="Synced",
            true=sync.ok,
            reason=sync.reason,
            message=sync.message,
            generation=resource.generation,
            now=now,
        ),
    ]
    return status


def _condition(
    old_status: Mapping[str, Any],
    *,
    kind: str,
    true: bool,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> dict[str, Any]:
    value = "True" if true else "False"
    since = rfc3339(now)
    for old in old_status.get("conditions") or ():
        if isinstance(old, Mapping) and old.get("type") == kind and old.get("status") == value:
            since = str(old.get("lastTransitionTime") or since)
    condition: dict[str, Any] = {
        "type": kind,
        "status": value,
        "reason": reason,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }
    if message:
        condition["message"] = message
    return condition


def condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    """The condition of this type in a status ({} if absent)."""
    for found in status.get("conditions") or ():
        if isinstance(found, Mapping) and found.get("type") == kind:
            return found
    return {}


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) turning ``old`` into ``new``; {} if they are equal."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            inner = merge_patch(before, value)
            if inner:
                patch[key] = inner
        elif key not in old or value != before:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


def _size(value: int) -> str:
    return f"{value / _MIB:.1f} MiB"


def events_between(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[EventSpec]:
    """The events announcing what changed from status ``old`` to ``new`` (nothing when nothing did)."""
    found: list[EventSpec] = []
    cache_name = f"imageCaches/{new.get('imageCacheId', '')}"
    phase, old_phase = new.get("phase"), old.get("phase")
    if phase == "Ready" and old_phase != "Ready":
        zones = [z["zone"] for z in new.get("zoneAvailability") or () if z.get("state") == "AVAILABLE"]
        found.append(
            EventSpec(
                "Normal",
                "Ready",
                f"image cache {cache_name} is ready: {new.get('imageCount', 0)} image(s), "
                f"{_size(int(new.get('snapshotSizeBytes') or 0))} snapshot"
                + (f"; available in {', '.join(zones)}" if zones else "; copying to its zones"),
            )
        )
    # a failed build; a spec the registry refused is announced by its Synced event instead
    if (
        phase in ("Failed", "UpdateFailed")
        and "progress" in new
        and (old_phase != phase or old.get("reason") != new.get("reason"))
    ):
        found.append(
            EventSpec(
                "Warning",
                str(phase),
                f"image cache {cache_name}: {new.get('reason') or 'build failed'}: {new.get('message', '')}",
            )
        )
    if phase == "Expired" and old_phase != "Expired":
        found.append(
            EventSpec("Normal", "Expired", f"image cache {cache_name} expired; its snapshot is deleted")
        )
    synced, old_synced = condition(new, "Synced"), condition(old, "Synced")
    if synced.get("status") == "False" and (
        old_synced.get("status") != "False" or old_synced.get("reason") != synced.get("reason")
    ):
        found.append(EventSpec("Warning", str(synced.get("reason")), str(synced.get("message", ""))))
    return found
