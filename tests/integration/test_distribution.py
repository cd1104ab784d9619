"""The distribution client: pure parsers (tables), auth flows (MockTransport), a real registry (e2e)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest

from services.cache_registry.distribution import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    ZSTD_ESTIMATED_RATIO,
    Descriptor,
    DistributionClient,
    gzip_uncompressed_size,
    platform_matches,
    uncompressed_size_of_file,
    zstd_frame_content_size,
    zstd_uncompressed_size,
)
from services.cache_registry.provider import BuildFailure, Platform, RegistryCredential
from snapcache.demo.oci_images import ImageSpec, LayerSpec, build_image, push_image
from snapcache.images import ImageReference
from snapcache.registry_auth import Challenge, parse_www_authenticate
from tests.support.oci_fixtures import PRIVATE_PASSWORD, OciRegistry, PushedImages

GiB = 1024**3
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


# --- pure parts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            [
                'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                'scope="repository:library/nginx:pull"'
            ],
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://auth.docker.io/token",
                        "service": "registry.docker.io",
                        "scope": "repository:library/nginx:pull",
                    },
                )
            ],
        ),
        (['Basic realm="snapcache"'], [Challenge("basic", {"realm": "snapcache"})]),
        (
            ['Basic realm="a", Bearer realm="https://t/token",service="s"'],
            [
                Challenge("basic", {"realm": "a"}),
                Challenge("bearer", {"realm": "https://t/token", "service": "s"}),
            ],
        ),
        (
            ['Basic realm="a"', "bearer Realm=https://t/token, Service=s"],
            [
                Challenge("basic", {"realm": "a"}),
                Challenge("bearer", {"realm": "https://t/token", "service": "s"}),
            ],
        ),
        (
            ['Bearer realm="r",scope="repository:a:pull,push"'],
            [Challenge("bearer", {"realm": "r", "scope": "repository:a:pull,push"})],
        ),
        (['Bearer realm="quo\\"ted"'], [Challenge("bearer", {"realm": 'quo"ted'})]),
        (["Negotiate"], [Challenge("negotiate", {})]),
        ([""], []),
        (["   "], []),
    ],
)
def test_parse_www_authenticate(headers: list[str], expected: list[Challenge]) -> None:
    assert parse_www_authenticate(headers) == expected


@pytest.mark.parametrize(
    ("wanted", "candidate", "matches"),
    [
        (Platform("linux", "arm64"), Platform("linux", "arm64", "v8"), True),
        (Platform("linux", "arm64", "v8"), Platform("linux", "arm64"), True),
        (Platform("linux", "arm64"), Platform("linux", "aarch64"), True),
        (Platform("linux", "amd64"), Platform("linux", "amd64"), True),
        (Platform("linux", "amd64"), Platform("linux", "x86_64"), True),
        (Platform("linux", "arm", "v7"), Platform("linux", "arm"), True),
        (Platform("linux", "arm", "v6"), Platform("linux", "arm", "v7"), False),
        (Platform("linux", "amd64"), Platform("linux", "arm64"), False),
        (Platform("linux", "amd64"), Platform("windows", "amd64"), False),
        (Platform("linux", "arm64"), Platform("unknown", "unknown"), False),
    ],
)
def test_platform_matches(wanted: Platform, candidate: Platform, matches: bool) -> None:
    assert platform_matches(wanted, candidate) is matches


@pytest.mark.parametrize(
    ("true_size", "compressed", "expected"),
    [
        (1000, 500, 1000),
        (1_000_000, 1_000_160, 1_000_000),  # incompressible: stored blocks make it slightly larger
        (1_000_000, 1_015_000, 1_000_000),  # 1.5% bigger: an encoder with tiny blocks, still no "wrap"
        (3 * GiB, 3 * GiB + 2 * 1024**2, 3 * GiB),  # a big incompressible layer, no false wrap
        (5 * GiB, int(4.5 * GiB), 5 * GiB),  # wrapped once, recovered from the compressed size
        (9 * GiB, int(8.7 * GiB), 9 * GiB),  # wrapped twice, recovered
        (9 * GiB, 9 * 1024**2, 1 * GiB),  # saved > 4 GiB: low by a multiple of 4 GiB (documented)
    ],
)
def test_gzip_uncompressed_size(true_size: int, compressed: int, expected: int) -> None:
    assert gzip_uncompressed_size(isize=true_size % 2**32, compressed_size=compressed) == expected


def test_gzip_trailer_of_a_multi_member_stream_is_rejected() -> None:
    # eStargz ends with a tiny footer member: ISIZE says ~0 for a 1 MiB stream, impossible for deflate
    assert gzip_uncompressed_size(isize=0, compressed_size=1024**2) is None


def test_gzip_size_against_real_streams(tmp_path: Path) -> None:
    rng = random.Random(7)
    for size, random_part in [
        (0, 0),
        (1, 1),
        (511, 0),
        (4096, 100),
        (100_000, 50_000),
        (2_000_003, 2_000_003),
    ]:
        data = rng.randbytes(random_part) + bytes(size - random_part)
        blob = gzip.compress(data)
        path = tmp_path / "layer.gz"
        path.write_bytes(blob)
        layer = Descriptor(
            media_type="application/vnd.oci.image.layer.v1.tar+gzip", digest="", size=len(blob)
        )
        assert uncompressed_size_of_file(layer, path) == size


def _zstd_header(descriptor: int, *, window: bool, dictionary: bytes, size_field: bytes) -> bytes:
    return ZSTD_MAGIC + bytes([descriptor]) + (b"\x58" if window else b"") + dictionary + size_field


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (_zstd_header(0b0010_0000, window=False, dictionary=b"", size_field=bytes([200])), 200),
        (
            _zstd_header(
                0b0100_0000, window=True, dictionary=b"", size_field=(1000 - 256).to_bytes(2, "little")
            ),
            1000,
        ),
        (
            _zstd_header(
                0b1000_0001, window=True, dictionary=b"\x07", size_field=(123_456).to_bytes(4, "little")
            ),
            123_456,
        ),
        (
            _zstd_header(
                0b1110_0010, window=False, dictionary=b"\x01\x02", size_field=(5 * GiB).to_bytes(8, "little")
            ),
            5 * GiB,
        ),
        (_zstd_header(0b0000_0000, window=True, dictionary=b"", size_field=b""), None),  # size not stated
        (b"\x1f\x8b\x08\x00" + bytes(14), None),  # not zstd
        (ZSTD_MAGIC + bytes([0b1000_0000, 0x58, 1]), None),  # truncated
    ],
)
def test_zstd_frame_content_size(header: bytes, expected: int | None) -> None:
    assert zstd_frame_content_size(header) == expected


def test_zstd_size_estimates_when_unknown_or_a_first_frame_only() -> None:
    no_size = _zstd_header(0, window=True, dictionary=b"", size_field=b"")
    assert zstd_uncompressed_size(header=no_size, compressed_size=1000) == 1000 * ZSTD_ESTIMATED_RATIO
    small_first_frame = _zstd_header(
        0b1000_0000, window=True, dictionary=b"", size_field=(10).to_bytes(4, "little")
    )
    assert (
        zstd_uncompressed_size(header=small_first_frame, compressed_size=100_000)
        == 100_000 * ZSTD_ESTIMATED_RATIO
    )


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd CLI not installed")
def test_zstd_size_against_the_real_encoder(tmp_path: Path) -> None:
    source = tmp_path / "data"
    source.write_bytes(random.Random(3).randbytes(300_000) + bytes(700_000))
    from_file = subprocess.run(["zstd", "-q", "-c", str(source)], capture_output=True, check=True).stdout
    from_pipe = subprocess.run(
        ["zstd", "-q", "-c"], input=source.read_bytes(), capture_output=True, check=True
    ).stdout
    assert zstd_frame_content_size(from_file[:18]) == 1_000_000
    assert zstd_frame_content_size(from_pipe[:18]) is None  # streaming encoders do not state it
    path = tmp_path / "layer.zst"
    path.write_bytes(from_file)
    layer = Descriptor("application/vnd.oci.image.layer.v1.tar+zstd", "", len(from_file))
    assert uncompressed_size_of_file(layer, path) == 1_000_000


# --- auth and error mapping through MockTransport ------------------------------------------------

REGISTRY = "reg.example.com"
TOKEN_URL = "https://auth.example.com/token"
BEARER_CHALLENGE = f'Bearer realm="{TOKEN_URL}",service="{REGISTRY}",scope="repository:team/app:pull"'


@dataclass
class FakeRegistry:
    """A scripted registry + token service: serves one image, records every request."""

    challenge: str = BEARER_CHALLENGE
    token_body: Callable[[httpx.Request], httpx.Response] | None = None
    valid_token: str = "T1"
    basic: tuple[str, str] = ("alice", "pw-alice")
    manifest_headers: dict[str, str] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    token_requests: list[httpx.Request] = field(default_factory=list)
    fail_status: int = 0

    def __post_init__(self) -> None:
        self.image = build_image(ImageSpec("team/app", "1.0", [LayerSpec(4096, seed=5)]))

    def blob(self, digest: str) -> bytes:
        content = self.image.blobs[digest]
        assert isinstance(content, bytes)  # built in memory
        return content

    def authorized(self, request: httpx.Request) -> bool:
        header: str = request.headers.get("Authorization", "")
        if self.challenge.startswith("Basic"):
            user, password = self.basic
            return header == "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        return header == f"Bearer {self.valid_token}"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example.com":
            self.token_requests.append(request)
            if self.token_body is not None:
                return self.token_body(request)
            return httpx.Response(200, json={"access_token": self.valid_token, "expires_in": 300})
        self.requests.append(request)
        if request.url.host == "storage.example.com":
            return httpx.Response(200, content=self.blob(request.url.params["d"]))
        if self.fail_status:
            return httpx.Response(self.fail_status, json={"errors": [{"code": "UNAVAILABLE"}]})
        if not self.authorized(request):
            return httpx.Response(
                401, headers={"WWW-Authenticate": self.challenge}, json={"errors": [{"code": "UNAUTHORIZED"}]}
            )
        path = request.url.path
        if path.startswith("/v2/team/app/manifests/"):
            return httpx.Response(
                200,
                content=self.image.manifest_bytes,
                headers={
                    "Content-Type": OCI_MANIFEST,
                    "Docker-Content-Digest": self.image.manifest_digest,
                    **self.manifest_headers,
                },
            )
        if path.startswith("/v2/team/app/blobs/"):
            digest = path.rsplit("/", 1)[1]
            if digest == self.image.layers[0].digest:  # layers live in object storage
                return httpx.Response(307, headers={"Location": f"https://storage.example.com/b?d={digest}"})
            return httpx.Response(200, content=self.blob(digest))
        return httpx.Response(404, json={"errors": [{"code": "NAME_UNKNOWN"}]})


def _client(fake: FakeRegistry, **kwargs: object) -> DistributionClient:
    return DistributionClient(transport=httpx.MockTransport(fake), **kwargs)  # type: ignore[arg-type]


REF = ImageReference(REGISTRY, "team/app", "1.0", "")


def test_a_token_is_fetched_for_the_scope_this_request_was_challenged_for() -> None:
    """Another thread's 401 for another repository, landing in between, must not change the scope."""
    other = Challenge(
        "bearer",
        {"realm": TOKEN_URL, "service": REGISTRY, "scope": "repository:team/other:pull"},
    )
    fake = FakeRegistry()
    client = _client(fake, credentials={REGISTRY: RegistryCredential("alice", "pw-alice")})
    remember = client._remember_challenge

    def remembered_then_overwritten(registry: str, challenges: Sequence[Challenge]) -> Challenge | None:
        chosen = remember(registry, challenges)
        client._challenges[registry] = other  # a concurrent request for team/other, just now
        return chosen

    client._remember_challenge = remembered_then_overwritten  # type: ignore[method-assign]
    resolved = client.resolve(REF, platform=Platform())
    assert resolved.manifest.digest == fake.image.manifest_digest
    assert [r.url.params["scope"] for r in fake.token_requests] == ["repository:team/app:pull"]


