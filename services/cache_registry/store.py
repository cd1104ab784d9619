"""Data access for the registry: tables and keyword-only functions over a caller's session.

No function here commits: the use case owns the transaction (one per use case).

Layout: each cache is one row whose `doc` column holds the whole domain value as JSON, plus the
columns that queries need (state, expiry, lease, version...). Filters use `cache_terms`
(image and label terms, indexed) so List pages cost the same at 100 or 100,000 caches.

Reads for the API are served from `wire`: the edge's encoding of the row's version, written by
the same statement that writes `doc` and `version` (a `CacheEncoder` handed down by the caller),
so a row's wire form always belongs to the version read with it. Decoding a document and encoding
it again cost ~70 us a cache, twenty times the SQL that fetched it; a page of stored wire forms
costs neither. `wire_format` names the encoding; rows written without one, or by another
encoding (an older release), are decoded and encoded by the reader instead, and the worker fills
them in (`caches_without_wire`, `set_wire`).
The change feed (`changes`) stores each version of a cache under a revision taken from a
single counter row; updating that row inside the writing transaction serializes writers, so
revisions are gap-free and in commit order on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVarTuple

import orjson
import sqlalchemy as sa
from sqlalchemy import JSON, Column
from sqlmodel import Field, Session, SQLModel, col, delete, func, select, update

from services.cache_registry.filtering import CacheFilter
from services.cache_registry.model import (
    BuildPhase,
    BuildProgress,
    CachedImage,
    CacheEvent,
    CacheId,
    CacheSpec,
    CacheState,
    Change,
    ChangeType,
    CredentialRef,
    Disk,
    DiskId,
    EventType,
    ImageCache,
    ZoneAvailability,
    ZoneState,
)
from snapcache.errors import Aborted
from snapcache.images import parse_image_reference

UtcDateTime = sa.DateTime(timezone=True)
_Columns = TypeVarTuple("_Columns")


class CacheRow(SQLModel, table=True):
    """One image cache."""

    __tablename__ = "image_caches"
    id: str = Field(primary_key=True, max_length=32)
    doc: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    state: str = Field(max_length=16, index=True)
    version: int
    revision: int
    expire_time: datetime | None = Field(default=None, sa_type=UtcDateTime, index=True)
    zones_pending: bool = Field(default=False, index=True)
    next_attempt_time: datetime | None = Field(default=None, sa_type=UtcDateTime)
    lease_owner: str = Field(default="", max_length=128)
    lease_expire_time: datetime | None = Field(default=None, sa_type=UtcDateTime)
    last_event_sequence: int = 0
    wire: bytes | None = Field(default=None, sa_type=sa.LargeBinary)
    wire_format: str | None = Field(default=None, max_length=64)


class CacheTermRow(SQLModel, table=True):
    """An indexed term of a cache for List filters: ("image", normalized) or ("label", "k=v")."""

    __tablename__ = "cache_terms"
    __table_args__ = (sa.Index("ix_cache_terms_lookup", "kind", "value", "cache_id"),)
    cache_id: str = Field(primary_key=True, foreign_key="image_caches.id", ondelete="CASCADE")
    kind: str = Field(primary_key=True, max_length=8)
    value: str = Field(primary_key=True, max_length=512)


class EventRow(SQLModel, table=True):
    """One entry of a cache's event log."""

    __tablename__ = "cache_events"
    cache_id: str = Field(primary_key=True, foreign_key="image_caches.id", ondelete="CASCADE")
    sequence: int = Field(primary_key=True)
    time: datetime = Field(sa_type=UtcDateTime)
    type: str = Field(max_length=8)
    reason: str = Field(max_length=64)
    message: str
    attributes: dict[str, str] = Field(sa_column=Column(JSON, nullable=False))


class DiskRow(SQLModel, table=True):
    """A live disk provisioned from a cache's snapshot."""

    __tablename__ = "disks"
    id: str = Field(primary_key=True, max_length=64)
    cache_id: str = Field(foreign_key="image_caches.id", index=True)
    zone: str = Field(max_length=64)
    location: str
    snapshot_id: str = Field(max_length=128)
    holder: str = Field(default="", max_length=256)
    create_time: datetime = Field(sa_type=UtcDateTime)


class ChangeRow(SQLModel, table=True):
    """One entry of the change feed."""

    __tablename__ = "changes"
    revision: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    cache_id: str = Field(max_length=32, index=True)
    type: str = Field(max_length=8)
    doc: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    time: datetime = Field(sa_type=UtcDateTime)


