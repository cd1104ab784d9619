"""Load on an HA registry: 3 replicas on one PostgreSQL database, 1,000 concurrent creates, and a
sustained match load on a matcher following them, for 60 s.

Must hold: no error but backpressure (RESOURCE_EXHAUSTED, UNAVAILABLE: retried by the client with
jittered backoff and the same cache id, so a retry that finds its cache is ALREADY_EXISTS), no
cache built twice (one BuildStarted, one SnapshotCreated each), every cache accounted for and
READY, and the matcher answering throughout.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psycopg
import pytest

from snapcache.demo.oci_images import ImageSpec, LayerSpec, build_image, push_image
from snapcache.tls import open_channel
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc
from tests.support.kube_cluster import free_port
from tests.support.oci_fixtures import OciRegistry

pytestmark = pytest.mark.e2e

REPLICAS = 3
CREATES = 1000
CREATE_THREADS = 64
MATCH_SECONDS = 60.0
BACKPRESSURE = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}


def _serve(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "snapcache_cli.main", "--log-level", "warning", "serve", *args]
    with open(log, "ab") as sink:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sink)


def _ready(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)


@pytest.fixture
def cluster(postgres_url: str, tmp_path: Path) -> Iterator[tuple[list[str], str]]:
    """Registry replicas (addresses) and a matcher following the first one."""
    # A load test, not a durability test (test_registry_database_restart is that): commits need
    # not wait for the disk here, which keeps 1,000 builds' worth of transactions to a minute.
    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"ALTER DATABASE {dsn.rsplit('/', 1)[1]} SET synchronous_commit = off")
    processes: list[subprocess.Popen[bytes]] = []
    replicas = []
    try:
        for number in range(REPLICAS):
            address = f"127.0.0.1:{free_port()}"
            processes.append(
                _serve(
                    ["--only", "registry", "--database-url", postgres_url, "--data-dir", str(tmp_path / "shared"),
                     "--listen", address, "--instance-id", f"replica-{number}", "--max-concurrent-builds", "4",
                     "--zone", "zone-a"],
                    tmp_path / f"replica-{number}.log",
                )
            )  # fmt: skip
            _ready(address)
            replicas.append(address)
        matcher = f"127.0.0.1:{free_port()}"
        processes.append(
            _serve(
                ["--only", "matcher", "--registry", replicas[0], "--matcher-listen", matcher],
                tmp_path / "matcher.log",
            )
        )
        _ready(matcher)
        yield replicas, matcher
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _create(stubs: list[api_grpc.CacheRegistryServiceStub], number: int, image: str, host: str) -> list[str]:
    """Create cache ``number`` (retrying backpressure with jittered backoff); the codes seen."""
    cache = pb.ImageCache(images=[image], cache_size_gib=1, plain_http_registries=[host])
    request = api.CreateImageCacheRequest(image_cache=cache, image_cache_id=f"imc-{number:08d}")
    seen: list[str] = []
    backoff = 0.05
    for attempt in range(12):
        stub = stubs[(number + attempt) % len(stubs)]  # a retry may go to another replica
        try:
            stub.CreateImageCache(request, timeout=20)
            seen.append("OK")
            return seen
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            seen.append(code.name)
            if code is grpc.StatusCode.ALREADY_EXISTS and attempt > 0:
                return seen  # an earlier attempt committed before its answer was lost
            if code not in BACKPRESSURE:
                return seen
        time.sleep(random.uniform(0, backoff))
        backoff = min(backoff * 2, 2.0)
    return seen


def _ready_count(stub: api_grpc.CacheRegistryServiceStub) -> int:
    count, token = 0, ""
    while True:
        page = stub.ListImageCaches(
            api.ListImageCachesRequest(page_size=1000, page_token=token, filter="state = READY"), timeout=20
        )
        count += len(page.image_caches)
        token = page.next_page_token
        if not token:
            return count


def test_three_replicas_take_a_thousand_creates_and_matches_without_loss_or_double_builds(
    cluster: tuple[list[str], str], postgres_url: str, fresh_oci_registry: OciRegistry
) -> None:
    replicas, matcher = cluster
    built = build_image(ImageSpec("load/app", "1.0", [LayerSpec(4096, seed=1)]))
    push_image(fresh_oci_registry.url, built)
    host = fresh_oci_registry.host
    image = f"{host}/load/app:1.0"

    channels = [open_channel(address) for address in replicas]
    stubs = [api_grpc.CacheRegistryServiceStub(channel) for channel in channels]
    matches: Counter[str] = Counter()
    stop = threading.Event()

    def match_load() -> None:
        with open_channel(matcher) as channel:
            stub = mpb_grpc.MatcherServiceStub(channel)
            request = mpb.MatchImageCachesRequest(images=[image], validate_only=True)
            while not stop.is_set():
                try:
                    answer = stub.MatchImageCaches(request, timeout=5)
                    matches["MATCHED" if answer.image_cache else "NO_MATCH"] += 1
                except grpc.RpcError as exc:
                    matches[exc.code().name] += 1  # type: ignore[attr-defined]
                time.sleep(0.005)

    loader = threading.Thread(target=match_load, daemon=True)
    started = time.monotonic()
    loader.start()
    try:
        with ThreadPoolExecutor(CREATE_THREADS) as pool:
            outcomes = list(pool.map(lambda n: _create(stubs, n, image, host), range(CREATES)))
        print(f"creates done after {time.monotonic() - started:.1f}s", flush=True)
        finals = Counter(seen[-1] for seen in outcomes)
        assert set(finals) <= {"OK", "ALREADY_EXISTS"}, finals
        every_code = Counter(code for seen in outcomes for code in seen)
        assert set(every_code) <= {"OK", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}, every_code

        deadline = started + 300
        ready = 0
        while ready < CREATES:
            assert time.monotonic() < deadline, f"only {ready} of {CREATES} caches READY"
            time.sleep(0.5)
            ready = _ready_count(stubs[0])
        print(f"all READY after {time.monotonic() - started:.1f}s; matches {matches}", flush=True)
        time.sleep(max(0.0, MATCH_SECONDS - (time.monotonic() - started)))
    finally:
        stop.set()
        loader.join(timeout=10)
        for channel in channels:
            channel.close()

    assert set(matches) <= {"MATCHED", "NO_MATCH", "RESOURCE_EXHAUSTED"}, matches
    assert matches["MATCHED"] > 0
    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as connection:
        caches = connection.execute(
            "SELECT count(*), count(*) FILTER (WHERE state = 'READY') FROM image_caches"
        ).fetchone()
        twice = connection.execute(
            "SELECT cache_id, reason, count(*) FROM cache_events WHERE reason IN ('BuildStarted', 'SnapshotCreated') "
            "GROUP BY cache_id, reason HAVING count(*) > 1"
        ).fetchall()
    assert caches == (CREATES, CREATES)
    assert twice == []  # no cache built twice
