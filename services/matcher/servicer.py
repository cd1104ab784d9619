"""The matcher's gRPC edge: request -> core -> response, nothing more.

Coroutines served by grpc.aio (see `snapcache.grpc_server` for why), yet they never await: a
match is pure CPU work of tens of microseconds with bounded search budgets, so running it on the
loop is cheaper than handing it to a thread. The index lock is only ever held for one feed
change or one swap, so taking it here does not stall the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc

from services.matcher.answering import answer_match
from services.matcher.hits import HitReporter
from services.matcher.index_sync import IndexSync
from services.matcher.match_requests import build_request
from services.matcher.messages import match_response
from services.matcher.metrics import MatcherMetrics
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc

SERVICE_NAME = mpb.DESCRIPTOR.services_by_name["MatcherService"].full_name


class MatcherServicer(mpb_grpc.MatcherServiceServicer):
    """MatchImageCaches and GetIndexStatus over the synced index."""

    def __init__(
        self,
        *,
        sync: IndexSync,
        hits: HitReporter,
        metrics: MatcherMetrics,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._sync = sync
        self._hits = hits
        self._metrics = metrics
        self._clock_ns = clock_ns

    async def MatchImageCaches(
        self, request: mpb.MatchImageCachesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mpb.MatchImageCachesResponse:
        match_request = build_request(
            images=request.images,
            image_cache=request.image_cache,
            policy=request.policy,
            min_images_covered=request.min_images_covered,
            strict=request.strict,
            zones=request.zones,
            max_candidates=request.max_candidates,
            max_rejections=request.max_rejections,
            namespace=request.namespace,
            image_pull_secrets=request.image_pull_secrets,
        )
        answered = answer_match(
            match_request,
            sync=self._sync,
            hits=self._hits,
            metrics=self._metrics,
            validate_only=request.validate_only,
            now_ns=self._clock_ns(),
        )
        response = match_response(
            answered.outcome,
            match_request,
            revision=answered.revision,
            staleness_seconds=answered.staleness_seconds,
        )
        return response

    async def GetIndexStatus(
        self, request: mpb.GetIndexStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mpb.IndexStatus:
        status = self._sync.status()
        answer = mpb.IndexStatus(
            loaded=status.loaded,
            live=status.live,
            cache_count=status.cache_count,
            ready_count=status.ready_count,
            revision=status.revision,
            full_syncs=status.full_syncs,
            last_error=status.last_error,
        )
        answer.staleness.FromNanoseconds(int(status.staleness_seconds * 1e9))
        if status.last_full_sync_time:
            answer.last_full_sync_time.FromNanoseconds(int(status.last_full_sync_time * 1e9))
        return answer
