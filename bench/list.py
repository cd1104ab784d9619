"""Benchmark `list`: a ListImageCaches page of 100 against a GetImageCache, on SQLite and PostgreSQL.

Seeds N caches straight into the store (the API would take minutes for 100,000), then times both
RPCs through the same gRPC server stack. The figure is p50(List page of 100) / p50(Get), measured
at 1,000 caches and at N caches, so it also shows the page time does not grow with the table.

    python bench/list.py [--caches 100000] [--repeat 200] [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import grpc
import psycopg
from psycopg import sql
from sqlalchemy import insert

from services.cache_registry import store
from services.cache_registry.database import Database, make_engine, migrate
from services.cache_registry.feed import CommitSignal
from services.cache_registry.local_provider import LocalProvider, LocalProviderConfig, LocalZone
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


def _cache(i: int, now: datetime) -> ImageCache:
    images = (f"registry.example.com/team{i % 50}/app{i % 997}:{i % 13}", f"nginx:1.{i % 30}", "busybox:1.36")
    return ImageCache(
        cache_id=CacheId(f"imc-{i:08d}"),
        spec=CacheSpec(images=images, cache_size_gib=20, retention_days=0, labels=(("team", f"t{i % 50}"),)),
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


def seed(database: Database, count: int, start: int = 0) -> None:
    """Insert caches [start, count) in bulk, with their filter terms."""
    now = datetime.now(UTC)
    batch = 5000
    for first in range(start, count, batch):
        rows, terms = [], []
        for i in range(first, min(first + batch, count)):
            cache = _cache(i, now)
            rows.append(
                {
                    "id": cache.cache_id,
                    "doc": store.cache_to_doc(cache),
                    "state": cache.state.value,
                    "version": 1,
                    "revision": cache.revision,
                    "expire_time": None,
                    "zones_pending": False,
                    "lease_owner": "",
                    "last_event_sequence": 0,
                }
            )
            terms += [
                {"cache_id": cache.cache_id, "kind": "image", "value": c.normalized_image}
                for c in cache.cached_images
            ]
        with database.transaction() as session:
            session.execute(insert(store.CacheRow), rows)
            session.execute(insert(store.CacheTermRow), terms)
            session.execute(
                store.update(store.CounterRow)
                .where(store.col(store.CounterRow.name) == "revision")
                .values(value=count)
            )


def p50_ms(call: object, repeat: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()  # type: ignore[operator]
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def measure(url: str, counts: list[int], repeat: int, data_dir: Path) -> dict[str, dict[str, float]]:
    engine = make_engine(url)
    migrate(engine)
    database = Database(engine)
    registry = CacheRegistry(
        database=database,
        provider=LocalProvider(
            LocalProviderConfig(root=data_dir / "provider", zones=[LocalZone(name="zone-a")])
        ),
        signal=CommitSignal(),
        clock=lambda: datetime.now(UTC),
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
    stub = api_grpc.CacheRegistryServiceStub(channel)
    results: dict[str, dict[str, float]] = {}
    seeded = 0
    try:
        for count in counts:
            seed(database, count, start=seeded)
            seeded = count
            middle = f"imageCaches/imc-{count // 2:08d}"
            # a page from the middle of the table, through an opaque token, like a real client
            token = stub.ListImageCaches(api.ListImageCachesRequest(page_size=count // 2)).next_page_token
            for _ in range(20):
                stub.GetImageCache(api.GetImageCacheRequest(name=middle))
                stub.ListImageCaches(api.ListImageCachesRequest(page_size=100, page_token=token))
            get_request = api.GetImageCacheRequest(name=middle)
            list_request = api.ListImageCachesRequest(page_size=100, page_token=token)
            get_p50, get_p99 = p50_ms(partial(stub.GetImageCache, get_request), repeat)
            list_p50, list_p99 = p50_ms(partial(stub.ListImageCaches, list_request), repeat)
            page = stub.ListImageCaches(api.ListImageCachesRequest(page_size=100, page_token=token))
            assert len(page.image_caches) == 100
            # cold: pages never read before (nothing decoded or encoded yet), walked by token
            cold: list[float] = []
            walk = stub.ListImageCaches(api.ListImageCachesRequest(page_size=count // 4)).next_page_token
            for _ in range(min(50, count // 400)):
                t0 = time.perf_counter()
                walk = stub.ListImageCaches(
                    api.ListImageCachesRequest(page_size=100, page_token=walk)
                ).next_page_token
                cold.append((time.perf_counter() - t0) * 1000)
            cold_p50 = statistics.median(cold)
            results[str(count)] = {
                "get_p50_ms": round(get_p50, 3),
                "get_p99_ms": round(get_p99, 3),
                "list100_p50_ms": round(list_p50, 3),
                "list100_p99_ms": round(list_p99, 3),
                "ratio": round(list_p50 / get_p50, 2),
                "cold_list100_p50_ms": round(cold_p50, 3),
                "cold_ratio": round(cold_p50 / get_p50, 2),
            }
            print(
                f"  {count:>7} caches: Get p50 {get_p50:.2f} ms, List(100) p50 {list_p50:.2f} ms, "
                f"ratio {list_p50 / get_p50:.2f}; never-read pages p50 {cold_p50:.2f} ms "
                f"(ratio {cold_p50 / get_p50:.2f})"
            )
    finally:
        channel.close()
        server.stop(0)
        engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--caches", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    options = parser.parse_args()
    counts = [1000, options.caches]
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        print("SQLite")
        report["sqlite"] = measure(f"sqlite:///{Path(tmp) / 'bench.db'}", counts, options.repeat, Path(tmp))
    name = f"snapcache_bench_{uuid.uuid4().hex[:8]}"
    admin = options.postgres_url.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        tmp_dir = tempfile.TemporaryDirectory()
        tmp = tmp_dir.name
        print("PostgreSQL")
        report["postgres"] = measure(f"{options.postgres_url}/{name}", counts, options.repeat, Path(tmp))
    finally:
        tmp_dir.cleanup()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    big = str(options.caches)
    worst = max(report[db][big]["ratio"] for db in ("sqlite", "postgres"))  # type: ignore[index]
    growth = max(
        report[db][big]["list100_p50_ms"] / report[db]["1000"]["list100_p50_ms"]  # type: ignore[index]
        for db in ("sqlite", "postgres")
    )
    print(
        json.dumps(
            {
                "bench": "list",
                "ratio": worst,
                "page_time_growth_1k_to_max": round(growth, 2),
                "caches": options.caches,
                **report,
            }
        )
    )


if __name__ == "__main__":
    main()