def test_bearer_flow_with_basic_credentials_and_token_cache() -> None:
    fake = FakeRegistry()
    client = _client(fake, credentials={REGISTRY: RegistryCredential("alice", "pw-alice")})
    resolved = client.resolve(REF, platform=Platform())
    assert resolved.manifest.digest == fake.image.manifest_digest
    assert resolved.config_bytes == fake.image.config_bytes
    client.resolve(REF, platform=Platform())

    assert len(fake.token_requests) == 1  # cached per scope
    token_request = fake.token_requests[0]
    assert token_request.headers["Authorization"] == "Basic " + base64.b64encode(b"alice:pw-alice").decode()
    assert parse_qs(token_request.url.query.decode()) == {
        "service": [REGISTRY],
        "scope": ["repository:team/app:pull"],
    }
    assert str(fake.requests[0].url) == f"https://{REGISTRY}/v2/team/app/manifests/1.0"
    assert "Authorization" not in fake.requests[0].headers  # anonymous until challenged
    assert all(r.headers["Authorization"] == "Bearer T1" for r in fake.requests[1:])
    assert len(fake.requests) == 5  # 401, manifest, config; then manifest, config with the token


def test_anonymous_token_and_token_field() -> None:
    fake = FakeRegistry(token_body=lambda request: httpx.Response(200, json={"token": "T1"}))
    _client(fake).resolve(REF, platform=Platform())
    assert "Authorization" not in fake.token_requests[0].headers


