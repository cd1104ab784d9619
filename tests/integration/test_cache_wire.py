"""The wire form kept per cache version, on SQLite and PostgreSQL.

Get, List, Watch and the write RPCs must send the very same bytes for one version, whether the
store kept its wire form ("wired", as `server.py` wires the registry) or the edge encodes it
("unwired"); a wire form must never be served for another version than the one read with it; and
a database made by migration 0001, with data in it, upgrades and serves through 0002.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime

import grpc
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from services.cache_registry import store
from services.cache_registry.database import MIGRATIONS, Database, make_engine, migrate
from services.cache_registry.filtering import parse_filter
from services.cache_registry.messages import ImageCacheWire, encode_cache
from services.cache_registry.model import (
    BuildPhase,
    BuildProgress,
    CacheId,
    CacheSpec,
    CacheState,
    ImageCache,
)
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import image_cache_pb2 as pb
from tests.support.fake_provider import FakeProvider
from tests.support.registry_harness import Harness, build_harness, close_harness

WIRE = ImageCacheWire()
SERVICE = "/snapcache.v1.CacheRegistryService/"
LABELS = {"team": "web", "app": "shop", "tier": "frontend", "zone": "eu"}


def build(url: str, *, encoder: store.CacheEncoder | None) -> Harness:
    """The test harness's registry, its service and worker given ``encoder``."""
    return build_harness(url, FakeProvider(), encoder=encoder)


@pytest.fixture(params=["wired", "unwired"])
def any_harness(request: pytest.FixtureRequest, database_url: str) -> Iterator[Harness]:
    """A registry that stores wire forms, and one that leaves encoding to the edge."""
    built = build(database_url, encoder=WIRE if request.param == "wired" else None)
    try:
        yield built
    finally:
        close_harness(built)


@pytest.fixture
def wired(database_url: str) -> Iterator[Harness]:
    """A registry that stores wire forms, as `services.cache_registry.server` wires it."""
    built = build(database_url, encoder=WIRE)
    try:
        yield built
    finally:
        close_harness(built)


# --- raw bytes as a client receives them --------------------------------------------------------


def raw(h: Harness, method: str, request: Message) -> bytes:
    """A unary RPC's response, undecoded."""
    call = h.channel.unary_unary(SERVICE + method, request_serializer=type(request).SerializeToString)
    return call(request, timeout=10)  # type: ignore[no-any-return]


def raw_watch(h: Harness, request: api.WatchImageCachesRequest) -> Iterator[bytes]:
    """WatchImageCaches responses, undecoded, until its first PROGRESS message."""
    call = h.channel.unary_stream(
        SERVICE + "WatchImageCaches", request_serializer=type(request).SerializeToString
    )
    stream = call(request, timeout=10)
    try:
        for message in stream:
            if api.WatchImageCachesResponse.FromString(message).type == api.WatchImageCachesResponse.PROGRESS:
                return
            yield message
    finally:
        stream.cancel()


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        shift += 7
        if byte < 0x80:
            return value, at


def submessages(data: bytes, number: int) -> list[bytes]:
    """The bytes of every length-delimited field ``number`` of a serialized message, in order."""
    found, at = [], 0
    while at < len(data):
        tag, at = _varint(data, at)
        if tag & 7 == 0:
            _, at = _varint(data, at)
            continue
        assert tag & 7 == 2, f"unexpected wire type in {data!r}"
        size, at = _varint(data, at)
        if tag >> 3 == number:
            found.append(data[at : at + size])
        at += size
    return found


def listed(h: Harness) -> dict[str, bytes]:
    """Every cache's bytes in a List response, by name."""
    response = raw(h, "ListImageCaches", api.ListImageCachesRequest())
    return {pb.ImageCache.FromString(m).name: m for m in submessages(response, 1)}


def create(
    h: Harness, *images: str, cache_id: str = "", labels: dict[str, str] | None = None
) -> pb.ImageCache:
    cache = pb.ImageCache(images=list(images), labels=labels or {})
    return h.stub.CreateImageCache(api.CreateImageCacheRequest(image_cache=cache, image_cache_id=cache_id))


