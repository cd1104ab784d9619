"""Container image references: Docker's reference grammar and its normalization.

One implementation for the whole project (registry, matcher, extender, node agent). Every
service compares, stores and looks up images by their normalized string, so ``nginx``,
``library/nginx``, ``docker.io/nginx`` and ``index.docker.io/library/nginx:latest`` must all
become the same key everywhere. Two parsers that disagree on a single corner case would mean a
cache built by one service is silently never matched by another; hence exactly one parser.

The grammar follows github.com/distribution/reference (``reference.go``, ``normalize.go``,
``regexp.go``)::

    reference        := name [ ":" tag ] [ "@" digest ]
    name             := [domain "/"] path-component ("/" path-component)*
    domain           := host [":" port-number]
    host             := domain-name | IPv4address | "[" IPv6address "]"
    domain-name      := domain-component ("." domain-component)*
    domain-component := /[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]/
    path-component   := /[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*/
    tag              := /[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}/
    digest           := "sha256:" 64 lowercase hex | "sha512:" 128 lowercase hex

Where this module is stricter than distribution, it is on purpose:

* Only sha256 and sha512 digests are accepted: they are what registries serve, and a digest we
  cannot verify is useless as a cache key.
* A first component is a domain only when it contains ``.`` or ``:`` or is ``localhost``.
  Recent distribution also treats an uppercase first component (``Foo/bar``) as a domain; we
  report it as an uppercase repository instead, which is almost always what the user meant.
* The 255-character limit applies to the normalized name (registry and repository), which is
  what every service stores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_REGISTRY",
    "DEFAULT_TAG",
    "MAX_NAME_LENGTH",
    "MAX_REFERENCE_LENGTH",
    "ImageReference",
    "InvalidImageReference",
    "familiar_name",
    "parse_image_reference",
]

DEFAULT_REGISTRY: Final = "docker.io"
DEFAULT_TAG: Final = "latest"
MAX_NAME_LENGTH: Final = 255
# No valid reference comes near this (name 255 + tag 129 + digest 136); the cap keeps hostile
# input from costing regex time and from ending up verbatim in error messages and logs.
MAX_REFERENCE_LENGTH: Final = 4096

_LEGACY_REGISTRY: Final = "index.docker.io"
_OFFICIAL_PREFIX: Final = "library/"
_LOCALHOST: Final = "localhost"

# Spelled out rather than \w: Python's \w matches any Unicode letter, Go's only ASCII.
_PATH_COMPONENT_PATTERN: Final = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_DOMAIN_COMPONENT: Final = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6_HOST: Final = r"\[[a-fA-F0-9:]+\]"
_DOMAIN_PATTERN: Final = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6_HOST})(?::[0-9]+)?"
_TAG_PATTERN: Final = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"

# fullmatch everywhere: re's "$" also matches before a trailing newline.
_PATH_COMPONENT_RE: Final = re.compile(_PATH_COMPONENT_PATTERN)
_DOMAIN_RE: Final = re.compile(_DOMAIN_PATTERN)
_TAG_RE: Final = re.compile(_TAG_PATTERN)
_DIGEST_HEX_RE: Final = {
    "sha256": re.compile(r"[a-f0-9]{64}"),
    "sha512": re.compile(r"[a-f0-9]{128}"),
}
_DIGEST_SHAPES: Final = "sha256:<64 lowercase hex> or sha512:<128 lowercase hex>"
# distribution refuses a bare 64-hex name: it is an image ID, and accepting it as
# docker.io/library/<hex> would turn a typo'd ID into a pull of a nonexistent repository.
_IMAGE_ID_RE: Final = re.compile(r"[a-f0-9]{64}")
_SCHEME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

_SHOWN_CHARS: Final = 80


# The name is part of the project-wide interface, hence no "Error" suffix.
class InvalidImageReference(ValueError):
    """The text is not a valid image reference; the message says which part and why."""


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A normalized image reference: ``docker.io/library/nginx:latest``."""

    registry: str  # "docker.io", "registry.example.com:5000", "localhost"
    repository: str  # "library/nginx", "team/app"
    tag: str  # "" when only a digest was given; "latest" when neither was given
    digest: str  # "sha256:<64 hex>" or ""
    implicit_tag: bool = False  # True when "latest" was implied, not written

    @property
    def name(self) -> str:
        """Registry and repository: ``docker.io/library/nginx``."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_image_reference(text: str) -> ImageReference:
    """Parse and normalize ``text``; raise ``InvalidImageReference`` when it is not valid."""
    if not isinstance(text, str):
        # Callers pass values decoded from JSON/YAML; a None or int must not escape as TypeError.
        raise InvalidImageReference(f"reference must be a string, not {type(text).__name__}")
    _check_whole(text)

    # Checked left to right so the message names the first bad part as the user reads it.
    name_and_tag, at, digest = text.partition("@")
    name, tag = _split_tag(name_and_tag)
    if not name:
        raise InvalidImageReference(f"repository name is missing before {'@' if at else ':'!r}")
    registry, repository = _split_registry(name)
    _check_repository(repository)
    if tag is not None:
        _check_tag(tag)
    if at:
        _check_digest(digest)

    registry, repository = _normalize(registry, repository)
    full_name = f"{registry}/{repository}"
    if len(full_name) > MAX_NAME_LENGTH:
        raise InvalidImageReference(
            f"name longer than {MAX_NAME_LENGTH} chars: registry/repository {_show(full_name)} "
            f"is {len(full_name)} chars"
        )

    if tag is None and not digest:
        return ImageReference(registry, repository, DEFAULT_TAG, "", implicit_tag=True)
    # With a digest only, the tag stays empty: adding "latest" would claim a tag nobody wrote
    # and make the digest-pinned reference look like a floating one.
    return ImageReference(registry, repository, tag or "", digest)


def familiar_name(ref: ImageReference) -> str:
    """Docker's short form for human output: ``nginx:1.25``, ``user/app:latest``.

    Like distribution's ``FamiliarString``: drop ``docker.io/`` and, for official images,
    ``library/`` (only when nothing is nested below it, since ``library/a/b`` is not official).
    Unlike it, ``docker.io/`` stays when the short form would read as another registry
    (``docker.io/my.org/app`` is not ``my.org/app``), so pasting the output back is safe.
    """
    path = ref.name
    if ref.registry == DEFAULT_REGISTRY:
        short = ref.repository
        official = short.removeprefix(_OFFICIAL_PREFIX)
        if official != short and "/" not in official:
            short = official
        first, slash, _ = short.partition("/")
        if not (slash and _looks_like_registry(first)):
            path = short
    text = path
    if ref.tag:
        text += f":{ref.tag}"
    if ref.digest:
        text += f"@{ref.digest}"
    return text


def _check_whole(text: str) -> None:
    """Reject what is wrong with the text as a whole before splitting it into parts."""
    if not text:
        raise InvalidImageReference("reference is empty")
    if len(text) > MAX_REFERENCE_LENGTH:
        raise InvalidImageReference(f"reference longer than {MAX_REFERENCE_LENGTH} chars (got {len(text)})")
    # Not stripped: a reference with stray whitespace usually comes from a broken template or
    # copy-paste, and quietly fixing it here would hide that from whoever wrote it.
    if text.strip() != text:
        raise InvalidImageReference(f"reference {_show(text)} has leading or trailing whitespace")
    for index, char in enumerate(text):
        if char.isspace():
            raise InvalidImageReference(f"reference {_show(text)} contains whitespace at position {index}")
    if _SCHEME_RE.match(text):
        raise InvalidImageReference(
            f"reference {_show(text)} must not start with a URL scheme; "
            "write registry/repository[:tag], e.g. registry.example.com/team/app:1.0"
        )
    if _IMAGE_ID_RE.fullmatch(text):
        raise InvalidImageReference(
            f"repository {_show(text)} must not be 64 hex characters: that is an image ID, not a name"
        )


def _split_tag(name_and_tag: str) -> tuple[str, str | None]:
    """Split off ``:tag``; ``None`` means no tag was written (``""`` means ``name:``)."""
    # Only the registry may contain ":" (its port), and the registry ends at the first "/", so
    # the tag separator is the first ":" after the last "/".
    last_slash = name_and_tag.rfind("/")
    colon = name_and_tag.find(":", last_slash + 1)
    if colon < 0:
        return name_and_tag, None
    return name_and_tag[:colon], name_and_tag[colon + 1 :]


def _split_registry(name: str) -> tuple[str, str]:
    """Split ``name`` into registry (``""`` when none was written) and repository path."""
    first, slash, rest = name.partition("/")
    if slash and _looks_like_registry(first):
        if not _DOMAIN_RE.fullmatch(first):
            raise InvalidImageReference(
                f"registry {_show(first)} must be a hostname, IPv4 address or [IPv6] address, "
                "optionally followed by :port"
            )
        if not rest:
            raise InvalidImageReference(
                f"repository is missing after registry {_show(first)} (trailing slash)"
            )
        return first, rest
    return "", name


def _looks_like_registry(first_component: str) -> bool:
    """distribution's rule for whether the component before the first "/" names a registry."""
    return first_component == _LOCALHOST or "." in first_component or ":" in first_component