def test_identity_token_is_an_oauth_refresh_token() -> None:
    seen: list[dict[str, list[str]]] = []

    def token(request: httpx.Request) -> httpx.Response:
        seen.append(parse_qs(request.content.decode()))
        return httpx.Response(200, json={"access_token": "T1"})

    fake = FakeRegistry(token_body=token)
    client = _client(fake, credentials={REGISTRY: RegistryCredential(identity_token="refresh-me")})
    client.resolve(REF, platform=Platform())
    assert fake.token_requests[0].method == "POST"
    assert seen[0]["grant_type"] == ["refresh_token"]
    assert seen[0]["refresh_token"] == ["refresh-me"]


def test_expired_token_is_fetched_again() -> None:
    fake = FakeRegistry(token_body=lambda request: httpx.Response(200, json={"token": "T1", "expires_in": 1}))
    client = _client(fake)
    client.resolve(REF, platform=Platform())
    assert len(fake.token_requests) == 1  # a short-lived token is still reused while it lasts
    time.sleep(0.8)  # past the last quarter of its life: renewed before it runs out
    client.resolve(REF, platform=Platform())
    assert len(fake.token_requests) == 2


def test_token_refused_is_auth_failure_without_the_password() -> None:
    fake = FakeRegistry(token_body=lambda request: httpx.Response(401, json={"details": "bad creds"}))
    client = _client(fake, credentials={REGISTRY: RegistryCredential("alice", "pw-alice")})
    with pytest.raises(BuildFailure) as caught:
        client.resolve(REF, platform=Platform())
    assert caught.value.reason == "REGISTRY_AUTH_FAILED"
    assert not caught.value.retryable
    assert REGISTRY in caught.value.message and "'alice'" in caught.value.message
    assert "pw-alice" not in caught.value.message