class CounterRow(SQLModel, table=True):
    """Named counters; `revision` orders the change feed."""

    __tablename__ = "counters"
    name: str = Field(primary_key=True, max_length=32)
    value: int


# --- documents -------------------------------------------------------------------------------


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything here is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


class DecodedCaches:
    """Decoded caches by (id, revision): a written version never changes, so a hit skips decoding.

    The revision, not the version, is the key: it is unique across the whole registry, while a
    cache deleted and created again under the same id starts over at version 1.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._items: OrderedDict[tuple[str, int], ImageCache] = OrderedDict()
        self._lock = threading.Lock()

    def decode(self, cache_id: str, revision: int, text: str | bytes) -> ImageCache:
        """The cache stored as ``text`` at ``revision``, decoded at most once."""
        key = (cache_id, revision)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        cache = cache_from_doc(orjson.loads(text))
        with self._lock:
            self._items[key] = cache
            if len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return cache


class CacheEncoder(Protocol):
    """The edge's wire form of a cache version; opaque here, stored next to the document."""

    @property
    def format(self) -> str:
        """Names the encoding (at most 64 characters); rows in another format are not served."""
        ...

    def encode(self, cache: ImageCache) -> bytes:
        """The wire form of ``cache``."""
        ...


@dataclass(frozen=True, slots=True)
class ServedCache:
    """A cache version as the API serves it: its stored wire form, or decoded if it has none."""

    cache_id: CacheId
    body: bytes | ImageCache  # bytes in the reader's format; else the value for the edge to encode


_NO_MEMO = DecodedCaches(capacity=0)


def cache_to_doc(cache: ImageCache) -> dict[str, Any]:
    """The JSON document of a cache (also the payload of its change-feed entries)."""
    spec = cache.spec
    return {
        "id": cache.cache_id,
        "spec": {
            "images": list(spec.images),
            "cache_size_gib": spec.cache_size_gib,
            "retention_days": spec.retention_days,
            "display_name": spec.display_name,
            "labels": dict(spec.labels),
            "registry_credentials": [_credential_doc(r) for r in spec.registry_credentials],
            "plain_http_registries": list(spec.plain_http_registries),
            "insecure_registries": list(spec.insecure_registries),
            "platform": spec.platform,
            "zones": list(spec.zones),
        },
        "state": cache.state.value,
        "state_reason": cache.state_reason,
        "state_message": cache.state_message,
        "progress": {
            "phase": cache.progress.phase.value,
            "bytes_done": cache.progress.bytes_done,
            "bytes_total": cache.progress.bytes_total,
            "attempt": cache.progress.attempt,
        },
        "cached_images": [
            {
                "image": i.image,
                "normalized_image": i.normalized_image,
                "manifest_digest": i.manifest_digest,
                "index_digest": i.index_digest,
                "platform": i.platform,
                "compressed_bytes": i.compressed_bytes,
                "uncompressed_bytes": i.uncompressed_bytes,
                "layer_count": i.layer_count,
                "requires_credentials": i.requires_credentials,
                "authorized_by": [_credential_doc(r) for r in i.authorized_by],
            }
            for i in cache.cached_images
        ],
        "zones": [
            {"zone": z.zone, "state": z.state.value, "message": z.message, "update_time": _ts(z.update_time)}
            for z in cache.zones
        ],
        "snapshot_id": cache.snapshot_id,
        "snapshot_size_bytes": cache.snapshot_size_bytes,
        "build_id": cache.build_id,
        "disk_count": cache.disk_count,
        "create_time": _ts(cache.create_time),
        "update_time": _ts(cache.update_time),
        "ready_time": _ts(cache.ready_time),
        "expire_time": _ts(cache.expire_time),
        "last_matched_time": _ts(cache.last_matched_time),
        "match_count": cache.match_count,
        "version": cache.version,
        "revision": cache.revision,
    }


def _credential_doc(ref: CredentialRef) -> dict[str, str]:
    return {"secret": ref.secret, "docker_config_path": ref.docker_config_path}


