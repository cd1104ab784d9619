"""The names of ImageCaches to reconcile: de-duplicated, in arrival order, some after a delay.

A name queued again while waiting is still one entry, so a burst of feed changes to one cache
(progress during a build) costs one reconcile of its latest state. A delayed entry (a retry after
backoff) becomes due at its time; queuing the name sooner makes it due now.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Iterable


class WorkQueue:
    """A de-duplicating FIFO of names with delayed entries; thread-safe."""

    def __init__(self, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._ready: dict[str, None] = {}  # insertion-ordered set
        self._delayed: list[tuple[float, str]] = []
        self._condition = threading.Condition()
        self._closed = False

    def add(self, name: str) -> None:
        """Queue ``name`` now (once)."""
        with self._condition:
            self._ready[name] = None
            self._condition.notify()

    def add_all(self, names: Iterable[str]) -> None:
        """Queue every name now."""
        with self._condition:
            for name in names:
                self._ready[name] = None
            self._condition.notify()

    def add_after(self, name: str, delay_seconds: float) -> None:
        """Queue ``name`` once ``delay_seconds`` have passed."""
        if delay_seconds <= 0:
            self.add(name)
            return
        with self._condition:
            heapq.heappush(self._delayed, (self._monotonic() + delay_seconds, name))
            self._condition.notify()

    def get(self, timeout: float) -> str | None:
        """The next due name, waiting up to ``timeout`` seconds; None on timeout or once closed."""
        deadline = self._monotonic() + timeout
        with self._condition:
            while not self._closed:
                now = self._monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    _, name = heapq.heappop(self._delayed)
                    self._ready[name] = None
                if self._ready:
                    name = next(iter(self._ready))
                    del self._ready[name]
                    return name
                wait = deadline - now
                if self._delayed:
                    wait = min(wait, self._delayed[0][0] - now)
                if wait <= 0:
                    return None
                self._condition.wait(wait)
            return None

    def __len__(self) -> int:
        with self._condition:
            return len(self._ready) + len(self._delayed)

    def close(self) -> None:
        """Wake every waiter; `get` answers None from now on."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