def test_token_the_registry_does_not_accept_is_auth_failure() -> None:
    fake = FakeRegistry(
        valid_token="other", token_body=lambda request: httpx.Response(200, json={"token": "T1"})
    )
    with pytest.raises(BuildFailure) as caught:
        _client(fake).resolve(REF, platform=Platform())
    assert caught.value.reason == "REGISTRY_AUTH_FAILED"


def test_basic_challenge_without_credentials() -> None:
    fake = FakeRegistry(challenge='Basic realm="x"')
    with pytest.raises(BuildFailure) as caught:
        _client(fake).resolve(REF, platform=Platform())
    assert caught.value.reason == "REGISTRY_AUTH_FAILED"
    assert "no credentials were given" in caught.value.message


def test_basic_challenge_remembered_per_host() -> None:
    fake = FakeRegistry(challenge='Basic realm="x"')
    client = _client(fake, credentials={REGISTRY: RegistryCredential("alice", "pw-alice")})
    client.resolve(REF, platform=Platform())
    client.resolve(REF, platform=Platform())
    assert [r.headers.get("Authorization", "")[:5] for r in fake.requests] == [
        "",
        "Basic",
        "Basic",
        "Basic",
        "Basic",
    ]


def test_blob_redirect_drops_authorization(tmp_path: Path) -> None:
    fake = FakeRegistry()
    client = _client(fake)
    layer = fake.image.layers[0]
    descriptor = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layer.digest, layer.size)
    client.download_blob(REF, descriptor, tmp_path / "blob")
    storage_request = fake.requests[-1]
    assert storage_request.url.host == "storage.example.com"
    assert "Authorization" not in storage_request.headers
    assert hashlib.sha256((tmp_path / "blob").read_bytes()).hexdigest() == layer.digest[7:]