def _cached_image(doc: dict[str, Any], credentials: tuple[CredentialRef, ...]) -> CachedImage:
    """A recorded image; one recorded before access was (no `requires_credentials`) reads safe.

    Such a build did not ask whether the registry serves the image anonymously, nor note which
    credentials pulled it: if the cache names any, the image reads as private to pods allowed to
    use all of them, until the next build records the facts.
    """
    fields = dict(doc)
    if "requires_credentials" not in fields:
        fields["requires_credentials"] = bool(credentials)
        fields["authorized_by"] = credentials
    else:
        fields["authorized_by"] = tuple(CredentialRef(**r) for r in fields.get("authorized_by", ()))
    return CachedImage(**fields)


def cache_from_doc(doc: dict[str, Any]) -> ImageCache:
    """Inverse of `cache_to_doc`."""
    spec = doc["spec"]
    progress = doc["progress"]
    create_time = _dt(doc["create_time"])
    update_time = _dt(doc["update_time"])
    assert create_time is not None and update_time is not None
    credentials = tuple(CredentialRef(**r) for r in spec["registry_credentials"])
    return ImageCache(
        cache_id=CacheId(doc["id"]),
        spec=CacheSpec(
            images=tuple(spec["images"]),
            cache_size_gib=spec["cache_size_gib"],
            retention_days=spec["retention_days"],
            display_name=spec["display_name"],
            labels=tuple(sorted(spec["labels"].items())),
            registry_credentials=credentials,
            plain_http_registries=tuple(spec["plain_http_registries"]),
            insecure_registries=tuple(spec["insecure_registries"]),
            platform=spec["platform"],
            zones=tuple(spec["zones"]),
        ),
        state=CacheState(doc["state"]),
        state_reason=doc["state_reason"],
        state_message=doc["state_message"],
        progress=BuildProgress(
            phase=BuildPhase(progress["phase"]),
            bytes_done=progress["bytes_done"],
            bytes_total=progress["bytes_total"],
            attempt=progress["attempt"],
        ),
        cached_images=tuple(_cached_image(i, credentials) for i in doc["cached_images"]),
        zones=tuple(
            ZoneAvailability(
                zone=z["zone"],
                state=ZoneState(z["state"]),
                message=z["message"],
                update_time=_dt(z["update_time"]) or create_time,
            )
            for z in doc["zones"]
        ),
        snapshot_id=doc["snapshot_id"],
        snapshot_size_bytes=doc["snapshot_size_bytes"],
        build_id=doc["build_id"],
        disk_count=doc["disk_count"],
        create_time=create_time,
        update_time=update_time,
        ready_time=_dt(doc["ready_time"]),
        expire_time=_dt(doc["expire_time"]),
        last_matched_time=_dt(doc["last_matched_time"]),
        match_count=doc["match_count"],
        version=doc["version"],
        revision=doc["revision"],
    )


def _terms(cache: ImageCache) -> list[CacheTermRow]:
    terms: dict[tuple[str, str], None] = {}
    for image in cache.spec.images:
        terms[("image", str(parse_image_reference(image)))] = None
    for recorded in cache.cached_images:
        terms[("image", recorded.normalized_image)] = None
    for key, value in cache.spec.labels:
        terms[("label", f"{key}={value}")] = None
    return [CacheTermRow(cache_id=cache.cache_id, kind=k, value=v) for k, v in terms]


def _zones_pending(cache: ImageCache) -> bool:
    return any(z.state is ZoneState.HYDRATING for z in cache.zones)


def _version_values(cache: ImageCache, encoder: CacheEncoder | None) -> dict[str, Any]:
    """Columns that change with every version; written together, so `wire` matches `version`."""
    return {
        "doc": cache_to_doc(cache),
        "state": cache.state.value,
        "version": cache.version,
        "revision": cache.revision,
        "expire_time": cache.expire_time,
        "zones_pending": _zones_pending(cache),
        "wire": encoder.encode(cache) if encoder else None,
        "wire_format": encoder.format if encoder else None,
    }


def cache_row(cache: ImageCache, *, encoder: CacheEncoder | None) -> dict[str, Any]:
    """Column values of a new row holding ``cache`` as it is (bulk loads; `insert_cache` below)."""
    return {
        "id": cache.cache_id,
        **_version_values(cache, encoder),
        "lease_owner": "",
        "last_event_sequence": 0,
    }


# --- revisions and the change feed ---------------------------------------------------------------


# PostgreSQL channel on which every transaction that advances the feed notifies, so the other
# registry replicas' watchers and workers wake at its commit (see `commit_listener`).
COMMIT_CHANNEL = "snapcache_commits"


