"""Backpressure: a server at its bound of calls in flight refuses new ones at once, and the
project's clients retry reads with jittered backoff within their deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from services.cache_registry.servicer import SERVICE_NAME, CacheRegistryServicer
from snapcache.grpc_server import RunningServer, ServiceBinding, create_server
from snapcache.tls import open_channel
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from tests.support.registry_harness import Harness

LIMIT = 2


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
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                api_grpc.CacheRegistryServiceStub(plain).GetImageCache(get, timeout=20)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert time.monotonic() - started < 2.0

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
        assert write_refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
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
