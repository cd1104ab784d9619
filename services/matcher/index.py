"""The matcher's in-memory index of image caches: what each cache holds and where it can be used.

Pure data, no transport. Each image a cache holds is filed under *match keys*: its normalized
name with its tag (`docker.io/library/nginx:1.25`) and with each digest it was recorded under
(`docker.io/library/nginx@sha256:...`, manifest and index). A pod image has exactly one key
(its digest if it pins one, else its tag), so "does this cache hold that image" is one dict
lookup, and "which caches hold it" is one posting list.

A posting is a set of cache entries (hashed by identity), so "the caches holding every image of
the pod" is one C-level set intersection, rarest first, whatever the size of the common
images' postings. Images are pooled: 100,000 caches drawn from 20,000 images share one copy of
each image and its strings.
"""

from __future__ import annotations

import bisect
import enum
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from snapcache.images import ImageReference, parse_image_reference


class CacheState(enum.Enum):
    """A cache's lifecycle state, as the registry reports it."""

    UNSPECIFIED = 0
    CREATING = 1
    READY = 2
    UPDATING = 3
    FAILED = 4
    UPDATE_FAILED = 5
    DELETING = 6
    EXPIRED = 7


@dataclass(frozen=True, slots=True, weakref_slot=True)  # weak: the pool forgets unused images
class HeldImage:
    """An image as a cache's last build recorded it."""

    normalized: str  # as recorded: `docker.io/library/nginx:1.25` (or `name@digest`)
    name: str  # `docker.io/library/nginx`
    tag: str  # "" when the cache was built from a digest only
    manifest_digest: str
    index_digest: str
    compressed_bytes: int
    uncompressed_bytes: int

    def match_keys(self) -> tuple[str, ...]:
        """Every match key this image answers to."""
        found = []
        if self.tag:
            found.append(f"{self.name}:{self.tag}")
        for digest in (self.manifest_digest, self.index_digest):
            if digest:
                found.append(f"{self.name}@{digest}")
        return tuple(dict.fromkeys(found))


