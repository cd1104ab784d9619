"""The matcher's core against a brute-force reference of each policy, plus TKE's rules by example.

The reference below is written plainly from the policies' definitions (README, matcher.proto):
it looks at every cache and every image, parses references with the shared grammar, and sorts.
The index and the search must give the same decision, the same ranked candidates, and only
true rejections (all of them, closest first, when the answer says it is not truncated).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.matcher import matching as matching_module
from services.matcher.index import CacheEntry, CacheIndex, CacheState, HeldImage, ImagePool, build_index
from services.matcher.match_requests import MatchRequest, Policy, build_request
from services.matcher.matching import Action, Decision, MatchOutcome, RejectReason, match
from snapcache.errors import InvalidArgument
from snapcache.images import parse_image_reference

NAMES = [
    "docker.io/library/alpine",
    "docker.io/library/nginx",
    "registry.example.com:5000/team/app",
    "ghcr.io/org/tool",
]
SHORT = {"docker.io/library/alpine": "alpine", "docker.io/library/nginx": "nginx"}
TAGS = ["latest", "1.0", "2.0"]
DIGESTS = ["sha256:" + c * 64 for c in "abcdef"]
ZONES = ["zone-a", "zone-b", "zone-c"]
NOW = 1_000_000


# ---------------------------------------------------------------------------------------------
# the reference


@dataclass(frozen=True)
class RefCache:
    """A cache as the reference sees it: plain fields, nothing precomputed."""

    name: str
    state: CacheState
    size: int
    created: int
    expires: int
    images: tuple[HeldImage, ...]
    available: tuple[str, ...]
    hydrating: tuple[str, ...]


def ref_holds(cache: RefCache, pod_image: str) -> HeldImage | None:
    """The first image of ``cache`` that is ``pod_image``: same name and digest, or same tag."""
    ref = parse_image_reference(pod_image)
    for held in cache.images:
        if held.name != ref.name:
            continue
        if ref.digest:
            if ref.digest in (held.manifest_digest, held.index_digest):
                return held
        elif held.tag == ref.tag:
            return held
    return None


def ref_distinct(images: Sequence[str]) -> list[str]:
    """The pod's distinct images: the same digest, or the same name and tag, count once."""
    seen: dict[str, str] = {}
    for text in images:
        ref = parse_image_reference(text)
        identity = f"{ref.name}@{ref.digest}" if ref.digest else f"{ref.name}:{ref.tag}"
        seen.setdefault(identity, text)
    return list(seen.values())


def ref_usable(cache: RefCache, zones: Sequence[str]) -> RejectReason | None:
    if cache.state is not CacheState.READY:
        return RejectReason.NOT_READY
    if cache.expires and cache.expires <= NOW:
        return RejectReason.EXPIRED
    places = [z for z in cache.available if not zones or z in zones]
    if not places:
        return RejectReason.NOT_AVAILABLE_IN_ZONES
    return None


@dataclass
class RefAnswer:
    decision: Decision
    action: Action
    candidates: list[str]
    rejected: dict[str, RejectReason]  # every cache sharing an image that is not a candidate
    rank: dict[str, tuple[object, ...]]  # closeness key of each rejected cache


