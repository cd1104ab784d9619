"""Wakes this replica when another registry replica commits a change (PostgreSQL LISTEN/NOTIFY).

Every transaction that advances the change feed queues a NOTIFY (`store.next_revision`);
PostgreSQL delivers it to every listening session when the transaction commits. A listener
thread per replica holds one connection in LISTEN and turns each notification into a
`CommitSignal.notify`, so watchers and the worker re-read the database at once instead of at
their next poll. Commits made in this process wake the signal directly as before; the listener
only adds the other replicas'. Notifications carry nothing: the database stays the source of
truth, and a lost notification (the listener reconnecting) costs at most one poll interval,
which is why watchers keep polling as a safety net.

SQLite has a single writer process: nothing to listen to.
"""

from __future__ import annotations

import logging
import random
import threading

import psycopg
from sqlalchemy.engine import Engine

from services.cache_registry.feed import CommitSignal
from services.cache_registry.store import COMMIT_CHANNEL

log = logging.getLogger(__name__)

_JITTER = random.Random()


class CommitListener:
    """LISTEN on the commit channel in a thread; every notification wakes ``signal``."""

    def __init__(
        self,
        engine: Engine,
        signal: CommitSignal,
        *,
        backoff_initial_seconds: float = 0.2,
        backoff_max_seconds: float = 5.0,
    ) -> None:
        # libpq's own URL form of the engine's, password included (rendered, not logged)
        self._dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._signal = signal
        self._backoff_initial = backoff_initial_seconds
        self._backoff_max = backoff_max_seconds
        self._stopping = threading.Event()
        self._listening = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start listening in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="registry-commit-listener", daemon=True)
        self._thread.start()

    def wait_listening(self, timeout: float) -> bool:
        """Block until the LISTEN is in place (or ``timeout``); True if it is."""
        return self._listening.wait(timeout)

    def stop(self) -> None:
        """Stop listening and close the connection."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = self._backoff_initial
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=5) as connection:
                    connection.execute(f"LISTEN {COMMIT_CHANNEL}")
                    self._listening.set()
                    backoff = self._backoff_initial
                    # A notification may have been missed while (re)connecting: wake once.
                    self._signal.notify()
                    while not self._stopping.is_set():
                        for _ in connection.notifies(timeout=0.5):
                            self._signal.notify()
            except psycopg.Error as exc:
                self._listening.clear()
                if self._stopping.is_set():
                    return
                log.warning(
                    "commit listener lost PostgreSQL (%s); other replicas' changes are seen by polling "
                    "until it reconnects in %.1fs",
                    type(exc).__name__,
                    backoff,
                )
                self._stopping.wait(backoff * _JITTER.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self._backoff_max)
        self._listening.clear()