def _check_repository(repository: str) -> None:
    components = repository.split("/")
    for index, component in enumerate(components):
        if _PATH_COMPONENT_RE.fullmatch(component):
            continue
        if not component:
            if index == 0:
                where = "leading slash"
            elif index == len(components) - 1:
                where = "trailing slash"
            else:
                where = "double slash"
            raise InvalidImageReference(
                f"repository {_show(repository)} has an empty path component ({where})"
            )
        # isascii: some non-ASCII letters lowercase to ASCII (KELVIN SIGN -> "k"), and
        # "must be lowercase" would be bad advice for those.
        if component.isascii() and _PATH_COMPONENT_RE.fullmatch(component.lower()):
            raise InvalidImageReference(f"repository {_show(repository)} must be lowercase")
        raise InvalidImageReference(
            f"repository {_show(repository)} has invalid path component {_show(component)}: "
            f"each component must match {_PATH_COMPONENT_PATTERN}"
        )


def _check_tag(tag: str) -> None:
    if not tag:
        raise InvalidImageReference("tag is empty after ':'")
    if _TAG_RE.fullmatch(tag):
        return
    detail = f" (got {len(tag)} chars, at most 128)" if len(tag) > 128 else f", got {_show(tag)}"
    raise InvalidImageReference(f"tag must match {_TAG_PATTERN}{detail}")


