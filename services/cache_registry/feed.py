"""Wake-ups for watchers and the worker after commits.

A condition variable tells waiters in this process that something was committed; waiters still
re-read the database (the source of truth), and wake on a timeout too, so a change committed by
another replica on the same database is seen within `poll_seconds` even without a wake-up.
"""

from __future__ import annotations

import threading


class CommitSignal:
    """A level-triggered 'something changed' signal with a generation counter."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._generation = 0
        self._closed = False

    @property
    def generation(self) -> int:
        """Increases at every `notify`."""
        return self._generation

    @property
    def closed(self) -> bool:
        """True once the server is shutting down."""
        return self._closed

    def notify(self) -> None:
        """Wake every waiter."""
        with self._condition:
            self._generation += 1
            self._condition.notify_all()

    def wait(self, *, seen: int, timeout: float) -> int:
        """Block until the generation passes ``seen``, a close, or the timeout; return the generation."""
        with self._condition:
            self._condition.wait_for(lambda: self._generation != seen or self._closed, timeout=timeout)
            return self._generation

    def close(self) -> None:
        """Release every waiter for good (server shutdown)."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