def test_endpoints_docker_hub_plain_http_and_insecure() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(404)

    client = DistributionClient(
        transport=httpx.MockTransport(handler), plain_http_registries=frozenset({"10.0.0.1:5000"})
    )
    for reference in (
        ImageReference("docker.io", "library/nginx", "latest", ""),
        ImageReference("10.0.0.1:5000", "a/b", "1", ""),
        ImageReference("ghcr.io", "o/p", "2", ""),
    ):
        with pytest.raises(BuildFailure):
            client.resolve(reference, platform=Platform())
    assert [str(r.url) for r in seen] == [
        "https://registry-1.docker.io/v2/library/nginx/manifests/latest",
        "http://10.0.0.1:5000/v2/a/b/manifests/1",
        "https://ghcr.io/v2/o/p/manifests/2",
    ]
    assert all(OCI_INDEX in r.headers["Accept"] and DOCKER_MANIFEST in r.headers["Accept"] for r in seen)


def test_served_digest_must_match_body() -> None:
    fake = FakeRegistry(manifest_headers={"Docker-Content-Digest": "sha256:" + "0" * 64})
    with pytest.raises(BuildFailure) as caught:
        _client(fake).resolve(REF, platform=Platform())
    assert caught.value.reason == "DIGEST_MISMATCH"


def test_pinned_digest_must_match_body() -> None:
    fake = FakeRegistry(manifest_headers={"Docker-Content-Digest": ""})
    pinned = ImageReference(REGISTRY, "team/app", "", "sha256:" + "1" * 64)
    with pytest.raises(BuildFailure) as caught:
        _client(fake).resolve(pinned, platform=Platform())
    assert caught.value.reason == "DIGEST_MISMATCH"
    assert "sha256:" + "1" * 64 in caught.value.message


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_server_errors_are_retryable(status: int) -> None:
    with pytest.raises(BuildFailure) as caught:
        _client(FakeRegistry(fail_status=status)).resolve(REF, platform=Platform())
    assert caught.value.reason == "REGISTRY_UNREACHABLE"
    assert caught.value.retryable


def test_timeouts_are_retryable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(BuildFailure) as caught:
        DistributionClient(transport=httpx.MockTransport(handler)).resolve(REF, platform=Platform())
    assert (caught.value.reason, caught.value.retryable) == ("REGISTRY_UNREACHABLE", True)
    assert "timed out" in caught.value.message


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"not json", OCI_MANIFEST),
        (
            json.dumps({"schemaVersion": 1, "name": "team/app", "fsLayers": []}).encode(),
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
        ),
        (
            json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": {"digest": "sha256:xyz", "size": 1, "mediaType": "x"},
                    "layers": [],
                }
            ).encode(),
            OCI_MANIFEST,
        ),
        (
            json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": {"digest": "sha512:" + "a" * 128, "size": 1, "mediaType": "x"},
                    "layers": [],
                }
            ).encode(),
            OCI_MANIFEST,
        ),
        (json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": "nope"}).encode(), OCI_INDEX),
    ],
)
def test_bad_manifests_are_manifest_invalid(body: bytes, content_type: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"Content-Type": content_type})

    with pytest.raises(BuildFailure) as caught:
        DistributionClient(transport=httpx.MockTransport(handler)).resolve(REF, platform=Platform())
    assert caught.value.reason == "MANIFEST_INVALID"


def test_range_ignored_means_size_unknown() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * 100)  # a full body: Range not honoured

    layer = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", "sha256:" + "a" * 64, 100)
    assert (
        DistributionClient(transport=httpx.MockTransport(handler)).layer_uncompressed_size(REF, layer) is None
    )


