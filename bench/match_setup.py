"""Shared set-up of the matcher benchmarks: a skewed catalogue of caches, seeded into a real registry.

The catalogue imitates real clusters: image popularity follows a Zipf law, so a few base images
are in a large share of caches and most images in a handful. Caches are written straight into
the registry's store as the registry writes them (the API would take an hour for 100,000
builds), then `snapcache serve` runs the registry, and the matcher runs as its own process
following it over gRPC, exactly as deployed.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import insert

from services.cache_registry import store
from services.cache_registry.database import Database, make_engine, migrate
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

ZONES = ("zone-a", "zone-b")


@dataclass(frozen=True)
class Catalogue:
    """Caches as lists of image references, and every distinct image."""

    caches: list[list[str]]
    images: list[str]


def image_ref(number: int) -> str:
    """The ``number``-th image of the universe (0 is the most popular)."""
    return f"registry.example.com/team{number % 97}/image{number}:v{number % 7}"


def digest_of(text: str) -> str:
    """A stable digest for an image reference."""
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def catalogue(*, caches: int, images: int, seed: int = 7, skew: float = 1.1) -> Catalogue:
    """``caches`` caches of 1-8 distinct images drawn by Zipf(``skew``) from ``images`` images."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** skew for rank in range(images)]
    cumulative = []
    total = 0.0
    for weight in weights:
        total += weight
        cumulative.append(total)
    universe = [image_ref(i) for i in range(images)]
    found: list[list[str]] = []
    for _ in range(caches):
        size = rng.randint(1, 8)
        chosen: dict[int, None] = {}
        while len(chosen) < size:
            chosen[_pick(rng, cumulative, total)] = None
        found.append([universe[i] for i in chosen])
    return Catalogue(found, universe)


def _pick(rng: random.Random, cumulative: list[float], total: float) -> int:
    return bisect.bisect_left(cumulative, rng.random() * total)


def _cache(number: int, images: list[str], now: datetime) -> ImageCache:
    cached = tuple(
        CachedImage(
            image=image,
            normalized_image=image,
            manifest_digest=digest_of(image),
            index_digest="",
            platform="linux/amd64",
            compressed_bytes=10_000_000 + (int(digest_of(image)[7:15], 16) % 90_000_000),
            uncompressed_bytes=300_000_000,
            layer_count=5,
        )
        for image in images
    )
    created = now - timedelta(seconds=number)
    return ImageCache(
        cache_id=CacheId(f"imc-{number:08d}"),
        spec=CacheSpec(images=tuple(images), cache_size_gib=10 + number % 5 * 10, retention_days=0),
        state=CacheState.READY,
        create_time=created,
        update_time=created,
        progress=BuildProgress(phase=BuildPhase.DONE, bytes_done=10**8, bytes_total=10**8, attempt=1),
        cached_images=cached,
        zones=tuple(ZoneAvailability(zone, ZoneState.AVAILABLE, "", created) for zone in ZONES),
        snapshot_id=f"snap-{number}",
        snapshot_size_bytes=sum(c.compressed_bytes for c in cached),
        build_id="b1",
        ready_time=created,
        revision=number + 1,
    )


def seed_registry(data_dir: Path, caches: list[list[str]]) -> None:
    """Write ``caches`` READY into the registry database of ``data_dir`` (SQLite)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(f"sqlite:///{data_dir / 'registry.db'}")
    migrate(engine)
    database = Database(engine)
    encoder = ImageCacheWire()
    now = datetime.now(UTC)
    batch = 5000
    for first in range(0, len(caches), batch):
        rows, terms = [], []
        for number in range(first, min(first + batch, len(caches))):
            cache = _cache(number, caches[number], now)
            rows.append(store.cache_row(cache, encoder=encoder))
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
                .values(value=len(caches))
            )
    engine.dispose()


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "snapcache_cli.main", "--log-level", "warning", "serve", *args],
            stdout=subprocess.DEVNULL,
            stderr=sink,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def wait_serving(address: str, service: str, *, timeout: float) -> None:
    """Block until ``service`` at ``address`` reports SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"{service} at {address} not SERVING after {timeout:g}s")


@dataclass
class Running:
    """The processes of a benchmark run and where they listen."""

    registry: str
    matcher: str
    processes: list[subprocess.Popen[bytes]]


@contextmanager
def registry_and_matcher(data_dir: Path, *, matcher: bool = True) -> Iterator[Running]:
    """`snapcache serve` for the registry, and a second one for the matcher alone."""
    registry_port, matcher_port = free_port(), free_port()
    registry_address = f"127.0.0.1:{registry_port}"
    processes = [
        _serve(
            ["--data-dir", str(data_dir), "--listen", registry_address, "--matcher-listen", "off",
             *[arg for zone in ZONES for arg in ("--zone", zone)]],
            data_dir / "registry.log",
        )
    ]  # fmt: skip
    try:
        wait_serving(registry_address, "snapcache.v1.CacheRegistryService", timeout=120)
        matcher_address = f"127.0.0.1:{matcher_port}"
        if matcher:
            processes.append(
                _serve(
                    [
                        "--only",
                        "matcher",
                        "--registry",
                        registry_address,
                        "--matcher-listen",
                        matcher_address,
                    ],
                    data_dir / "matcher.log",
                )
            )
            wait_serving(matcher_address, "snapcache.v1.MatcherService", timeout=300)
        yield Running(registry_address, matcher_address, processes)
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
