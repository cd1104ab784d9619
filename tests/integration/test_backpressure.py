"""Backpressure: a server at its bound of calls in flight refuses new ones at once with the error
table's status (RESOURCE_EXHAUSTED, ErrorInfo OVERLOADED with the limit, RetryInfo with a jittered
delay, the same delay as grpc-retry-pushback-ms), never refuses health or reflection, and frees
every slot of a cancelled call; the project's clients retry reads within their deadline, waiting
as long as the server asked.

Both server models: the registry's thread pool (`create_server`) and the matcher's grpc.aio
(`create_aio_server`). Slots are held by the registry's real watch streams, or by a gated test
servicer of the matcher's API whose calls wait until the test opens the gate.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from services.cache_registry.servicer import SERVICE_NAME, CacheRegistryServicer
from snapcache.admission import Admission
from snapcache.errors import ERROR_DOMAIN
from snapcache.grpc_server import (
    SPARE_WORKERS,
    AioRunningServer,
    RunningServer,
    ServiceBinding,
    create_aio_server,
    create_server,
)
from snapcache.rpc_admission import PUSHBACK_KEY
from snapcache.rpc_errors import error_info, retry_delay
from snapcache.tls import open_channel
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc
from tests.support.registry_harness import Harness

LIMIT = 2
MATCHER_SERVICE = mpb.DESCRIPTOR.services_by_name["MatcherService"].full_name
WAIT_SECONDS = 10.0


@pytest.fixture
def bounded(harness: Harness) -> Iterator[RunningServer]:
    binding = ServiceBinding(
        SERVICE_NAME,
        api_grpc.add_CacheRegistryServiceServicer_to_server,
        CacheRegistryServicer(harness.registry),
    )
    server = create_server("127.0.0.1:0", [binding], max_workers=8, max_concurrent_rpcs=LIMIT)
    try:
        yield server
    finally:
        server.stop(0)


def _hold(channel: grpc.Channel, count: int) -> list[grpc.Future]:  # type: ignore[type-arg]
    """``count`` watch streams, each holding a call slot until cancelled."""
    stub = api_grpc.CacheRegistryServiceStub(channel)
    calls = [stub.WatchImageCaches(api.WatchImageCachesRequest(start_revision=0)) for _ in range(count)]
    time.sleep(0.3)  # the server has taken them
    return calls  # type: ignore[return-value]


def _wait_until(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def assert_overloaded(error: grpc.RpcError, *, limit: int, base_delay: float = 0.2) -> float:
    """The refusal is the error table's: ErrorInfo, RetryInfo, and the same delay as pushback."""
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    info = error_info(error)
    assert info is not None, "a refusal without a google.rpc.Status"
    assert (info.reason, info.domain) == ("OVERLOADED", ERROR_DOMAIN)
    assert info.metadata["limit"] == str(limit)
    delay = retry_delay(error)
    assert delay is not None, "a refusal without RetryInfo"
    assert 0.5 * base_delay - 0.001 <= delay < 1.5 * base_delay + 0.001  # jittered around the base
    trailers = dict(error.trailing_metadata())  # type: ignore[attr-defined]
    assert abs(int(trailers[PUSHBACK_KEY]) - delay * 1000) <= 1
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
    return delay


def test_a_server_at_its_bound_refuses_at_once_and_clients_retry_reads(
    harness: Harness, bounded: RunningServer
) -> None:
    harness.stub.CreateImageCache(
        api.CreateImageCacheRequest(
            image_cache=pb.ImageCache(images=["nginx:1.25"]), image_cache_id="imc-0000b001"
        )
    )
    address = f"127.0.0.1:{bounded.port}"
    holder = grpc.insecure_channel(address)
    held = _hold(holder, LIMIT)
    get = api.GetImageCacheRequest(name="imageCaches/imc-0000b001")
    try:
        # a client without the retry policy sees the refusal at once, not when its deadline runs
        # out in a queue (the bound leaves room for a loaded machine, far below the deadline)
        with grpc.insecure_channel(address) as plain:
            delays = set()
            for _ in range(5):
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as refused:
                    api_grpc.CacheRegistryServiceStub(plain).GetImageCache(get, timeout=20)
                assert time.monotonic() - started < 2.0
                delays.add(assert_overloaded(refused.value, limit=LIMIT))
            assert len(delays) > 1, "every refused caller was told the same delay: no jitter"

        # the project's channel retries the read; a slot frees up meanwhile and the read succeeds
        threading.Timer(0.15, held[0].cancel).start()
        with open_channel(address) as channel:
            found = api_grpc.CacheRegistryServiceStub(channel).GetImageCache(get, timeout=5)
        assert found.name == "imageCaches/imc-0000b001"

        # a write is not retried by the channel (the caller decides): still refused while full
        held.extend(_hold(holder, 1))
        with open_channel(address) as channel, pytest.raises(grpc.RpcError) as write_refused:
            api_grpc.CacheRegistryServiceStub(channel).DeleteImageCache(
                api.DeleteImageCacheRequest(name="imageCaches/imc-0000b001"), timeout=5
            )
        assert_overloaded(write_refused.value, limit=LIMIT)
    finally:
        for call in held:
            call.cancel()
        holder.close()


