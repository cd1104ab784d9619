"""The registry while its PostgreSQL server crashes and comes back, under a steady load of creates.

While the database is down every call fails fast (well inside its deadline) with UNAVAILABLE,
reason DATABASE_UNAVAILABLE and a RetryInfo, which clients retry; once it is back calls succeed again within
seconds, with no restart of the registry; every create that was answered OK is there afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from snapcache.rpc_errors import error_info, retry_delay
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import image_cache_pb2 as pb
from tests.support.fake_provider import FakeProvider
from tests.support.private_postgres import PrivatePostgres
from tests.support.registry_harness import Harness, build_harness, close_harness

DEADLINE_SECONDS = 5.0
FAIL_FAST_SECONDS = 2.0  # well inside the deadline: a caller can retry elsewhere in time


@dataclass
class Load:
    """Creates in a loop; what each call answered and how long it took."""

    harness: Harness
    stop: threading.Event = field(default_factory=threading.Event)
    # (at, cache id, code, took, reason) of each call; the RetryInfo delay of each failure
    results: list[tuple[float, str, str, float, str]] = field(default_factory=list)
    retry_delays: list[float | None] = field(default_factory=list)

    def run(self) -> None:
        number = 0
        while not self.stop.is_set():
            number += 1
            cache_id = f"imc-{number:08d}"
            request = api.CreateImageCacheRequest(
                image_cache=pb.ImageCache(images=["nginx:1.25"]), image_cache_id=cache_id
            )
            started = time.monotonic()
            try:
                self.harness.stub.CreateImageCache(request, timeout=DEADLINE_SECONDS)
                code, reason = "OK", ""
            except grpc.RpcError as exc:
                code = exc.code().name
                info = error_info(exc)
                reason = info.reason if info is not None else ""
                self.retry_delays.append(retry_delay(exc))
            self.results.append((started, cache_id, code, time.monotonic() - started, reason))
            time.sleep(0.02)


@pytest.fixture
def harness(private_postgres: PrivatePostgres) -> Iterator[Harness]:
    built = build_harness(private_postgres.url, FakeProvider())
    try:
        yield built
    finally:
        close_harness(built)


def test_a_database_crash_fails_calls_fast_and_retryably_and_loses_nothing(
    harness: Harness, private_postgres: PrivatePostgres
) -> None:
    load = Load(harness)
    thread = threading.Thread(target=load.run, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        private_postgres.stop(mode="immediate")  # a crash: connections cut, no clean shutdown
        down_at = time.monotonic()
        time.sleep(3.0)
        private_postgres.start()
        up_at = time.monotonic()
        deadline = up_at + 15
        while not any(at > up_at and code == "OK" for at, _, code, _, _ in load.results):
            assert time.monotonic() < deadline, "no call succeeded after the database came back"
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        load.stop.set()
        thread.join(timeout=DEADLINE_SECONDS + 5)

    during = [r for r in load.results if down_at + 0.5 < r[0] < up_at - 0.5]
    assert during, "no call was made while the database was down"
    assert {(code, reason) for _, _, code, _, reason in during} == {("UNAVAILABLE", "DATABASE_UNAVAILABLE")}
    assert max(took for _, _, _, took, _ in during) < FAIL_FAST_SECONDS
    assert set(load.retry_delays) == {1.0}  # every refusal says when to try again (RetryInfo)
    codes = {code for _, _, code, _, _ in load.results}
    assert codes <= {"OK", "UNAVAILABLE"}, codes

    answered_ok = {cache_id for _, cache_id, code, _, _ in load.results if code == "OK"}
    stored = {
        cache.name.removeprefix("imageCaches/")
        for cache in harness.stub.ListImageCaches(api.ListImageCachesRequest(page_size=1000)).image_caches
    }
    assert answered_ok <= stored  # nothing answered OK was lost
    # a create that failed UNAVAILABLE may or may not have committed (its answer was lost): a
    # retry with the same id then finds it (ALREADY_EXISTS), which is why clients choose ids
    assert len(answered_ok) >= 20
