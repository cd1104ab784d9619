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

Postings are kept per pooled image, not per key: a cache is filed once per image it holds, not
once per key (an image answers to two or three), which halves the work of a full load. A key
answers to one image almost always; when several do (a tag rebuilt with a new digest, a digest
pushed under two tags), its posting is the union of theirs, made at first use and kept until
the index next changes.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from services.matcher.pull_access import Grant
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


@dataclass(frozen=True, slots=True, eq=False)
class HeldImage:
    """An image as a cache's last build recorded it (pooled: one object per distinct image).

    Compared and hashed by identity: the pool makes one object per distinct image, and postings
    are keyed by it.
    """

    normalized: str  # as recorded: `docker.io/library/nginx:1.25` (or `name@digest`)
    name: str  # `docker.io/library/nginx`
    tag: str  # "" when the cache was built from a digest only
    manifest_digest: str
    index_digest: str
    compressed_bytes: int
    uncompressed_bytes: int
    keys: tuple[str, ...]  # every match key it answers to: name:tag, name@digest (each digest)


def match_keys(name: str, tag: str, *digests: str) -> tuple[str, ...]:
    """The match keys of an image: by tag if it has one, and by each digest."""
    found = [f"{name}:{tag}"] if tag else []
    found += [f"{name}@{digest}" for digest in digests if digest]
    return tuple(dict.fromkeys(found))


class CacheEntry:
    """What the matcher knows of one version of a cache. Read-only by convention.

    A plain slotted class rather than a dataclass: 100,000 of them are built at every full load,
    and each is hashed by identity (postings are sets of entries).
    """

    __slots__ = (
        "available_zones",
        "cache_size_gib",
        "create_time_ns",
        "display_name",
        "expire_time_ns",
        "hydrating_zones",
        "images",
        "name",
        "private",
        "revision",
        "state",
    )

    def __init__(
        self,
        *,
        name: str,  # `imageCaches/imc-...`
        display_name: str,
        state: CacheState,
        cache_size_gib: int,
        create_time_ns: int,
        expire_time_ns: int,  # 0: never expires
        revision: int,  # registry revision of this version
        images: tuple[HeldImage, ...],
        available_zones: tuple[str, ...],  # sorted
        hydrating_zones: tuple[str, ...],  # sorted
        # its private images and who may use them (`pull_access`); None (most caches): all public
        private: Mapping[HeldImage, Grant] | None = None,
    ) -> None:
        self.name = name
        self.display_name = display_name
        self.state = state
        self.cache_size_gib = cache_size_gib
        self.create_time_ns = create_time_ns
        self.expire_time_ns = expire_time_ns
        self.revision = revision
        self.images = images
        self.available_zones = available_zones
        self.hydrating_zones = hydrating_zones
        self.private = private

    def __repr__(self) -> str:
        return f"CacheEntry({self.name!r}, {self.state.name}, revision={self.revision})"

    @property
    def exact_order(self) -> tuple[int, int, str]:
        """TKE's order: smaller cache first, then newer, then name (for a total order)."""
        return (self.cache_size_gib, -self.create_time_ns, self.name)

    def held(self, key: str) -> HeldImage | None:
        """The first image of this cache answering to match key ``key``, if any."""
        for image in self.images:
            if key in image.keys:
                return image
        return None

    def expired(self, now_ns: int) -> bool:
        """True once the expire time has passed (even before the registry marks it EXPIRED)."""
        return self.expire_time_ns != 0 and now_ns >= self.expire_time_ns


def _exact_order(entry: CacheEntry) -> tuple[int, int, str]:
    return (entry.cache_size_gib, -entry.create_time_ns, entry.name)


class Posting(set["CacheEntry"]):
    """The caches holding one image (or a key's images): a set, and a list in TKE's order.

    The set serves intersections; the order (smaller cache, newer, name) lets EXACT take the best
    caches holding a common image from the front instead of sorting thousands per request. The
    list is built at first use (only the postings of common images are ever walked) and kept in
    order from then on. `max_bytes` bounds the image's bytes over the entries, for the partial
    policies' early stop.
    """

    __slots__ = ("_ordered", "max_bytes")

    def __init__(self, max_bytes: int = 0) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self._ordered: list[CacheEntry] | None = None

    @property
    def ordered(self) -> list[CacheEntry]:
        """The entries in TKE's order."""
        ordered = self._ordered
        if ordered is None:
            ordered = self._ordered = sorted(self, key=_exact_order)
        return ordered

    def file(self, entry: CacheEntry) -> None:
        """Add ``entry`` (at its place in the order, once there is one)."""
        self.add(entry)
        if self._ordered is not None:
            bisect.insort(self._ordered, entry, key=_exact_order)

    def unfile(self, entry: CacheEntry) -> None:
        """Take ``entry`` out."""
        self.discard(entry)
        ordered = self._ordered
        if ordered is not None:
            at = bisect.bisect_left(ordered, entry.exact_order, key=_exact_order)
            if at < len(ordered) and ordered[at] is entry:
                del ordered[at]