# --- a real registry ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_resolve_tag(pushed_images: PushedImages) -> None:
    web = pushed_images.web
    with DistributionClient(plain_http_registries=frozenset({web.reference.registry})) as client:
        resolved = client.resolve(web.reference, platform=Platform())
    assert resolved.manifest.digest == web.digest == web.image.manifest_digest
    assert resolved.manifest_bytes == web.image.manifest_bytes
    assert resolved.config_bytes == web.image.config_bytes
    assert [layer.digest for layer in resolved.layers] == [layer.digest for layer in web.image.layers]
    assert resolved.platform == Platform("linux", "amd64")
    assert resolved.index is None
    assert resolved.compressed_bytes == web.image.compressed_bytes


@pytest.mark.e2e
def test_resolve_digest_pin(pushed_images: PushedImages, oci_registry: OciRegistry) -> None:
    web = pushed_images.web
    pinned = oci_registry.reference("demo/web", digest=web.digest)
    with DistributionClient(plain_http_registries=frozenset({oci_registry.host})) as client:
        assert client.resolve(pinned, platform=Platform()).manifest.digest == web.digest
        elsewhere = oci_registry.reference("demo/web", digest=pushed_images.worker.digest)
        with pytest.raises(BuildFailure) as caught:
            client.resolve(elsewhere, platform=Platform())
    assert caught.value.reason == "IMAGE_NOT_FOUND"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("platform", "arch", "variant"),
    [
        (Platform("linux", "amd64"), "amd64", ""),
        (Platform("linux", "arm64"), "arm64", "v8"),
        (Platform("linux", "arm64", "v8"), "arm64", "v8"),
    ],
)
def test_resolve_index_picks_platform(
    pushed_images: PushedImages, platform: Platform, arch: str, variant: str
) -> None:
    base = pushed_images.base
    with DistributionClient(plain_http_registries=frozenset({base.reference.registry})) as client:
        resolved = client.resolve(base.reference, platform=platform)
    assert resolved.index is not None and resolved.index.digest == base.digest
    assert hashlib.sha256(resolved.index_bytes).hexdigest() == base.digest[7:]
    assert resolved.manifest.digest == base.manifest_digest(Platform("linux", arch, variant))
    assert resolved.platform == Platform("linux", arch, variant)


@pytest.mark.e2e
def test_platform_not_in_index(pushed_images: PushedImages) -> None:
    base = pushed_images.base
    with (
        DistributionClient(plain_http_registries=frozenset({base.reference.registry})) as client,
        pytest.raises(BuildFailure) as caught,
    ):
        client.resolve(base.reference, platform=Platform("linux", "s390x"))
    assert caught.value.reason == "PLATFORM_NOT_FOUND"
    assert "linux/amd64" in caught.value.message and "linux/arm64/v8" in caught.value.message


@pytest.mark.e2e
def test_single_platform_image_for_another_platform(pushed_images: PushedImages) -> None:
    web = pushed_images.web
    with (
        DistributionClient(plain_http_registries=frozenset({web.reference.registry})) as client,
        pytest.raises(BuildFailure) as caught,
    ):
        client.resolve(web.reference, platform=Platform("linux", "arm64"))
    assert caught.value.reason == "PLATFORM_NOT_FOUND"


@pytest.mark.e2e
def test_basic_auth(pushed_images: PushedImages, private_oci_registry: OciRegistry) -> None:
    private = pushed_images.private
    options = private_oci_registry.pull_options()
    with DistributionClient.from_options(options) as client:
        resolved = client.resolve(private.reference, platform=Platform())
    assert resolved.manifest.digest == private.digest


@pytest.mark.e2e
@pytest.mark.parametrize("credential", [RegistryCredential("snap", "wrong-password"), None])
def test_basic_auth_refused(
    pushed_images: PushedImages, private_oci_registry: OciRegistry, credential: RegistryCredential | None
) -> None:
    options = private_oci_registry.pull_options()
    credentials = {private_oci_registry.host: credential} if credential else {}
    with (
        DistributionClient(
            credentials=credentials, plain_http_registries=options.plain_http_registries
        ) as client,
        pytest.raises(BuildFailure) as caught,
    ):
        client.resolve(pushed_images.private.reference, platform=Platform())
    assert caught.value.reason == "REGISTRY_AUTH_FAILED"
    assert not caught.value.retryable
    assert private_oci_registry.host in caught.value.message
    assert "wrong-password" not in caught.value.message and PRIVATE_PASSWORD not in caught.value.message


