"""A match request as the core takes it, checked whole: every bad field reported at once.

The pod's images are parsed with the registry's grammar (`snapcache.images`), so `nginx` is
`docker.io/library/nginx:latest` here exactly as it was when the cache was built, and reduced
to one match key each: the digest when the pod pins one (Docker ignores the tag then), the tag
otherwise.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from snapcache import cache_names
from snapcache.errors import FieldViolation, InvalidArgument
from snapcache.images import DEFAULT_TAG, InvalidImageReference, parse_image_reference

MAX_IMAGES = 64
DEFAULT_MAX_CANDIDATES = 5
DEFAULT_MAX_REJECTIONS = 10
MAX_LISTED = 100
MAX_ZONES = 64
MAX_PULL_SECRETS = 64
_NO_SECRETS: frozenset[str] = frozenset()
# Kubernetes' grammars: a namespace is a DNS-1123 label, a Secret's name a DNS-1123 subdomain.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class Policy(enum.Enum):
    """How candidates qualify and rank (numbers as in the API's MatchPolicy)."""

    EXACT = 1  # TKE: every image; smaller cache, then newer
    BYTES_COVERED = 2  # Huawei `size`: most bytes covered, then newer
    IMAGES_COVERED = 3  # Huawei `quantity`: most images covered, then newer


@dataclass(frozen=True, slots=True)
class PodImage:
    """One distinct image of the pod."""

    given: str  # as written in the pod spec
    normalized: str  # `docker.io/library/nginx:latest`
    key: str  # the index's match key
    possibly_stale: bool  # asked for by `latest` or no tag at all


@dataclass(frozen=True, slots=True)
class MatchRequest:
    """A validated match request."""

    images: tuple[PodImage, ...]  # distinct, in the order first given
    manual: str  # cache name for a manual match, "" for automatic
    policy: Policy
    min_covered: int  # resolved: all images for EXACT, 1 for the partial policies by default
    min_covered_given: bool  # the caller asked for a minimum (manual matches honour only that)
    strict: bool
    zones: frozenset[str]
    max_candidates: int
    max_rejections: int
    namespace: str = ""  # the pod's; "" when the caller does not know the pod
    pull_secrets: frozenset[str] = frozenset()  # names in the pod's imagePullSecrets


@lru_cache(maxsize=65536)
def _pod_image(text: str) -> PodImage:
    # Pods repeat the same few hundred images all day; parse each text once.
    ref = parse_image_reference(text)
    if ref.digest:
        key = f"{ref.name}@{ref.digest}"
        stale = False
    else:
        key = f"{ref.name}:{ref.tag}"
        stale = ref.implicit_tag or ref.tag == DEFAULT_TAG
    return PodImage(given=text, normalized=str(ref), key=key, possibly_stale=stale)


def build_request(
    *,
    images: Sequence[str],
    image_cache: str = "",
    policy: int = 0,
    min_images_covered: int = 0,
    strict: bool = False,
    zones: Sequence[str] = (),
    max_candidates: int = 0,
    max_rejections: int = 0,
    namespace: str = "",
    image_pull_secrets: Sequence[str] = (),
) -> MatchRequest:
    """Check a request's fields (all violations at once) and resolve its defaults."""
    violations: list[FieldViolation] = []
    pod_images: dict[str, PodImage] = {}
    if not images:
        violations.append(FieldViolation("images", "at least one image is required"))
    elif len(images) > MAX_IMAGES:
        violations.append(FieldViolation("images", f"at most {MAX_IMAGES} images (got {len(images)})"))
    else:
        for i, text in enumerate(images):
            try:
                image = _pod_image(text)
            except InvalidImageReference as exc:
                violations.append(FieldViolation(f"images[{i}]", str(exc)))
                continue
            pod_images.setdefault(image.key, image)

    manual = ""
    if image_cache:
        try:
            manual = cache_names.cache_name(cache_names.parse_cache_name(image_cache, field="image_cache"))
        except InvalidArgument as exc:
            violations.extend(exc.violations)

    chosen = Policy.EXACT
    if policy:
        try:
            chosen = Policy(policy)
        except ValueError:
            known = ", ".join(f"{p.value} ({p.name})" for p in Policy)
            violations.append(FieldViolation("policy", f"unknown policy {policy}; known: {known}"))

    distinct = len(pod_images)
    if min_images_covered < 0:
        violations.append(FieldViolation("min_images_covered", "must not be negative"))
    elif distinct and min_images_covered > distinct:
        violations.append(
            FieldViolation(
                "min_images_covered",
                f"{min_images_covered} is more than the pod's {distinct} distinct images",
            )
        )
    elif chosen is Policy.EXACT and min_images_covered not in (0, distinct) and not manual:
        violations.append(
            FieldViolation(
                "min_images_covered",
                "EXACT needs every image; use BYTES_COVERED or IMAGES_COVERED for partial matches",
            )
        )

    if len(zones) > MAX_ZONES:
        violations.append(FieldViolation("zones", f"at most {MAX_ZONES} zones"))
    for i, zone in enumerate(zones):
        if not zone:
            violations.append(FieldViolation(f"zones[{i}]", "must not be empty"))

    if namespace or image_pull_secrets:
        violations += _pod_access_violations(namespace, image_pull_secrets)

    limits = {"max_candidates": max_candidates, "max_rejections": max_rejections}
    for name, value in limits.items():
        if value < 0 or value > MAX_LISTED:
            violations.append(FieldViolation(name, f"must be 0 (default) to {MAX_LISTED}"))

    if violations:
        first = violations[0]
        raise InvalidArgument(
            reason="INVALID_MATCH_REQUEST",
            message=f"{first.field}: {first.description}"
            + (f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""),
            violations=tuple(violations),
        )

    min_covered = min_images_covered or (distinct if chosen is Policy.EXACT and not manual else 1)
    return MatchRequest(
        images=tuple(pod_images.values()),
        manual=manual,
        policy=chosen,
        min_covered=min_covered,
        min_covered_given=bool(min_images_covered),
        strict=strict,
        zones=frozenset(zones),
        max_candidates=max_candidates or DEFAULT_MAX_CANDIDATES,
        max_rejections=max_rejections or DEFAULT_MAX_REJECTIONS,
        namespace=namespace,
        pull_secrets=frozenset(image_pull_secrets) if image_pull_secrets else _NO_SECRETS,
    )


def _pod_access_violations(namespace: str, pull_secrets: Sequence[str]) -> list[FieldViolation]:
    """What is wrong with the pod's namespace and pull secret names (Kubernetes' own grammars)."""
    found: list[FieldViolation] = []
    if namespace and (len(namespace) > 63 or not _DNS_LABEL.fullmatch(namespace)):
        found.append(
            FieldViolation(
                "namespace", "must be a Kubernetes namespace name (a DNS label of at most 63 characters)"
            )
        )
    if pull_secrets and not namespace:
        found.append(FieldViolation("image_pull_secrets", "pull secrets need the pod's namespace"))
    if len(pull_secrets) > MAX_PULL_SECRETS:
        found.append(FieldViolation("image_pull_secrets", f"at most {MAX_PULL_SECRETS} names"))
        return found
    for i, name in enumerate(pull_secrets):
        if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
            found.append(
                FieldViolation(
                    f"image_pull_secrets[{i}]",
                    "must be a Secret name (a DNS subdomain of at most 253 characters)",
                )
            )
    return found
