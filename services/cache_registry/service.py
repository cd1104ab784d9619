"""The registry's API use cases: one transaction each, domain values in and out.

The servicer converts protos to the values here and back; the worker runs the background half of
the lifecycle (builds, hydration, expiry, deletion). Both commit through `store` and then ring
the `CommitSignal`, which wakes watchers and the worker.
"""

from __future__ import annotations

import logging
import secrets
import string
import time
from collections.abc import Callable, Collection, Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from services.cache_registry import lifecycle, store
from services.cache_registry.database import Database
from services.cache_registry.feed import CommitSignal
from services.cache_registry.filtering import parse_filter
from services.cache_registry.lifecycle import Trigger
from services.cache_registry.model import (
    CACHE_NAME_PREFIX,
    BuildPhase,
    BuildProgress,
    CacheEvent,
    CacheId,
    CacheSpec,
    CacheState,
    Change,
    ChangeType,
    Disk,
    DiskId,
    EventType,
    ImageCache,
    ZoneState,
)
from services.cache_registry.provider import Provider
from services.cache_registry.validation import (
    check_cache_id,
    check_disk_id,
    check_page_size,
    check_spec,
    parse_cache_name,
)
from snapcache import page_tokens
from snapcache.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    invalid,
)

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# Fields an update may name, and which of them change what the snapshot holds.
UPDATABLE_FIELDS = frozenset(
    {
        "display_name",
        "labels",
        "images",
        "cache_size_gib",
        "retention_days",
        "registry_credentials",
        "plain_http_registries",
        "insecure_registries",
        "platform",
    }
)
REBUILD_FIELDS = frozenset({"images", "cache_size_gib", "platform"})
_ID_ALPHABET = string.ascii_lowercase + string.digits


@dataclass(frozen=True)
class RegistrySettings:
    """Tunables of the registry's API behaviour."""

    max_watchers: int = 256
    watch_poll_seconds: float = 1.0  # how soon another replica's commit is seen without a wake-up
    watch_heartbeat_seconds: float = 5.0  # PROGRESS messages on an idle feed
    watch_batch: int = 500


@dataclass(frozen=True, slots=True)
class ListPage:
    """A page of caches, the next page's token, and the revision it was read at."""

    caches: list[store.ServedCache]
    next_page_token: str
    revision: int