def next_revision(session: Session) -> int:
    """Take the next revision; the row lock this takes orders concurrent writers.

    On PostgreSQL it also queues a NOTIFY on `COMMIT_CHANNEL`: delivered when (and only if) the
    transaction commits, once however many revisions it took.
    """
    result = session.execute(
        update(CounterRow)
        .where(col(CounterRow.name) == "revision")
        .values(value=CounterRow.value + 1)
        .returning(col(CounterRow.value))
    )
    revision = int(result.scalar_one())
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.text(f"NOTIFY {COMMIT_CHANNEL}"))
    return revision


def current_revision(session: Session) -> int:
    """The newest revision committed (or being written by this session)."""
    return int(session.exec(select(CounterRow.value).where(col(CounterRow.name) == "revision")).one())


def _record_change(session: Session, *, cache: ImageCache, change_type: ChangeType, now: datetime) -> None:
    session.add(
        ChangeRow(
            revision=cache.revision,
            cache_id=cache.cache_id,
            type=change_type.value,
            doc=cache_to_doc(cache),
            time=now,
        )
    )


def changes_after(session: Session, *, revision: int, cache_id: str = "", limit: int = 500) -> list[Change]:
    """Feed entries with a revision above ``revision``, oldest first."""
    query = select(ChangeRow).where(col(ChangeRow.revision) > revision)
    if cache_id:
        query = query.where(col(ChangeRow.cache_id) == cache_id)
    rows = session.exec(query.order_by(col(ChangeRow.revision)).limit(limit)).all()
    return [Change(revision=r.revision, type=ChangeType(r.type), cache=cache_from_doc(r.doc)) for r in rows]


def oldest_retained_revision(session: Session) -> int:
    """The lowest revision still in the feed (0 when the feed is empty)."""
    return int(session.exec(select(func.min(ChangeRow.revision))).one() or 0)


def compact_changes(session: Session, *, keep: int) -> int:
    """Drop all but the newest ``keep`` feed entries; return how many were dropped."""
    newest = current_revision(session)
    result = session.execute(delete(ChangeRow).where(col(ChangeRow.revision) <= newest - keep))
    return int(result.rowcount)  # type: ignore[attr-defined]


# --- caches ------------------------------------------------------------------------------------


def insert_cache(
    session: Session, *, cache: ImageCache, now: datetime, encoder: CacheEncoder | None = None
) -> ImageCache:
    """Insert a new cache at the next revision; return it as stored."""
    stored = replace(cache, revision=next_revision(session), version=1)
    session.add(CacheRow(**cache_row(stored, encoder=encoder)))
    session.add_all(_terms(stored))
    _record_change(session, cache=stored, change_type=ChangeType.UPSERT, now=now)
    session.flush()
    return stored


def cache_exists(session: Session, *, cache_id: str) -> bool:
    """Whether a cache row exists."""
    return session.exec(select(CacheRow.id).where(col(CacheRow.id) == cache_id)).first() is not None


_DOC_TEXT = sa.cast(col(CacheRow.doc), sa.Text)


def get_cache(
    session: Session, *, cache_id: str, for_update: bool = False, memo: DecodedCaches = _NO_MEMO
) -> ImageCache | None:
    """One cache, or None."""
    query = sa.select(col(CacheRow.id), col(CacheRow.revision), _DOC_TEXT).where(col(CacheRow.id) == cache_id)
    if for_update:
        query = query.with_for_update()
    row = session.execute(query).first()
    return memo.decode(row[0], row[1], row[2]) if row else None


def _served_columns(wire_format: str) -> tuple[Any, ...]:
    """id, revision, the wire form if it is in ``wire_format``, else the document (never both)."""
    if not wire_format:
        return (col(CacheRow.id), col(CacheRow.revision), sa.null(), _DOC_TEXT)
    served = col(CacheRow.wire_format) == wire_format
    return (
        col(CacheRow.id),
        col(CacheRow.revision),
        sa.case((served, col(CacheRow.wire)), else_=sa.null()),
        sa.case((served, sa.null()), else_=_DOC_TEXT),
    )


def _served(row: sa.Row[str, int, bytes | None, str | None], memo: DecodedCaches) -> ServedCache:
    cache_id, revision, wire, text = row
    if wire is not None:
        return ServedCache(CacheId(cache_id), wire)
    assert text is not None  # `_served_columns` selects the document whenever it leaves out wire
    return ServedCache(CacheId(cache_id), memo.decode(cache_id, revision, text))