def _check_digest(digest: str) -> None:
    if not digest:
        raise InvalidImageReference(f"digest is empty after '@'; digest must be {_DIGEST_SHAPES}")
    algorithm, colon, hex_part = digest.partition(":")
    if not colon:
        raise InvalidImageReference(f"digest {_show(digest)} must be algorithm:hex, i.e. {_DIGEST_SHAPES}")
    hex_re = _DIGEST_HEX_RE.get(algorithm)
    if hex_re is None:
        raise InvalidImageReference(
            f"digest algorithm {_show(algorithm)} is not supported: digest must be {_DIGEST_SHAPES}"
        )
    if not hex_re.fullmatch(hex_part):
        width = 64 if algorithm == "sha256" else 128
        raise InvalidImageReference(
            f"digest must be {algorithm}:<{width} lowercase hex>, got {_show(digest)}"
        )


def _normalize(registry: str, repository: str) -> tuple[str, str]:
    if registry in ("", _LEGACY_REGISTRY):
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = _OFFICIAL_PREFIX + repository
    return registry, repository


def _show(value: str) -> str:
    """Quote a piece of user input for a message, cut short so a huge input stays readable."""
    if len(value) > _SHOWN_CHARS:
        value = value[: _SHOWN_CHARS - 3] + "..."
    return repr(value)
