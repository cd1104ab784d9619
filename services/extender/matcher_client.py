"""The matcher over gRPC, within a deadline budget; down or slow becomes an UNKNOWN answer.

The scheduler waits for the extender on every pod (scheduling is serial), and gives up after its
`httpTimeout`. The matcher call gets a budget well under that, and any failure (connection
refused, deadline exceeded, an error status) fails open: the pod is scheduled as if it used no
cache, and the fail-open counter says how often.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from services.extender.matches import Candidate, MatchAnswer, MatchQuery
from snapcache.tls import PLAINTEXT_CHANNEL, ClientSecurity, open_channel
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc

log = logging.getLogger(__name__)

_DECISIONS = mpb.MatchImageCachesResponse.Decision
_ACTIONS = mpb.MatchImageCachesResponse.Action


class MatcherClient:
    """Asks `snapcache.v1.MatcherService/MatchImageCaches` with a deadline."""

    def __init__(
        self,
        target: str,
        *,
        budget_seconds: float,
        on_fail_open: Callable[[str], None] = lambda _code: None,
        security: ClientSecurity = PLAINTEXT_CHANNEL,
    ) -> None:
        # Reconnect soon after a matcher restart: gRPC's default backoff grows to two minutes,
        # all of it failing open.
        self._channel = open_channel(
            target,
            security,
            options=[
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
            # Only an overloaded matcher is worth a retry within the scheduler's wait: it says
            # when (pushback), and the next attempt usually gets through. A matcher that is down
            # or still loading (UNAVAILABLE) fails open at once rather than holding every pod for
            # the whole budget.
            retried_codes=("RESOURCE_EXHAUSTED",),
        )
        self._stub = mpb_grpc.MatcherServiceStub(self._channel)
        self._budget = budget_seconds
        self._on_fail_open = on_fail_open

    def match(self, query: MatchQuery) -> MatchAnswer:
        """The matcher's answer, or `MatchAnswer.unknown` when it cannot answer in time."""
        try:
            response = self._stub.MatchImageCaches(match_request(query), timeout=self._budget)
        except grpc.RpcError as exc:
            return self._failed(exc)
        return answer_from_proto(response)

    def _failed(self, error: grpc.RpcError) -> MatchAnswer:
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        name = code.name if code is not None else "UNKNOWN"
        self._on_fail_open(name)
        log.warning("matcher call failed (%s); failing open", name)
        return MatchAnswer.unknown(f"matcher call failed: {name}")

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()


def match_request(query: MatchQuery) -> mpb.MatchImageCachesRequest:
    """The one place a query becomes the matcher's request."""
    return mpb.MatchImageCachesRequest(
        images=query.images,
        image_cache=query.manual_id,
        strict=query.strict,
        zones=query.zones,
        validate_only=query.validate_only,
        namespace=query.namespace,
        image_pull_secrets=query.image_pull_secrets,
    )


def answer_from_proto(response: mpb.MatchImageCachesResponse) -> MatchAnswer:
    """The proto answer as domain values."""
    return MatchAnswer(
        decision=_DECISIONS.Name(response.decision),
        action=_ACTIONS.Name(response.action),
        image_cache=response.image_cache,
        message=response.message,
        candidates=tuple(
            Candidate(
                image_cache=c.image_cache,
                rank=c.rank or position + 1,
                available_zones=frozenset(c.available_zones),
                hydrating_zones=frozenset(c.hydrating_zones),
            )
            for position, c in enumerate(response.candidates)
        ),
    )
