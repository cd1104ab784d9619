"""Admission control: how many calls a server runs at once, and the refusal beyond that bound.

Pure (no grpc): `snapcache.rpc_admission` asks `Admission.try_enter` when a call's handler
starts and calls `leave` when it ends, and answers a refused call with `Admission.refusal`, a
`ResourceExhausted` (reason ``OVERLOADED``) that the one error table turns into
``RESOURCE_EXHAUSTED`` with an ErrorInfo (``limit``) and a RetryInfo.

Why the count is of calls running, not of calls that arrived: a counter raised when a call
arrives and lowered when its handler ends leaks one slot for every call cancelled while it waits
for a worker thread, since such a call's handler never runs. Counting from the handler's start
to its end cannot leak; what waits before a handler starts is bounded by the server (a thread
pool sized so every admitted call has a thread, and grpc's own bound on calls as a hard ceiling).

Why the delay is jittered: clients refused together and told the same delay come back together
and are refused together again; a delay drawn from [0.5, 1.5) times the base spreads them out.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Final

from snapcache import errors

OVERLOADED: Final = "OVERLOADED"
DEFAULT_RETRY_AFTER_SECONDS: Final = 0.2


class Admission:
    """At most ``limit`` calls at once; `refusal` for the others."""

    __slots__ = ("_lock", "_random", "_running", "limit", "refused", "retry_after_seconds")

    def __init__(
        self,
        limit: int,
        *,
        retry_after_seconds: float = DEFAULT_RETRY_AFTER_SECONDS,
        random_fraction: Callable[[], float] = random.random,
    ) -> None:
        if limit < 1:
            raise ValueError(f"an admission limit must be >= 1, not {limit}")
        if retry_after_seconds <= 0:
            raise ValueError("the retry delay of a refused call must be > 0 seconds")
        self.limit = limit
        self.retry_after_seconds = retry_after_seconds
        self.refused = 0
        self._running = 0
        self._lock = threading.Lock()
        self._random = random_fraction

    @property
    def running(self) -> int:
        """Calls admitted and not yet ended."""
        return self._running

    def try_enter(self) -> bool:
        """Take a slot for a call that is starting; False (counted) when all are taken."""
        with self._lock:
            if self._running >= self.limit:
                self.refused += 1
                return False
            self._running += 1
            return True

    def leave(self) -> None:
        """Give back the slot of a call that ended (once per successful `try_enter`)."""
        with self._lock:
            if self._running <= 0:
                raise RuntimeError("admission slot released twice")
            self._running -= 1

    def retry_delay(self) -> float:
        """A jittered delay for a refused caller: [0.5, 1.5) times the base, in seconds."""
        return self.retry_after_seconds * (0.5 + self._random())

    def refusal(self, delay_seconds: float | None = None) -> errors.ResourceExhausted:
        """The error a refused call is answered with (RetryInfo through ``retry_after_seconds``)."""
        delay = self.retry_delay() if delay_seconds is None else delay_seconds
        return errors.ResourceExhausted(
            reason=OVERLOADED,
            message=f"the server is running its limit of {self.limit} calls; retry after {delay:.3f} s",
            metadata={"limit": str(self.limit), "retry_after_seconds": f"{delay:.3f}"},
        )
