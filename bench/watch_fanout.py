"""Benchmark `watch_fanout`: a change committed on one registry replica, seen by a watcher of another.

Two `snapcache serve --only registry` processes (replicas A and B) on one fresh PostgreSQL
database. A WatchImageCaches client on B (what a matcher following B holds) times each change
from the moment its CreateImageCache returned (committed) to its arrival; a change that arrived
before the create's answer did counts 0 (it happens on the same replica). Creates alternate
between A (cross-replica: B learns of it through PostgreSQL LISTEN/NOTIFY) and B (same replica:
the floor, B's own in-process wake-up), so background load weighs on both alike. Figure: p99
cross / p99 same (target <= 2), and p50s. B also polls the database every second as a safety
net; without the notification the cross-replica delay would be that poll.

    python bench/watch_fanout.py [--changes 300] [--postgres postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
import psycopg
from match_setup import _serve, free_port, wait_serving

from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb

SERVICE = "snapcache.v1.CacheRegistryService"


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=300)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    options = parser.parse_args()

    database = f"bench_fanout_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(options.postgres, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
    url = (
        options.postgres.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{database}"
    )
    processes: list[subprocess.Popen[bytes]] = []
    workdir = tempfile.TemporaryDirectory(prefix="bench-fanout-")
    tmp = workdir.name
    try:
        addresses = []
        for name in ("a", "b"):
            address = f"127.0.0.1:{free_port()}"
            data = Path(tmp) / name
            data.mkdir()
            args = ["--only", "registry", "--database-url", url, "--data-dir", str(data), "--listen", address,
                    "--matcher-listen", "off", "--instance-id", f"replica-{name}"]  # fmt: skip
            processes.append(_serve(args, data / "serve.log"))
            wait_serving(address, SERVICE, timeout=60)
            addresses.append(address)
        channels = [grpc.insecure_channel(address) for address in addresses]
        stubs = [api_grpc.CacheRegistryServiceStub(channel) for channel in channels]
        a, b = stubs
        arrivals: queue.Queue[tuple[str, float]] = queue.Queue()
        head = b.ListImageCaches(api.ListImageCachesRequest(page_size=1)).revision
        call = b.WatchImageCaches(api.WatchImageCachesRequest(start_revision=head))

        def read() -> None:
            try:
                for change in call:
                    if change.type == api.WatchImageCachesResponse.UPSERT:
                        arrivals.put((change.image_cache.name, time.perf_counter()))
            except grpc.RpcError:
                pass

        threading.Thread(target=read, daemon=True).start()
        time.sleep(0.5)
        delays: dict[str, list[float]] = {"cross": [], "same": []}
        for number in range(options.changes):
            kind = "cross" if number % 2 == 0 else "same"
            stub = a if kind == "cross" else b
            cache_id = f"imc-{number:08d}"
            request = api.CreateImageCacheRequest(
                image_cache=pb.ImageCache(images=["registry.invalid/bench/app:1"]),
                image_cache_id=cache_id,
            )
            stub.CreateImageCache(request)
            committed = time.perf_counter()
            while True:  # the build's own updates (it fails: no such registry) arrive too
                name, at = arrivals.get(timeout=30)
                if name == f"imageCaches/{cache_id}":
                    delays[kind].append(max(0.0, at - committed) * 1000)
                    break
            time.sleep(0.01)
        call.cancel()
        for channel in channels:
            channel.close()
    finally:
        for process in processes:  # before the directory goes: the replicas write into it
            process.terminate()
            process.wait(timeout=20)
        workdir.cleanup()
        with psycopg.connect(options.postgres, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")

    cross, same = delays["cross"], delays["same"]
    ratio = _p(cross, 0.99) / _p(same, 0.99)
    print(
        f"commit -> watcher on replica B, {len(cross)} changes each: cross-replica p50 "
        f"{statistics.median(cross):.1f} ms p99 {_p(cross, 0.99):.1f} ms; same replica p50 "
        f"{statistics.median(same):.1f} ms p99 {_p(same, 0.99):.1f} ms; p99 ratio {ratio:.2f} (target <= 2)"
    )
    print(
        json.dumps(
            {
                "bench": "watch_fanout",
                "ratio": round(ratio, 3),
                "cross_p50_ms": round(statistics.median(cross), 2),
                "cross_p99_ms": round(_p(cross, 0.99), 2),
                "same_p50_ms": round(statistics.median(same), 2),
                "same_p99_ms": round(_p(same, 0.99), 2),
                "changes": options.changes,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