def read_cache(
    session: Session, *, cache_id: str, wire_format: str, memo: DecodedCaches = _NO_MEMO
) -> ServedCache | None:
    """One cache as the API serves it (its wire form in ``wire_format`` when stored), or None."""
    row = session.execute(
        sa.select(*_served_columns(wire_format)).where(col(CacheRow.id) == cache_id)
    ).first()
    return _served(row, memo) if row else None


def update_cache(
    session: Session,
    *,
    cache: ImageCache,
    expected_version: int,
    now: datetime,
    encoder: CacheEncoder | None = None,
) -> ImageCache:
    """Write a new version of a cache if nobody else did since ``expected_version``."""
    stored = replace(cache, version=expected_version + 1, revision=next_revision(session))
    result = session.execute(
        update(CacheRow)
        .where(col(CacheRow.id) == cache.cache_id, col(CacheRow.version) == expected_version)
        .values(**_version_values(stored, encoder))
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise Aborted(
            reason="CONCURRENT_UPDATE",
            message=f"image cache {cache.cache_id} changed concurrently; read it again and retry",
            metadata={"image_cache": cache.name},
        )
    session.execute(delete(CacheTermRow).where(col(CacheTermRow.cache_id) == cache.cache_id))
    session.add_all(_terms(stored))
    _record_change(session, cache=stored, change_type=ChangeType.UPSERT, now=now)
    session.flush()
    return stored


def delete_cache(session: Session, *, cache: ImageCache, now: datetime) -> None:
    """Remove a cache and everything it owns; record its last version in the feed."""
    last = replace(cache, revision=next_revision(session))
    session.execute(delete(CacheTermRow).where(col(CacheTermRow.cache_id) == cache.cache_id))
    session.execute(delete(EventRow).where(col(EventRow.cache_id) == cache.cache_id))
    session.execute(delete(DiskRow).where(col(DiskRow.cache_id) == cache.cache_id))
    session.execute(delete(CacheRow).where(col(CacheRow.id) == cache.cache_id))
    _record_change(session, cache=last, change_type=ChangeType.DELETE, now=now)


def _page(
    query: sa.Select[*_Columns], *, after_id: str, limit: int, where: CacheFilter
) -> sa.Select[*_Columns]:
    """``query`` narrowed to a page of caches in id order after ``after_id`` (keyset pagination)."""
    query = query.where(col(CacheRow.id) > after_id)
    if where.states:
        query = query.where(col(CacheRow.state).in_([s.value for s in where.states]))
    terms = [("image", where.image)] if where.image else []
    terms += [("label", f"{k}={v}") for k, v in where.labels]
    for kind, value in terms:
        query = query.where(
            sa.exists().where(
                col(CacheTermRow.cache_id) == col(CacheRow.id),
                col(CacheTermRow.kind) == kind,
                col(CacheTermRow.value) == value,
            )
        )
    return query.order_by(col(CacheRow.id)).limit(limit)


def list_caches(
    session: Session, *, after_id: str, limit: int, where: CacheFilter, memo: DecodedCaches = _NO_MEMO
) -> list[ImageCache]:
    """A page of caches in id order after ``after_id`` (keyset pagination)."""
    query = sa.select(col(CacheRow.id), col(CacheRow.revision), _DOC_TEXT)
    rows = session.execute(_page(query, after_id=after_id, limit=limit, where=where)).all()
    return [memo.decode(cache_id, revision, text) for cache_id, revision, text in rows]


def read_caches(
    session: Session,
    *,
    after_id: str,
    limit: int,
    where: CacheFilter,
    wire_format: str,
    memo: DecodedCaches = _NO_MEMO,
) -> list[ServedCache]:
    """A page of caches as the API serves them (see `read_cache`), in id order after ``after_id``."""
    query = sa.select(*_served_columns(wire_format))
    rows = session.execute(_page(query, after_id=after_id, limit=limit, where=where)).all()
    return [_served(row, memo) for row in rows]


def caches_without_wire(session: Session, *, wire_format: str, after_id: str, limit: int) -> list[ImageCache]:
    """Caches whose row has no wire form in ``wire_format``, in id order after ``after_id``."""
    missing = sa.or_(col(CacheRow.wire_format).is_(None), col(CacheRow.wire_format) != wire_format)
    query = (
        sa.select(_DOC_TEXT)
        .where(col(CacheRow.id) > after_id, missing)
        .order_by(col(CacheRow.id))
        .limit(limit)
    )
    return [cache_from_doc(orjson.loads(text)) for text in session.execute(query).scalars()]


def set_wire(session: Session, *, cache: ImageCache, wire: bytes, wire_format: str) -> bool:
    """Store the wire form of ``cache`` if its row still holds that version; False if it moved on.

    Guarded by the revision, unique registry-wide, so not even a cache deleted and created again
    under the same id (back at version 1) can receive another cache's wire form.
    """
    result = session.execute(
        update(CacheRow)
        .where(col(CacheRow.id) == cache.cache_id, col(CacheRow.revision) == cache.revision)
        .values(wire=wire, wire_format=wire_format)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def all_cache_ids(session: Session) -> set[str]:
    """Every cache id (for reconcile passes)."""
    return set(session.exec(select(CacheRow.id)).all())


@dataclass(frozen=True, slots=True)
class ProviderRefs:
    """What one cache owns on the provider, read without decoding its whole document."""

    cache_id: str
    state: CacheState
    build_id: str
    snapshot_id: str
    zones: tuple[tuple[str, ZoneState], ...]


def provider_refs(session: Session) -> list[ProviderRefs]:
    """Every cache's provider-side names, for reconcile passes.

    Reads four fields out of the JSON documents in SQL (SQLite's json_extract, PostgreSQL's ->>),
    so a pass over 100,000 caches costs a scan, not 100,000 document decodes.
    """
    doc = col(CacheRow.doc)
    rows = session.execute(
        sa.select(
            col(CacheRow.id),
            col(CacheRow.state),
            doc["build_id"].as_string(),
            doc["snapshot_id"].as_string(),
            doc["zones"],
        )
    ).all()
    return [
        ProviderRefs(
            cache_id=cache_id,
            state=CacheState(state),
            build_id=build_id or "",
            snapshot_id=snapshot_id or "",
            zones=tuple((z["zone"], ZoneState(z["state"])) for z in zones or ()),
        )
        for cache_id, state, build_id, snapshot_id, zones in rows
    ]


def disk_snapshot_ids(session: Session) -> set[str]:
    """Snapshot ids that live disks were made from."""
    return set(session.exec(select(DiskRow.snapshot_id)).all())


# --- work selection and leases ----------------------------------------------------------------


def claim_lease(session: Session, *, cache_id: str, owner: str, now: datetime, until: datetime) -> bool:
    """Take or renew the work lease of a cache if it is free, expired or already ours."""
    result = session.execute(
        update(CacheRow)
        .where(
            col(CacheRow.id) == cache_id,
            sa.or_(
                col(CacheRow.lease_owner) == "",
                col(CacheRow.lease_owner) == owner,
                col(CacheRow.lease_expire_time) < now,
            ),
        )
        .values(lease_owner=owner, lease_expire_time=until)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def earliest_foreign_lease_expiry(session: Session, *, owner: str) -> datetime | None:
    """When the first lease held by another owner runs out (None if there is none)."""
    found: datetime | None = session.execute(
        sa.select(sa.func.min(col(CacheRow.lease_expire_time))).where(
            col(CacheRow.lease_owner) != "", col(CacheRow.lease_owner) != owner
        )
    ).scalar_one()
    if found is None:
        return None
    return found if found.tzinfo is not None else found.replace(tzinfo=UTC)


def release_lease(session: Session, *, cache_id: str, owner: str) -> None:
    """Give a lease back (no-op if it is not ours)."""
    session.execute(
        update(CacheRow)
        .where(col(CacheRow.id) == cache_id, col(CacheRow.lease_owner) == owner)
        .values(lease_owner="", lease_expire_time=None)
    )


def set_next_attempt(session: Session, *, cache_id: str, at: datetime | None) -> None:
    """When the worker may retry a build that failed transiently."""
    session.execute(update(CacheRow).where(col(CacheRow.id) == cache_id).values(next_attempt_time=at))


def caches_needing_work(session: Session, *, now: datetime, owner: str, limit: int = 50) -> list[str]:
    """Ids of caches with lifecycle work due whose lease is free, expired or ours."""
    lease_free = sa.or_(
        col(CacheRow.lease_owner) == "",
        col(CacheRow.lease_owner) == owner,
        col(CacheRow.lease_expire_time) < now,
    )
    due = sa.or_(col(CacheRow.next_attempt_time).is_(None), col(CacheRow.next_attempt_time) <= now)
    work = sa.or_(
        col(CacheRow.state).in_(
            [CacheState.CREATING.value, CacheState.UPDATING.value, CacheState.DELETING.value]
        ),
        col(CacheRow.zones_pending).is_(True),
        sa.and_(
            col(CacheRow.expire_time) <= now,
            col(CacheRow.state).notin_([CacheState.EXPIRED.value, CacheState.DELETING.value]),
        ),
    )
    query = select(CacheRow.id).where(lease_free, due, work).order_by(col(CacheRow.id)).limit(limit)
    return list(session.exec(query).all())


def caches_in_states(
    session: Session, *, states: Iterable[CacheState], updated_before: datetime | None = None
) -> list[ImageCache]:
    """Caches in any of ``states``, optionally last changed before a time."""
    docs = session.exec(select(CacheRow.doc).where(col(CacheRow.state).in_([s.value for s in states]))).all()
    caches = [cache_from_doc(dict(doc)) for doc in docs]
    if updated_before is not None:
        caches = [c for c in caches if c.update_time < updated_before]
    return caches


# --- events ------------------------------------------------------------------------------------


def append_event(
    session: Session,
    *,
    cache_id: str,
    now: datetime,
    type: EventType,
    reason: str,
    message: str,
    attributes: dict[str, str] | None = None,
) -> int:
    """Append to a cache's event log; return the event's sequence number."""
    result = session.execute(
        update(CacheRow)
        .where(col(CacheRow.id) == cache_id)
        .values(last_event_sequence=CacheRow.last_event_sequence + 1)
        .returning(col(CacheRow.last_event_sequence))
    )
    sequence = int(result.scalar_one())
    session.add(
        EventRow(
            cache_id=cache_id,
            sequence=sequence,
            time=now,
            type=type.value,
            reason=reason,
            message=message,
            attributes=attributes or {},
        )
    )
    return sequence


def list_events(session: Session, *, cache_id: str, after_sequence: int, limit: int) -> list[CacheEvent]:
    """A page of a cache's events in order."""
    rows = session.exec(
        select(EventRow)
        .where(col(EventRow.cache_id) == cache_id, col(EventRow.sequence) > after_sequence)
        .order_by(col(EventRow.sequence))
        .limit(limit)
    ).all()
    return [
        CacheEvent(
            sequence=r.sequence,
            time=utc(r.time) or r.time,
            type=EventType(r.type),
            reason=r.reason,
            message=r.message,
            attributes=tuple(sorted(r.attributes.items())),
        )
        for r in rows
    ]


# --- disks -------------------------------------------------------------------------------------


def _disk(row: DiskRow) -> Disk:
    return Disk(
        disk_id=DiskId(row.id),
        cache_id=CacheId(row.cache_id),
        zone=row.zone,
        location=row.location,
        snapshot_id=row.snapshot_id,
        holder=row.holder,
        create_time=utc(row.create_time) or row.create_time,
    )


def insert_disk(session: Session, *, disk: Disk) -> None:
    """Record a provisioned disk."""
    session.add(
        DiskRow(
            id=disk.disk_id,
            cache_id=disk.cache_id,
            zone=disk.zone,
            location=disk.location,
            snapshot_id=disk.snapshot_id,
            holder=disk.holder,
            create_time=disk.create_time,
        )
    )
    session.flush()


def get_disk(session: Session, *, disk_id: str) -> Disk | None:
    """One disk, or None."""
    row = session.get(DiskRow, disk_id)
    return _disk(row) if row else None


def delete_disk(session: Session, *, disk_id: str) -> bool:
    """Forget a disk; False if it was not recorded."""
    result = session.execute(delete(DiskRow).where(col(DiskRow.id) == disk_id))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def list_disks(session: Session, *, cache_id: str | None = None) -> list[Disk]:
    """Live disks of a cache, or of all caches."""
    query = select(DiskRow)
    if cache_id is not None:
        query = query.where(col(DiskRow.cache_id) == cache_id)
    return [_disk(r) for r in session.exec(query.order_by(col(DiskRow.id))).all()]


def count_disks(session: Session, *, cache_id: str) -> int:
    """Number of live disks of a cache."""
    return int(
        session.exec(select(func.count()).select_from(DiskRow).where(col(DiskRow.cache_id) == cache_id)).one()
    )
