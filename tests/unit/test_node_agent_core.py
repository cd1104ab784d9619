"""The node agent's pure core: request routing and reference mapping, hosts.toml, digest checks."""

from __future__ import annotations

import hashlib
import tomllib

import pytest

from services.node_agent.hosts_toml import MARKER, hosts_files, hosts_toml, upstream_url
from services.node_agent.http_app import parse_range
from services.node_agent.routing import Kind, MirrorRequest, Refusal, Source, accepts, route
from services.node_agent.verification import DigestMismatch, relay_verified
from snapcache.registry_auth import Challenge, parse_www_authenticate, preferred_challenge

D = "sha256:" + "a" * 64
D512 = "sha512:" + "b" * 128


@pytest.mark.parametrize(
    ("target", "kind", "expected"),
    [
        ("/v2/library/nginx/manifests/latest?ns=docker.io", Kind.MANIFEST, "docker.io/library/nginx:latest"),
        ("/v2/nginx/manifests/1.25?ns=docker.io", Kind.MANIFEST, "docker.io/library/nginx:1.25"),
        ("/v2/nginx/manifests/1.25?ns=index.docker.io", Kind.MANIFEST, "docker.io/library/nginx:1.25"),
        ("/v2/nginx/manifests/1.25", Kind.MANIFEST, "docker.io/library/nginx:1.25"),  # no ns: default
        (
            "/v2/team/app/manifests/v1?ns=registry.example.com:5000",
            Kind.MANIFEST,
            "registry.example.com:5000/team/app:v1",
        ),
        (f"/v2/demo/web/manifests/{D}?ns=127.0.0.1:5000", Kind.MANIFEST, f"127.0.0.1:5000/demo/web@{D}"),
        (f"/v2/demo/web/blobs/{D}?ns=127.0.0.1:5000", Kind.BLOB, f"127.0.0.1:5000/demo/web@{D}"),
        (f"/v2/a/b/c/blobs/{D}?ns=localhost", Kind.BLOB, f"localhost/a/b/c@{D}"),
        (f"/v2/user/app/blobs/{D}?ns=docker.io&other=1", Kind.BLOB, f"docker.io/user/app@{D}"),
        # a repository whose last component is called "manifests" or "blobs" is still a name
        ("/v2/x/manifests/manifests/t?ns=docker.io", Kind.MANIFEST, "docker.io/x/manifests:t"),
    ],
)
def test_routes_map_to_the_normalized_reference(target: str, kind: Kind, expected: str) -> None:
    routed = route("GET", target)
    assert isinstance(routed, MirrorRequest), routed
    assert routed.kind is kind
    assert str(routed.image) == expected


def test_requests_without_ns_go_to_the_configured_default_registry() -> None:
    routed = route("HEAD", "/v2/demo/web/manifests/1.0", default_registry="127.0.0.1:5000")
    assert isinstance(routed, MirrorRequest)
    assert str(routed.image) == "127.0.0.1:5000/demo/web:1.0"
    assert routed.registry == "127.0.0.1:5000"
    probe = route("GET", "/v2/?ns=quay.io", default_registry="127.0.0.1:5000")
    assert isinstance(probe, MirrorRequest) and probe.kind is Kind.BASE and probe.registry == "quay.io"
    assert route("GET", "/v2/", default_registry="127.0.0.1:5000") == MirrorRequest(
        Kind.BASE, registry="127.0.0.1:5000"
    )


@pytest.mark.parametrize(
    ("method", "target", "status", "code"),
    [
        ("PUT", "/v2/library/nginx/manifests/latest", 405, "UNSUPPORTED"),
        ("POST", "/v2/library/nginx/blobs/uploads/", 405, "UNSUPPORTED"),
        ("DELETE", f"/v2/library/nginx/blobs/{D}", 405, "UNSUPPORTED"),
        ("PATCH", "/v2/", 405, "UNSUPPORTED"),
        ("GET", "/etc/passwd", 404, "NOT_FOUND"),
        ("GET", "/v2/_catalog", 404, "UNSUPPORTED"),
        ("GET", "/v2/library/nginx/tags/list", 404, "UNSUPPORTED"),
        ("GET", "/v2/library/nginx/blobs/uploads/x", 404, "UNSUPPORTED"),
        ("GET", f"/v2/../../etc/blobs/{D}", 400, "NAME_INVALID"),
        ("GET", f"/v2/a/../../b/blobs/{D}", 400, "NAME_INVALID"),
        ("GET", f"/v2/%2e%2e/%2e%2e/blobs/{D}", 400, "NAME_INVALID"),
        ("GET", f"/v2/a//b/blobs/{D}", 400, "NAME_INVALID"),
        ("GET", f"/v2//a/blobs/{D}", 400, "NAME_INVALID"),
        ("GET", f"/v2/a\\b/blobs/{D}", 400, "NAME_INVALID"),
        ("GET", f"/v2/Upper/blobs/{D}", 400, "NAME_INVALID"),
        ("GET", f"/v2/a:b/blobs/{D}", 400, "NAME_INVALID"),
        ("GET", f"/v2/a@b/manifests/{D}", 400, "NAME_INVALID"),
        ("GET", "/v2/a/blobs/sha256:../../../etc/passwd", 404, "UNSUPPORTED"),
        ("GET", "/v2/a/blobs/sha256:..%2f..%2fetc%2fpasswd", 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/blobs/latest", 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/blobs/sha256:ABC", 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/manifests/sha256:abc", 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/manifests/.hidden", 400, "TAG_INVALID"),
        ("GET", "/v2/a/manifests/" + "t" * 200, 400, "TAG_INVALID"),
        ("GET", "/v2/a/manifests/", 400, "TAG_INVALID"),
        ("GET", "/v2/a/manifests/1?ns=../../x", 400, "NAME_INVALID"),
        ("GET", "/v2/a/manifests/1?ns=registry", 400, "NAME_INVALID"),  # not a registry host
        ("GET", "/v2/a/manifests/1?ns=docker.io&ns=quay.io", 400, "NAME_INVALID"),
        ("GET", "/v2/a/manifests/1?ns=http://evil.example", 400, "NAME_INVALID"),
        ("GET", "/v2/" + "a/" * 5000 + "manifests/1", 414, "NAME_INVALID"),
    ],
)
def test_refusals(method: str, target: str, status: int, code: str) -> None:
    routed = route(method, target)
    assert isinstance(routed, Refusal), routed
    assert (routed.status, routed.code) == (status, code)