def reference(
    caches: Sequence[RefCache],
    *,
    images: Sequence[str],
    manual: str,
    policy: Policy,
    min_images: int,
    strict: bool,
    zones: Sequence[str],
    max_candidates: int,
) -> RefAnswer:
    pod = ref_distinct(images)
    fallback = Action.REJECT if strict else Action.PULL_IMAGES

    def held_of(cache: RefCache) -> list[HeldImage]:
        return [h for h in (ref_holds(cache, image) for image in pod) if h is not None]

    def score(cache: RefCache) -> int:
        held = held_of(cache)
        return sum(h.compressed_bytes for h in held) if policy is Policy.BYTES_COVERED else len(held)

    def order(cache: RefCache) -> tuple[object, ...]:
        if policy is Policy.EXACT:
            return (cache.size, -cache.created, cache.name)
        return (-score(cache), -cache.created, cache.name)

    if manual:
        found = [c for c in caches if c.name == manual]
        if not found:
            return RefAnswer(Decision.MANUAL_NOT_FOUND, fallback, [], {}, {})
        cache = found[0]
        if min_images and len(held_of(cache)) < min_images:
            return RefAnswer(Decision.MANUAL_TOO_FEW_IMAGES, fallback, [], {}, {})
        why = ref_usable(cache, zones)
        if why in (RejectReason.NOT_READY, RejectReason.EXPIRED):
            return RefAnswer(Decision.MANUAL_NOT_READY, fallback, [], {}, {})
        if why is RejectReason.NOT_AVAILABLE_IN_ZONES:
            return RefAnswer(Decision.MANUAL_NOT_AVAILABLE, fallback, [], {}, {})
        return RefAnswer(Decision.MATCHED, Action.USE_CACHE, [cache.name], {}, {})

    need = len(pod) if policy is Policy.EXACT else (min_images or 1)
    qualifying: list[RefCache] = []
    rejected: dict[str, RejectReason] = {}
    closeness: dict[str, tuple[object, ...]] = {}
    for cache in caches:
        count = len(held_of(cache))
        if count == 0:
            continue
        if count < need:
            why: RejectReason | None = (
                RejectReason.MISSING_IMAGES if policy is Policy.EXACT else RejectReason.TOO_FEW_IMAGES
            )
        else:
            why = ref_usable(cache, zones)
        if why is None:
            qualifying.append(cache)
        else:
            rejected[cache.name] = why
            closeness[cache.name] = (-count, *order(cache))
    qualifying.sort(key=order)
    chosen = [c.name for c in qualifying[:max_candidates]]
    if chosen:
        return RefAnswer(Decision.MATCHED, Action.USE_CACHE, chosen, rejected, closeness)
    return RefAnswer(Decision.NO_MATCH, fallback, [], rejected, closeness)


# ---------------------------------------------------------------------------------------------
# strategies

pool = ImagePool()


@st.composite
def held_images(draw: st.DrawFn) -> HeldImage:
    name = draw(st.sampled_from(NAMES))
    tag = draw(st.sampled_from(["", *TAGS]))
    digest = draw(st.sampled_from(DIGESTS))
    index_digest = draw(st.sampled_from(["", *DIGESTS]))
    normalized = f"{name}:{tag}" if tag else f"{name}@{digest}"
    return pool.held_image(
        normalized=normalized,
        manifest_digest=digest,
        index_digest=index_digest if index_digest != digest else "",
        compressed_bytes=draw(st.sampled_from([10, 20, 30])),
        uncompressed_bytes=100,
    )


@st.composite
def caches(draw: st.DrawFn, number: int) -> RefCache:
    held = draw(st.lists(held_images(), min_size=1, max_size=4, unique_by=lambda h: h.normalized))
    available = draw(st.lists(st.sampled_from(ZONES), unique=True, max_size=3))
    hydrating = [
        z for z in draw(st.lists(st.sampled_from(ZONES), unique=True, max_size=2)) if z not in available
    ]
    state = draw(st.sampled_from([CacheState.READY] * 4 + list(CacheState)))
    return RefCache(
        name=f"imageCaches/imc-{number:08d}",
        state=state,
        size=draw(st.integers(1, 3)),
        created=draw(st.integers(0, 3)),
        expires=draw(st.sampled_from([0, 0, 0, NOW - 1, NOW, NOW + 1])),
        images=tuple(held),
        available=tuple(sorted(available)),
        hydrating=tuple(sorted(hydrating)),
    )


@st.composite
def pod_image(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(NAMES))
    written = draw(st.sampled_from([name, SHORT.get(name, name)]))
    form = draw(st.sampled_from(["implicit", "tag", "digest", "tag+digest"]))
    if form == "implicit":
        return written
    if form == "tag":
        return f"{written}:{draw(st.sampled_from(TAGS))}"
    digest = draw(st.sampled_from(DIGESTS))
    if form == "digest":
        return f"{written}@{digest}"
    return f"{written}:{draw(st.sampled_from(TAGS))}@{digest}"