def _union(postings: list[Posting]) -> Posting:
    union = Posting(max(posting.max_bytes for posting in postings))
    union.update(*postings)
    return union


EMPTY_POSTING = Posting()


@lru_cache(maxsize=65536)
def _parse_recorded(normalized: str) -> ImageReference:
    # Recorded references repeat across caches (a few base images are everywhere), so the
    # grammar runs once per distinct reference, not once per cache.
    return parse_image_reference(normalized)


class RecordedImage(Protocol):
    """What a build recorded of an image (the API's CachedImage has these fields)."""

    @property
    def normalized_image(self) -> str: ...
    @property
    def manifest_digest(self) -> str: ...
    @property
    def index_digest(self) -> str: ...
    @property
    def compressed_bytes(self) -> int: ...
    @property
    def uncompressed_bytes(self) -> int: ...


class ImagePool:
    """Interns held images, so caches sharing an image share one object and its strings.

    A full load starts a fresh pool (the old one goes with the old index); between full loads,
    `prune` drops the images no cache holds any more, so churn does not grow it without bound.
    """

    def __init__(self) -> None:
        self._images: dict[tuple[str, str, str], HeldImage] = {}
        self._zone_sets: dict[tuple[str, ...], tuple[str, ...]] = {}  # a handful: zones are few

    def prune(self, index: CacheIndex) -> int:
        """Forget images no cache of ``index`` holds; return how many were dropped."""
        held = {id(image) for entry in index.entries() for image in entry.images}
        unused = [key for key, image in self._images.items() if id(image) not in held]
        for key in unused:
            del self._images[key]
        return len(unused)

    def held_image(
        self,
        *,
        normalized: str,
        manifest_digest: str,
        index_digest: str,
        compressed_bytes: int,
        uncompressed_bytes: int,
    ) -> HeldImage:
        """The pooled image with these facts; parses ``normalized`` with the shared grammar.

        Keyed by reference and digests: the sizes are facts of the manifest, so the first
        report of them stands.
        """
        key = (normalized, manifest_digest, index_digest)
        found = self._images.get(key)
        if found is None:
            found = self._new(key, compressed_bytes, uncompressed_bytes)
        return found

    def recorded(self, image: RecordedImage) -> HeldImage:
        """The pooled image for a build record (anything with the API's CachedImage fields)."""
        key = (image.normalized_image, image.manifest_digest, image.index_digest)
        found = self._images.get(key)
        if found is None:
            found = self._new(key, image.compressed_bytes, image.uncompressed_bytes)
        return found

    def _new(self, key: tuple[str, str, str], compressed_bytes: int, uncompressed_bytes: int) -> HeldImage:
        normalized, manifest_digest, index_digest = key
        ref = _parse_recorded(normalized)
        manifest = manifest_digest or ref.digest
        found = HeldImage(
            normalized=str(ref),
            name=ref.name,
            tag=ref.tag,
            manifest_digest=manifest,
            index_digest=index_digest,
            compressed_bytes=compressed_bytes,
            uncompressed_bytes=uncompressed_bytes,
            keys=match_keys(ref.name, ref.tag, manifest, index_digest),
        )
        self._images[key] = found
        return found

    def zones(self, names: list[str]) -> tuple[str, ...]:
        """The sorted tuple of ``names``, shared by every cache in the same zones."""
        given = tuple(names)
        found = self._zone_sets.get(given)
        if found is None:
            found = self._zone_sets[given] = tuple(sorted(given))
        return found

    def __len__(self) -> int:
        return len(self._images)


