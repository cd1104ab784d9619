"""The extender's matcher in its own process: a function call instead of a gRPC round trip.

Why: kube-scheduler waits for the extender on every pod, and with Python gRPC on both ends the
matcher's round trip alone costs about three times an empty HTTP answer (bench/extender.py), so
an annotated prioritize could not come within three times the empty handler over the wire. The
matcher keeps no state of its own (each replica follows the registry's feed into its own
index), so every extender replica can run one beside it and ask it directly.

The wings never import each other; this adapter sits on the roof, where both are visible. It
answers exactly as the matcher's servicer does, through the same `answer_match` (same index
read under the same lock, same hit recorded for non-``validate_only`` calls, same metrics), and
the outcome reaches the extender through the same proto conversion the gRPC client uses, so a
pod gets the same answer either way. Fail-open stays: before the index is loaded (and on any
error the servicer would answer with a status) the extender gets the UNKNOWN answer the gRPC
client gives for that status code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from services.extender.matcher_client import answer_from_proto
from services.extender.matches import MatchAnswer, MatchQuery
from services.matcher.answering import answer_match
from services.matcher.match_requests import build_request
from services.matcher.messages import match_response
from services.matcher.server import MatcherApp
from snapcache.errors import SnapcacheError
from snapcache.rpc_errors import code_for

log = logging.getLogger(__name__)


class ColocatedMatcher:
    """The extender's `Matcher` answered from a `MatcherApp` of the same process."""

    def __init__(
        self,
        app: MatcherApp,
        *,
        on_fail_open: Callable[[str], None] = lambda _code: None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._app = app
        self._on_fail_open = on_fail_open
        self._clock_ns = clock_ns

    def match(self, query: MatchQuery) -> MatchAnswer:
        """The matcher's answer, or `MatchAnswer.unknown` as the gRPC client would give it."""
        try:
            request = build_request(
                images=query.images,
                image_cache=query.manual_id,
                strict=query.strict,
                zones=query.zones,
                namespace=query.namespace,
                image_pull_secrets=query.image_pull_secrets,
            )
            answered = answer_match(
                request,
                sync=self._app.sync,
                hits=self._app.hits,
                metrics=self._app.metrics,
                validate_only=query.validate_only,
                now_ns=self._clock_ns(),
            )
        except SnapcacheError as exc:  # what the servicer answers as a status: INDEX_NOT_LOADED...
            return self._failed(code_for(exc).name)
        except Exception:  # the servicer's INTERNAL: logged, and the pod still schedules
            log.exception("co-located matcher failed")
            return self._failed("INTERNAL")
        response = match_response(
            answered.outcome,
            request,
            revision=answered.revision,
            staleness_seconds=answered.staleness_seconds,
        )
        return answer_from_proto(response)

    def _failed(self, code: str) -> MatchAnswer:
        self._on_fail_open(code)
        log.warning("matcher call failed (%s); failing open", code)
        return MatchAnswer.unknown(f"matcher call failed: {code}")

    def close(self) -> None:
        """Nothing to release: the matcher is stopped as a component of its own."""