def held_reference(ref_caches: Sequence[RefCache]) -> st.SearchStrategy[str]:
    """An image some cache holds, written by tag or by one of its digests (pods that do match)."""
    texts = sorted(
        {
            text
            for cache in ref_caches
            for held in cache.images
            for text in (
                f"{held.name}:{held.tag}" if held.tag else "",
                f"{held.name}@{held.manifest_digest}",
                f"{held.name}@{held.index_digest}" if held.index_digest else "",
            )
            if text
        }
    )
    return st.sampled_from(texts) if texts else pod_image()


def to_entry(cache: RefCache) -> CacheEntry:
    return CacheEntry(
        name=cache.name,
        display_name="",
        state=cache.state,
        cache_size_gib=cache.size,
        create_time_ns=cache.created,
        expire_time_ns=cache.expires,
        revision=1,
        images=cache.images,
        available_zones=cache.available,
        hydrating_zones=cache.hydrating,
    )


def index_of(ref_caches: Sequence[RefCache], *, incremental: bool) -> CacheIndex:
    entries = [to_entry(c) for c in ref_caches]
    if not incremental:
        return build_index(entries, revision=1, pool=pool)
    index = CacheIndex(pool)
    for entry in entries:
        index.upsert(entry)
    return index


# ---------------------------------------------------------------------------------------------
# the property


def check_against_reference(outcome: MatchOutcome, expected: RefAnswer, request: MatchRequest) -> None:
    assert outcome.decision is expected.decision, outcome.message
    assert outcome.action is expected.action
    assert [c.entry.name for c in outcome.candidates] == expected.candidates
    listed = [r.entry.name for r in outcome.rejections]
    assert len(listed) == len(set(listed)) <= request.max_rejections
    if request.manual:
        return
    for rejection in outcome.rejections:
        assert expected.rejected.get(rejection.entry.name) is rejection.reason, rejection.message
    keys = [expected.rank[name] for name in listed]
    assert keys == sorted(keys), "rejections are not closest first"
    if not outcome.rejections_truncated:
        assert set(listed) == set(expected.rejected)


# The search's size thresholds, shrunk so that a dozen caches take every path the real sizes
# take with thousands: the walk of the rarest posting, its give-up, the bounded explanation.
TINY_THRESHOLDS = {"SMALL_INTERSECTION": 0, "WALK_FIRST": 1, "WALK_BUDGET": 2, "EXPLAIN_BUDGET": 1}