class CacheIndex:
    """Every cache the registry has, filed by image. Not thread-safe: the owner locks."""

    def __init__(self, pool: ImagePool | None = None) -> None:
        self.pool = pool or ImagePool()
        self._entries: dict[str, CacheEntry] = {}
        self._postings: dict[HeldImage, Posting] = {}  # by image (identity)
        self._keys: dict[str, list[HeldImage]] = {}  # match key -> the filed images answering to it
        self._unions: dict[str, Posting] = {}  # keys answering to several images; cleared on change
        self.revision = 0
        self.ready_count = 0

    def get(self, name: str) -> CacheEntry | None:
        """The cache called ``name``, if the index has it."""
        return self._entries.get(name)

    def posting(self, key: str) -> Posting:
        """The caches holding match key ``key`` (an empty posting if none)."""
        images = self._keys.get(key)
        if images is None:
            return EMPTY_POSTING
        if len(images) == 1:
            return self._postings[images[0]]
        union = self._unions.get(key)
        if union is None:
            union = self._unions[key] = _union([self._postings[image] for image in images])
        return union

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

    def warm(self, *, min_size: int) -> int:
        """Order every posting of at least ``min_size`` caches now; return how many.

        Called by the follower after a full load, so the first pods of common images do not pay
        for the sort.
        """
        warmed = 0
        for posting in list(self._postings.values()):
            if len(posting) >= min_size:
                _ = posting.ordered
                warmed += 1
        return warmed

    def advance(self, revision: int) -> None:
        """The feed reached ``revision`` with nothing else to apply."""
        self.revision = max(self.revision, revision)

    def _file(self, entry: CacheEntry) -> None:
        if entry.state is CacheState.READY:
            self.ready_count += 1
        if self._unions:
            self._unions = {}
        for image in entry.images:
            posting = self._postings.get(image)
            if posting is None:
                posting = self._postings[image] = Posting(image.compressed_bytes)
                _register_keys(self._keys, image)
            posting.file(entry)

    def _unfile(self, entry: CacheEntry) -> None:
        if entry.state is CacheState.READY:
            self.ready_count -= 1
        if self._unions:
            self._unions = {}
        for image in entry.images:
            posting = self._postings.get(image)
            if posting is None:
                continue
            posting.unfile(entry)
            if not posting:
                del self._postings[image]
                _unregister_keys(self._keys, image)


def _register_keys(keys: dict[str, list[HeldImage]], image: HeldImage) -> None:
    for key in image.keys:
        answering = keys.get(key)
        if answering is None:
            keys[key] = [image]
        elif image not in answering:
            answering.append(image)


def _unregister_keys(keys: dict[str, list[HeldImage]], image: HeldImage) -> None:
    for key in image.keys:
        answering = keys.get(key)
        if answering is None:
            continue
        if image in answering:
            answering.remove(image)
        if not answering:
            del keys[key]


class IndexBuilder:
    """Builds a fresh index from a full load, entry by entry as pages arrive.

    Entries go into the postings' sets at once, so the work overlaps with fetching the next
    page; the TKE-ordered lists are left to first use (see `Posting`, and `CacheIndex.warm`).
    """

    def __init__(self, pool: ImagePool) -> None:
        self._pool = pool
        self._latest: dict[str, CacheEntry] = {}
        self._postings: dict[HeldImage, Posting] = {}
        self._replaced = False

    def add(self, entry: CacheEntry) -> None:
        """File one cache (a name seen twice keeps its newest version)."""
        old = self._latest.get(entry.name)
        if old is not None:
            self._replaced = True  # rare (a cache changed while listed): refiled in finish()
            if old.revision > entry.revision:
                return
        self._latest[entry.name] = entry
        if old is not None:
            return
        postings = self._postings
        for image in entry.images:
            posting = postings.get(image)
            if posting is None:
                posting = postings[image] = Posting(image.compressed_bytes)
            posting.add(entry)

    def finish(self, *, revision: int) -> CacheIndex:
        """The index of everything added, as of ``revision``."""
        if self._replaced:  # refile from the final versions
            survivors = list(self._latest.values())
            self._latest, self._postings, self._replaced = {}, {}, False
            for entry in survivors:
                self.add(entry)
        index = CacheIndex(self._pool)
        index._entries = self._latest
        ready = sum(1 for entry in self._latest.values() if entry.state is CacheState.READY)
        index.ready_count = ready
        index.revision = max((entry.revision for entry in self._latest.values()), default=0)
        index._postings = self._postings
        keys: dict[str, list[HeldImage]] = {}
        for image in self._postings:  # one per distinct image, not per cache
            _register_keys(keys, image)
        index._keys = keys
        index.advance(revision)
        return index


def build_index(entries: Iterable[CacheEntry], *, revision: int, pool: ImagePool) -> CacheIndex:
    """A fresh index of ``entries`` as of ``revision`` (a full load or a resync)."""
    builder = IndexBuilder(pool)
    for entry in entries:
        builder.add(entry)
    return builder.finish(revision=revision)
