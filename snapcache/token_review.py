"""Kubernetes ServiceAccount tokens as gRPC bearer tokens, checked by the TokenReview API.

In a cluster, a workload proves who it is with its ServiceAccount token; the apiserver, which
signed it, is the one to say whether it is still valid (not expired, its ServiceAccount or pod
not deleted). `TokenReviewer` asks it (``authentication.k8s.io/v1`` ``TokenReview``, which needs
``create tokenreviews``: deploy/base/registry/rbac.yaml) and `snapcache.access` maps the answer's
user name and groups to a role through the identity file.

Accepted tokens are remembered for a short, bounded time (``cache_seconds``, at most
``max_cached`` tokens, least recently used dropped first), keyed by the token's SHA-256 so no
token is kept: a busy caller costs one review per period, and a revoked token keeps working for
at most that long. Refusals and failures are never remembered: a bogus token is asked about
again, and an apiserver that failed once is asked again at the next call. An apiserver that
cannot answer (no connection, a timeout, 5xx, 429, or refusing the review itself: our own RBAC)
is ``UNAVAILABLE`` with a retry delay, not a refusal of the caller.

The token is sent only in the review's body and never logged; the client's exceptions, whose
text may quote the response (which echoes the token), are not chained into our errors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Final

import urllib3
from kubernetes import client as kube_client
from kubernetes.client.exceptions import ApiException

from snapcache import errors
from snapcache.access import KubeIdentity, token_digest

log = logging.getLogger(__name__)

DEFAULT_CACHE_SECONDS: Final = 10.0
DEFAULT_MAX_CACHED: Final = 10_000
DEFAULT_TIMEOUT_SECONDS: Final = 5.0
_RETRY_AFTER_SECONDS: Final = "1"


def _unavailable(why: str) -> errors.Unavailable:
    return errors.Unavailable(
        reason="TOKEN_REVIEW_UNAVAILABLE",
        message="the Kubernetes API could not check the bearer token; retry later",
        metadata={"retry_after_seconds": _RETRY_AFTER_SECONDS, "cause": why},
    )


class TokenReviewer:
    """Checks bearer tokens with the Kubernetes TokenReview API; remembers accepted ones briefly."""

    def __init__(
        self,
        api_client: kube_client.ApiClient,
        *,
        audiences: Sequence[str] = (),
        cache_seconds: float = DEFAULT_CACHE_SECONDS,
        max_cached: int = DEFAULT_MAX_CACHED,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cache_seconds < 0 or max_cached < 0:
            raise ValueError("the token review cache's period and size must not be negative")
        self._api = kube_client.AuthenticationV1Api(api_client)
        self._audiences = list(audiences)
        self._cache_seconds = cache_seconds
        self._max_cached = max_cached
        self._timeout = timeout_seconds
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, KubeIdentity]] = OrderedDict()
        self._lock = threading.Lock()
        self.reviews = 0  # calls to the API, for tests and the curious

    def cached(self, token: str) -> KubeIdentity | None:
        """The identity of a token accepted less than ``cache_seconds`` ago, if any."""
        if not self._max_cached or not self._cache_seconds:
            return None
        digest = token_digest(token)
        with self._lock:
            entry = self._cache.get(digest)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._cache[digest]
                return None
            self._cache.move_to_end(digest)
            return entry[1]

    def review(self, token: str) -> KubeIdentity | None:
        """Ask the API: the token's identity, or None if it does not accept it; `errors.Unavailable`."""
        identity = self._ask(token)
        if identity is not None and self._max_cached and self._cache_seconds:
            with self._lock:
                self._cache[token_digest(token)] = (self._clock() + self._cache_seconds, identity)
                self._cache.move_to_end(token_digest(token))
                while len(self._cache) > self._max_cached:
                    self._cache.popitem(last=False)
        return identity

    def _ask(self, token: str) -> KubeIdentity | None:
        spec = kube_client.V1TokenReviewSpec(token=token, audiences=self._audiences or None)
        self.reviews += 1
        failure = ""
        try:
            answer = self._api.create_token_review(
                kube_client.V1TokenReview(spec=spec), _request_timeout=self._timeout
            )
        except ApiException as exc:
            failure = f"HTTP {exc.status}"
            if exc.status in (401, 403):
                failure += ": this server may not create tokenreviews (its RBAC or credentials)"
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            failure = f"no answer ({type(exc).__name__})"
        if failure:  # raised outside the except blocks: no chain carries the client's text
            log.warning("TokenReview failed: %s", failure)
            raise _unavailable(failure)
        status = answer.status
        if status is None or not status.authenticated or status.user is None or not status.user.username:
            log.info(
                "TokenReview: token not accepted%s", f" ({status.error})" if status and status.error else ""
            )
            return None
        if self._audiences and not set(self._audiences) & set(status.audiences or ()):
            log.debug("TokenReview: token accepted for other audiences only")
            return None
        return KubeIdentity(username=status.user.username, groups=tuple(status.user.groups or ()))
