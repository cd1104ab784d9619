"""The latest version of every CR-born cache, as the registry's feed and the operator's own calls report it.

Two writers: the feed follower (in revision order) and the reconciler, which records what a
Create, Update or Delete answered so that its next decision does not wait for the feed to echo
it. A version older than the one held is ignored, and a deletion leaves a tombstone at its
revision, so a late echo can never bring back a cache that is gone or roll one back. A full
resync replaces everything, tombstones included.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from services.operator.model import CacheView


class CacheBook:
    """Thread-safe map: cache id -> latest `CacheView` (only caches made for an ImageCache)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._caches: dict[str, CacheView] = {}
        self._gone: dict[str, int] = {}  # cache id -> revision of its deletion

    def get(self, cache_id: str) -> CacheView | None:
        """The latest version known, or None if the registry has no such cache (as far as known)."""
        with self._lock:
            return self._caches.get(cache_id)

    def put(self, cache: CacheView) -> bool:
        """Record a version unless a newer one (or a newer deletion) is known; True if recorded."""
        with self._lock:
            held = self._caches.get(cache.cache_id)
            if held is not None and held.revision > cache.revision:
                return False
            if self._gone.get(cache.cache_id, -1) >= cache.revision:
                return False
            self._caches[cache.cache_id] = cache
            self._gone.pop(cache.cache_id, None)
            return True

    def remove(self, cache_id: str, *, revision: int) -> CacheView | None:
        """Record a deletion at ``revision``; return the version it removed."""
        with self._lock:
            held = self._caches.get(cache_id)
            if held is not None and held.revision > revision:
                return None
            self._gone[cache_id] = max(revision, self._gone.get(cache_id, -1))
            return self._caches.pop(cache_id, None)

    def replace_all(self, caches: Iterable[CacheView]) -> set[str]:
        """Swap in a full listing; return the ids that were held and are gone now."""
        fresh = {c.cache_id: c for c in caches}
        with self._lock:
            gone = set(self._caches) - set(fresh)
            self._caches = fresh
            self._gone = {}
        return gone

    def __len__(self) -> int:
        with self._lock:
            return len(self._caches)