# --- identical bytes -----------------------------------------------------------------------------


def test_get_list_watch_and_writes_send_identical_bytes_for_a_version(any_harness: Harness) -> None:
    h = any_harness
    created = [create(h, "nginx:1.25", labels=LABELS), create(h, "redis:7", "busybox", labels=LABELS)]
    with h.database.transaction(write=False) as session:
        before_builds = store.current_revision(session)
    h.settle()
    plain = create(h, "alpine:3")

    pages = listed(h)
    assert set(pages) == {c.name for c in [*created, plain]}
    for name, listed_bytes in pages.items():
        assert raw(h, "GetImageCache", api.GetImageCacheRequest(name=name)) == listed_bytes
    assert pb.ImageCache.FromString(pages[created[0].name]).state == pb.ImageCache.READY

    # the feed's initial state and its later entries carry the same bytes as List
    initial = {}
    for message in raw_watch(h, api.WatchImageCachesRequest(start_revision=0)):
        (cache_bytes,) = submessages(message, 3)
        initial[pb.ImageCache.FromString(cache_bytes).name] = cache_bytes
    assert initial == pages
    latest = {}
    for message in raw_watch(h, api.WatchImageCachesRequest(start_revision=before_builds)):
        (cache_bytes,) = submessages(message, 3)
        latest[pb.ImageCache.FromString(cache_bytes).name] = cache_bytes
    assert latest == pages

    # what a write returns is what every read of that version returns afterwards
    created_bytes = raw(
        h,
        "CreateImageCache",
        api.CreateImageCacheRequest(image_cache=pb.ImageCache(images=["nginx"], labels=LABELS)),
    )
    name = pb.ImageCache.FromString(created_bytes).name
    assert listed(h)[name] == created_bytes == raw(h, "GetImageCache", api.GetImageCacheRequest(name=name))
    update = api.UpdateImageCacheRequest(
        image_cache=pb.ImageCache(name=created[0].name, display_name="shop"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    )
    updated_bytes = raw(h, "UpdateImageCache", update)
    assert pb.ImageCache.FromString(updated_bytes).display_name == "shop"
    assert listed(h)[created[0].name] == updated_bytes
    assert raw(h, "GetImageCache", api.GetImageCacheRequest(name=created[0].name)) == updated_bytes


def test_wired_rows_hold_the_encoding_of_their_version_and_serve_it(wired: Harness) -> None:
    create(wired, "nginx", labels=LABELS)
    wired.settle()
    with wired.database.transaction(write=False) as session:
        rows = session.execute(
            sa.select(store.CacheRow.id, store.CacheRow.wire, store.CacheRow.wire_format)
        ).all()
        caches = {r.id: store.get_cache(session, cache_id=r.id) for r in rows}
    served = listed(wired)
    for cache_id, wire, wire_format in rows:
        cache = caches[cache_id]
        assert cache is not None and wire_format == WIRE.format and wire == encode_cache(cache)
        # gRPC serializes the message parsed from it (maps in upb's order, the same on every path)
        assert pb.ImageCache.FromString(wire) == pb.ImageCache.FromString(served[cache.name])
        assert pb.ImageCache.FromString(wire).SerializeToString() == served[cache.name]


# --- never a stale version -----------------------------------------------------------------------


def test_a_cache_created_again_under_its_id_is_never_served_as_the_old_one(any_harness: Harness) -> None:
    h = any_harness
    first = create(h, "nginx:1.25", cache_id="imc-again001")
    assert h.stub.GetImageCache(api.GetImageCacheRequest(name=first.name)).images == ["nginx:1.25"]
    assert listed(h)  # both memos have now seen version 1 of the first cache
    h.stub.DeleteImageCache(api.DeleteImageCacheRequest(name=first.name))
    h.settle()
    with pytest.raises(grpc.RpcError):
        h.stub.GetImageCache(api.GetImageCacheRequest(name=first.name))

    second = create(h, "redis:7", cache_id="imc-again001")
    assert second.images == ["redis:7"] and second.etag == first.etag  # version 1 again
    assert h.stub.GetImageCache(api.GetImageCacheRequest(name=first.name)).images == ["redis:7"]
    assert pb.ImageCache.FromString(listed(h)[first.name]).images == ["redis:7"]


def test_bytes_of_another_encoding_are_not_served_and_the_worker_replaces_them(wired: Harness) -> None:
    created = create(wired, "nginx", labels=LABELS)
    wired.settle()
    before = listed(wired)[created.name]
    with wired.database.transaction() as session:
        session.execute(
            sa.update(store.CacheRow).values(wire=b"\x00not an ImageCache", wire_format="release/0")
        )

    assert listed(wired)[created.name] == before
    assert raw(wired, "GetImageCache", api.GetImageCacheRequest(name=created.name)) == before

    assert wired.worker.fill_wire_forms() == 1
    assert wired.worker.fill_wire_forms() == 0
    with wired.database.transaction(write=False) as session:
        cache_id = created.name.split("/")[1]
        found = store.read_cache(session, cache_id=cache_id, wire_format=WIRE.format)
        cache = store.get_cache(session, cache_id=cache_id)
    assert found is not None and cache is not None and found.body == encode_cache(cache)
    assert listed(wired)[created.name] == before


def _cache(cache_id: str, *images: str) -> ImageCache:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return ImageCache(
        cache_id=CacheId(cache_id),
        spec=CacheSpec(images=images, cache_size_gib=20, retention_days=0, labels=(("team", "web"),)),
        state=CacheState.CREATING,
        create_time=now,
        update_time=now,
        progress=BuildProgress(phase=BuildPhase.QUEUED),
        build_id="b1",
    )


def test_a_version_written_without_an_encoder_drops_the_previous_wire_form(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate(engine)
    database = Database(engine)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    try:
        with database.transaction() as session:
            v1 = store.insert_cache(session, cache=_cache("imc-stale001", "nginx"), now=now, encoder=WIRE)
        with database.transaction(write=False) as session:
            found = store.read_cache(session, cache_id=v1.cache_id, wire_format=WIRE.format)
        assert found is not None and found.body == encode_cache(v1)

        # e.g. a replica of an older release: its version must not be served as v1's bytes
        with database.transaction() as session:
            v2 = store.update_cache(
                session, cache=replace(v1, state=CacheState.READY), expected_version=1, now=now, encoder=None
            )
        with database.transaction(write=False) as session:
            found = store.read_cache(session, cache_id=v1.cache_id, wire_format=WIRE.format)
            (page,) = store.read_caches(
                session, after_id="", limit=10, where=parse_filter(""), wire_format=WIRE.format
            )
            (pending,) = store.caches_without_wire(session, wire_format=WIRE.format, after_id="", limit=10)
        assert found is not None and found.body == v2 and page.body == v2 and pending == v2

        # a wire form computed for v2 is refused once v3 is there
        with database.transaction() as session:
            v3 = store.update_cache(session, cache=v2, expected_version=2, now=now)
            assert not store.set_wire(
                session, cache=pending, wire=encode_cache(pending), wire_format=WIRE.format
            )
        with database.transaction(write=False) as session:
            found = store.read_cache(session, cache_id=v1.cache_id, wire_format=WIRE.format)
        assert found is not None and found.body == v3 and v3.version == 3
    finally:
        engine.dispose()


# --- migration 0002 over a database made by 0001 ------------------------------------------------


def _upgrade(engine: sa.Engine, target: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, target)


def test_upgrade_from_0001_with_data_serves_and_fills_in_wire_forms(database_url: str) -> None:
    engine = make_engine(database_url)
    _upgrade(engine, "0001")
    now = datetime(2026, 1, 1, tzinfo=UTC)
    ready = replace(_cache("imc-old00001", "nginx:1.25"), state=CacheState.READY, version=3, revision=3)
    building = replace(_cache("imc-old00002", "redis:7"), version=1, revision=4)
    caches = sa.table(
        "image_caches",
        *(sa.column(c) for c in ("id", "state", "version", "revision", "zones_pending", "lease_owner")),
        sa.column("doc", sa.JSON()),
        sa.column("last_event_sequence"),
    )
    terms = sa.table("cache_terms", sa.column("cache_id"), sa.column("kind"), sa.column("value"))
    events = sa.table(
        "cache_events",
        *(sa.column(c) for c in ("cache_id", "sequence", "type", "reason", "message")),
        sa.column("time", sa.DateTime(timezone=True)),
        sa.column("attributes", sa.JSON()),
    )
    counters = sa.table("counters", sa.column("name"), sa.column("value"))
    with engine.begin() as connection:
        for cache in (ready, building):
            connection.execute(
                caches.insert().values(
                    id=cache.cache_id,
                    doc=store.cache_to_doc(cache),
                    state=cache.state.value,
                    version=cache.version,
                    revision=cache.revision,
                    zones_pending=False,
                    lease_owner="",
                    last_event_sequence=1,
                )
            )
            connection.execute(terms.insert().values(cache_id=cache.cache_id, kind="label", value="team=web"))
            connection.execute(
                events.insert().values(
                    cache_id=cache.cache_id,
                    sequence=1,
                    type="NORMAL",
                    reason="Created",
                    message="image cache created",
                    time=now,
                    attributes={},
                )
            )
        connection.execute(counters.update().values(value=4))
    engine.dispose()

    h = build(database_url, encoder=WIRE)  # migrates to head, as every start does
    try:
        with h.database.transaction(write=False) as session:
            rows = session.execute(sa.select(store.CacheRow.id, store.CacheRow.wire)).all()
            assert sorted(rows) == [("imc-old00001", None), ("imc-old00002", None)]
            found = store.read_cache(session, cache_id="imc-old00001", wire_format=WIRE.format)
        assert found is not None and found.body == ready

        # served from the documents while no wire form is stored: content, filters, events, revision
        page = h.stub.ListImageCaches(api.ListImageCachesRequest(filter='labels.team = "web"'))
        assert [(c.name, c.images[0], c.etag) for c in page.image_caches] == [
            ("imageCaches/imc-old00001", "nginx:1.25", 'W/"3"'),
            ("imageCaches/imc-old00002", "redis:7", 'W/"1"'),
        ]
        assert page.revision == 4
        events_page = h.stub.ListImageCacheEvents(
            api.ListImageCacheEventsRequest(parent="imageCaches/imc-old00001")
        )
        assert [e.reason for e in events_page.events] == ["Created"]
        before = listed(h)

        assert h.worker.fill_wire_forms() == 2
        with h.database.transaction(write=False) as session:
            stored = {
                r.id: r.wire for r in session.execute(sa.select(store.CacheRow.id, store.CacheRow.wire))
            }
        assert stored == {"imc-old00001": encode_cache(ready), "imc-old00002": encode_cache(building)}
        assert listed(h) == before

        # the old rows take new versions as usual, and serve them
        h.settle()
        built = raw(h, "GetImageCache", api.GetImageCacheRequest(name="imageCaches/imc-old00002"))
        assert pb.ImageCache.FromString(built).state == pb.ImageCache.READY
        assert listed(h)["imageCaches/imc-old00002"] == built
    finally:
        close_harness(h)

    # and the migration steps back down without losing the rows or what references them
    engine = make_engine(database_url)
    try:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0001")
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT count(*) FROM image_caches")).scalar() == 2
            assert connection.execute(sa.text("SELECT count(*) FROM cache_terms")).scalar() >= 2
            assert connection.execute(sa.text("SELECT count(*) FROM cache_events")).scalar() >= 2
        migrate(engine)
    finally:
        engine.dispose()
