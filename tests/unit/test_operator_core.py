"""The operator's pure core, table-driven: spec -> cache, cache -> status, the plan, one reconcile.

The reconciler runs against in-memory fakes of its two ports (the Kubernetes edge and the
registry edge), so each decision is checked without a cluster or a registry.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest

from services.operator.cache_book import CacheBook
from services.operator.cache_specs import (
    SpecError,
    cache_id_for,
    desired_spec,
    owner_labels,
    update_paths,
    zones_differ,
)
from services.operator.model import (
    FINALIZER,
    OWNER_NAME_LABEL,
    OWNER_UID_LABEL,
    BuildProgress,
    CacheSpec,
    CacheState,
    CacheView,
    EventSpec,
    ImageCacheResource,
    RegistryRefusal,
    ResourceConflict,
    ZoneAvailability,
)
from services.operator.plans import Step, plan_for
from services.operator.reconciler import Reconciler, RetrySettings
from services.operator.statuses import APPLIED, Sync, events_between, merge_patch, status_for
from services.operator.work_queue import WorkQueue

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
UID = "6f1c1f2e-0d7a-4c43-9a55-0a2b1d3c4e5f"
CACHE_ID = cache_id_for(UID)


def resource(
    spec: Mapping[str, Any] | None = None,
    *,
    status: Mapping[str, Any] | None = None,
    finalizers: tuple[str, ...] = (FINALIZER,),
    deleting: bool = False,
    generation: int = 1,
    annotations: Mapping[str, str] | None = None,
    name: str = "web",
    uid: str = UID,
) -> ImageCacheResource:
    return ImageCacheResource(
        name=name,
        uid=uid,
        generation=generation,
        resource_version="100",
        spec=spec if spec is not None else {"images": ["nginx:1.25"], "imageCacheSize": 20},
        status=status or {},
        finalizers=finalizers,
        annotations=annotations or {},
        deleting=deleting,
    )


def cache(
    state: CacheState = CacheState.READY,
    *,
    spec: CacheSpec | None = None,
    revision: int = 5,
    uid: str = UID,
    **fields: Any,
) -> CacheView:
    wanted = spec or desired_spec(resource(uid=uid))
    return CacheView(cache_id=cache_id_for(uid), state=state, spec=wanted, revision=revision, **fields)


# --- spec -> cache ---------------------------------------------------------------------------


def test_cache_ids_are_stable_well_formed_and_distinct() -> None:
    ids = {cache_id_for(f"uid-{n}") for n in range(2000)}
    assert len(ids) == 2000
    assert all(re.fullmatch(r"imc-[a-z0-9]{8}", i) for i in ids)
    assert cache_id_for(UID) == cache_id_for(UID)


def test_desired_spec_applies_the_crd_defaults_and_owner_labels() -> None:
    assert desired_spec(resource({"images": ["nginx"]})) == CacheSpec(
        images=("nginx",),
        cache_size_gib=20,
        retention_days=0,
        platform="linux/amd64",
        display_name="web",
        labels=((OWNER_NAME_LABEL, "web"), (OWNER_UID_LABEL, UID)),
    )


def test_desired_spec_maps_every_field() -> None:
    spec = {
        "images": ["a:1", "b:2"],
        "imageCacheSize": 7,
        "retentionDays": 30,
        "imageRegistryCredentials": ["team/pull", "ops/pull.2"],
        "platform": "linux/arm64/v8",
        "zones": ["z1"],
        "plainHttpRegistries": ["r:5000"],
        "insecureRegistries": ["s.example.com"],
    }
    desired = desired_spec(resource(spec))
    assert (desired.images, desired.cache_size_gib, desired.retention_days) == (("a:1", "b:2"), 7, 30)
    assert desired.credentials == ("team/pull", "ops/pull.2")
    assert (desired.platform, desired.zones) == ("linux/arm64/v8", ("z1",))
    assert (desired.plain_http_registries, desired.insecure_registries) == (("r:5000",), ("s.example.com",))


def test_a_long_name_is_no_label_value_but_the_uid_is() -> None:
    long = "x" * 64
    assert owner_labels(resource(name=long)) == ((OWNER_UID_LABEL, UID),)
    assert desired_spec(resource({"images": ["a"]}, name=long)).display_name == "x" * 63


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "spec.images: at least one image is required"),
        ({"images": []}, "spec.images: at least one image is required"),
        ({"images": "nginx"}, "spec.images: must be a list of non-empty strings"),
        ({"images": [""]}, "spec.images: must be a list of non-empty strings"),
        ({"images": [f"i{n}" for n in range(65)]}, "spec.images: at most 64 entries; got 65"),
        ({"images": ["a"], "imageCacheSize": 0}, "spec.imageCacheSize: must be between 1 and 2048; got 0"),
        ({"images": ["a"], "imageCacheSize": 2049}, "between 1 and 2048; got 2049"),
        ({"images": ["a"], "imageCacheSize": "20"}, "spec.imageCacheSize: must be an integer"),
        ({"images": ["a"], "imageCacheSize": True}, "spec.imageCacheSize: must be an integer"),
        ({"images": ["a"], "retentionDays": -1}, "spec.retentionDays: must be between 0 and 3650; got -1"),
        ({"images": ["a"], "imageRegistryCredentials": ["nope"]}, "'nope' is not namespace/name"),
        ({"images": ["a"], "imageRegistryCredentials": ["/etc/docker/config.json"]}, "is not namespace/name"),
        ({"images": ["a"], "platform": 3}, "spec.platform: must be a string"),
    ],
)
def test_bad_specs_are_refused_with_the_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        desired_spec(resource(spec))


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(SpecError) as caught:
        desired_spec(resource({"images": [], "imageCacheSize": -1, "retentionDays": 9999}))
    assert str(caught.value).count("spec.") == 3


BASE = desired_spec(resource({"images": ["a:1", "b:1"], "plainHttpRegistries": ["r:1", "s:1"]}))


@pytest.mark.parametrize(
    ("change", "paths"),
    [
        ({}, ()),
        ({"images": ("b:1", "a:1")}, ()),  # order alone rebuilds nothing
        ({"plain_http_registries": ("s:1", "r:1")}, ()),
        ({"images": ("a:1", "c:1")}, ("images",)),
        ({"cache_size_gib": 30, "platform": "linux/arm64"}, ("cache_size_gib", "platform")),
        ({"retention_days": 9}, ("retention_days",)),
        ({"credentials": ("a/b",)}, ("registry_credentials",)),
        ({"credentials": ("a/b", "c/d")}, ("registry_credentials",)),
        ({"insecure_registries": ("x:1",)}, ("insecure_registries",)),
        ({"labels": ()}, ("labels",)),
        ({"display_name": "other"}, ("display_name",)),
        ({"zones": ("z9",)}, ()),  # never in the mask: the registry fixes zones at creation
    ],
)
def test_update_paths_name_what_differs(change: dict[str, Any], paths: tuple[str, ...]) -> None:
    assert update_paths(replace(BASE, **change), BASE) == paths


def test_credentials_compare_in_order() -> None:
    one = replace(BASE, credentials=("a/b", "c/d"))
    assert update_paths(replace(BASE, credentials=("c/d", "a/b")), one) == ("registry_credentials",)


def test_zones_compare_as_sets() -> None:
    assert not zones_differ(replace(BASE, zones=("b", "a")), replace(BASE, zones=("a", "b")))
    assert zones_differ(replace(BASE, zones=("a",)), replace(BASE, zones=("a", "b")))


# --- the plan --------------------------------------------------------------------------------

INVALID_STATUS = {
    "phase": "Failed",
    "reason": "INVALID_FIELD",
    "observedGeneration": 1,
    "imageCacheId": CACHE_ID,
    "conditions": [{"type": "Synced", "status": "False", "reason": "InvalidSpec", "message": "bad image"}],
}
FAILED_STATUS = {"phase": "Failed", "observedGeneration": 1, "imageCacheId": CACHE_ID}


@pytest.mark.parametrize(
    ("res", "found", "step", "add_finalizer", "sync_reason"),
    [
        # deletion
        (resource(deleting=True, finalizers=()), cache(), Step.NOTHING, False, None),
        (resource(deleting=True), None, Step.REMOVE_FINALIZER, False, None),
        (resource(deleting=True), cache(uid="someone-else"), Step.REMOVE_FINALIZER, False, None),
        (resource(deleting=True), cache(CacheState.DELETING), Step.WAIT, False, None),
        (resource(deleting=True), cache(CacheState.CREATING), Step.DELETE, False, None),
        (resource(deleting=True), cache(CacheState.FAILED), Step.DELETE, False, None),
        # creation
        (resource(finalizers=()), None, Step.CREATE, True, None),
        (resource(), None, Step.CREATE, False, None),
        (resource({"images": []}, finalizers=()), None, Step.NOTHING, True, "InvalidSpec"),
        (resource(status=INVALID_STATUS), None, Step.NOTHING, False, "InvalidSpec"),
        (resource(status=INVALID_STATUS, generation=2), None, Step.CREATE, False, None),
        (resource(status=FAILED_STATUS), None, Step.NOTHING, False, None),
        (resource(status={**FAILED_STATUS, "phase": "Expired"}), None, Step.NOTHING, False, None),
        (resource(status=FAILED_STATUS, generation=2), None, Step.CREATE, False, None),
        (resource(status={**FAILED_STATUS, "phase": "Ready"}), None, Step.CREATE, False, None),
        # an existing cache
        (resource(), cache(), Step.NOTHING, False, None),
        (resource(), cache(uid="someone-else"), Step.NOTHING, False, "CacheIdTaken"),
        (resource(), cache(CacheState.DELETING), Step.WAIT, False, None),
        (resource(), cache(CacheState.EXPIRED), Step.NOTHING, False, "CacheExpired"),
        (resource({"images": ["nginx:1.26"]}), cache(), Step.UPDATE, False, None),
        (resource({"images": ["nginx:1.26"]}), cache(CacheState.FAILED), Step.UPDATE, False, None),
        (
            resource({"images": ["nginx:1.25"], "zones": ["z1"]}),
            cache(),
            Step.NOTHING,
            False,
            "ZonesImmutable",
        ),
        (resource({"images": ["x"], "zones": ["z1"]}), cache(), Step.UPDATE, False, "ZonesImmutable"),
    ],
)
def test_plan_table(
    res: ImageCacheResource, found: CacheView | None, step: Step, add_finalizer: bool, sync_reason: str | None
) -> None:
    plan = plan_for(res, found, cache_id=CACHE_ID)
    assert (plan.step, plan.add_finalizer) == (step, add_finalizer)
    assert (plan.sync.reason if plan.sync else None) == sync_reason


def test_force_delete_annotation() -> None:
    annotated = resource(deleting=True, annotations={"snapcache.io/force-delete": "true"})
    assert plan_for(annotated, cache(), cache_id=CACHE_ID).force
    assert not plan_for(resource(deleting=True), cache(), cache_id=CACHE_ID).force


def test_update_plan_carries_the_mask() -> None:
    plan = plan_for(resource({"images": ["a"], "imageCacheSize": 9}), cache(), cache_id=CACHE_ID)
    assert plan.paths == ("cache_size_gib", "images")


# --- cache -> status -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "phase", "ready", "ready_reason"),
    [
        (CacheState.CREATING, "Creating", "False", "Creating"),
        (CacheState.READY, "Ready", "True", "Ready"),
        (CacheState.UPDATING, "Updating", "False", "Updating"),
        (CacheState.FAILED, "Failed", "False", "ImageNotFound"),
        (CacheState.UPDATE_FAILED, "UpdateFailed", "False", "ImageNotFound"),
        (CacheState.DELETING, "Deleting", "False", "Deleting"),
        (CacheState.EXPIRED, "Expired", "False", "Expired"),
    ],
)
def test_phase_and_ready_condition_follow_the_cache(
    state: CacheState, phase: str, ready: str, ready_reason: str
) -> None:
    failed = state in (CacheState.FAILED, CacheState.UPDATE_FAILED)
    found = cache(
        state,
        state_reason="IMAGE_NOT_FOUND" if failed else "",
        state_message="image x not found" if failed else "",
    )
    status = status_for(resource=resource(), cache_id=CACHE_ID, cache=found, sync=APPLIED, now=NOW)
    assert status["phase"] == phase
    conditions = {c["type"]: c for c in status["conditions"]}
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == (ready, ready_reason)
    assert conditions["Synced"]["status"] == "True"
    assert status["observedGeneration"] == 1
    if failed:
        assert (status["reason"], status["message"]) == ("IMAGE_NOT_FOUND", "image x not found")


def test_status_carries_what_the_registry_reports() -> None:
    found = cache(
        CacheState.CREATING,
        progress=BuildProgress(phase="PULLING", bytes_done=50, bytes_total=200, attempt=1),
        zones=(ZoneAvailability("a", "AVAILABLE"), ZoneAvailability("b", "UNAVAILABLE", "disk full")),
        expire_time=datetime(2026, 4, 1, tzinfo=UTC),
        last_matched_time=datetime(2026, 3, 1, 11, 59, 58, 500000, tzinfo=UTC),
        snapshot_size_bytes=1234,
        disk_count=2,
    )
    status = status_for(resource=resource(), cache_id=CACHE_ID, cache=found, sync=APPLIED, now=NOW)
    assert status["imageCacheId"] == CACHE_ID
    assert status["progress"] == {
        "phase": "PULLING",
        "percent": 25,
        "bytesDone": 50,
        "bytesTotal": 200,
        "attempt": 1,
    }
    assert status["zoneAvailability"] == [
        {"zone": "a", "state": "AVAILABLE"},
        {"zone": "b", "state": "UNAVAILABLE", "message": "disk full"},
    ]
    assert status["expireDateTime"] == "2026-04-01T00:00:00Z"
    assert status["lastMatchedTime"] == "2026-03-01T11:59:58Z"
    assert (status["snapshotSizeBytes"], status["diskCount"], status["imageCount"]) == (1234, 2, 1)
    assert "readyTime" not in status


def test_ready_is_100_percent_and_permanent_caches_have_no_expiry() -> None:
    status = status_for(resource=resource(), cache_id=CACHE_ID, cache=cache(), sync=APPLIED, now=NOW)
    assert status["progress"]["percent"] == 100
    assert "expireDateTime" not in status


def test_no_empty_strings_in_a_status() -> None:
    """The API server (1.20) refuses "" in a status string field: absent keys instead."""

    def strings(value: Any) -> list[str]:
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    for found in (cache(CacheState.DELETING), cache(zones=(ZoneAvailability("a", "HYDRATING"),)), None):
        for res in (resource(), resource(deleting=True)):
            status = status_for(resource=res, cache_id=CACHE_ID, cache=found, sync=APPLIED, now=NOW)
            assert "" not in strings(status), status


def test_transition_times_stay_while_a_condition_keeps_its_status() -> None:
    first = status_for(
        resource=resource(), cache_id=CACHE_ID, cache=cache(CacheState.CREATING), sync=APPLIED, now=NOW
    )
    later = datetime(2026, 3, 1, 13, 0, tzinfo=UTC)
    updating = status_for(
        resource=resource(status=first),
        cache_id=CACHE_ID,
        cache=cache(CacheState.UPDATING),
        sync=APPLIED,
        now=later,
    )
    ready = status_for(
        resource=resource(status=first), cache_id=CACHE_ID, cache=cache(), sync=APPLIED, now=later
    )
    times = {
        name: {c["type"]: c["lastTransitionTime"] for c in s["conditions"]}
        for name, s in (("updating", updating), ("ready", ready))
    }
    assert times["updating"] == {"Ready": "2026-03-01T12:00:00Z", "Synced": "2026-03-01T12:00:00Z"}
    assert times["ready"] == {"Ready": "2026-03-01T13:00:00Z", "Synced": "2026-03-01T12:00:00Z"}


@pytest.mark.parametrize(
    ("res", "sync", "phase", "reason"),
    [
        (resource(), APPLIED, "Pending", None),
        (resource(deleting=True), APPLIED, "Deleting", None),
        (resource(), Sync.invalid_spec("images[0]: bad"), "Failed", "INVALID_FIELD"),
        (
            resource(status={**FAILED_STATUS, "reason": "IMAGE_NOT_FOUND"}),
            APPLIED,
            "Failed",
            "IMAGE_NOT_FOUND",
        ),
        (resource(status={**FAILED_STATUS, "phase": "Expired"}), APPLIED, "Expired", None),
        (resource(status=FAILED_STATUS, generation=2), APPLIED, "Pending", None),
    ],
)
def test_status_without_a_cache(res: ImageCacheResource, sync: Sync, phase: str, reason: str | None) -> None:
    status = status_for(resource=res, cache_id=CACHE_ID, cache=None, sync=sync, now=NOW)
    assert (status["phase"], status.get("reason")) == (phase, reason)
    assert status["imageCount"] == 1


def test_a_transient_failure_keeps_the_observed_generation() -> None:
    sync = Sync.problem("RegistryUnavailable", "cannot create now", observed=False)
    res = resource(status={"observedGeneration": 1}, generation=2)
    status = status_for(resource=res, cache_id=CACHE_ID, cache=None, sync=sync, now=NOW)
    assert status["observedGeneration"] == 1
    synced = next(c for c in status["conditions"] if c["type"] == "Synced")
    assert (synced["status"], synced["reason"], synced["message"]) == (
        "False",
        "RegistryUnavailable",
        "cannot create now",
    )
    assert status["message"] == "cannot create now"


@pytest.mark.parametrize(
    ("old", "new", "patch"),
    [
        ({}, {}, {}),
        ({"a": 1}, {"a": 1}, {}),
        ({"a": 1}, {"a": 2}, {"a": 2}),
        ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),
        ({"p": {"x": 1, "y": 2}}, {"p": {"x": 1, "y": 3}}, {"p": {"y": 3}}),
        ({"p": {"x": 1}}, {"p": {}}, {"p": {"x": None}}),
        ({"l": [1, 2]}, {"l": [1]}, {"l": [1]}),
        ({}, {"p": {"x": 1}}, {"p": {"x": 1}}),
    ],
)
def test_merge_patch(old: dict[str, Any], new: dict[str, Any], patch: dict[str, Any]) -> None:
    assert merge_patch(old, new) == patch
    assert apply_merge_patch(old, patch) == new


def _status(phase: str, *, synced: tuple[str, str] = ("True", "Applied"), **extra: Any) -> dict[str, Any]:
    return {
        "phase": phase,
        "imageCacheId": CACHE_ID,
        "progress": {},
        "conditions": [{"type": "Synced", "status": synced[0], "reason": synced[1], "message": "why"}],
        **extra,
    }


@pytest.mark.parametrize(
    ("old", "new", "reasons"),
    [
        ({}, _status("Creating"), []),
        (_status("Creating"), _status("Creating"), []),
        (_status("Creating"), _status("Ready"), ["Ready"]),
        (_status("Ready"), _status("Ready"), []),
        (_status("Updating"), _status("Ready"), ["Ready"]),
        (_status("Creating"), _status("Failed", reason="IMAGE_NOT_FOUND"), ["Failed"]),
        (_status("Failed", reason="IMAGE_NOT_FOUND"), _status("Failed", reason="IMAGE_NOT_FOUND"), []),
        (_status("Updating"), _status("UpdateFailed", reason="CACHE_TOO_SMALL"), ["UpdateFailed"]),
        (_status("Ready"), _status("Expired"), ["Expired"]),
        (_status("Deleting"), _status("Deleting", synced=("False", "DeletionBlocked")), ["DeletionBlocked"]),
        (
            _status("Deleting", synced=("False", "DeletionBlocked")),
            _status("Deleting", synced=("False", "DeletionBlocked")),
            [],
        ),
        (
            {},
            {**_status("Failed", synced=("False", "InvalidSpec"), reason="INVALID_FIELD"), "progress": None},
            ["InvalidSpec"],
        ),
    ],
)
def test_events_announce_changes_once(old: dict[str, Any], new: dict[str, Any], reasons: list[str]) -> None:
    if new.get("progress") is None:
        new.pop("progress", None)
    assert [e.reason for e in events_between(old, new)] == reasons


def test_ready_event_names_the_cache_and_zones() -> None:
    new = _status("Ready", imageCount=2, snapshotSizeBytes=3 * 1024 * 1024)
    new["zoneAvailability"] = [{"zone": "a", "state": "AVAILABLE"}, {"zone": "b", "state": "HYDRATING"}]
    (event,) = events_between(_status("Creating"), new)
    assert event == EventSpec(
        "Normal",
        "Ready",
        f"image cache imageCaches/{CACHE_ID} is ready: 2 image(s), 3.0 MiB snapshot; available in a",
    )


# --- the cache book and the queue ------------------------------------------------------------


def test_book_keeps_the_newest_version_and_remembers_deletions() -> None:
    book = CacheBook()
    assert book.put(cache(revision=5))
    assert not book.put(cache(CacheState.CREATING, revision=4))  # a late echo
    assert book.get(CACHE_ID) is not None and book.get(CACHE_ID).state is CacheState.READY  # type: ignore[union-attr]
    assert book.remove(CACHE_ID, revision=7) is not None
    assert not book.put(cache(revision=6))  # older than the deletion
    assert book.get(CACHE_ID) is None
    assert book.put(cache(CacheState.CREATING, revision=8))  # created again
    assert book.replace_all([]) == {CACHE_ID}
    assert len(book) == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_queue_deduplicates_and_delays() -> None:
    clock = FakeClock()
    queue = WorkQueue(monotonic=clock)
    queue.add("a")
    queue.add("b")
    queue.add("a")
    queue.add_after("c", 5)
    assert [queue.get(0), queue.get(0), queue.get(0)] == ["a", "b", None]
    clock.now = 5.0
    assert queue.get(0) == "c"
    queue.add_after("d", 0)
    assert queue.get(0) == "d"
    queue.close()
    queue.add("e")
    assert queue.get(1) is None


# --- one reconcile, against fakes of both edges ----------------------------------------------


def apply_merge_patch(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386, as the API server applies a merge patch."""
    merged = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = apply_merge_patch(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class FakeResources:
    objects: dict[str, ImageCacheResource] = field(default_factory=dict)
    patches: list[dict[str, Any]] = field(default_factory=list)
    events: list[EventSpec] = field(default_factory=list)
    conflict: bool = False

    def get(self, name: str) -> ImageCacheResource | None:
        return self.objects.get(name)

    def set_finalizers(self, res: ImageCacheResource, finalizers: tuple[str, ...]) -> ImageCacheResource:
        if self.conflict:
            raise ResourceConflict("409")
        updated = replace(res, finalizers=finalizers)
        if res.deleting and not finalizers:
            del self.objects[res.name]  # the API server deletes it
        else:
            self.objects[res.name] = updated
        return updated

    def patch_status(self, res: ImageCacheResource, patch: Mapping[str, Any]) -> None:
        self.patches.append(dict(patch))
        current = self.objects[res.name]
        self.objects[res.name] = replace(current, status=apply_merge_patch(current.status, patch))

    def record_event(self, res: ImageCacheResource, event: EventSpec) -> None:
        self.events.append(event)


@dataclass
class FakeRegistry:
    caches: dict[str, CacheView] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    refuse: dict[str, RegistryRefusal] = field(default_factory=dict)
    revision: int = 0

    def _check(self, call: str) -> None:
        self.calls.append(call)
        if call in self.refuse:
            raise self.refuse[call]

    def _store(self, view: CacheView) -> CacheView:
        self.revision += 1
        self.caches[view.cache_id] = replace(view, revision=self.revision)
        return self.caches[view.cache_id]

    def create(self, cache_id: str, spec: CacheSpec) -> CacheView:
        self._check("create")
        if cache_id in self.caches:
            raise RegistryRefusal(code="ALREADY_EXISTS", reason="IMAGE_CACHE_EXISTS", message="exists")
        return self._store(CacheView(cache_id=cache_id, state=CacheState.CREATING, spec=spec))

    def get(self, cache_id: str) -> CacheView | None:
        self._check("get")
        return self.caches.get(cache_id)

    def update(self, cache_id: str, spec: CacheSpec, paths: tuple[str, ...]) -> CacheView:
        self._check("update")
        return self._store(replace(self.caches[cache_id], spec=spec, state=CacheState.UPDATING))

    def delete(self, cache_id: str, *, force: bool) -> CacheView:
        self._check("delete")
        return self._store(replace(self.caches[cache_id], state=CacheState.DELETING))


@dataclass
class World:
    resources: FakeResources
    registry: FakeRegistry
    book: CacheBook
    reconciler: Reconciler

    @property
    def status(self) -> Mapping[str, Any]:
        return self.resources.objects["web"].status

    def feed(self, view: CacheView | None = None, *, gone: str = "") -> None:
        """What the feed would tell: the registry's current version, or a deletion."""
        if gone:
            self.registry.caches.pop(gone)
            self.registry.revision += 1
            self.book.remove(gone, revision=self.registry.revision)
            return
        assert view is not None
        self.book.put(self.registry._store(view))


def world(res: ImageCacheResource | None = None) -> World:
    resources = FakeResources(objects={"web": res or resource(finalizers=())})
    registry = FakeRegistry()
    book = CacheBook()
    reconciler = Reconciler(
        resources=resources,
        registry=registry,
        book=book,
        clock=lambda: NOW,
        retry=RetrySettings(initial_seconds=1, max_seconds=8, blocked_seconds=60),
    )
    return World(resources, registry, book, reconciler)


def test_a_new_resource_gets_a_finalizer_a_cache_and_a_status() -> None:
    w = world()
    assert w.reconciler.reconcile("web") is None
    assert w.registry.calls == ["create"]
    assert FINALIZER in w.resources.objects["web"].finalizers
    assert w.status["phase"] == "Creating" and w.status["imageCacheId"] == CACHE_ID
    assert [e.reason for e in w.resources.events] == ["Created"]
    # the build finishes: the feed reports it, the status follows, Ready is announced once
    w.feed(replace(w.registry.caches[CACHE_ID], state=CacheState.READY))
    w.reconciler.reconcile("web")
    w.reconciler.reconcile("web")
    assert w.status["phase"] == "Ready"
    assert [e.reason for e in w.resources.events] == ["Created", "Ready"]
    assert w.registry.calls == ["create"]  # no registry call just to write a status
    assert len(w.resources.patches) == 2


def test_a_restarted_operator_adopts_the_cache_it_created() -> None:
    w = world(resource())
    w.registry.caches[CACHE_ID] = cache(CacheState.CREATING)  # created before the crash; feed not loaded
    assert w.reconciler.reconcile("web") == 0.0  # adopted: look again at once
    assert w.registry.calls == ["create", "get"]
    assert w.reconciler.reconcile("web") is None
    assert w.registry.calls == ["create", "get"]  # nothing to change: no second build
    assert w.status["phase"] == "Creating"
    assert "Created" not in [e.reason for e in w.resources.events]


def test_a_cache_id_taken_by_someone_else_is_not_adopted() -> None:
    w = world(resource())
    w.registry.caches[CACHE_ID] = cache(uid="other")
    w.reconciler.reconcile("web")
    synced = next(c for c in w.status["conditions"] if c["type"] == "Synced")
    assert (synced["status"], synced["reason"]) == ("False", "CacheIdTaken")
    assert w.registry.calls == ["create", "get"]


def test_a_spec_change_updates_the_differing_fields() -> None:
    w = world(resource({"images": ["nginx:1.26"]}, generation=2))
    w.feed(cache())
    w.reconciler.reconcile("web")
    assert w.registry.calls == ["update"]
    assert w.status["phase"] == "Updating" and w.status["observedGeneration"] == 2
    assert [e.reason for e in w.resources.events] == ["Updating"]


def test_an_invalid_spec_is_sent_once_per_generation() -> None:
    w = world(resource({"images": ["UPPER"]}))
    w.registry.refuse["create"] = RegistryRefusal(
        code="INVALID_ARGUMENT", reason="INVALID_FIELD", message="image_cache.images[0]: 'UPPER': bad"
    )
    assert w.reconciler.reconcile("web") is None
    assert w.reconciler.reconcile("web") is None
    assert w.registry.calls == ["create"]
    assert (w.status["phase"], w.status["reason"]) == ("Failed", "INVALID_FIELD")
    assert "'UPPER': bad" in w.status["message"]
    assert [e.reason for e in w.resources.events] == ["InvalidSpec"]


def test_an_unreachable_registry_backs_off_and_recovers() -> None:
    w = world(resource())
    w.registry.refuse["create"] = RegistryRefusal(code="UNAVAILABLE", reason="", message="connection refused")
    assert [w.reconciler.reconcile("web") for _ in range(5)] == [1, 2, 4, 8, 8]
    assert {w.reconciler.reconcile("web") for _ in range(1100)} == {8}  # a long outage: no overflow
    synced = next(c for c in w.status["conditions"] if c["type"] == "Synced")
    assert synced["reason"] == "RegistryUnavailable"
    assert "observedGeneration" not in w.status
    del w.registry.refuse["create"]
    assert w.reconciler.reconcile("web") is None
    assert w.status["phase"] == "Creating" and w.status["observedGeneration"] == 1


def test_deletion_waits_for_the_cache_to_be_gone() -> None:
    w = world(resource(deleting=True))
    w.feed(cache())
    w.reconciler.reconcile("web")
    assert w.registry.calls == ["delete"] and w.status["phase"] == "Deleting"
    w.reconciler.reconcile("web")  # DELETING: wait for the feed
    assert w.registry.calls == ["delete"]
    w.feed(gone=CACHE_ID)
    assert w.reconciler.reconcile("web") is None
    assert w.registry.calls == ["delete", "get"]  # confirmed before the finalizer goes
    assert "web" not in w.resources.objects


def test_a_refused_deletion_keeps_the_finalizer_and_says_why() -> None:
    w = world(resource(deleting=True))
    w.feed(cache(disk_count=1))
    w.registry.refuse["delete"] = RegistryRefusal(
        code="FAILED_PRECONDITION", reason="DISKS_IN_USE", message="has 1 live disk(s)"
    )
    assert w.reconciler.reconcile("web") == 60
    assert FINALIZER in w.resources.objects["web"].finalizers
    synced = next(c for c in w.status["conditions"] if c["type"] == "Synced")
    assert (synced["status"], synced["reason"]) == ("False", "DeletionBlocked")
    assert "has 1 live disk(s)" in synced["message"] and "force-delete" in synced["message"]
    assert [e.reason for e in w.resources.events] == ["DeletionBlocked"]
    del w.registry.refuse["delete"]
    w.feed(cache(disk_count=0))  # the disk is released
    w.reconciler.reconcile("web")
    assert w.status["phase"] == "Deleting"
    assert next(c for c in w.status["conditions"] if c["type"] == "Synced")["status"] == "True"


def test_a_stale_book_never_removes_the_finalizer_of_a_live_cache() -> None:
    w = world(resource(deleting=True))
    w.registry.caches[CACHE_ID] = cache()  # the feed has not reported it yet
    assert w.reconciler.reconcile("web") == 0.0
    assert "web" in w.resources.objects and w.registry.calls == ["get"]
    w.reconciler.reconcile("web")
    assert w.registry.calls == ["get", "delete"]


def test_a_conflict_retries_soon() -> None:
    w = world()
    w.resources.conflict = True
    assert w.reconciler.reconcile("web") == RetrySettings().conflict_seconds
    assert w.registry.calls == []


def test_a_resource_gone_is_left_alone() -> None:
    w = world()
    del w.resources.objects["web"]
    assert w.reconciler.reconcile("web") is None
    assert w.registry.calls == []
