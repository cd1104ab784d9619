"""Tests for snapcache.images: the one image-reference grammar every service relies on."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from snapcache.images import (
    ImageReference,
    InvalidImageReference,
    familiar_name,
    parse_image_reference,
)

pytestmark = pytest.mark.filterwarnings(
    # When a property fails, hypothesis imports libcst to write a patch; that import warns, and
    # the repo-wide filterwarnings=error would turn a readable failure into a pytest INTERNALERROR.
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning",
)

SHA256 = "sha256:" + "0123456789abcdef" * 4
SHA512 = "sha512:" + "fedcba9876543210" * 8

# distribution's ReferenceRegexp, transcribed independently from regexp.go (Go's \w and
# [[:xdigit:]] spelled out as ASCII classes). Anything the parser accepts must match it.
_GO_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_GO_DOMAIN_NAME_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_GO_HOST = rf"(?:{_GO_DOMAIN_NAME_COMPONENT}(?:\.{_GO_DOMAIN_NAME_COMPONENT})*|\[(?:[a-fA-F0-9:]+)\])"
_GO_NAME = rf"(?:{_GO_HOST}(?::[0-9]+)?/)?{_GO_PATH_COMPONENT}(?:/{_GO_PATH_COMPONENT})*"
_GO_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_GO_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9a-fA-F]{32,}"
GO_REFERENCE_RE = re.compile(rf"({_GO_NAME})(?::({_GO_TAG}))?(?:@({_GO_DIGEST}))?")


# --------------------------------------------------------------------------------------------
# Table-driven: valid references and their normalized form
# --------------------------------------------------------------------------------------------

# (input, registry, repository, tag, digest, implicit_tag)
VALID: list[tuple[str, str, str, str, str, bool]] = [
    ("nginx", "docker.io", "library/nginx", "latest", "", True),
    ("nginx:1.25", "docker.io", "library/nginx", "1.25", "", False),
    ("nginx:latest", "docker.io", "library/nginx", "latest", "", False),
    ("library/nginx", "docker.io", "library/nginx", "latest", "", True),
    ("docker.io/nginx", "docker.io", "library/nginx", "latest", "", True),
    ("docker.io/library/nginx", "docker.io", "library/nginx", "latest", "", True),
    ("index.docker.io/library/nginx", "docker.io", "library/nginx", "latest", "", True),
    ("index.docker.io/nginx:1.25", "docker.io", "library/nginx", "1.25", "", False),
    ("user/app", "docker.io", "user/app", "latest", "", True),
    ("docker.io/user/app:v2", "docker.io", "user/app", "v2", "", False),
    ("library/foo/bar", "docker.io", "library/foo/bar", "latest", "", True),
    ("localhost/app", "localhost", "app", "latest", "", True),
    ("localhost:5000/a/b:v1", "localhost:5000", "a/b", "v1", "", False),
    (
        "registry.example.com:5000/team/app@" + SHA256,
        "registry.example.com:5000",
        "team/app",
        "",
        SHA256,
        False,
    ),
    ("127.0.0.1:5000/demo/web:1.0", "127.0.0.1:5000", "demo/web", "1.0", "", False),
    ("ghcr.io/org/tool:sha-abc123", "ghcr.io", "org/tool", "sha-abc123", "", False),
    ("example.com/app", "example.com", "app", "latest", "", True),  # no library/ off docker.io
    ("nginx@" + SHA256, "docker.io", "library/nginx", "", SHA256, False),
    ("nginx:1.25@" + SHA256, "docker.io", "library/nginx", "1.25", SHA256, False),
    ("quay.io/a/b@" + SHA512, "quay.io", "a/b", "", SHA512, False),
    ("[::1]:5000/app:dev", "[::1]:5000", "app", "dev", "", False),
    ("[fc00:1:2:3:4:5:6:7]/library/debian", "[fc00:1:2:3:4:5:6:7]", "library/debian", "latest", "", True),
    ("xn--n3h.com:18080/foo", "xn--n3h.com:18080", "foo", "latest", "", True),
    ("test-com:8080/foo", "test-com:8080", "foo", "latest", "", True),
    ("Registry.Example.COM/app", "Registry.Example.COM", "app", "latest", "", True),  # host keeps case
    ("test_com/foo", "docker.io", "test_com/foo", "latest", "", True),  # "_" is no domain
    ("docker---rules/dock__er", "docker.io", "docker---rules/dock__er", "latest", "", True),
    ("a/b.c_d-e", "docker.io", "a/b.c_d-e", "latest", "", True),
    ("ubuntu-12.04-base", "docker.io", "library/ubuntu-12.04-base", "latest", "", True),
    ("nginx:_private", "docker.io", "library/nginx", "_private", "", False),
    ("nginx:" + "t" * 128, "docker.io", "library/nginx", "t" * 128, "", False),
    ("nginx:1.25-Alpine_3.19", "docker.io", "library/nginx", "1.25-Alpine_3.19", "", False),
    # Like Docker: with no "/", a host-like word is an official image and ":5000" is its tag.
    ("localhost", "docker.io", "library/localhost", "latest", "", True),
    ("localhost:5000", "docker.io", "library/localhost", "5000", "", False),
    ("192.168.0.1", "docker.io", "library/192.168.0.1", "latest", "", True),
    # 64 hex is refused only as the whole text (an image ID); as a path under a registry it is a name.
    ("docker.io/" + "1a3f" * 16, "docker.io", "library/" + "1a3f" * 16, "latest", "", True),
    ("d/" + "a" * 235, "docker.io", "d/" + "a" * 235, "latest", "", True),  # exactly 255
    ("example.com/" + "a" * 243, "example.com", "a" * 243, "latest", "", True),  # exactly 255
]


@pytest.mark.parametrize("case", VALID, ids=[case[0][:60] for case in VALID])
def test_valid_references_normalize(case: tuple[str, str, str, str, str, bool]) -> None:
    text, registry, repository, tag, digest, implicit_tag = case
    ref = parse_image_reference(text)
    assert ref == ImageReference(registry, repository, tag, digest, implicit_tag)
    assert GO_REFERENCE_RE.fullmatch(text), "accepted text must be a distribution reference"
    # The normalized string is a fixed point.
    assert str(parse_image_reference(str(ref))) == str(ref)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nginx", "docker.io/library/nginx:latest"),
        ("library/nginx", "docker.io/library/nginx:latest"),
        ("nginx@" + SHA256, "docker.io/library/nginx@" + SHA256),
        ("nginx:1.25@" + SHA256, "docker.io/library/nginx:1.25@" + SHA256),
        ("localhost:5000/a/b:v1", "localhost:5000/a/b:v1"),
    ],
)
def test_str_is_the_normalized_reference(text: str, expected: str) -> None:
    assert str(parse_image_reference(text)) == expected


def test_name_is_registry_and_repository() -> None:
    assert parse_image_reference("nginx:1.25@" + SHA256).name == "docker.io/library/nginx"


def test_implicit_tag_reparses_as_explicit_latest() -> None:
    implicit = parse_image_reference("nginx")
    explicit = parse_image_reference(str(implicit))
    assert implicit.implicit_tag
    assert not explicit.implicit_tag
    assert str(implicit) == str(explicit)


@pytest.mark.parametrize(
    ("text", "familiar"),
    [
        ("nginx:1.25", "nginx:1.25"),
        ("nginx", "nginx:latest"),
        ("docker.io/library/nginx@" + SHA256, "nginx@" + SHA256),
        ("user/app", "user/app:latest"),
        ("library/foo/bar:x", "library/foo/bar:x"),  # nested under library/ is not official
        ("localhost:5000/a/b:v1", "localhost:5000/a/b:v1"),
        ("ghcr.io/library/nginx:1", "ghcr.io/library/nginx:1"),  # library/ is Docker Hub only
        # Docker would print "my.org/app", which reads back as registry my.org: keep docker.io/.
        ("docker.io/my.org/app", "docker.io/my.org/app:latest"),
        ("docker.io/localhost/app", "docker.io/localhost/app:latest"),
    ],
)
def test_familiar_name(text: str, familiar: str) -> None:
    ref = parse_image_reference(text)
    assert familiar_name(ref) == familiar
    assert parse_image_reference(familiar_name(ref)) == parse_image_reference(str(ref))


# --------------------------------------------------------------------------------------------
# Table-driven: invalid references, each message naming the bad part
# --------------------------------------------------------------------------------------------

# (input, substrings the message must contain)
INVALID: list[tuple[str, tuple[str, ...]]] = [
    ("", ("reference is empty",)),
    ("Nginx", ("repository 'Nginx' must be lowercase",)),
    ("docker.io/docker/Docker", ("repository", "must be lowercase")),
    ("Docker/docker", ("repository", "must be lowercase")),  # stricter than distribution
    (":1.25", ("repository name is missing",)),
    ("nginx:", ("tag is empty",)),
    ("nginx@sha256:short", ("digest must be sha256:<64 lowercase hex>",)),
    ("nginx@sha256:" + "A" * 64, ("digest must be sha256:<64 lowercase hex>",)),
    ("nginx@sha512:" + "a" * 64, ("digest must be sha512:<128 lowercase hex>",)),
    ("nginx@md5:" + "a" * 32, ("digest algorithm 'md5' is not supported",)),
    ("nginx@sha384:" + "a" * 96, ("digest algorithm 'sha384' is not supported",)),
    ("nginx@" + "a" * 64, ("digest", "algorithm:hex")),
    ("nginx@", ("digest is empty",)),
    ("nginx@" + SHA256 + "@" + SHA256, ("digest must be sha256",)),
    ("@" + SHA256, ("repository name is missing before '@'",)),
    ("a//b", ("repository", "empty path component", "double slash")),
    ("docker.io/docker///docker", ("repository", "empty path component")),
    ("user/app/", ("repository", "trailing slash")),
    ("example.com/", ("repository is missing after registry 'example.com'",)),
    ("/app", ("repository", "leading slash")),
    ("-lead", ("repository", "'-lead'", "must match")),
    ("docker-/docker", ("repository", "'docker-'")),
    ("____/____", ("repository", "'____'")),
    ("dock..er/docker", ("registry 'dock..er'",)),  # a "." makes the first component a registry
    ("docker/dock..er", ("repository", "'dock..er'")),
    ("nginx latest", ("whitespace",)),
    (" nginx", ("leading or trailing whitespace",)),
    ("nginx\n", ("leading or trailing whitespace",)),
    ("nginx:" + "a" * 129, ("tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", "129")),
    ("nginx:-dash", ("tag must match",)),
    ("nginx:ta/g", ("registry 'nginx:ta'",)),  # a "/" after ":" makes "nginx:ta" a host:port
    ("nginx:t\u00e9", ("tag must match",)),  # Go's \w is ASCII only
    ("a/b:c:d", ("tag must match", "'c:d'")),
    ("a" * 256, ("name longer than 255",)),
    ("a" * 240, ("name longer than 255", "258")),  # docker.io/library/ counts
    ("example.com/" + "a" * 244, ("name longer than 255", "256")),
    ("n" * 4097, ("reference longer than 4096",)),
    ("https://x/y", ("scheme",)),
    ("https://github.com/docker/docker", ("scheme",)),
    ("1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a", ("repository", "image ID")),
    ("fc00::1:5000/debian", ("registry 'fc00::1:5000'",)),
    ("[fe80::1%eth0]:5000/debian", ("registry",)),
    ("[2001:db8:3:4::192.0.2.33]:5000/debian", ("registry",)),
    ("[fc00::1]:5000", ("repository '[fc00'",)),  # no "/": not a registry, ":1]:5000" is the tag
    ("-docker.io/docker/docker", ("registry '-docker.io'",)),
    ("example.com:port/app", ("registry 'example.com:port'",)),
    ("exa_mple.com/app", ("registry 'exa_mple.com'",)),
    ("LOCALHOST/app", ("repository", "must be lowercase")),
    ("\u212aelvin", ("repository", "invalid path component")),  # KELVIN SIGN lowercases to "k"
]


@pytest.mark.parametrize(("text", "expected"), INVALID, ids=[repr(case[0][:40]) for case in INVALID])
def test_invalid_references_say_which_part(text: str, expected: tuple[str, ...]) -> None:
    with pytest.raises(InvalidImageReference) as caught:
        parse_image_reference(text)
    message = str(caught.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_invalid_reference_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="must be lowercase"):
        parse_image_reference("Nginx")


def test_non_string_is_rejected_as_invalid_reference() -> None:
    with pytest.raises(InvalidImageReference, match="must be a string"):
        parse_image_reference(None)  # type: ignore[arg-type]


def test_messages_stay_short_for_huge_input() -> None:
    with pytest.raises(InvalidImageReference) as caught:
        parse_image_reference("A" * 4000)
    assert len(str(caught.value)) < 300


# --------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------

_ALNUM = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6)
_SEPARATOR = st.sampled_from([".", "_", "__", "-", "--", "---"])


@st.composite
def path_components(draw: st.DrawFn) -> str:
    parts = [draw(_ALNUM)]
    for _ in range(draw(st.integers(0, 3))):
        parts += [draw(_SEPARATOR), draw(_ALNUM)]
    return "".join(parts)


_DOMAIN_LABEL = st.from_regex(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", fullmatch=True)
_PORT = st.integers(0, 65535).map(lambda port: f":{port}")


@st.composite
def registries(draw: st.DrawFn) -> str:
    """A registry the parser must recognise as one: has ".", ":" or is localhost."""
    kind = draw(st.sampled_from(["dns", "dns-port", "localhost", "ipv4", "ipv6", "hub"]))
    if kind == "dns":
        labels = draw(st.lists(_DOMAIN_LABEL, min_size=2, max_size=4))
        return ".".join(labels) + draw(st.one_of(st.just(""), _PORT))
    if kind == "dns-port":
        return draw(_DOMAIN_LABEL) + draw(_PORT)
    if kind == "localhost":
        return "localhost" + draw(st.one_of(st.just(""), _PORT))
    if kind == "ipv4":
        octets = draw(st.lists(st.integers(0, 255), min_size=4, max_size=4))
        return ".".join(map(str, octets)) + draw(st.one_of(st.just(""), _PORT))
    if kind == "ipv6":
        # At least two groups: "[0]" has no ":" and so, like in Docker, is no registry at all.
        groups = draw(st.lists(st.from_regex(r"[0-9a-fA-F]{1,4}", fullmatch=True), min_size=2, max_size=4))
        return "[" + "::".join(groups) + "]" + draw(st.one_of(st.just(""), _PORT))
    return draw(st.sampled_from(["docker.io", "index.docker.io"]))


_TAG = st.one_of(
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{127}", fullmatch=True),
)
_DIGEST = st.one_of(
    st.text(alphabet="0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h),
    st.text(alphabet="0123456789abcdef", min_size=128, max_size=128).map(lambda h: "sha512:" + h),
)


@st.composite
def references(draw: st.DrawFn) -> tuple[str, str, str, str | None, str | None]:
    """(text, expected registry, expected repository, tag or None, digest or None)."""
    registry = draw(st.one_of(st.none(), registries()))
    components = draw(st.lists(path_components(), min_size=1, max_size=4))
    if registry is None and len(components) > 1:
        # Without a registry, a first component with "." would itself be read as the registry;
        # keep this oracle simple by generating only familiar Docker Hub names here.
        assume("." not in components[0] and components[0] != "localhost")
    path = "/".join(components)
    tag = draw(st.one_of(st.none(), _TAG))
    digest = draw(st.one_of(st.none(), _DIGEST))
    text = path if registry is None else f"{registry}/{path}"
    if tag is not None:
        text += f":{tag}"
    if digest is not None:
        text += f"@{digest}"

    expected_registry = "docker.io" if registry in (None, "docker.io", "index.docker.io") else registry
    expected_repository = path
    if expected_registry == "docker.io" and len(components) == 1:
        expected_repository = "library/" + path
    assume(len(f"{expected_registry}/{expected_repository}") <= 255)
    return text, expected_registry, expected_repository, tag, digest


@given(references())
def test_generated_valid_references_parse_and_round_trip(
    case: tuple[str, str, str, str | None, str | None],
) -> None:
    text, registry, repository, tag, digest = case
    ref = parse_image_reference(text)

    assert ref.registry == registry
    assert ref.repository == repository
    assert ref.digest == (digest or "")
    if tag is None and digest is None:
        assert (ref.tag, ref.implicit_tag) == ("latest", True)
    else:
        assert (ref.tag, ref.implicit_tag) == (tag or "", False)

    normalized = str(ref)
    again = parse_image_reference(normalized)
    assert str(again) == normalized
    assert (again.registry, again.repository, again.tag, again.digest) == (
        ref.registry,
        ref.repository,
        ref.tag,
        ref.digest,
    )
    assert parse_image_reference(familiar_name(ref)) == again


_REFERENCE_ALPHABET = "abzAZ09._-_/:@[]% \n\u00e9"


@given(st.one_of(st.text(), st.text(alphabet=_REFERENCE_ALPHABET, max_size=40)))
def test_arbitrary_text_parses_or_raises_invalid_reference(text: str) -> None:
    try:
        ref = parse_image_reference(text)
    except InvalidImageReference as error:
        assert str(error)
        return
    # Soundness against distribution's own grammar, and the normalized form is a fixed point.
    assert GO_REFERENCE_RE.fullmatch(text)
    assert str(parse_image_reference(str(ref))) == str(ref)


@given(references(), st.data())
def test_uppercase_in_repository_is_rejected(
    case: tuple[str, str, str, str | None, str | None], data: st.DataObject
) -> None:
    text, _, _, _, _ = case
    name_and_tag = text.partition("@")[0]
    # The repository is everything after the registry (if written) up to the tag.
    first, slash, _ = name_and_tag.partition("/")
    has_registry = bool(slash) and ("." in first or ":" in first or first == "localhost")
    start = len(first) + 1 if has_registry else 0
    last_slash = name_and_tag.rfind("/")
    colon = name_and_tag.find(":", last_slash + 1)
    end = colon if colon >= 0 else len(name_and_tag)
    position = data.draw(st.integers(start, end), label="position")
    letter = data.draw(st.sampled_from("ABCXYZ"), label="letter")
    mutated = text[:position] + letter + text[position:]

    with pytest.raises(InvalidImageReference, match=r"repository .* must be lowercase"):
        parse_image_reference(mutated)


@given(references(), st.data())
def test_whitespace_anywhere_is_rejected(
    case: tuple[str, str, str, str | None, str | None], data: st.DataObject
) -> None:
    text = case[0]
    position = data.draw(st.integers(0, len(text)), label="position")
    space = data.draw(st.sampled_from([" ", "\t", "\n", "\u00a0"]), label="space")
    mutated = text[:position] + space + text[position:]

    with pytest.raises(InvalidImageReference, match="whitespace"):
        parse_image_reference(mutated)
