"""Conversions between the API's messages and the matcher's domain values; nothing else.

Registry `ImageCache` -> index `CacheEntry` on the way in (the feed), `MatchOutcome` ->
`MatchImageCachesResponse` on the way out.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import duration_pb2, timestamp_pb2

from services.matcher.index import CacheEntry, CacheState, HeldImage, ImagePool
from services.matcher.match_requests import MatchRequest
from services.matcher.matching import Candidate, MatchOutcome, Rejection
from snapcache.images import InvalidImageReference
from snapcache.v1 import image_cache_pb2 as pb
from snapcache.v1 import matcher_pb2 as mpb

_AVAILABLE = pb.ZoneAvailability.AVAILABLE
_HYDRATING = pb.ZoneAvailability.HYDRATING


def entry_from_cache(cache: pb.ImageCache, pool: ImagePool) -> CacheEntry:
    """The index entry of one version of a cache as the registry sent it."""
    images: tuple[HeldImage, ...]
    if cache.cached_images:
        images = tuple(
            pool.held_image(
                normalized=image.normalized_image,
                manifest_digest=image.manifest_digest,
                index_digest=image.index_digest,
                compressed_bytes=image.compressed_bytes,
                uncompressed_bytes=image.uncompressed_bytes,
            )
            for image in cache.cached_images
        )
    else:
        # Not built yet: file it under the images it was asked for, so an answer can say
        # "that cache is CREATING" instead of not mentioning it.
        images = tuple(_requested(cache.images, pool))
    zones = cache.zone_availability
    return CacheEntry(
        name=cache.name,
        display_name=cache.display_name,
        state=_state(cache.state),
        cache_size_gib=cache.cache_size_gib,
        create_time_ns=cache.create_time.ToNanoseconds(),
        expire_time_ns=cache.expire_time.ToNanoseconds() if cache.HasField("expire_time") else 0,
        revision=cache.revision,
        images=images,
        available_zones=tuple(sorted(z.zone for z in zones if z.state == _AVAILABLE)),
        hydrating_zones=tuple(sorted(z.zone for z in zones if z.state == _HYDRATING)),
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


def _state(value: int) -> CacheState:
    try:
        return CacheState(value)
    except ValueError:
        return CacheState.UNSPECIFIED


def match_response(
    outcome: MatchOutcome, request: MatchRequest, *, revision: int, staleness_seconds: float
) -> mpb.MatchImageCachesResponse:
    """The API's answer for ``outcome``."""
    chosen = outcome.chosen
    staleness = duration_pb2.Duration()
    staleness.FromNanoseconds(int(staleness_seconds * 1e9))
    return mpb.MatchImageCachesResponse(
        decision=outcome.decision.value,  # type: ignore[arg-type]
        action=outcome.action.value,  # type: ignore[arg-type]
        image_cache=chosen.entry.name if chosen else "",
        message=outcome.message,
        candidates=[_candidate(c, rank) for rank, c in enumerate(outcome.candidates, start=1)],
        rejections=[_rejection(r) for r in outcome.rejections],
        rejections_truncated=outcome.rejections_truncated,
        normalized_images=[image.normalized for image in request.images],
        index_revision=revision,
        index_staleness=staleness,
    )


def _timestamp(nanos: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(nanos)
    return stamp


def _candidate(candidate: Candidate, rank: int) -> mpb.MatchCandidate:
    entry, coverage = candidate.entry, candidate.coverage
    return mpb.MatchCandidate(
        image_cache=entry.name,
        display_name=entry.display_name,
        rank=rank,
        rank_key=mpb.RankKey(
            images_covered=coverage.count,
            bytes_covered=coverage.bytes_covered,
            cache_size_gib=entry.cache_size_gib,
            create_time=_timestamp(entry.create_time_ns),
        ),
        covered_images=[
            mpb.CoveredImage(
                image=image.given,
                cached_image=held.normalized,
                manifest_digest=held.manifest_digest,
                compressed_bytes=held.compressed_bytes,
                uncompressed_bytes=held.uncompressed_bytes,
                matched_by=mpb.CoveredImage.DIGEST if "@" in image.key else mpb.CoveredImage.TAG,
                possibly_stale=image.possibly_stale,
            )
            for image, held in coverage.covered
        ],
        missing_images=[image.normalized for image in coverage.missing],
        available_zones=candidate.available_zones,
        hydrating_zones=candidate.hydrating_zones,
    )


def _rejection(rejection: Rejection) -> mpb.Rejection:
    return mpb.Rejection(
        image_cache=rejection.entry.name,
        reason=rejection.reason.value,  # type: ignore[arg-type]
        message=rejection.message,
        state=rejection.entry.state.value,  # type: ignore[arg-type]
        missing_images=[image.normalized for image in rejection.coverage.missing],
        images_covered=rejection.coverage.count,
        hydrating_zones=rejection.hydrating_zones,
    )
