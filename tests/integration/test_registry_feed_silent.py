"""A Watch that never answers is dropped and made again (snapcache.registry_feed's `check`).

A Watch made while the registry goes away can be left open with no message and no error. The
follower's consumers call `check` periodically (the matcher's status loop, the operator's feed
check); a call that brought nothing within the live window must be cancelled and made again,
not waited on forever. A real gRPC server here whose Watch answers nothing, ever, until a switch
lets it answer: the follower keeps remaking the call while it is silent, then follows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from snapcache.registry_feed import FeedFollower, FeedSettings
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from tests.support.waiting import eventually


class SilentRegistry(api_grpc.CacheRegistryServiceServicer):
    """An empty registry whose Watch says nothing until ``answer`` is set."""

    def __init__(self) -> None:
        self.watches = 0
        self.answer = threading.Event()
        self.closing = threading.Event()

    def ListImageCaches(
        self, request: api.ListImageCachesRequest, context: Any
    ) -> api.ListImageCachesResponse:
        return api.ListImageCachesResponse(revision=7)

    def WatchImageCaches(
        self, request: api.WatchImageCachesRequest, context: Any
    ) -> Iterator[api.WatchImageCachesResponse]:
        self.watches += 1
        while not self.closing.is_set() and context.is_active():
            if self.answer.is_set():
                yield api.WatchImageCachesResponse(revision=request.start_revision + 1)
            time.sleep(0.02)


class Consumer:
    def __init__(self) -> None:
        self.changes: list[int] = []

    def load(self, pages: Iterator[api.ListImageCachesResponse]) -> None:
        for _ in pages:
            pass

    def apply(self, change: api.WatchImageCachesResponse) -> None:
        self.changes.append(change.revision)

    def recovered(self) -> None:
        pass


def test_a_watch_that_brings_nothing_is_dropped_and_made_again() -> None:
    registry = SilentRegistry()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    api_grpc.add_CacheRegistryServiceServicer_to_server(registry, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    consumer = Consumer()
    follower = FeedFollower(
        channel,
        consumer,
        settings=FeedSettings(live_window_seconds=0.5, backoff_initial_seconds=0.05, backoff_max_seconds=0.1),
    )
    checking = threading.Event()

    def check() -> None:
        while not checking.wait(0.05):
            follower.check()

    checker = threading.Thread(target=check, daemon=True)
    follower.start()
    checker.start()
    try:
        assert follower.wait_loaded(10)
        eventually(lambda: registry.watches >= 3, what="the silent Watch dropped and made again", timeout=10)
        assert consumer.changes == [] and not follower.status().live
        registry.answer.set()  # the registry speaks again: the next call is followed
        eventually(lambda: follower.status().live, what="the feed live once the registry answers", timeout=10)
        assert consumer.changes and consumer.changes[0] == 8
    finally:
        checking.set()
        checker.join(timeout=5)
        follower.stop()
        registry.closing.set()
        channel.close()
        server.stop(0)
