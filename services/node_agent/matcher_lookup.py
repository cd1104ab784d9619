"""The matcher over gRPC: which cache a pod bound to this node should use in the node's zone.

One ``MatchImageCaches`` per opted-in pod (``pod_disks`` remembers the answer), with the pod's
images, its manual cache id, its namespace and pull secrets, the node's zone, and
``validate_only`` off: this is the use the match counts are for. Any failure (matcher down,
slow, an error status) fails open: the pod pulls through the mirror as if it used no cache, and
is asked about again later.
"""

from __future__ import annotations

import logging

import grpc

from services.node_agent.pod_disks import Lookup
from snapcache.cache_names import parse_cache_name
from snapcache.errors import InvalidArgument
from snapcache.pod_requests import PodRequest
from snapcache.tls import PLAINTEXT_CHANNEL, ClientSecurity, open_channel
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc

log = logging.getLogger(__name__)

_ACTIONS = mpb.MatchImageCachesResponse.Action
_DECISIONS = mpb.MatchImageCachesResponse.Decision


class MatcherLookup:
    """Asks ``snapcache.v1.MatcherService/MatchImageCaches`` within a deadline."""

    def __init__(
        self, target: str, *, security: ClientSecurity = PLAINTEXT_CHANNEL, timeout_seconds: float = 5.0
    ) -> None:
        self._channel = open_channel(
            target,
            security,
            options=[
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 5000),
            ],
            retried_codes=("RESOURCE_EXHAUSTED",),
        )
        self._stub = mpb_grpc.MatcherServiceStub(self._channel)
        self._timeout = timeout_seconds

    def lookup(self, request: PodRequest, *, zone: str) -> Lookup:
        """The cache to provision for this pod in ``zone``, or none; never raises."""
        query = mpb.MatchImageCachesRequest(
            images=request.images,
            image_cache=request.manual_id,
            strict=request.strict,
            zones=[zone] if zone else [],
            validate_only=False,
            # who the pod is, so a cache holding private images is given only to pods that may
            # pull them themselves (docs/security.md)
            namespace=request.namespace,
            image_pull_secrets=request.image_pull_secrets,
        )
        try:
            answer = self._stub.MatchImageCaches(query, timeout=self._timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            name = code.name if code is not None else "UNKNOWN"
            log.warning("matcher call failed (%s); the pod pulls, asked again later", name)
            return Lookup(known=False, why=f"matcher call failed: {name}")
        decision = _DECISIONS.Name(answer.decision)
        if answer.action != _ACTIONS.Value("USE_CACHE") or not answer.image_cache:
            return Lookup(why=f"{decision}: {answer.message}", decision=decision)
        try:
            cache_id = parse_cache_name(answer.image_cache, field="image_cache")
        except InvalidArgument:
            log.warning("the matcher answered an unreadable cache name %r", answer.image_cache)
            return Lookup(why=f"unreadable cache name {answer.image_cache!r}", decision=decision)
        return Lookup(cache_id=cache_id, why=decision, decision=decision)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()