def test_health_and_reflection_are_never_refused(harness: Harness, bounded: RunningServer) -> None:
    address = f"127.0.0.1:{bounded.port}"
    holder = grpc.insecure_channel(address)
    held = _hold(holder, LIMIT)
    try:
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                api_grpc.CacheRegistryServiceStub(channel).ListImageCaches(
                    api.ListImageCachesRequest(), timeout=5
                )
            assert_overloaded(refused.value, limit=LIMIT)
            for _ in range(3 * LIMIT):
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
                )
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            listed = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            names = {s.name for r in listed for s in r.list_services_response.service}
            assert SERVICE_NAME in names
        assert bounded.admission is not None and bounded.admission.running == LIMIT
    finally:
        for call in held:
            call.cancel()
        holder.close()


def test_retries_stop_at_the_deadline(harness: Harness, bounded: RunningServer) -> None:
    address = f"127.0.0.1:{bounded.port}"
    holder = grpc.insecure_channel(address)
    held = _hold(holder, LIMIT)
    try:
        with open_channel(address) as channel:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as failed:
                api_grpc.CacheRegistryServiceStub(channel).ListImageCaches(
                    api.ListImageCachesRequest(), timeout=0.6
                )
            took = time.monotonic() - started
        code = failed.value.code()  # type: ignore[attr-defined]
        assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert took < 1.5  # retried within the deadline, not beyond it
    finally:
        for call in held:
            call.cancel()
        holder.close()


def test_the_channel_waits_as_long_as_the_server_asks(harness: Harness) -> None:
    """A refusal that asks for 1-3 s is not retried within a 0.5 s deadline (backoff alone would)."""
    binding = ServiceBinding(
        SERVICE_NAME,
        api_grpc.add_CacheRegistryServiceServicer_to_server,
        CacheRegistryServicer(harness.registry),
    )
    server = create_server("127.0.0.1:0", [binding], max_concurrent_rpcs=1, retry_after_seconds=2.0)
    address = f"127.0.0.1:{server.port}"
    holder = grpc.insecure_channel(address)
    held = _hold(holder, 1)
    try:
        assert server.admission is not None and server.admission.running == 1
        with open_channel(address) as channel, pytest.raises(grpc.RpcError) as failed:
            api_grpc.CacheRegistryServiceStub(channel).ListImageCaches(
                api.ListImageCachesRequest(), timeout=0.5
            )
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert server.admission.refused == 1  # one attempt: the retry was due after the deadline
    finally:
        for call in held:
            call.cancel()
        holder.close()
        server.stop(0)


