"""Benchmark `match`: MatchImageCaches latency and throughput against an empty RPC on the same server.

100,000 READY caches of 1-8 images each, drawn from 20,000 images with Zipf-skewed popularity,
are seeded into a real registry (`snapcache serve`); the matcher runs as its own process and
loads them over gRPC, as deployed. Pods are drawn like real ones: most run exactly the images of
some cache, some a subset, some add an image no cache holds, a few run only unknown images.

Floor: grpc.health.v1.Health/Check on the matcher's own server (same process, same grpc.aio
loop, same interceptors) - an empty RPC. Match and floor calls alternate, so background load weighs on
both alike. Figures: p50 and p99 ratios (one client, sequential), and throughput with 8 client
processes against the floor's throughput. The server model is checked too: the same handlers
served by grpcio's thread pool in a second matcher process, empty RPC and match on each.

    python bench/match.py [--caches 100000] [--images 20000] [--requests 4000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from match_setup import Catalogue, catalogue, free_port, registry_and_matcher, seed_registry

from services.matcher.server import MatcherApp, MatcherConfig
from snapcache.grpc_server import ServiceBinding, create_server
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc

CLIENTS = 8


def pods(cat: Catalogue, count: int, seed: int = 11) -> list[tuple[str, list[str]]]:
    """Pods as (kind, images): exact 70 %, subset 15 %, plus an unknown image 10 %, unknown 5 %."""
    rng = random.Random(seed)
    found = []
    for i in range(count):
        images = list(rng.choice(cat.caches))
        rng.shuffle(images)
        roll = rng.random()
        if roll < 0.70:
            kind = "exact"
        elif roll < 0.85 and len(images) > 1:
            kind, images = "subset", images[:-1]
        elif roll < 0.95:
            kind, images = "plus-unknown", [*images, f"registry.example.com/new/app{i}:1"]
        else:
            kind, images = "unknown", [f"registry.example.com/new/app{i}:1", f"ghcr.io/x/tool{i}:2"]
        found.append((kind, images))
    return found


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def latency(address: str, requests: list[tuple[str, list[str]]]) -> dict[str, object]:
    """Alternate one match and one empty RPC per pod; return percentiles in microseconds."""
    with grpc.insecure_channel(address) as channel:
        stub = mpb_grpc.MatcherServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        empty = health_pb2.HealthCheckRequest()
        built = [mpb.MatchImageCachesRequest(images=images, validate_only=True) for _, images in requests]
        for request in built[:300]:  # warm up both paths and the parse cache
            stub.MatchImageCaches(request)
            health.Check(empty)
        matches: list[float] = []
        floors: list[float] = []
        by_kind: dict[str, list[float]] = {}
        decisions: dict[str, int] = {}
        for (kind, _), request in zip(requests, built, strict=True):
            t0 = time.perf_counter()
            answer = stub.MatchImageCaches(request)
            t1 = time.perf_counter()
            health.Check(empty)
            t2 = time.perf_counter()
            matches.append((t1 - t0) * 1e6)
            floors.append((t2 - t1) * 1e6)
            by_kind.setdefault(kind, []).append((t1 - t0) * 1e6)
            name = mpb.MatchImageCachesResponse.Decision.Name(answer.decision)
            decisions[name] = decisions.get(name, 0) + 1
    return {
        "match_p50_us": _p(matches, 0.5),
        "match_p99_us": _p(matches, 0.99),
        "empty_p50_us": _p(floors, 0.5),
        "empty_p99_us": _p(floors, 0.99),
        "by_kind_p50_us": {k: round(_p(v, 0.5), 1) for k, v in by_kind.items()},
        "by_kind_p99_us": {k: round(_p(v, 0.99), 1) for k, v in by_kind.items()},
        "decisions": decisions,
    }


def _client_loop(address: str, kind: str, images: list[list[str]], seconds: float, out: object) -> None:
    with grpc.insecure_channel(address) as channel:
        if kind == "match":
            stub = mpb_grpc.MatcherServiceStub(channel)
            built = [mpb.MatchImageCachesRequest(images=i, validate_only=True) for i in images]
            calls: list[Callable[[], object]] = [lambda r=r: stub.MatchImageCaches(r) for r in built]
        else:
            health = health_pb2_grpc.HealthStub(channel)
            empty = health_pb2.HealthCheckRequest()
            calls = [lambda: health.Check(empty)]
        for call in calls[:50]:
            call()
        done = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            calls[done % len(calls)]()
            done += 1
    out.put(done / seconds)  # type: ignore[attr-defined]


def throughput(address: str, kind: str, images: list[list[str]], seconds: float) -> float:
    """Calls per second of ``CLIENTS`` client processes together."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=_client_loop, args=(address, kind, images[i::CLIENTS], seconds, queue))
        for i in range(CLIENTS)
    ]
    for worker in workers:
        worker.start()
    rates = [queue.get(timeout=seconds + 120) for _ in workers]
    for worker in workers:
        worker.join()
    return float(sum(rates))