@contextmanager
def search_thresholds(values: dict[str, int]) -> Iterator[None]:
    saved = {name: getattr(matching_module, name) for name in values}
    try:
        for name, value in values.items():
            setattr(matching_module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(matching_module, name, value)


@pytest.mark.parametrize("thresholds", ["real", "tiny"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    cache_count=st.integers(0, 12),
    policy=st.sampled_from(list(Policy)),
    strict=st.booleans(),
)
def test_answers_equal_the_brute_force_reference(
    thresholds: str, data: st.DataObject, cache_count: int, policy: Policy, strict: bool
) -> None:
    incremental = data.draw(st.booleans(), label="incremental")
    ref_caches = [data.draw(caches(i)) for i in range(cache_count)]
    images = data.draw(st.lists(pod_image() | held_reference(ref_caches), min_size=1, max_size=4))
    distinct = len(ref_distinct(images))
    manual = ""
    if data.draw(st.integers(0, 4)) == 0:
        manual = data.draw(st.sampled_from([f"imc-{i:08d}" for i in range(cache_count + 1)]))
    if policy is Policy.EXACT and not manual:
        min_images = data.draw(st.sampled_from([0, distinct]))
    else:
        min_images = data.draw(st.integers(0, distinct))
    zones = data.draw(st.lists(st.sampled_from(ZONES), unique=True, max_size=2))
    max_candidates = data.draw(st.integers(1, 4))
    max_rejections = data.draw(st.integers(1, 6))

    request = build_request(
        images=images,
        image_cache=manual,
        policy=policy.value,
        min_images_covered=min_images,
        strict=strict,
        zones=zones,
        max_candidates=max_candidates,
        max_rejections=max_rejections,
    )
    with search_thresholds(TINY_THRESHOLDS if thresholds == "tiny" else {}):
        outcome = match(index_of(ref_caches, incremental=incremental), request, now_ns=NOW)
    expected = reference(
        ref_caches,
        images=images,
        manual=f"imageCaches/{manual}" if manual else "",
        policy=policy,
        min_images=min_images,
        strict=strict,
        zones=zones,
        max_candidates=max_candidates,
    )
    check_against_reference(outcome, expected, request)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_index_updates_equal_a_fresh_build(data: st.DataObject) -> None:
    """Upserts (newer versions, stale replays) and deletes leave the index as a fresh build."""
    current: dict[str, RefCache] = {}
    index = CacheIndex(pool)
    for revision in range(1, data.draw(st.integers(1, 25)) + 1):
        if data.draw(st.booleans(), label="warm"):  # ordered lists exist from here on: kept in order
            index.warm(min_size=0)
        number = data.draw(st.integers(0, 5))
        name = f"imageCaches/imc-{number:08d}"
        if data.draw(st.booleans()) or name not in current:
            cache = data.draw(caches(number))
            current[name] = cache
            entry = to_entry(cache)
            entry = CacheEntry(**{**_fields(entry), "revision": revision})
            assert index.upsert(entry)
            stale = CacheEntry(**{**_fields(entry), "revision": revision - 1, "state": CacheState.FAILED})
            assert not index.upsert(stale)  # an older version replayed by the feed is ignored
        else:
            del current[name]
            assert index.delete(name, revision=revision)
    fresh = index_of(list(current.values()), incremental=False)
    images = data.draw(st.lists(pod_image(), min_size=1, max_size=3))
    for policy in Policy:
        request = build_request(images=images, policy=policy.value, max_candidates=5, max_rejections=50)
        a, b = match(index, request, now_ns=NOW), match(fresh, request, now_ns=NOW)
        assert [c.entry.name for c in a.candidates] == [c.entry.name for c in b.candidates]
        assert {r.entry.name for r in a.rejections} == {r.entry.name for r in b.rejections}
    assert len(index) == len(current)
    assert index.ready_count == sum(1 for c in current.values() if c.state is CacheState.READY)
    keys = {key for cache in current.values() for image in cache.images for key in image.keys}
    for key in keys:
        assert [e.name for e in index.posting(key).ordered] == [e.name for e in fresh.posting(key).ordered]


def _fields(entry: CacheEntry) -> dict[str, object]:
    return {
        "name": entry.name,
        "display_name": entry.display_name,
        "state": entry.state,
        "cache_size_gib": entry.cache_size_gib,
        "create_time_ns": entry.create_time_ns,
        "expire_time_ns": entry.expire_time_ns,
        "revision": entry.revision,
        "images": entry.images,
        "available_zones": entry.available_zones,
        "hydrating_zones": entry.hydrating_zones,
    }


# ---------------------------------------------------------------------------------------------
# TKE's rules, by example


def held(normalized: str, digest: str = DIGESTS[0], *, index_digest: str = "", size: int = 10) -> HeldImage:
    # A pool of its own: the shared one may already hold this reference and digest with other
    # sizes (the pool keeps the first report), which would make examples depend on test order.
    return ImagePool().held_image(
        normalized=normalized,
        manifest_digest=digest,
        index_digest=index_digest,
        compressed_bytes=size,
        uncompressed_bytes=size * 2,
    )


def cache(number: int, *images: HeldImage, size: int = 20, created: int = 0, **kw: object) -> CacheEntry:
    fields: dict[str, object] = {
        "name": f"imageCaches/imc-{number:08d}",
        "display_name": "",
        "state": CacheState.READY,
        "cache_size_gib": size,
        "create_time_ns": created,
        "expire_time_ns": 0,
        "revision": 1,
        "images": images,
        "available_zones": ("zone-a",),
        "hydrating_zones": (),
    }
    fields.update(kw)
    return CacheEntry(**fields)  # type: ignore[arg-type]


def answer(entries: Sequence[CacheEntry], images: Sequence[str], **kw: object) -> MatchOutcome:
    request = build_request(images=images, **kw)  # type: ignore[arg-type]
    return match(build_index(entries, revision=1, pool=pool), request, now_ns=NOW)


NGINX_LATEST = held("docker.io/library/nginx:latest", DIGESTS[1])
NGINX_125 = held("docker.io/library/nginx:1.25", DIGESTS[2], index_digest=DIGESTS[3])
APP = held("registry.example.com:5000/team/app:2.0", DIGESTS[4])


@pytest.mark.parametrize(
    ("pod_images", "expected"),
    [
        (["nginx"], "imageCaches/imc-00000001"),  # nginx = docker.io/library/nginx:latest
        (["docker.io/library/nginx:latest"], "imageCaches/imc-00000001"),
        (["index.docker.io/library/nginx"], "imageCaches/imc-00000001"),
        (["nginx:1.25"], "imageCaches/imc-00000002"),
        ([f"nginx@{DIGESTS[2]}"], "imageCaches/imc-00000002"),  # the manifest digest, any tag
        ([f"library/nginx@{DIGESTS[3]}"], "imageCaches/imc-00000002"),  # the index digest
        ([f"nginx:9.9@{DIGESTS[2]}"], "imageCaches/imc-00000002"),  # a digest wins over a tag
        (["nginx:1.24"], None),  # another version is not the same image
        (["registry.example.com:5000/team/app:2.0"], "imageCaches/imc-00000002"),
        (["registry.example.com/team/app:2.0"], None),  # another registry (no port)
    ],
)
def test_images_match_by_normalized_name_and_same_version(
    pod_images: list[str], expected: str | None
) -> None:
    entries = [cache(1, NGINX_LATEST), cache(2, NGINX_125, APP)]
    outcome = answer(entries, pod_images)
    chosen = outcome.chosen
    assert (chosen.entry.name if chosen else None) == expected, outcome.message
    assert outcome.decision is (Decision.MATCHED if expected else Decision.NO_MATCH)


def test_every_image_must_be_held_then_smaller_then_newer() -> None:
    entries = [
        cache(1, NGINX_125, size=10, created=5),  # lacks the app
        cache(2, NGINX_125, APP, size=30, created=9),
        cache(3, NGINX_125, APP, size=20, created=1),
        cache(4, NGINX_125, APP, size=20, created=7),  # same size as 3, newer: first
    ]
    outcome = answer(entries, ["nginx:1.25", "registry.example.com:5000/team/app:2.0"])
    assert [c.entry.name[-1] for c in outcome.candidates] == ["4", "3", "2"]
    assert outcome.action is Action.USE_CACHE
    # The search walked the app's posting only: cache 1 was never examined, and the answer says so.
    assert outcome.rejections == () and outcome.rejections_truncated

    nobody_has_all = answer(
        entries, ["nginx:1.25", "registry.example.com:5000/team/app:2.0", "ghcr.io/org/x"]
    )
    assert nobody_has_all.decision is Decision.NO_MATCH
    assert [r.entry.name[-1] for r in nobody_has_all.rejections] == ["4", "3", "2", "1"]  # closest first
    assert all(r.reason is RejectReason.MISSING_IMAGES for r in nobody_has_all.rejections)
    assert "ghcr.io/org/x:latest" in nobody_has_all.rejections[0].message
    assert not nobody_has_all.rejections_truncated


def test_a_match_through_latest_is_flagged_possibly_stale() -> None:
    outcome = answer([cache(1, NGINX_LATEST, NGINX_125)], ["nginx", "nginx:1.25"])
    chosen = outcome.chosen
    assert chosen is not None
    stale = {image.normalized: image.possibly_stale for image, _ in chosen.coverage.covered}
    assert stale == {"docker.io/library/nginx:latest": True, "docker.io/library/nginx:1.25": False}
    assert "possibly stale" in outcome.message


def test_partial_policies_rank_by_bytes_or_count_then_newer() -> None:
    big = held("ghcr.io/org/tool:1.0", DIGESTS[5], size=500)
    entries = [
        cache(1, NGINX_125, APP, created=1),  # 2 images, 20 bytes
        cache(2, big, created=2),  # 1 image, 500 bytes
        cache(3, NGINX_125, APP, created=3),  # ties with 1 on both scores: newer first
    ]
    pod = ["nginx:1.25", "registry.example.com:5000/team/app:2.0", "ghcr.io/org/tool:1.0"]
    by_bytes = answer(entries, pod, policy=Policy.BYTES_COVERED.value)
    assert [c.entry.name[-1] for c in by_bytes.candidates] == ["2", "3", "1"]
    by_count = answer(entries, pod, policy=Policy.IMAGES_COVERED.value)
    assert [c.entry.name[-1] for c in by_count.candidates] == ["3", "1", "2"]
    at_least_two = answer(entries, pod, policy=Policy.BYTES_COVERED.value, min_images_covered=2)
    assert [c.entry.name[-1] for c in at_least_two.candidates] == ["3", "1"]
    assert at_least_two.rejections[0].reason is RejectReason.TOO_FEW_IMAGES


def test_not_ready_expired_and_zone_rejections_are_explained() -> None:
    entries = [
        cache(1, NGINX_125, state=CacheState.CREATING),
        cache(2, NGINX_125, expire_time_ns=NOW - 1),
        cache(3, NGINX_125, available_zones=("zone-b",), hydrating_zones=("zone-a",)),
    ]
    outcome = answer(entries, ["nginx:1.25"], zones=["zone-a"])
    assert outcome.decision is Decision.NO_MATCH and outcome.action is Action.PULL_IMAGES
    reasons = {r.entry.name[-1]: r.reason for r in outcome.rejections}
    assert reasons == {
        "1": RejectReason.NOT_READY,
        "2": RejectReason.EXPIRED,
        "3": RejectReason.NOT_AVAILABLE_IN_ZONES,
    }
    zone_rejection = next(r for r in outcome.rejections if r.reason is RejectReason.NOT_AVAILABLE_IN_ZONES)
    assert zone_rejection.hydrating_zones == ("zone-a",)
    assert "still hydrating in zone-a" in zone_rejection.message
    assert not outcome.rejections_truncated
    strict = answer(entries, ["nginx:1.25"], zones=["zone-a"], strict=True)
    assert strict.action is Action.REJECT


@pytest.mark.parametrize(
    ("entry_kw", "expected"),
    [
        ({}, Decision.MATCHED),
        ({"state": CacheState.UPDATING}, Decision.MANUAL_NOT_READY),
        ({"expire_time_ns": NOW}, Decision.MANUAL_NOT_READY),
        ({"available_zones": ()}, Decision.MANUAL_NOT_AVAILABLE),
    ],
)
def test_manual_match_uses_the_named_cache_or_says_why_not(
    entry_kw: dict[str, object], expected: Decision
) -> None:
    # TKE: a manually chosen cache is used whatever images it holds, if it can be used at all
    outcome = answer([cache(1, APP, **entry_kw)], ["nginx:1.25"], image_cache="imc-00000001")
    assert outcome.decision is expected, outcome.message
    assert outcome.action is (Action.USE_CACHE if expected is Decision.MATCHED else Action.PULL_IMAGES)
    missing = answer([cache(1, APP)], ["nginx:1.25"], image_cache="imageCaches/imc-00000009", strict=True)
    assert (missing.decision, missing.action) == (Decision.MANUAL_NOT_FOUND, Action.REJECT)
    too_few = answer([cache(1, APP)], ["nginx:1.25"], image_cache="imc-00000001", min_images_covered=1)
    assert too_few.decision is Decision.MANUAL_TOO_FEW_IMAGES


@pytest.mark.parametrize(
    ("kw", "fields"),
    [
        ({"images": []}, ["images"]),
        ({"images": ["nginx"] * 65}, ["images"]),
        ({"images": ["nginx", "UPPER/case", "ok:1"]}, ["images[1]"]),
        ({"images": ["nginx"], "image_cache": "imc-XYZ"}, ["image_cache"]),
        ({"images": ["nginx"], "policy": 42}, ["policy"]),
        ({"images": ["nginx"], "min_images_covered": 2, "policy": 2}, ["min_images_covered"]),
        ({"images": ["nginx", "redis"], "min_images_covered": 1}, ["min_images_covered"]),
        (
            {"images": ["nginx"], "max_candidates": 101, "max_rejections": -1},
            ["max_candidates", "max_rejections"],
        ),
        ({"images": ["bad image"], "policy": 9, "zones": [""]}, ["images[0]", "policy", "zones[0]"]),
    ],
)
def test_bad_requests_name_every_bad_field(kw: dict[str, object], fields: list[str]) -> None:
    with pytest.raises(InvalidArgument) as raised:
        build_request(**kw)  # type: ignore[arg-type]
    assert [v.field for v in raised.value.violations] == fields
    assert raised.value.reason == "INVALID_MATCH_REQUEST"


def test_duplicate_pod_images_count_once() -> None:
    request = build_request(images=["nginx", "docker.io/library/nginx:latest", "nginx:latest"])
    assert [image.normalized for image in request.images] == ["docker.io/library/nginx:latest"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), cache_count=st.integers(8, 40), max_candidates=st.integers(1, 4))
def test_exact_search_walks_common_images_in_tke_order(
    data: st.DataObject, cache_count: int, max_candidates: int
) -> None:
    """Many caches holding the same few images: the walk of the rarest posting, and its give-up."""
    common = [
        held("docker.io/library/alpine:3", DIGESTS[0]),
        held("docker.io/library/nginx:1.25", DIGESTS[1]),
    ]
    extra = [held("ghcr.io/org/tool:1.0", DIGESTS[2]), held("ghcr.io/org/tool:2.0", DIGESTS[3])]
    ref_caches = []
    for number in range(cache_count):
        images = [image for image in common + extra if data.draw(st.booleans())] or common[:1]
        ref_caches.append(
            RefCache(
                name=f"imageCaches/imc-{number:08d}",
                state=data.draw(st.sampled_from([CacheState.READY] * 5 + [CacheState.CREATING])),
                size=data.draw(st.integers(1, 3)),
                created=data.draw(st.integers(0, 5)),
                expires=0,
                images=tuple(images),
                available=("zone-a",),
                hydrating=(),
            )
        )
    pod = data.draw(
        st.lists(
            st.sampled_from(["alpine:3", "nginx:1.25", "ghcr.io/org/tool:1.0", f"nginx@{DIGESTS[1]}"]),
            min_size=2,
            max_size=3,
        )
    )
    request = build_request(images=pod, max_candidates=max_candidates, max_rejections=5)
    expected = reference(
        ref_caches,
        images=pod,
        manual="",
        policy=Policy.EXACT,
        min_images=0,
        strict=False,
        zones=(),
        max_candidates=max_candidates,
    )
    for walk_budget in (1, 3, 100):
        with search_thresholds({"SMALL_INTERSECTION": 0, "WALK_FIRST": 2, "WALK_BUDGET": walk_budget}):
            outcome = match(index_of(ref_caches, incremental=True), request, now_ns=NOW)
        check_against_reference(outcome, expected, request)


def test_the_image_pool_shares_images_and_forgets_unused_ones() -> None:
    own_pool = ImagePool()
    index = CacheIndex(own_pool)

    def image() -> HeldImage:
        return own_pool.held_image(
            normalized="nginx:1.25",
            manifest_digest=DIGESTS[0],
            index_digest="",
            compressed_bytes=1,
            uncompressed_bytes=2,
        )

    first, second = cache(1, image()), cache(2, image())
    assert first.images[0] is second.images[0]  # one object for the image both caches hold
    assert first.images[0].normalized == "docker.io/library/nginx:1.25"
    index.upsert(first)
    index.upsert(second)
    del first, second
    assert len(own_pool) == 1
    assert own_pool.prune(index) == 0  # still held
    index.delete("imageCaches/imc-00000001", revision=2)
    assert own_pool.prune(index) == 0  # the other cache holds it
    index.delete("imageCaches/imc-00000002", revision=3)
    assert own_pool.prune(index) == 1
    assert len(own_pool) == 0