@pytest.mark.e2e
def test_not_found(oci_registry: OciRegistry, pushed_images: PushedImages) -> None:
    with DistributionClient(plain_http_registries=frozenset({oci_registry.host})) as client:
        for reference in (
            oci_registry.reference("demo/nope", tag="1.0"),
            oci_registry.reference("demo/web", tag="9.9"),
        ):
            with pytest.raises(BuildFailure) as caught:
                client.resolve(reference, platform=Platform())
            assert caught.value.reason == "IMAGE_NOT_FOUND"
            assert caught.value.message == f"image {reference} not found in registry"
    assert str(oci_registry.reference("demo/nope", tag="1.0")) == f"{oci_registry.host}/demo/nope:1.0"


@pytest.mark.e2e
def test_unreachable_registry_is_retryable_and_restart_recovers(fresh_oci_registry: OciRegistry) -> None:
    image = build_image(ImageSpec("fault/app", "1.0", [LayerSpec(8192, seed=9)]))
    push_image(fresh_oci_registry.url, image)
    reference = fresh_oci_registry.reference("fault/app", tag="1.0")
    with DistributionClient(
        plain_http_registries=frozenset({fresh_oci_registry.host}), timeout_seconds=5
    ) as client:
        for stop in (fresh_oci_registry.server.stop, fresh_oci_registry.server.kill):
            stop()
            with pytest.raises(BuildFailure) as caught:
                client.resolve(reference, platform=Platform())
            assert (caught.value.reason, caught.value.retryable) == ("REGISTRY_UNREACHABLE", True)
            assert fresh_oci_registry.host in caught.value.message
            fresh_oci_registry.server.start()  # same port, same storage
            assert client.resolve(reference, platform=Platform()).manifest.digest == image.manifest_digest


@pytest.mark.e2e
def test_tampered_blob_is_digest_mismatch(fresh_oci_registry: OciRegistry, tmp_path: Path) -> None:
    image = build_image(ImageSpec("tamper/app", "1.0", [LayerSpec(64 * 1024, seed=11)]))
    push_image(fresh_oci_registry.url, image)
    layer = image.layers[0]
    hex_digest = layer.digest[7:]
    stored = (
        fresh_oci_registry.server.storage_dir
        / "docker/registry/v2/blobs/sha256"
        / hex_digest[:2]
        / hex_digest
        / "data"
    )
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    stored.write_bytes(bytes(data))

    reference = fresh_oci_registry.reference("tamper/app", tag="1.0")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    destination = downloads / hex_digest
    with DistributionClient(plain_http_registries=frozenset({fresh_oci_registry.host})) as client:
        descriptor = client.resolve(reference, platform=Platform()).layers[0]
        with pytest.raises(BuildFailure) as caught:
            client.download_blob(reference, descriptor, destination)
    assert caught.value.reason == "DIGEST_MISMATCH"
    assert layer.digest in caught.value.message
    assert list(downloads.iterdir()) == []  # neither the blob nor its partial file


@pytest.mark.e2e
def test_download_streams_with_progress_and_sizes_layers_by_range(
    pushed_images: PushedImages, tmp_path: Path
) -> None:
    web = pushed_images.web
    with DistributionClient(plain_http_registries=frozenset({web.reference.registry})) as client:
        resolved = client.resolve(web.reference, platform=Platform())
        for descriptor, built in zip(resolved.layers, web.image.layers, strict=True):
            chunks: list[int] = []
            destination = tmp_path / descriptor.digest[7:]
            client.download_blob(web.reference, descriptor, destination, on_chunk=chunks.append)
            assert sum(chunks) == descriptor.size == destination.stat().st_size
            assert hashlib.sha256(destination.read_bytes()).hexdigest() == descriptor.digest[7:]
            assert client.layer_uncompressed_size(web.reference, descriptor) == built.uncompressed_size
            assert uncompressed_size_of_file(descriptor, destination) == built.uncompressed_size
    log = pushed_images.registry.server.read_log()
    assert '" 206 4 ' in log  # the size probe was a 4-byte range request, answered as such