def _drive(coroutine: Any) -> Any:
    """Run a coroutine that never awaits (the matcher's handlers) to its result, without a loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the handler awaited")


class _ThreadPoolMatcher(mpb_grpc.MatcherServiceServicer):
    """The matcher's own handlers, served by grpcio's thread pool instead of grpc.aio."""

    def __init__(self, servicer: Any) -> None:
        self._servicer = servicer

    def MatchImageCaches(self, request: Any, context: Any) -> Any:  # noqa: N802 (the RPC's name)
        return _drive(self._servicer.MatchImageCaches(request, context))


def _thread_pool_matcher(registry: str, port: int, ready: Any) -> None:
    """A second matcher on the other server model: same index sync and handlers, thread pool."""
    app = MatcherApp(MatcherConfig(registry_target=registry, listen="127.0.0.1:0")).start(
        wait_loaded_seconds=600
    )
    binding = ServiceBinding(
        full_name="snapcache.v1.MatcherService",
        add_to_server=mpb_grpc.add_MatcherServiceServicer_to_server,
        servicer=_ThreadPoolMatcher(app.servicer),
    )
    server = create_server(f"127.0.0.1:{port}", [binding], max_workers=16)
    ready.set()
    server.server.wait_for_termination()


def _p50_pair(address: str, requests: list[mpb.MatchImageCachesRequest]) -> tuple[float, float]:
    """p50 of (empty RPC, match) in microseconds, alternating."""
    with grpc.insecure_channel(address) as channel:
        stub = mpb_grpc.MatcherServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        empty = health_pb2.HealthCheckRequest()
        for request in requests[:200]:
            stub.MatchImageCaches(request)
            health.Check(empty)
        floors, matches = [], []
        for request in requests:
            t0 = time.perf_counter()
            health.Check(empty)
            t1 = time.perf_counter()
            stub.MatchImageCaches(request)
            t2 = time.perf_counter()
            floors.append((t1 - t0) * 1e6)
            matches.append((t2 - t1) * 1e6)
    return statistics.median(floors), statistics.median(matches)


def server_models(running: Any, requests: list[tuple[str, list[str]]]) -> dict[str, float]:
    """Empty RPC and match on the chosen grpc.aio matcher against the same handlers on a thread pool."""
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    port = free_port()
    process = context.Process(target=_thread_pool_matcher, args=(running.registry, port, ready), daemon=True)
    process.start()
    built = [mpb.MatchImageCachesRequest(images=images, validate_only=True) for _, images in requests]
    try:
        if not ready.wait(600):
            raise RuntimeError("the thread-pool matcher did not start")
        aio_rounds, pool_rounds = [], []
        for _ in range(3):
            aio_rounds.append(_p50_pair(running.matcher, built))
            pool_rounds.append(_p50_pair(f"127.0.0.1:{port}", built))
    finally:
        process.terminate()
        process.join()
    return {
        "aio_empty_p50_us": min(r[0] for r in aio_rounds),
        "aio_match_p50_us": min(r[1] for r in aio_rounds),
        "pool_empty_p50_us": min(r[0] for r in pool_rounds),
        "pool_match_p50_us": min(r[1] for r in pool_rounds),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caches", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--seconds", type=float, default=5.0)
    options = parser.parse_args()

    cat = catalogue(caches=options.caches, images=options.images)
    base = sum(1 for c in cat.caches if cat.images[0] in c)
    print(f"catalogue: {options.caches} caches, {options.images} images; the top image is in {base} caches")
    requests = pods(cat, options.requests)
    with tempfile.TemporaryDirectory(prefix="bench-match-") as tmp:
        data_dir = Path(tmp) / "registry"
        t0 = time.perf_counter()
        seed_registry(data_dir, cat.caches)
        print(f"seeded the registry in {time.perf_counter() - t0:.1f}s")
        with registry_and_matcher(data_dir) as running:
            figures = latency(running.matcher, requests)
            images = [images for _, images in requests]
            match_rate = throughput(running.matcher, "match", images, options.seconds)
            empty_rate = throughput(running.matcher, "empty", images, options.seconds)
            models = server_models(running, requests[:1500])

    p50_ratio = figures["match_p50_us"] / figures["empty_p50_us"]  # type: ignore[operator]
    p99_ratio = figures["match_p99_us"] / figures["empty_p99_us"]  # type: ignore[operator]
    print(f"decisions: {figures['decisions']}")
    print(
        f"latency, one client: match p50 {figures['match_p50_us']:.0f} us / empty {figures['empty_p50_us']:.0f} us"
        f" = {p50_ratio:.2f} (target <= 1.3); p99 {figures['match_p99_us']:.0f} / {figures['empty_p99_us']:.0f}"
        f" = {p99_ratio:.2f} (target <= 1.5)"
    )
    print(f"  p50 by pod kind (us): {figures['by_kind_p50_us']}; p99: {figures['by_kind_p99_us']}")
    print(
        f"throughput, {CLIENTS} client processes: match {match_rate:.0f}/s, empty {empty_rate:.0f}/s"
        f" = {match_rate / empty_rate:.2f} of the floor"
    )
    print(
        f"server model (p50, us): grpc.aio (chosen) empty {models['aio_empty_p50_us']:.0f} match "
        f"{models['aio_match_p50_us']:.0f}; thread pool empty {models['pool_empty_p50_us']:.0f} match "
        f"{models['pool_match_p50_us']:.0f}; empty aio/pool "
        f"{models['aio_empty_p50_us'] / models['pool_empty_p50_us']:.2f}, match aio/pool "
        f"{models['aio_match_p50_us'] / models['pool_match_p50_us']:.2f}"
    )
    print(
        json.dumps(
            {
                "bench": "match",
                "ratio": round(p50_ratio, 3),
                "p99_ratio": round(p99_ratio, 3),
                "throughput_ratio": round(match_rate / empty_rate, 3),
                "match_p50_us": round(figures["match_p50_us"], 1),  # type: ignore[arg-type]
                "empty_p50_us": round(figures["empty_p50_us"], 1),  # type: ignore[arg-type]
                "aio_over_pool_empty": round(models["aio_empty_p50_us"] / models["pool_empty_p50_us"], 3),
                "aio_over_pool_match": round(models["aio_match_p50_us"] / models["pool_match_p50_us"], 3),
                "caches": options.caches,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