@dataclass(frozen=True, slots=True, eq=False)  # hashed by identity: postings are sets
class CacheEntry:
    """What the matcher knows of one cache."""

    name: str  # `imageCaches/imc-...`
    display_name: str
    state: CacheState
    cache_size_gib: int
    create_time_ns: int
    expire_time_ns: int  # 0: never expires
    revision: int  # registry revision of this version
    images: tuple[HeldImage, ...]
    available_zones: tuple[str, ...]  # sorted
    hydrating_zones: tuple[str, ...]  # sorted
    # match key -> the held image answering to it; built once per version
    by_key: dict[str, HeldImage] = field(init=False, repr=False, compare=False)
    # TKE's order: smaller cache first, then newer, then name (for a total order)
    exact_order: tuple[int, int, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_key: dict[str, HeldImage] = {}
        for image in self.images:
            for key in image.match_keys():
                by_key.setdefault(key, image)
        object.__setattr__(self, "by_key", by_key)
        object.__setattr__(self, "exact_order", (self.cache_size_gib, -self.create_time_ns, self.name))

    def expired(self, now_ns: int) -> bool:
        """True once the expire time has passed (even before the registry marks it EXPIRED)."""
        return self.expire_time_ns != 0 and now_ns >= self.expire_time_ns


def _exact_order(entry: CacheEntry) -> tuple[int, int, str]:
    return entry.exact_order


class Posting(set["CacheEntry"]):
    """The caches holding one match key: a set (for intersections) and a list in TKE's order.

    The order (smaller cache, newer, name) lets EXACT take the best caches holding a common image
    from the front instead of sorting thousands per request; `max_bytes` bounds the key's bytes
    over the entries for the partial policies' early stop (never lowered on removal, so it stays
    a valid bound).
    """

    __slots__ = ("max_bytes", "ordered")

    def __init__(self) -> None:
        super().__init__()
        self.max_bytes = 0
        self.ordered: list[CacheEntry] = []

    def file(self, entry: CacheEntry, compressed_bytes: int) -> None:
        """Add ``entry`` at its place in the order."""
        self.add(entry)
        bisect.insort(self.ordered, entry, key=_exact_order)
        self.max_bytes = max(self.max_bytes, compressed_bytes)

    def unfile(self, entry: CacheEntry) -> None:
        """Take ``entry`` out."""
        self.discard(entry)
        at = bisect.bisect_left(self.ordered, entry.exact_order, key=_exact_order)
        if at < len(self.ordered) and self.ordered[at] is entry:
            del self.ordered[at]


EMPTY_POSTING = Posting()


@lru_cache(maxsize=65536)
def _parse_recorded(normalized: str) -> ImageReference:
    # Recorded references repeat across caches (a few base images are everywhere), so the
    # grammar runs once per distinct reference, not once per cache.
    return parse_image_reference(normalized)


class ImagePool:
    """Interns held images, so caches sharing an image share one object and its strings.

    Weak: an image no cache holds any more is dropped, so a long-lived matcher following a
    registry with churn does not keep every image it ever saw.
    """

    def __init__(self) -> None:
        self._images: weakref.WeakValueDictionary[tuple[str, str, str, int, int], HeldImage] = (
            weakref.WeakValueDictionary()
        )

    def held_image(
        self,
        *,
        normalized: str,
        manifest_digest: str,
        index_digest: str,
        compressed_bytes: int,
        uncompressed_bytes: int,
    ) -> HeldImage:
        """The pooled image with these facts; parses ``normalized`` with the shared grammar."""
        key = (normalized, manifest_digest, index_digest, compressed_bytes, uncompressed_bytes)
        found = self._images.get(key)
        if found is None:
            ref = _parse_recorded(normalized)
            found = HeldImage(
                normalized=str(ref),
                name=ref.name,
                tag=ref.tag,
                manifest_digest=manifest_digest or ref.digest,
                index_digest=index_digest,
                compressed_bytes=compressed_bytes,
                uncompressed_bytes=uncompressed_bytes,
            )
            self._images[key] = found
        return found

    def __len__(self) -> int:
        return len(self._images)


class CacheIndex:
    """Every cache the registry has, filed by match key. Not thread-safe: the owner locks."""

    def __init__(self, pool: ImagePool | None = None) -> None:
        self.pool = pool or ImagePool()
        self._entries: dict[str, CacheEntry] = {}
        self._postings: dict[str, Posting] = {}
        self.revision = 0
        self.ready_count = 0

    def get(self, name: str) -> CacheEntry | None:
        """The cache called ``name``, if the index has it."""
        return self._entries.get(name)

    def posting(self, key: str) -> Posting:
        """The caches holding match key ``key`` (an empty posting if none)."""
        return self._postings.get(key, EMPTY_POSTING)

    def entries(self) -> Iterable[CacheEntry]:
        """Every cache, in no particular order."""
        return self._entries.values()

    def __len__(self) -> int:
        return len(self._entries)

    def upsert(self, entry: CacheEntry) -> bool:
        """Add or replace a cache; ignore a version older than the one held. True if applied."""
        old = self._entries.get(entry.name)
        if old is not None:
            if old.revision > entry.revision:
                return False
            self._unfile(old)
        self._entries[entry.name] = entry
        self._file(entry)
        self.revision = max(self.revision, entry.revision)
        return True

    def delete(self, name: str, *, revision: int) -> bool:
        """Remove a cache deleted at ``revision``; ignore it if a newer version is held."""
        old = self._entries.get(name)
        self.revision = max(self.revision, revision)
        if old is None or old.revision > revision:
            return False
        self._unfile(old)
        del self._entries[name]
        return True

    def advance(self, revision: int) -> None:
        """The feed reached ``revision`` with nothing else to apply."""
        self.revision = max(self.revision, revision)

    def _file(self, entry: CacheEntry) -> None:
        if entry.state is CacheState.READY:
            self.ready_count += 1
        for key, image in entry.by_key.items():
            posting = self._postings.get(key)
            if posting is None:
                posting = self._postings[key] = Posting()
            posting.file(entry, image.compressed_bytes)

    def _unfile(self, entry: CacheEntry) -> None:
        if entry.state is CacheState.READY:
            self.ready_count -= 1
        for key in entry.by_key:
            posting = self._postings.get(key)
            if posting is None:
                continue
            posting.unfile(entry)
            if not posting:
                del self._postings[key]


def build_index(entries: Iterable[CacheEntry], *, revision: int, pool: ImagePool) -> CacheIndex:
    """A fresh index of ``entries`` as of ``revision`` (a full load or a resync).

    Filed in bulk and each posting sorted once: inserting 100,000 caches one by one would move
    each common image's ordered list once per cache.
    """
    index = CacheIndex(pool)
    for entry in entries:
        old = index._entries.get(entry.name)
        if old is not None and old.revision > entry.revision:
            continue
        index._entries[entry.name] = entry
    postings: dict[str, Posting] = {}
    for entry in index._entries.values():
        if entry.state is CacheState.READY:
            index.ready_count += 1
        for key, image in entry.by_key.items():
            posting = postings.get(key)
            if posting is None:
                posting = postings[key] = Posting()
            posting.add(entry)
            posting.ordered.append(entry)
            posting.max_bytes = max(posting.max_bytes, image.compressed_bytes)
        index.revision = max(index.revision, entry.revision)
    for posting in postings.values():
        posting.ordered.sort(key=_exact_order)
    index._postings = postings
    index.advance(revision)
    return index
