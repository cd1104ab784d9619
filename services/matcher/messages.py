"""Conversions between the API's messages and the matcher's domain values; nothing else.

Registry `ImageCache` -> index `CacheEntry` on the way in (the feed), `MatchOutcome` ->
`MatchImageCachesResponse` on the way out.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.matcher.index import CacheEntry, CacheState, HeldImage, ImagePool
from services.matcher.match_requests import MatchRequest
from services.matcher.matching import Candidate, MatchOutcome, Rejection
from services.matcher.pull_access import Grant, grant_of
from snapcache.images import InvalidImageReference
from snapcache.v1 import image_cache_pb2 as pb
from snapcache.v1 import matcher_pb2 as mpb

_AVAILABLE = pb.ZoneAvailability.AVAILABLE
_HYDRATING = pb.ZoneAvailability.HYDRATING
_STATES = {state.value: state for state in CacheState}
_DIGEST = mpb.CoveredImage.DIGEST
_TAG = mpb.CoveredImage.TAG


def entry_from_cache(
    cache: pb.ImageCache, pool: ImagePool, *, share_node_credentials: bool = False
) -> CacheEntry:
    """The index entry of one version of a cache as the registry sent it.

    ``share_node_credentials``: images pulled with the registry host's docker config are
    matched for every pod (the operator's choice; see `pull_access`).
    """
    images: tuple[HeldImage, ...]
    private: dict[HeldImage, Grant] | None = None
    if cache.cached_images:
        recorded = pool.recorded
        images = tuple([recorded(image) for image in cache.cached_images])
        for held, image in zip(images, cache.cached_images, strict=True):
            if image.requires_credentials:
                grant = grant_of(image.authorized_by, share_node_credentials=share_node_credentials)
                if grant is not None:
                    if private is None:
                        private = {}
                    private[held] = grant
    else:
        # Not built yet: file it under the images it was asked for, so an answer can say
        # "that cache is CREATING" instead of not mentioning it.
        images = tuple(_requested(cache.images, pool))
    available: list[str] = []
    hydrating: list[str] = []
    for zone in cache.zone_availability:
        if zone.state == _AVAILABLE:
            available.append(zone.zone)
        elif zone.state == _HYDRATING:
            hydrating.append(zone.zone)
    created = cache.create_time
    expires = cache.expire_time
    return CacheEntry(
        name=cache.name,
        display_name=cache.display_name,
        state=_STATES.get(cache.state, CacheState.UNSPECIFIED),
        cache_size_gib=cache.cache_size_gib,
        create_time_ns=created.seconds * 1_000_000_000 + created.nanos,
        expire_time_ns=expires.seconds * 1_000_000_000 + expires.nanos,  # unset reads as 0
        revision=cache.revision,
        images=images,
        available_zones=pool.zones(available),
        hydrating_zones=pool.zones(hydrating),
        private=private,
    )


def _requested(texts: Iterable[str], pool: ImagePool) -> list[HeldImage]:
    found = []
    for text in texts:
        try:
            found.append(
                pool.held_image(
                    normalized=text,
                    manifest_digest="",
                    index_digest="",
                    compressed_bytes=0,
                    uncompressed_bytes=0,
                )
            )
        except InvalidImageReference:
            continue  # the registry validated it; a newer grammar is no reason to drop the cache
    return found


def match_response(
    outcome: MatchOutcome, request: MatchRequest, *, revision: int, staleness_seconds: float
) -> mpb.MatchImageCachesResponse:
    """The API's answer for ``outcome``.

    Built field by field into the response (``add()`` and attribute sets): on the matcher's hot
    path that is about twice as fast as nested keyword constructors, which build every
    sub-message twice.
    """
    response = mpb.MatchImageCachesResponse(
        decision=outcome.decision.value,  # type: ignore[arg-type]
        action=outcome.action.value,  # type: ignore[arg-type]
        message=outcome.message,
        rejections_truncated=outcome.rejections_truncated,
        normalized_images=[image.normalized for image in request.images],
        index_revision=revision,
    )
    chosen = outcome.chosen
    if chosen is not None:
        response.image_cache = chosen.entry.name
    if staleness_seconds:
        response.index_staleness.FromNanoseconds(int(staleness_seconds * 1e9))
    for rank, candidate in enumerate(outcome.candidates, start=1):
        _fill_candidate(response.candidates.add(), candidate, rank)
    for rejection in outcome.rejections:
        _fill_rejection(response.rejections.add(), rejection)
    return response


def _fill_candidate(out: mpb.MatchCandidate, candidate: Candidate, rank: int) -> None:
    entry, coverage = candidate.entry, candidate.coverage
    out.image_cache = entry.name
    if entry.display_name:
        out.display_name = entry.display_name
    out.rank = rank
    key = out.rank_key
    key.images_covered = coverage.count
    key.bytes_covered = coverage.bytes_covered
    key.cache_size_gib = entry.cache_size_gib
    seconds, nanos = divmod(entry.create_time_ns, 1_000_000_000)
    key.create_time.seconds = seconds
    key.create_time.nanos = nanos
    covered_images = out.covered_images
    for image, held in coverage.covered:
        covered = covered_images.add()
        covered.image = image.given
        covered.cached_image = held.normalized
        covered.manifest_digest = held.manifest_digest
        covered.compressed_bytes = held.compressed_bytes
        covered.uncompressed_bytes = held.uncompressed_bytes
        covered.matched_by = _DIGEST if "@" in image.key else _TAG
        if image.possibly_stale:
            covered.possibly_stale = True
    if coverage.missing:
        out.missing_images.extend(image.normalized for image in coverage.missing)
    out.available_zones.extend(candidate.available_zones)
    if candidate.hydrating_zones:
        out.hydrating_zones.extend(candidate.hydrating_zones)


def _fill_rejection(out: mpb.Rejection, rejection: Rejection) -> None:
    out.image_cache = rejection.entry.name
    out.reason = rejection.reason.value  # type: ignore[assignment]
    out.message = rejection.message
    out.state = rejection.entry.state.value  # type: ignore[assignment]
    if rejection.coverage.missing:
        out.missing_images.extend(image.normalized for image in rejection.coverage.missing)
    out.images_covered = rejection.coverage.count
    if rejection.hydrating_zones:
        out.hydrating_zones.extend(rejection.hydrating_zones)