@dataclass(frozen=True, slots=True)
class EventPage:
    """A page of a cache's events."""

    events: list[CacheEvent]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The feed is alive and current up to ``revision``."""

    revision: int


@dataclass(frozen=True, slots=True)
class MatchHits:
    """Pods matched to one cache since the last report."""

    name: str
    count: int
    last_matched_time: datetime


def new_cache_id() -> CacheId:
    """`imc-` and 8 random lowercase letters or digits."""
    return CacheId("imc-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(8)))


def new_build_id() -> str:
    """A fresh build id; it names the builder disk and the snapshot of that build."""
    return secrets.token_hex(4)


def _expire_time(create_time: datetime, retention_days: int) -> datetime | None:
    return create_time + timedelta(days=retention_days) if retention_days else None


class CacheRegistry:
    """The use cases behind `CacheRegistryService`."""

    def __init__(
        self,
        *,
        database: Database,
        provider: Provider,
        signal: CommitSignal,
        clock: Clock,
        settings: RegistrySettings | None = None,
        encoder: store.CacheEncoder | None = None,
    ) -> None:
        self._db = database
        self._provider = provider
        self._signal = signal
        self._clock = clock
        self._settings = settings or RegistrySettings()
        self._watchers = 0
        self._zones = tuple(z.name for z in provider.zones())
        self._decoded = store.DecodedCaches()
        # the wire form the store keeps with each version, from the edge at wiring; without one,
        # reads hand the edge every cache decoded, for it to encode
        self._encoder = encoder
        self._wire_format = encoder.format if encoder else ""

    @property
    def zones(self) -> tuple[str, ...]:
        """Zone names the provider offers."""
        return self._zones

    # --- caches ------------------------------------------------------------------------------

    def create(self, *, spec: CacheSpec, cache_id: str = "") -> ImageCache:
        """Validate, record in CREATING, and leave the build to the worker."""
        checked = check_spec(spec, known_zones=self._zones)
        chosen = check_cache_id(cache_id) if cache_id else new_cache_id()
        now = self._clock()
        cache = ImageCache(
            cache_id=chosen,
            spec=checked,
            state=CacheState.CREATING,
            create_time=now,
            update_time=now,
            progress=BuildProgress(phase=BuildPhase.QUEUED),
            build_id=new_build_id(),
            expire_time=_expire_time(now, checked.retention_days),
        )
        with self._db.transaction() as session:
            if store.cache_exists(session, cache_id=chosen):
                raise AlreadyExists(
                    reason="IMAGE_CACHE_EXISTS",
                    message=f"image cache {CACHE_NAME_PREFIX}{chosen} already exists",
                    metadata={"image_cache": CACHE_NAME_PREFIX + chosen},
                )
            stored = store.insert_cache(session, cache=cache, now=now, encoder=self._encoder)
            store.append_event(
                session,
                cache_id=chosen,
                now=now,
                type=EventType.NORMAL,
                reason="Created",
                message=f"image cache created with {len(checked.images)} image(s), "
                f"{checked.cache_size_gib} GiB; build queued",
            )
        self._signal.notify()
        return stored

    def get(self, *, name: str) -> ImageCache:
        """One cache by name; NOT_FOUND if absent."""
        cache_id = parse_cache_name(name)
        with self._db.transaction(write=False) as session:
            return self._require(store.get_cache(session, cache_id=cache_id, memo=self._decoded), cache_id)

    def read(self, *, name: str) -> store.ServedCache:
        """One cache by name as the API serves it (its stored wire form when it has one)."""
        cache_id = parse_cache_name(name)
        with self._db.transaction(write=False) as session:
            found = store.read_cache(
                session, cache_id=cache_id, wire_format=self._wire_format, memo=self._decoded
            )
        if found is None:
            raise self._not_found(cache_id)
        return found

    def list_caches(self, *, page_size: int, page_token: str, filter_text: str) -> ListPage:
        """A page of caches in id order, with the revision it was read at."""
        limit = check_page_size(page_size)
        where = parse_filter(filter_text)
        scope = f"caches:{filter_text.strip()}"
        cursor = page_tokens.decode(page_token, scope=scope, expect={"after": str}) if page_token else {}
        after = str(cursor.get("after", ""))
        with self._db.transaction(write=False) as session:
            revision = store.current_revision(session)
            caches = store.read_caches(
                session,
                after_id=after,
                limit=limit + 1,
                where=where,
                wire_format=self._wire_format,
                memo=self._decoded,
            )
        next_token = ""
        if len(caches) > limit:
            caches = caches[:limit]
            next_token = page_tokens.encode({"after": caches[-1].cache_id}, scope=scope)
        return ListPage(caches=caches, next_page_token=next_token, revision=revision)

    def update(self, *, name: str, changes: CacheSpec, paths: Sequence[str], etag: str = "") -> ImageCache:
        """Apply the named fields; a change to what the snapshot holds starts a rebuild."""
        cache_id = parse_cache_name(name, field="image_cache.name")
        fields = self._check_mask(paths)
        checked = check_spec(changes, known_zones=self._zones, only=fields)
        now = self._clock()
        with self._db.transaction() as session:
            current = self._require(store.get_cache(session, cache_id=cache_id, for_update=True), cache_id)
            self._check_etag(current, etag)
            if current.state is CacheState.DELETING:
                raise FailedPrecondition(
                    reason="IMAGE_CACHE_DELETING",
                    message=f"image cache {current.name} is being deleted",
                    metadata={"image_cache": current.name},
                )
            spec = current.spec
            values = {f: getattr(checked, f) for f in fields}
            new_spec = replace(spec, **values)
            rebuild = any(getattr(new_spec, f) != getattr(spec, f) for f in fields & REBUILD_FIELDS)
            updated = replace(current, spec=new_spec, update_time=now)
            if "retention_days" in fields:
                updated = replace(
                    updated, expire_time=_expire_time(current.create_time, new_spec.retention_days)
                )
            if rebuild:
                updated = replace(
                    updated,
                    state=lifecycle.next_state(current.state, Trigger.REBUILD),
                    build_id=new_build_id(),
                    progress=BuildProgress(phase=BuildPhase.QUEUED),
                    state_reason="",
                    state_message="",
                )
                store.set_next_attempt(session, cache_id=cache_id, at=None)
            stored = store.update_cache(
                session, cache=updated, expected_version=current.version, now=now, encoder=self._encoder
            )
            changed = ", ".join(sorted(fields))
            store.append_event(
                session,
                cache_id=cache_id,
                now=now,
                type=EventType.NORMAL,
                reason="Updated",
                message=f"updated {changed}" + ("; rebuild queued" if rebuild else ""),
            )
        self._signal.notify()
        return stored

    def delete(self, *, name: str, etag: str = "", force: bool = False) -> ImageCache:
        """Move the cache to DELETING; the worker removes its snapshot and then the record."""
        cache_id = parse_cache_name(name)
        now = self._clock()
        with self._db.transaction() as session:
            current = self._require(store.get_cache(session, cache_id=cache_id, for_update=True), cache_id)
            self._check_etag(current, etag)
            if current.state is CacheState.DELETING:
                return current  # deleting twice is the same request
            disks = store.count_disks(session, cache_id=cache_id)
            if disks and not force:
                raise FailedPrecondition(
                    reason="DISKS_IN_USE",
                    message=f"image cache {current.name} has {disks} live disk(s); "
                    "release them or delete with force",
                    metadata={"image_cache": current.name, "disk_count": str(disks)},
                )
            deleting = replace(
                current,
                state=lifecycle.next_state(current.state, Trigger.DELETE),
                update_time=now,
                progress=replace(current.progress, phase=BuildPhase.NONE),
            )
            stored = store.update_cache(
                session, cache=deleting, expected_version=current.version, now=now, encoder=self._encoder
            )
            store.set_next_attempt(session, cache_id=cache_id, at=None)
            store.append_event(
                session,
                cache_id=cache_id,
                now=now,
                type=EventType.NORMAL,
                reason="Deleting",
                message="deletion requested" + (f"; releasing {disks} live disk(s)" if disks else ""),
            )
        self._signal.notify()
        return stored

    def list_events(self, *, parent: str, page_size: int, page_token: str) -> EventPage:
        """A page of a cache's event log, oldest first."""
        cache_id = parse_cache_name(parent, field="parent")
        limit = check_page_size(page_size)
        scope = f"events:{cache_id}"
        cursor = page_tokens.decode(page_token, scope=scope, expect={"after": int}) if page_token else {}
        after = int(cursor.get("after", 0))
        with self._db.transaction(write=False) as session:
            self._require(store.get_cache(session, cache_id=cache_id), cache_id)
            events = store.list_events(session, cache_id=cache_id, after_sequence=after, limit=limit + 1)
        token = ""
        if len(events) > limit:
            events = events[:limit]
            token = page_tokens.encode({"after": events[-1].sequence}, scope=scope)
        return EventPage(events=events, next_page_token=token)

    # --- change feed -------------------------------------------------------------------------

    def watch(
        self, *, start_revision: int, name: str = "", is_active: Callable[[], bool]
    ) -> Iterator[Change | Heartbeat]:
        """Changes after ``start_revision`` in order, then live ones, until the caller goes away."""
        if start_revision < 0:
            raise invalid("start_revision", "must not be negative")
        cache_id = parse_cache_name(name) if name else ""
        if self._watchers >= self._settings.max_watchers:
            raise ResourceExhausted(
                reason="TOO_MANY_WATCHERS",
                message=f"the registry serves at most {self._settings.max_watchers} watchers; retry later",
                metadata={"retry_after_seconds": "5"},
            )
        self._watchers += 1
        try:
            yield from self._follow(start_revision, cache_id, is_active)
        finally:
            self._watchers -= 1

    def _follow(
        self, start: int, cache_id: str, is_active: Callable[[], bool]
    ) -> Iterator[Change | Heartbeat]:
        settings = self._settings
        position = start
        if start == 0:
            position = yield from self._initial_state(cache_id)
        else:
            with self._db.transaction(write=False) as session:
                oldest = store.oldest_retained_revision(session)
                newest = store.current_revision(session)
            if start > newest:
                raise OutOfRange(
                    reason="REVISION_IN_FUTURE",
                    message=f"start_revision {start} is ahead of the registry (at {newest})",
                    metadata={"current_revision": str(newest)},
                )
            if oldest and start < oldest - 1:
                raise OutOfRange(
                    reason="REVISION_COMPACTED",
                    message=f"revision {start} was compacted (oldest kept: {oldest}); list again and watch "
                    "from the list's revision",
                    metadata={"oldest_revision": str(oldest), "current_revision": str(newest)},
                )
        last_sent = time.monotonic()
        while is_active() and not self._signal.closed:
            seen = self._signal.generation
            with self._db.transaction(write=False) as session:
                changes = store.changes_after(
                    session, revision=position, cache_id=cache_id, limit=settings.watch_batch
                )
                if not changes:
                    head = store.current_revision(session)
            if changes:
                for change in changes:
                    yield change
                    position = change.revision
                last_sent = time.monotonic()
                continue
            if time.monotonic() - last_sent >= settings.watch_heartbeat_seconds:
                # everything up to head is delivered (for this filter): report it
                position = max(position, head)
                yield Heartbeat(revision=position)
                last_sent = time.monotonic()
            self._signal.wait(seen=seen, timeout=settings.watch_poll_seconds)

    def _initial_state(self, cache_id: str) -> Generator[Change | Heartbeat, None, int]:
        with self._db.transaction(write=False) as session:
            revision = store.current_revision(session)
        if cache_id:
            with self._db.transaction(write=False) as session:
                found = store.get_cache(session, cache_id=cache_id)
            caches = [found] if found else []
        else:
            caches = []
            after = ""
            while True:
                with self._db.transaction(write=False) as session:
                    page = store.list_caches(
                        session, after_id=after, limit=1000, where=parse_filter(""), memo=self._decoded
                    )
                caches.extend(page)
                if len(page) < 1000:
                    break
                after = page[-1].cache_id
        for cache in caches:
            yield Change(revision=cache.revision, type=ChangeType.UPSERT, cache=cache)
        yield Heartbeat(revision=revision)
        return revision

    # --- disks -------------------------------------------------------------------------------

    def provision_disk(self, *, parent: str, zone: str, disk_id: str = "", holder: str = "") -> Disk:
        """A disk from a READY cache's snapshot in ``zone``; idempotent per disk id."""
        cache_id = parse_cache_name(parent, field="parent")
        if not zone:
            raise invalid("zone", "required")
        chosen = DiskId(check_disk_id(disk_id) if disk_id else f"disk-{secrets.token_hex(6)}")
        with self._db.transaction(write=False) as session:
            cache = self._require(store.get_cache(session, cache_id=cache_id), cache_id)
            existing = store.get_disk(session, disk_id=chosen)
        if existing is not None:
            if existing.cache_id != cache_id or existing.zone != zone:
                raise AlreadyExists(
                    reason="DISK_EXISTS",
                    message=f"disk {chosen} already exists for {existing.name}",
                    metadata={"disk": existing.name},
                )
            return existing
        self._check_provisionable(cache, zone)
        info = self._provider.provision_disk(snapshot_id=cache.snapshot_id, zone=zone, disk_id=chosen)
        now = self._clock()
        disk = Disk(
            disk_id=chosen,
            cache_id=cache_id,
            zone=zone,
            location=info.location,
            snapshot_id=cache.snapshot_id,
            holder=holder[:256],
            create_time=now,
        )
        try:
            with self._db.transaction() as session:
                current = self._require(
                    store.get_cache(session, cache_id=cache_id, for_update=True), cache_id
                )
                self._check_provisionable(current, zone)
                if current.snapshot_id != cache.snapshot_id:
                    raise FailedPrecondition(
                        reason="SNAPSHOT_REPLACED",
                        message=f"image cache {current.name} was rebuilt meanwhile; retry",
                    )
                store.insert_disk(session, disk=disk)
                store.update_cache(
                    session,
                    cache=replace(current, disk_count=current.disk_count + 1),
                    expected_version=current.version,
                    now=now,
                    encoder=self._encoder,
                )
        except BaseException:
            # never leak a disk the database does not know about
            self._provider.release_disk(disk_id=chosen)
            raise
        self._signal.notify()
        return disk

    def release_disk(self, *, name: str) -> bool:
        """Release a disk; False if it was already gone."""
        cache_part, sep, disk_id = name.rpartition("/disks/")
        if not sep:
            raise InvalidArgument(
                reason="INVALID_NAME",
                message=f"name: {name!r} is not imageCaches/{{id}}/disks/{{disk}}",
                violations=(FieldViolation("name", "must be imageCaches/{id}/disks/{disk}"),),
            )
        cache_id = parse_cache_name(cache_part)
        check_disk_id(disk_id, field="name")
        now = self._clock()
        with self._db.transaction() as session:
            disk = store.get_disk(session, disk_id=disk_id)
            if disk is None or disk.cache_id != cache_id:
                return False
            store.delete_disk(session, disk_id=disk_id)
            current = store.get_cache(session, cache_id=cache_id, for_update=True)
            if current is not None:
                store.update_cache(
                    session,
                    cache=replace(current, disk_count=max(0, current.disk_count - 1)),
                    expected_version=current.version,
                    now=now,
                    encoder=self._encoder,
                )
        # after the commit: a crash here leaves a provider disk without a record, which the
        # reconcile pass removes; the reverse order could leave a record without a disk
        self._provider.release_disk(disk_id=disk_id)
        self._signal.notify()
        return True

    def list_disks(self, *, parent: str) -> list[Disk]:
        """Live disks of a cache."""
        cache_id = parse_cache_name(parent, field="parent")
        with self._db.transaction(write=False) as session:
            self._require(store.get_cache(session, cache_id=cache_id), cache_id)
            return store.list_disks(session, cache_id=cache_id)

    # --- hits --------------------------------------------------------------------------------

    def report_matches(self, *, hits: Sequence[MatchHits]) -> tuple[int, int]:
        """Add matchers' hit counts; return (applied, unknown)."""
        if len(hits) > 1000:
            raise invalid("matches", "at most 1000 entries per report")
        parsed: dict[CacheId, MatchHits] = {}
        for i, hit in enumerate(hits):
            cache_id = parse_cache_name(hit.name, field=f"matches[{i}].name")
            if hit.count < 1:
                raise invalid(f"matches[{i}].count", "must be at least 1")
            prior = parsed.get(cache_id)
            parsed[cache_id] = (
                hit
                if prior is None
                else MatchHits(
                    name=hit.name,
                    count=prior.count + hit.count,
                    last_matched_time=max(prior.last_matched_time, hit.last_matched_time),
                )
            )
        applied = unknown = 0
        now = self._clock()
        with self._db.transaction() as session:
            for cache_id, hit in sorted(parsed.items()):
                current = store.get_cache(session, cache_id=cache_id, for_update=True)
                if current is None:
                    unknown += 1
                    continue
                last = max(filter(None, (current.last_matched_time, hit.last_matched_time)))
                store.update_cache(
                    session,
                    cache=replace(
                        current, match_count=current.match_count + hit.count, last_matched_time=last
                    ),
                    expected_version=current.version,
                    now=now,
                    encoder=self._encoder,
                )
                applied += 1
        if applied:
            self._signal.notify()
        return applied, unknown

    # --- helpers -----------------------------------------------------------------------------

    @classmethod
    def _require(cls, cache: ImageCache | None, cache_id: str) -> ImageCache:
        if cache is None:
            raise cls._not_found(cache_id)
        return cache

    @staticmethod
    def _not_found(cache_id: str) -> NotFound:
        return NotFound(
            reason="IMAGE_CACHE_NOT_FOUND",
            message=f"image cache {CACHE_NAME_PREFIX}{cache_id} not found",
            metadata={"image_cache": CACHE_NAME_PREFIX + cache_id},
        )

    @staticmethod
    def _check_etag(cache: ImageCache, etag: str) -> None:
        if etag and etag != cache.etag:
            raise Aborted(
                reason="ETAG_MISMATCH",
                message=f"image cache {cache.name} changed (etag {cache.etag}, request had {etag}); "
                "read it again",
                metadata={"image_cache": cache.name, "etag": cache.etag},
            )

    @staticmethod
    def _check_mask(paths: Sequence[str]) -> frozenset[str]:
        if not paths:
            raise InvalidArgument(
                reason="INVALID_FIELD_MASK",
                message="update_mask: name at least one field",
                violations=(FieldViolation("update_mask", "required; name the fields to change"),),
            )
        bad = [
            FieldViolation(
                f"update_mask.paths[{i}]",
                f"{p!r} cannot be updated; updatable: {', '.join(sorted(UPDATABLE_FIELDS))}",
            )
            for i, p in enumerate(paths)
            if p not in UPDATABLE_FIELDS
        ]
        if bad:
            raise InvalidArgument(
                reason="INVALID_FIELD_MASK",
                message="; ".join(f"{v.field}: {v.description}" for v in bad),
                violations=tuple(bad),
            )
        return frozenset(paths)

    @staticmethod
    def _check_provisionable(cache: ImageCache, zone: str) -> None:
        if cache.state not in lifecycle.PROVISIONABLE_STATES or not cache.snapshot_id:
            raise FailedPrecondition(
                reason="IMAGE_CACHE_NOT_READY",
                message=f"image cache {cache.name} is {cache.state.value}, not READY",
                metadata={"image_cache": cache.name, "state": cache.state.value},
            )
        availability = {z.zone: z for z in cache.zones}
        found = availability.get(zone)
        if found is None:
            known = ", ".join(sorted(availability)) or "none"
            raise FailedPrecondition(
                reason="SNAPSHOT_NOT_IN_ZONE",
                message=f"image cache {cache.name} is not kept in zone {zone!r} (its zones: {known})",
                metadata={"image_cache": cache.name, "zone": zone},
            )
        if found.state is not ZoneState.AVAILABLE:
            detail = f": {found.message}" if found.message else ""
            raise FailedPrecondition(
                reason="SNAPSHOT_NOT_IN_ZONE",
                message=f"the snapshot of {cache.name} is {found.state.value} in zone {zone}{detail}",
                metadata={"image_cache": cache.name, "zone": zone, "zone_state": found.state.value},
            )


def target_zones(cache: ImageCache, provider_zones: Collection[str]) -> tuple[str, ...]:
    """The zones a cache's snapshot must be available in."""
    return cache.spec.zones or tuple(provider_zones)
