"""Benchmark `list`: a ListImageCaches page of 100 against a GetImageCache, on SQLite and PostgreSQL.

Seeds N caches straight into the store, as the registry writes them (document, filter terms and
wire form; the API would take minutes for 100,000), then times both RPCs through the same gRPC
server stack, wired as `services.cache_registry.server` wires it. The floor is p50(Get) of one
cache; each figure is a p50 of List(page of 100) divided by it:

- warm: the same page over and over (anything the registry memoizes is in memory);
- cold: pages never read before by this process, walked in order by page token: the page after
  the warm one onwards, so no request before has touched them and no memo can hold them.

Get and List are timed alternately, so background load weighs on floor and figure alike. Both
are measured at 1,000 caches and at N caches, which also shows the page time does not grow with
the table. The last line is one JSON object; its `ratio` is the worst of warm and cold at N.

    python bench/list.py [--engine all|sqlite|postgres] [--caches 100000] [--repeat 200]
                         [--cold-pages 100] [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import grpc
import psycopg
from psycopg import sql
from sqlalchemy import insert

from services.cache_registry import store
from services.cache_registry.database import Database, make_engine, migrate
from services.cache_registry.feed import CommitSignal
from services.cache_registry.local_provider import LocalProvider, LocalProviderConfig, LocalZone
from services.cache_registry.messages import ImageCacheWire
from services.cache_registry.model import (
    BuildPhase,
    BuildProgress,
    CachedImage,
    CacheId,
    CacheSpec,
    CacheState,
    ImageCache,
    ZoneAvailability,
    ZoneState,
)
from services.cache_registry.service import CacheRegistry
from services.cache_registry.servicer import SERVICE_NAME, CacheRegistryServicer
from snapcache.grpc_server import ServiceBinding, create_server
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc

PAGE = 100


def _cache(i: int, now: datetime) -> ImageCache:
    images = (f"registry.example.com/team{i % 50}/app{i % 997}:{i % 13}", f"nginx:1.{i % 30}", "busybox:1.36")
    return ImageCache(
        cache_id=CacheId(f"imc-{i:08d}"),
        spec=CacheSpec(
            images=images,
            cache_size_gib=20,
            retention_days=0,
            labels=(("app", f"app{i % 997}"), ("team", f"t{i % 50}")),
        ),
        state=CacheState.READY,
        create_time=now,
        update_time=now,
        progress=BuildProgress(phase=BuildPhase.DONE, bytes_done=10**8, bytes_total=10**8, attempt=1),
        cached_images=tuple(
            CachedImage(
                image=img,
                normalized_image=img if img.startswith("registry") else f"docker.io/library/{img}",
                manifest_digest="sha256:" + f"{i:064x}",
                index_digest="",
                platform="linux/amd64",
                compressed_bytes=30_000_000,
                uncompressed_bytes=90_000_000,
                layer_count=5,
            )
            for img in images
        ),
        zones=(
            ZoneAvailability("zone-a", ZoneState.AVAILABLE, "", now),
            ZoneAvailability("zone-b", ZoneState.AVAILABLE, "", now),
        ),
        snapshot_id=f"snap-{i}",
        snapshot_size_bytes=90_000_000,
        build_id="b1",
        ready_time=now,
        revision=i + 1,
    )


def seed(database: Database, count: int, *, start: int, encoder: store.CacheEncoder) -> None:
    """Insert caches [start, count) in bulk, as `store.insert_cache` would write them."""
    now = datetime.now(UTC)
    batch = 5000
    for first in range(start, count, batch):
        rows, terms = [], []
        for i in range(first, min(first + batch, count)):
            cache = _cache(i, now)
            rows.append(store.cache_row(cache, encoder=encoder))
            terms += [
                {"cache_id": cache.cache_id, "kind": "image", "value": c.normalized_image}
                for c in cache.cached_images
            ]
            terms += [
                {"cache_id": cache.cache_id, "kind": "label", "value": f"{k}={v}"}
                for k, v in cache.spec.labels
            ]
        with database.transaction() as session:
            session.execute(insert(store.CacheRow), rows)
            session.execute(insert(store.CacheTermRow), terms)
            session.execute(
                store.update(store.CounterRow)
                .where(store.col(store.CounterRow.name) == "revision")
                .values(value=count)
            )


def _timed(call: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1000


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@contextmanager
def _serving(
    database: Database, encoder: store.CacheEncoder, data_dir: Path
) -> Iterator[api_grpc.CacheRegistryServiceStub]:
    """A registry over ``database`` behind a gRPC server, fresh (no memo holds anything yet)."""
    registry = CacheRegistry(
        database=database,
        provider=LocalProvider(
            LocalProviderConfig(root=data_dir / "provider", zones=[LocalZone(name="zone-a")])
        ),
        signal=CommitSignal(),
        clock=lambda: datetime.now(UTC),
        encoder=encoder,
    )
    server = create_server(
        "127.0.0.1:0",
        [
            ServiceBinding(
                SERVICE_NAME,
                api_grpc.add_CacheRegistryServiceServicer_to_server,
                CacheRegistryServicer(registry),
            )
        ],
        max_workers=4,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield api_grpc.CacheRegistryServiceStub(channel)
    finally:
        channel.close()
        server.stop(0)


def measure(
    url: str, counts: list[int], *, repeat: int, cold_pages: int, data_dir: Path
) -> dict[str, dict[str, float]]:
    engine = make_engine(url)
    migrate(engine)
    database = Database(engine)
    encoder = ImageCacheWire()  # as services.cache_registry.server wires it
    results: dict[str, dict[str, float]] = {}
    seeded = 0
    try:
        for count in counts:
            seed(database, count, start=seeded, encoder=encoder)
            seeded = count
            with _serving(database, encoder, data_dir) as stub:
                results[str(count)] = _measure_size(stub, count, repeat=repeat, cold_pages=cold_pages)
    finally:
        engine.dispose()
    return results


def _measure_size(
    stub: api_grpc.CacheRegistryServiceStub, count: int, *, repeat: int, cold_pages: int
) -> dict[str, float]:
    # caches 0-99 warm the stack up, 100-199 are the warm page, 200 onwards stay unread
    first = stub.ListImageCaches(api.ListImageCachesRequest(page_size=PAGE))
    warm_request = api.ListImageCachesRequest(page_size=PAGE, page_token=first.next_page_token)
    warm_page = stub.ListImageCaches(warm_request)
    assert warm_page.image_caches[0].name == "imageCaches/imc-00000100"
    get_request = api.GetImageCacheRequest(name="imageCaches/imc-00000150")
    for _ in range(20):
        stub.GetImageCache(get_request)
        stub.ListImageCaches(warm_request)
    gets, warm = [], []
    for _ in range(repeat):
        gets.append(_timed(lambda: stub.GetImageCache(get_request)))
        warm.append(_timed(lambda: stub.ListImageCaches(warm_request)))
    cold_gets, cold = [], []
    token = warm_page.next_page_token
    expected = 200
    for _ in range(min(cold_pages, (count - 200) // PAGE)):
        cold_gets.append(_timed(lambda: stub.GetImageCache(get_request)))
        t0 = time.perf_counter()
        page = stub.ListImageCaches(api.ListImageCachesRequest(page_size=PAGE, page_token=token))
        cold.append((time.perf_counter() - t0) * 1000)
        assert len(page.image_caches) == PAGE
        assert page.image_caches[0].name == f"imageCaches/imc-{expected:08d}"  # never read before
        expected += PAGE
        token = page.next_page_token
    get_p50, warm_p50 = statistics.median(gets), statistics.median(warm)
    cold_get_p50, cold_p50 = statistics.median(cold_gets), statistics.median(cold)
    figures = {
        "get_p50_ms": round(get_p50, 3),
        "get_p99_ms": round(_p(gets, 0.99), 3),
        "warm_list100_p50_ms": round(warm_p50, 3),
        "warm_list100_p99_ms": round(_p(warm, 0.99), 3),
        "warm_ratio": round(warm_p50 / get_p50, 2),
        "cold_get_p50_ms": round(cold_get_p50, 3),
        "cold_list100_p50_ms": round(cold_p50, 3),
        "cold_list100_p99_ms": round(_p(cold, 0.99), 3),
        "cold_pages": len(cold),
        "cold_ratio": round(cold_p50 / cold_get_p50, 2),
    }
    print(
        f"  {count:>7} caches: warm: Get p50 {get_p50:.2f} ms, List(100) p50 {warm_p50:.2f} ms, "
        f"ratio {warm_p50 / get_p50:.2f}; cold ({len(cold)} never-read pages): Get p50 "
        f"{cold_get_p50:.2f} ms, List(100) p50 {cold_p50:.2f} ms, ratio {cold_p50 / cold_get_p50:.2f}",
        flush=True,
    )
    return figures


@contextmanager
def _postgres_database(base_url: str) -> Iterator[str]:
    name = f"snapcache_bench_{uuid.uuid4().hex[:8]}"
    admin = base_url.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{base_url}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", choices=["all", "sqlite", "postgres"], default="all")
    parser.add_argument("--caches", type=int, default=100_000, help="table size (at least 2,000)")
    parser.add_argument("--repeat", type=int, default=200, help="samples of Get and of the warm page")
    parser.add_argument("--cold-pages", type=int, default=100, help="never-read pages timed")
    parser.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    options = parser.parse_args()
    if options.caches < 2000:
        parser.error("--caches must be at least 2,000 (it is compared with 1,000)")
    counts = [1000, options.caches]
    engines = ["sqlite", "postgres"] if options.engine == "all" else [options.engine]
    report: dict[str, dict[str, dict[str, float]]] = {}
    for db in engines:
        with tempfile.TemporaryDirectory() as tmp:
            print("SQLite" if db == "sqlite" else "PostgreSQL", flush=True)
            if db == "sqlite":
                url = f"sqlite:///{Path(tmp) / 'bench.db'}"
                report[db] = measure(
                    url, counts, repeat=options.repeat, cold_pages=options.cold_pages, data_dir=Path(tmp)
                )
            else:
                with _postgres_database(options.postgres_url) as url:
                    report[db] = measure(
                        url, counts, repeat=options.repeat, cold_pages=options.cold_pages, data_dir=Path(tmp)
                    )
    big = str(options.caches)
    warm = max(report[db][big]["warm_ratio"] for db in engines)
    cold = max(report[db][big]["cold_ratio"] for db in engines)
    growth = max(
        report[db][big]["cold_list100_p50_ms"] / report[db]["1000"]["cold_list100_p50_ms"] for db in engines
    )
    print(
        json.dumps(
            {
                "bench": "list",
                "ratio": max(warm, cold),
                "warm_ratio": warm,
                "cold_ratio": cold,
                "page_time_growth_1k_to_max": round(growth, 2),
                "caches": options.caches,
                "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                **report,
            }
        )
    )


if __name__ == "__main__":
    main()
