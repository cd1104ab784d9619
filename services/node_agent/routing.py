"""What a container runtime asks the mirror for: distribution API paths (and containerd's ``ns``).

containerd's ``hosts.toml`` mirror mechanism sends the distribution API's read requests to the
mirror with the image's real registry in the query: ``GET /v2/library/nginx/manifests/1.25?ns=
docker.io``, ``GET /v2/library/nginx/blobs/sha256:...?ns=docker.io``. This module turns such a
request into a normalized ``ImageReference`` with the project's one grammar (``snapcache.images``),
so ``ns=docker.io`` + ``library/nginx`` (or ``nginx``) is ``docker.io/library/nginx`` exactly as
the registry stored it when it built the cache, and decides where an answer may come from.

Everything the grammar refuses is refused here, before any file or socket is touched: a name
with ``..``, ``%2e``, a backslash or an empty component never reaches the disk catalogue (which,
in any case, only looks up digests it read from the disks' own manifests). Only GET and HEAD
exist: the mirror is read-only. Pure: no HTTP library, no files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Final
from urllib.parse import parse_qs

from snapcache.images import DEFAULT_REGISTRY, ImageReference, InvalidImageReference, parse_image_reference

READ_METHODS: Final = frozenset({"GET", "HEAD"})
_SHA256: Final = re.compile(r"sha256:[a-f0-9]{64}")
# The registry part of a reference: what ``ns`` must be (the grammar's domain rule, plus "a dot,
# a colon or localhost", which is how any reference's first component becomes a registry).
_HOST: Final = re.compile(
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*"
    r"[a-zA-Z0-9]))*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
_MAX_TARGET: Final = 8192


class Kind(Enum):
    """What a request asks for."""

    BASE = "base"  # GET /v2/: "do you speak the distribution API?"
    MANIFEST = "manifest"
    BLOB = "blob"


class Source(Enum):
    """Where an answer may come from, in the order to try."""

    LOCAL = "local"  # the mirror answers itself (the /v2/ probe)
    DISK = "disk"  # an attached disk's OCI layout
    UPSTREAM = "upstream"  # the image's real registry (pass-through)


@dataclass(frozen=True, slots=True)
class MirrorRequest:
    """A valid read request: what is asked for and the normalized image it belongs to."""

    kind: Kind
    # The image: registry (from ``ns``), repository, and the tag or digest of the manifest asked
    # for; for a blob, the blob's digest. ``None`` only for the /v2/ probe.
    image: ImageReference | None = None
    registry: str = ""  # the upstream registry host (of the image, or of the probe)

    @property
    def sources(self) -> tuple[Source, ...]:
        """Where to look, in order: a disk only holds sha256 content; the rest comes from upstream.

        The /v2/ probe is the upstream's answer when it has one: a client that authenticates
        (skopeo, docker) learns from it whether and how to, as it would talking to the registry;
        with the upstream away, the mirror still answers that it speaks the API.
        """
        if self.kind is Kind.BASE or self.image is None:
            return (Source.UPSTREAM, Source.LOCAL)
        if self.kind is Kind.BLOB and not _SHA256.fullmatch(self.image.digest):
            return (Source.UPSTREAM,)
        return (Source.DISK, Source.UPSTREAM)

    @property
    def reference(self) -> str:
        """The tag or digest in the path (``manifests/<this>``, ``blobs/<this>``)."""
        assert self.image is not None
        return self.image.digest or self.image.tag


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the mirror answers with an error of the distribution API."""

    status: int
    code: str  # the distribution error code: NAME_INVALID, DIGEST_INVALID, UNSUPPORTED, ...
    message: str


def route(method: str, target: str, *, default_registry: str = DEFAULT_REGISTRY) -> MirrorRequest | Refusal:
    """Classify ``method`` + request ``target`` (path and query as sent); never raises.

    ``default_registry`` is the upstream of a request without ``ns`` (a client talking to the
    mirror directly, as ``skopeo copy docker://MIRROR/...`` does).
    """
    if method not in READ_METHODS:
        return Refusal(405, "UNSUPPORTED", f"the mirror is read-only: {method[:20]} is not allowed")
    if len(target) > _MAX_TARGET:
        return Refusal(414, "NAME_INVALID", f"request target longer than {_MAX_TARGET} chars")
    path, _, query = target.partition("?")
    if path in ("/v2", "/v2/") or path.startswith("/v2/"):
        registry = _registry(query, default_registry)
        if isinstance(registry, Refusal):
            return registry
    else:
        return Refusal(404, "NOT_FOUND", "only the distribution API (/v2/...) is served")
    if path in ("/v2", "/v2/"):
        return MirrorRequest(Kind.BASE, registry=registry)
    parts = path[len("/v2/") :].rsplit("/", 2)
    if len(parts) != 3 or parts[1] not in ("manifests", "blobs"):
        return Refusal(404, "UNSUPPORTED", "only manifests and blobs are served (GET/HEAD)")
    name, section, reference = parts
    kind = Kind.MANIFEST if section == "manifests" else Kind.BLOB
    return _request(kind, registry, name, reference)


def _registry(query: str, default_registry: str) -> str | Refusal:
    try:
        values = parse_qs(query, keep_blank_values=True, strict_parsing=False, max_num_fields=16).get("ns")
    except ValueError:
        return Refusal(400, "NAME_INVALID", "query has too many fields")
    if not values:
        return default_registry
    if len(values) > 1:
        return Refusal(400, "NAME_INVALID", "ns given more than once")
    host = values[0]
    if not _HOST.fullmatch(host) or not ("." in host or ":" in host or host == "localhost"):
        return Refusal(
            400, "NAME_INVALID", f"ns {host[:80]!r} is not a registry host (HOST[:PORT] with a '.' or ':')"
        )
    return host


def _request(kind: Kind, registry: str, name: str, reference: str) -> MirrorRequest | Refusal:
    # ":" and "@" would let the grammar read part of the name as a tag or digest.
    if not name or ":" in name or "@" in name:
        return Refusal(400, "NAME_INVALID", f"invalid repository name {name[:80]!r}")
    try:
        image_name = parse_image_reference(f"{registry}/{name}")
    except InvalidImageReference as exc:
        return Refusal(400, "NAME_INVALID", str(exc))
    full = image_name.name
    if kind is Kind.BLOB or ":" in reference:
        try:
            image = parse_image_reference(f"{full}@{reference}")
        except InvalidImageReference as exc:
            return Refusal(400, "DIGEST_INVALID", str(exc))
        return MirrorRequest(kind, image, image.registry)
    try:
        image = parse_image_reference(f"{full}:{reference}")
    except InvalidImageReference as exc:
        return Refusal(400, "TAG_INVALID", str(exc))
    return MirrorRequest(kind, image, image.registry)


def accepts(accept_header: str, media_type: str) -> bool:
    """Whether a client's ``Accept`` takes ``media_type`` (no header, or ``*/*``, takes anything)."""
    if not accept_header.strip():
        return True
    offered = {item.split(";")[0].strip().lower() for item in accept_header.split(",")}
    return bool(offered & {media_type.lower(), "*/*", "application/*"})
