"""Per-pod memory: the filter's matcher answer reused by prioritize, and which pods were counted.

The scheduler calls filter then prioritize for the same pod within one cycle; asking the matcher
twice would double the extender's share of every pod's scheduling time. Answers are kept by pod
UID for a short TTL (a few seconds: long enough for one cycle, short enough that the next cycle
sees new caches). A pod retried over many cycles is counted as a hit once: the first match of a
UID records the hit, later ones are previews (`validate_only`).

Expired answers are dropped as new ones come in, not kept until the bound pushes them out: each
answer is a handful of objects the cyclic collector tracks, and a cache that only ever filled up
(10,000 answers, every pod a new UID) kept the collector busy: the young generation filled with
survivors, so collections ran during requests, and a full one walked every kept answer (15 ms to
55 ms at 8,000 answers, on the request that triggered it; bench/extender.py counts them). Dropped
as they expire, the cache holds the last TTL's pods only, and as many answers leave as arrive.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from services.extender.matches import MatchAnswer

T = TypeVar("T")


class DecisionCache:
    """A bounded, thread-safe TTL map pod UID -> answer, and a bounded set of counted UIDs."""

    def __init__(
        self,
        *,
        ttl_seconds: float = 5.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._answers: OrderedDict[str, tuple[float, MatchAnswer]] = OrderedDict()
        self._counted: OrderedDict[str, None] = OrderedDict()

    def get(self, uid: str) -> MatchAnswer | None:
        """The answer kept for ``uid`` if it is still fresh."""
        with self._lock:
            entry = self._answers.get(uid)
            if entry is None:
                return None
            if entry[0] < self._clock():
                del self._answers[uid]
                return None
            return entry[1]

    def put(self, uid: str, answer: MatchAnswer) -> None:
        """Keep ``answer`` for ``uid`` for the TTL; answers expired by now are dropped."""
        with self._lock:
            now = self._clock()
            self._answers[uid] = (now + self._ttl, answer)
            self._answers.move_to_end(uid)
            # Oldest first (every put moves its entry to the end with the same TTL), so the
            # expired ones are at the front: amortised one check per put.
            answers = self._answers
            while answers and (len(answers) > self._max or next(iter(answers.values()))[0] < now):
                answers.popitem(last=False)

    def __len__(self) -> int:
        """Answers kept (expired ones included until the next `put`)."""
        with self._lock:
            return len(self._answers)

    def first_match(self, uid: str) -> bool:
        """True if no match of ``uid`` was counted yet (the caller then records a hit)."""
        with self._lock:
            return uid not in self._counted

    def counted(self, uid: str) -> None:
        """Remember that a hit was recorded for ``uid``."""
        with self._lock:
            self._counted[uid] = None
            while len(self._counted) > self._max * 10:
                self._counted.popitem(last=False)


class RecentPlacements(Generic[T]):
    """The node names of the last few filter calls, placed in zones, for their prioritize calls.

    In a scheduling cycle the scheduler sends prioritize the nodes that passed filter: for a pod
    that is not strict, the very list the filter call had. Keyed by pod UID and that list's text,
    so a prioritize call that sends anything else places its own names. Scheduling is serial, so a
    handful of entries is plenty; each holds one request's names, so they are few.
    """

    def __init__(self, *, max_entries: int = 8) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[bytes, T]] = OrderedDict()

    def get(self, uid: str, key: bytes | memoryview) -> T | None:
        """What was kept for ``uid`` if its names' text was ``key``."""
        with self._lock:
            entry = self._entries.get(uid)
        # bytes against bytes is a memcmp; a memoryview compares item by item (70 times slower)
        if entry is None or len(entry[0]) != len(key) or entry[0] != bytes(key):
            return None
        return entry[1]

    def put(self, uid: str, key: bytes | memoryview, value: T) -> None:
        """Keep ``value`` for ``uid``'s names ``key``."""
        kept = bytes(key)
        with self._lock:
            self._entries[uid] = (kept, value)
            self._entries.move_to_end(uid)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