class GatedMatcher(mpb_grpc.MatcherServiceServicer):
    """Matches that wait for the test's gate; counts the calls that reached the servicer."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = 0
        self._lock = threading.Lock()

    def MatchImageCaches(
        self, request: mpb.MatchImageCachesRequest, context: grpc.ServicerContext
    ) -> mpb.MatchImageCachesResponse:
        with self._lock:
            self.entered += 1
        self.gate.wait(WAIT_SECONDS)
        return mpb.MatchImageCachesResponse()


def _blocking_requests(stop: threading.Event) -> Iterator[reflection_pb2.ServerReflectionRequest]:
    stop.wait(WAIT_SECONDS)
    return
    yield  # a generator that sends nothing until ``stop``


def test_calls_cancelled_while_waiting_for_a_thread_leak_no_slot() -> None:
    """The trap of counting arrivals: calls admitted, queued behind a full pool, cancelled there.

    Every thread of the pool is taken while the admission bound still has room (one gated match,
    the other threads by reflection streams, which admission never refuses), so the next calls
    wait in the pool's queue until their deadline cancels them; their handlers never run. A
    counter raised on arrival would keep their slots for good. Afterwards the server takes a
    full load of LIMIT calls again.
    """
    servicer = GatedMatcher()
    binding = ServiceBinding(MATCHER_SERVICE, mpb_grpc.add_MatcherServiceServicer_to_server, servicer)
    server = create_server("127.0.0.1:0", [binding], max_workers=1, max_concurrent_rpcs=LIMIT)
    admission = server.admission
    assert admission is not None
    address = f"127.0.0.1:{server.port}"
    stop_reflection = threading.Event()
    pool = ThreadPoolExecutor(max_workers=16)
    channel = grpc.insecure_channel(address)
    stub = mpb_grpc.MatcherServiceStub(channel)
    request = mpb.MatchImageCachesRequest(images=["nginx"])
    first_gate = servicer.gate
    try:
        gated = [stub.MatchImageCaches.future(request, timeout=WAIT_SECONDS * 2)]
        _wait_until(lambda: servicer.entered == 1, "the gated call to start")
        reflecting = [
            reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                _blocking_requests(stop_reflection)
            )
            for _ in range(SPARE_WORKERS + LIMIT - 1)  # the pool has LIMIT + SPARE_WORKERS threads
        ]
        time.sleep(0.3)  # the reflection streams hold the other threads
        assert admission.running == 1

        # the pool is full, the bound is not: these wait in the queue and are cancelled there
        queued = [stub.MatchImageCaches.future(request, timeout=0.5) for _ in range(LIMIT - 1)]
        for call in queued:
            with pytest.raises(grpc.RpcError) as expired:
                call.result()
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        for call in gated:  # cancelled by the client while running
            call.cancel()
        assert servicer.entered == 1  # the queued calls never reached the servicer

        # let everything end: the gated handlers return, the reflection streams close
        servicer.gate = threading.Event()
        first_gate.set()
        stop_reflection.set()
        for stream in reflecting:
            stream.cancel()
        _wait_until(lambda: admission.running == 0, "every slot to be given back")

        # a full load is admitted again, and the call beyond it is refused with the rich status
        entered = servicer.entered
        again = [pool.submit(stub.MatchImageCaches, request, timeout=WAIT_SECONDS) for _ in range(LIMIT)]
        _wait_until(lambda: servicer.entered == entered + LIMIT, "a full load to be admitted again")
        with pytest.raises(grpc.RpcError) as refused:
            stub.MatchImageCaches(request, timeout=5)
        assert_overloaded(refused.value, limit=LIMIT)
        servicer.gate.set()
        for future in again:
            assert future.result(timeout=WAIT_SECONDS) == mpb.MatchImageCachesResponse()
        _wait_until(lambda: admission.running == 0, "the slots of the second load")
    finally:
        servicer.gate.set()
        first_gate.set()
        stop_reflection.set()
        channel.close()
        pool.shutdown(wait=True)
        server.stop(0)


class AioGatedMatcher(mpb_grpc.MatcherServiceServicer):
    """`GatedMatcher` for grpc.aio: the gate is an asyncio event on the server's loop."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.entered = 0
        self.cancelled = 0

    async def MatchImageCaches(  # type: ignore[override]
        self, request: mpb.MatchImageCachesRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> mpb.MatchImageCachesResponse:
        if self.gate is None:
            self.gate = asyncio.Event()
        self.entered += 1
        try:
            await asyncio.wait_for(self.gate.wait(), WAIT_SECONDS)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return mpb.MatchImageCachesResponse()


def _open_gate(server: AioRunningServer, servicer: AioGatedMatcher) -> None:
    async def open_it() -> None:
        if servicer.gate is not None:
            servicer.gate.set()
        servicer.gate = None  # the next calls wait for a new gate

    asyncio.run_coroutine_threadsafe(open_it(), server.loop).result(timeout=WAIT_SECONDS)


def test_aio_server_refuses_with_retry_information_and_cancelled_calls_leak_no_slot() -> None:
    servicer = AioGatedMatcher()
    binding = ServiceBinding(MATCHER_SERVICE, mpb_grpc.add_MatcherServiceServicer_to_server, servicer)
    server = create_aio_server("127.0.0.1:0", [binding], max_concurrent_rpcs=LIMIT)
    admission = server.admission
    assert isinstance(admission, Admission)
    address = f"127.0.0.1:{server.port}"
    channel = grpc.insecure_channel(address)
    stub = mpb_grpc.MatcherServiceStub(channel)
    request = mpb.MatchImageCachesRequest(images=["nginx"])
    try:
        for _round in range(3):  # load, cancel everything, and again: the same LIMIT every time
            entered = servicer.entered
            held = [stub.MatchImageCaches.future(request, timeout=WAIT_SECONDS * 2) for _ in range(LIMIT)]
            _wait_until(lambda n=entered: servicer.entered == n + LIMIT, "a full load to be admitted")
            # a burst beyond the bound: every call refused at once, with the rich status
            burst = [stub.MatchImageCaches.future(request, timeout=5) for _ in range(20)]
            for call in burst:
                with pytest.raises(grpc.RpcError) as refused:
                    call.result()
                assert_overloaded(refused.value, limit=LIMIT)
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            assert admission.running == LIMIT
            cancelled = servicer.cancelled
            for call in held:
                call.cancel()
            _wait_until(lambda n=cancelled: servicer.cancelled == n + LIMIT, "the server to see the cancels")
            _wait_until(lambda: admission.running == 0, "every slot to be given back")
        # and calls that finish normally give their slots back too
        done = [stub.MatchImageCaches.future(request, timeout=WAIT_SECONDS) for _ in range(LIMIT)]
        _wait_until(lambda: servicer.entered >= 3 * LIMIT + LIMIT, "the last load")
        _open_gate(server, servicer)
        for call in done:
            assert call.result() == mpb.MatchImageCachesResponse()
        assert admission.running == 0
    finally:
        channel.close()
        server.stop(0)