@pytest.mark.parametrize(
    ("target", "sources"),
    [
        ("/v2/", (Source.UPSTREAM, Source.LOCAL)),  # the upstream's auth challenge, if it has one
        ("/v2", (Source.UPSTREAM, Source.LOCAL)),
        ("/v2/a/manifests/1", (Source.DISK, Source.UPSTREAM)),
        (f"/v2/a/manifests/{D}", (Source.DISK, Source.UPSTREAM)),
        (f"/v2/a/blobs/{D}", (Source.DISK, Source.UPSTREAM)),
        (f"/v2/a/blobs/{D512}", (Source.UPSTREAM,)),  # disks hold sha256 content only
    ],
)
def test_sources_in_order(target: str, sources: tuple[Source, ...]) -> None:
    routed = route("GET", target)
    assert isinstance(routed, MirrorRequest)
    assert routed.sources == sources


@pytest.mark.parametrize(
    ("accept", "media_type", "expected"),
    [
        ("", "application/vnd.oci.image.manifest.v1+json", True),
        ("*/*", "application/vnd.oci.image.manifest.v1+json", True),
        (
            "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
            True,
        ),
        (
            "application/vnd.docker.distribution.manifest.v2+json;q=0.9",
            "application/vnd.oci.image.manifest.v1+json",
            False,
        ),
        ("application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json", False),
    ],
)
def test_accepts(accept: str, media_type: str, expected: bool) -> None:
    assert accepts(accept, media_type) is expected


def test_hosts_toml_points_at_the_mirror_with_the_registry_as_fallback() -> None:
    text = hosts_toml(registry="docker.io", mirror_url="http://127.0.0.1:50055")
    assert text.startswith(MARKER)
    parsed = tomllib.loads(text)
    assert parsed["server"] == "https://registry-1.docker.io"
    assert parsed["host"] == {"http://127.0.0.1:50055": {"capabilities": ["pull", "resolve"]}}
    plain = tomllib.loads(hosts_toml(registry="10.0.0.5:5000", mirror_url="http://m:1", plain_http=True))
    assert plain["server"] == "http://10.0.0.5:5000"
    files = hosts_files(["quay.io", "docker.io"], mirror_url="http://m:1")
    assert sorted(files) == ["docker.io", "quay.io"]
    assert sorted(hosts_files([], mirror_url="http://m:1")) == ["docker.io"]  # Docker Hub always
    assert upstream_url("quay.io") == "https://quay.io"


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=10-", 100, (10, 99)),
        ("bytes=-10", 100, (90, 99)),
        ("bytes=90-500", 100, (90, 99)),
        ("bytes=100-", 100, "unsatisfiable"),
        ("bytes=5-4", 100, "unsatisfiable"),
        ("bytes=-0", 100, "unsatisfiable"),
        ("bytes=0-1,5-6", 100, None),  # several ranges: the whole body
        ("items=0-1", 100, None),
        ("bytes=-", 100, None),
    ],
)
def test_parse_range(header: str, size: int, expected: object) -> None:
    assert parse_range(header, size) == expected


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_relay_verified_sends_everything_when_the_digest_matches() -> None:
    chunks = [b"a" * 10, b"", b"b" * 10, b"c" * 5]
    sent: list[bytes] = []
    size = relay_verified(chunks, digest=_digest(b"".join(chunks)), expected_size=25, write=sent.append)
    assert size == 25 and b"".join(sent) == b"".join(chunks)


@pytest.mark.parametrize(
    ("chunks", "expected_size"),
    [
        ([b"a" * 10, b"b" * 10, b"X" * 5], 25),  # content differs
        ([b"a" * 10, b"b" * 10], 25),  # short
        ([b"a" * 10, b"b" * 10, b"c" * 5, b"d"], 25),  # long
        ([b"a" * 10, b"b" * 10, b"X" * 5], None),  # no announced size
    ],
)
def test_relay_verified_never_completes_a_bad_body(chunks: list[bytes], expected_size: int | None) -> None:
    good = b"a" * 10 + b"b" * 10 + b"c" * 5
    sent: list[bytes] = []
    with pytest.raises(DigestMismatch):
        relay_verified(chunks, digest=_digest(good), expected_size=expected_size, write=sent.append)
    assert len(b"".join(sent)) < len(good)  # the client never gets a complete body


def test_challenges_are_parsed_and_bearer_preferred() -> None:
    challenges = parse_www_authenticate(
        [
            'Basic realm="x"',
            'Bearer realm="https://auth.example/token",service="reg",scope="repository:a:pull"',
        ]
    )
    assert challenges[0] == Challenge("basic", {"realm": "x"})
    chosen = preferred_challenge(challenges)
    assert chosen is not None and chosen.scheme == "bearer"
    assert chosen.params["scope"] == "repository:a:pull"
    assert preferred_challenge(parse_www_authenticate(["Negotiate"])) is None
