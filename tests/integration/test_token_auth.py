"""Bearer-token auth against a real docker-registry configured for the Docker token protocol.

The registry (distribution 2.8) verifies every token it is handed: signature against its
``rootcertbundle``, issuer, audience, expiry (with 60 s of leeway) and the granted actions. The
token server is ``tests.support.token_auth``: real sockets, real RS256 JWTs. The distribution
client and, at the end, the whole registry app pull through both.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.cache_registry.distribution import OCI_MANIFEST, DistributionClient
from services.cache_registry.provider import BuildFailure, Platform, RegistryCredential
from services.cache_registry.server import RegistryApp, RegistryConfig, ZoneConfig
from snapcache.demo.oci_images import ImageSpec, LayerSpec, build_image, push_image
from snapcache.registry_auth import parse_www_authenticate
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from tests.support.oci_fixtures import PushedRef
from tests.support.token_auth import (
    ADMIN_PASSWORD,
    ISSUER,
    READER,
    READER_PASSWORD,
    SERVICE,
    RegistryTokenAuth,
    SigningKey,
    TokenOciRegistry,
)

pytestmark = pytest.mark.e2e

WRONG_PASSWORD = "WRONG-t0ken-pa55"


def _scope(ref: PushedRef) -> str:
    return f"repository:{ref.reference.repository}:pull"


class Recorder(httpx.BaseTransport):
    """A real HTTP transport that notes every exchange, so tests see what the client sent."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self._lock = threading.Lock()
        self.exchanges: list[tuple[str, str, int]] = []  # (host, path, status)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        with self._lock:
            self.exchanges.append((request.url.netloc.decode(), request.url.path, response.status_code))
        return response

    def close(self) -> None:
        self._inner.close()

    def statuses(self, host: str, repository: str = "") -> list[int]:
        """The status of each request to ``host`` (under ``/v2/<repository>/``), in order."""
        prefix = f"/v2/{repository}/" if repository else "/"
        with self._lock:
            return [status for h, path, status in self.exchanges if h == host and path.startswith(prefix)]


def _pull_everything(client: DistributionClient, ref: PushedRef, destination: Path) -> None:
    """Resolve ``ref``, size its layers by range request and download them, checking digests."""
    resolved = client.resolve(ref.reference, platform=Platform())
    assert resolved.manifest.digest == ref.digest
    assert [layer.digest for layer in resolved.layers] == [layer.digest for layer in ref.image.layers]
    destination.mkdir(parents=True, exist_ok=True)
    for descriptor, built in zip(resolved.layers, ref.image.layers, strict=True):
        assert client.layer_uncompressed_size(ref.reference, descriptor) == built.uncompressed_size
        path = destination / descriptor.digest[7:]
        path.unlink(missing_ok=True)
        client.download_blob(ref.reference, descriptor, path)
        assert path.stat().st_size == descriptor.size


# --- the harness is real: the registry verifies what it is given ----------------------------------


def test_registry_checks_token_signature_issuer_and_access(token_oci_registry: TokenOciRegistry) -> None:
    registry, tokens = token_oci_registry, token_oci_registry.tokens
    url = f"{registry.registry.url}/v2/private/app/manifests/1.0"
    with httpx.Client() as http:
        challenge = http.get(url)
        assert challenge.status_code == 401
        (bearer,) = parse_www_authenticate(challenge.headers.get_list("WWW-Authenticate"))
        assert bearer.scheme == "bearer"
        assert dict(bearer.params) == {
            "realm": tokens.realm,
            "service": SERVICE,
            "scope": "repository:private/app:pull",
        }

        def fetch(signing_key: SigningKey, *, issuer: str = ISSUER, audience: str = SERVICE) -> int:
            now = int(time.time())
            claims = {
                "iss": issuer,
                "sub": READER,
                "aud": audience,
                "exp": now + 60,
                "nbf": now - 1,
                "iat": now,
                "jti": "test",
                "access": [{"type": "repository", "name": "private/app", "actions": ["pull"]}],
            }
            headers = {"Authorization": f"Bearer {signing_key.sign_jwt(claims)}", "Accept": OCI_MANIFEST}
            return http.get(url, headers=headers).status_code

        assert fetch(tokens.signing_key) == 200
        assert fetch(SigningKey.generate()) == 401  # a key the registry's bundle does not hold
        assert fetch(tokens.signing_key, issuer="someone-else") == 401
        assert fetch(tokens.signing_key, audience="another-registry") == 401

    # reader may pull private/* but not push: the token server grants pull only, the registry refuses
    image = build_image(ImageSpec("private/app", "reader-push", [LayerSpec(1024, seed=499)]))
    with pytest.raises(RuntimeError, match="answered 401"):
        push_image(registry.registry.url, image, auth=RegistryTokenAuth(READER, READER_PASSWORD))
    granted = [r.access for r in tokens.requests if r.user == READER and "push" in r.scopes[0]]
    assert granted[-1] == (("repository", "private/app", ("pull",)),)


# --- the distribution client ------------------------------------------------------------------------


def test_pull_fetches_one_token_per_scope_and_reuses_it(
    token_oci_registry: TokenOciRegistry, tmp_path: Path
) -> None:
    registry, tokens = token_oci_registry, token_oci_registry.tokens
    before = {
        ref.reference.repository: tokens.issued(user=READER, scope=_scope(ref))
        for ref in (registry.app, registry.tool)
    }
    recorder = Recorder()
    with DistributionClient.from_options(registry.registry.pull_options(), transport=recorder) as client:
        for ref in (registry.app, registry.tool, registry.app):
            _pull_everything(client, ref, tmp_path / "blobs")
    for ref in (registry.app, registry.tool):
        repository = ref.reference.repository
        assert tokens.issued(user=READER, scope=_scope(ref)) - before[repository] == 1
        # manifest, config, a size probe and a download per layer; app twice over
        assert len(recorder.statuses(registry.host, repository)) >= 2 + 2 * len(ref.image.layers)
    # Only the very first request met the challenge. Every later one went out with the cached
    # token of its repository, or, for tool, one fetched up front: the host's scheme is known.
    statuses = recorder.statuses(registry.host)
    assert statuses[0] == 401 and set(statuses[1:]) <= {200, 206}


def test_wrong_password_is_a_permanent_failure_that_keeps_the_password_secret(
    token_oci_registry: TokenOciRegistry,
) -> None:
    registry, tokens = token_oci_registry, token_oci_registry.tokens
    refused_before = sum(1 for r in tokens.requests if r.user == READER and r.status == 401)
    wrong = RegistryCredential(READER, WRONG_PASSWORD)
    with (
        DistributionClient.from_options(registry.registry.pull_options(credential=wrong)) as client,
        pytest.raises(BuildFailure) as caught,
    ):
        client.resolve(registry.app.reference, platform=Platform())
    failure = caught.value
    assert (failure.reason, failure.retryable) == ("REGISTRY_AUTH_FAILED", False)
    assert tokens.host in failure.message and registry.host in failure.message
    assert f"user {READER!r}" in failure.message
    assert sum(1 for r in tokens.requests if r.user == READER and r.status == 401) == refused_before + 1
    for text in (failure.message, repr(failure), repr(client), tokens.read_log(), registry.server.read_log()):
        assert WRONG_PASSWORD not in text and READER_PASSWORD not in text


@pytest.mark.parametrize("credential", ["reader", "anonymous"])
def test_no_pull_access_is_denied(token_oci_registry: TokenOciRegistry, credential: str) -> None:
    registry = token_oci_registry
    options = registry.registry.pull_options()
    credentials = {registry.host: registry.credential} if credential == "reader" else {}
    with (
        DistributionClient(
            credentials=credentials, plain_http_registries=options.plain_http_registries
        ) as client,
        pytest.raises(BuildFailure) as caught,
    ):
        client.resolve(registry.restricted.reference, platform=Platform())
    failure = caught.value
    assert (failure.reason, failure.retryable) == ("REGISTRY_AUTH_FAILED", False)
    assert str(registry.restricted.reference) in failure.message
    if credential == "reader":
        assert f"denied user {READER!r} pull access to restricted/db" in failure.message
    else:
        assert "no credentials were given" in failure.message
    # the token server did answer, with a token granting nothing; the registry said why it refused
    assert registry.tokens.requests[-1].access == (("repository", "restricted/db", ()),)
    assert "insufficient_scope" in failure.message


def test_token_server_down_is_transient(fresh_token_oci_registry: TokenOciRegistry, tmp_path: Path) -> None:
    registry, tokens = fresh_token_oci_registry, fresh_token_oci_registry.tokens
    tokens.stop()
    with DistributionClient.from_options(registry.registry.pull_options(), timeout_seconds=5) as client:
        with pytest.raises(BuildFailure) as caught:
            client.resolve(registry.app.reference, platform=Platform())
        assert (caught.value.reason, caught.value.retryable) == ("REGISTRY_UNREACHABLE", True)
        assert f"token service {tokens.host}" in caught.value.message
        tokens.start()  # same port: the registry's realm is right again
        _pull_everything(client, registry.app, tmp_path)
    assert tokens.issued(user=READER) == 1


def test_token_past_its_lifetime_is_replaced_before_use(
    fresh_token_oci_registry: TokenOciRegistry, tmp_path: Path
) -> None:
    """The client renews a token it knows has expired, without a 401 from the registry first."""
    registry, tokens = fresh_token_oci_registry, fresh_token_oci_registry.tokens
    tokens.expires_in = 3  # (distribution would accept it 60 s longer: only the client can act)
    recorder = Recorder()
    with DistributionClient.from_options(registry.registry.pull_options(), transport=recorder) as client:
        fetched = time.monotonic()
        _pull_everything(client, registry.app, tmp_path)
        assert tokens.issued(user=READER) == 1
        time.sleep(max(0.0, fetched + 3.2 - time.monotonic()))
        _pull_everything(client, registry.app, tmp_path)
    assert tokens.issued(user=READER) == 2
    assert recorder.statuses(registry.host).count(401) == 1  # the very first request only


def test_token_the_registry_no_longer_accepts_is_refreshed(
    fresh_token_oci_registry: TokenOciRegistry, tmp_path: Path
) -> None:
    """A token the client still trusts but the registry calls expired: fetch a new one, retry."""
    registry, tokens = fresh_token_oci_registry, fresh_token_oci_registry.tokens
    tokens.registry_valid_seconds = 3  # expires_in stays 300: issuer and registry disagree
    recorder = Recorder()
    with DistributionClient.from_options(registry.registry.pull_options(), transport=recorder) as client:
        fetched = time.monotonic()
        _pull_everything(client, registry.app, tmp_path)
        assert tokens.issued(user=READER) == 1
        time.sleep(max(0.0, fetched + 3.2 - time.monotonic()))
        _pull_everything(client, registry.app, tmp_path)
    assert tokens.issued(user=READER) == 2
    # the first request met the challenge; the first after the pause, the registry's refusal
    assert recorder.statuses(registry.host).count(401) == 2
    assert "token not to be used after" in registry.server.read_log()  # the registry's reason


# --- the registry app, end to end ---------------------------------------------------------------------


TERMINAL = {pb.ImageCache.READY, pb.ImageCache.FAILED, pb.ImageCache.UPDATE_FAILED}


@pytest.fixture
def app(tmp_path: Path, sqlite_url: str) -> Iterator[RegistryApp]:
    # SQLite only: the store is not what these tests are about (test_registry_e2e covers both)
    config = RegistryConfig(
        data_dir=tmp_path / "data",
        listen="127.0.0.1:0",
        database_url=sqlite_url,
        zones=(ZoneConfig("zone-a"),),
        worker_poll_seconds=0.1,
        grpc_workers=4,
    )
    started = RegistryApp(config).start()
    try:
        yield started
    finally:
        started.stop(0)


@pytest.fixture
def stub(app: RegistryApp) -> Iterator[api_grpc.CacheRegistryServiceStub]:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield api_grpc.CacheRegistryServiceStub(channel)


def _docker_config(path: Path, host: str, username: str, password: str) -> Path:
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}), encoding="utf-8")
    return path


def _create(
    stub: api_grpc.CacheRegistryServiceStub, registry: TokenOciRegistry, refs: list[PushedRef], config: Path
) -> str:
    created = stub.CreateImageCache(
        api.CreateImageCacheRequest(
            image_cache=pb.ImageCache(
                images=[str(ref.reference) for ref in refs],
                cache_size_gib=1,
                plain_http_registries=[registry.host],
                registry_credentials=[pb.RegistryCredentialRef(docker_config_path=str(config))],
            )
        ),
        timeout=10,
    )
    return str(created.name)


def _events(stub: api_grpc.CacheRegistryServiceStub, name: str) -> list[pb.ImageCacheEvent]:
    return list(stub.ListImageCacheEvents(api.ListImageCacheEventsRequest(parent=name), timeout=10).events)


def _wait(stub: api_grpc.CacheRegistryServiceStub, name: str, *, timeout: float = 60) -> pb.ImageCache:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cache = stub.GetImageCache(api.GetImageCacheRequest(name=name), timeout=10)
        if cache.state in TERMINAL:
            return cache
        time.sleep(0.05)
    raise AssertionError(f"{name} did not settle")


def test_cache_behind_token_auth_builds_ready(
    stub: api_grpc.CacheRegistryServiceStub, token_oci_registry: TokenOciRegistry, tmp_path: Path
) -> None:
    registry, tokens = token_oci_registry, token_oci_registry.tokens
    refs = [registry.app, registry.tool]  # resolved concurrently: two scopes on one registry
    before = [tokens.issued(user=READER, scope=_scope(ref)) for ref in refs]
    config = _docker_config(tmp_path / "config.json", registry.host, READER, READER_PASSWORD)
    name = _create(stub, registry, refs, config)
    cache = _wait(stub, name)
    assert cache.state == pb.ImageCache.READY, cache.state_message
    recorded = {image.image: image for image in cache.cached_images}
    for ref in refs:
        image = recorded[str(ref.reference)]
        assert image.manifest_digest == ref.digest
        assert image.layer_count == len(ref.image.layers)
        assert image.compressed_bytes == ref.image.compressed_bytes
    # one build, one client: a token per repository, reused for its manifest, config and blobs
    assert [tokens.issued(user=READER, scope=_scope(ref)) for ref in refs] == [n + 1 for n in before]


@pytest.mark.parametrize(
    "case",
    [
        (WRONG_PASSWORD, "app", "refused user 'reader'"),
        (READER_PASSWORD, "restricted", "denied user 'reader' pull access to restricted/db"),
    ],
    ids=["wrong-password", "no-pull-access"],
)
def test_refused_pull_fails_the_cache_at_once_without_leaking(
    stub: api_grpc.CacheRegistryServiceStub,
    token_oci_registry: TokenOciRegistry,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: tuple[str, str, str],
) -> None:
    password, image, expected = case
    caplog.set_level(logging.DEBUG)
    registry = token_oci_registry
    ref: PushedRef = getattr(registry, image)
    config = _docker_config(tmp_path / "config.json", registry.host, READER, password)
    name = _create(stub, registry, [ref], config)
    cache = _wait(stub, name)
    assert cache.state == pb.ImageCache.FAILED
    assert cache.state_reason == "REGISTRY_AUTH_FAILED" and expected in cache.state_message
    events = _events(stub, name)
    assert "BuildRetrying" not in [e.reason for e in events]  # permanent: no retry
    everything = "\n".join(
        [
            str(cache),
            *(str(e) for e in events),
            caplog.text,
            registry.tokens.read_log(),
            registry.server.read_log(),
        ]
    )
    for secret in (password, READER_PASSWORD, ADMIN_PASSWORD):
        assert secret not in everything


def test_token_server_down_is_retried_until_it_is_back(
    stub: api_grpc.CacheRegistryServiceStub, fresh_token_oci_registry: TokenOciRegistry, tmp_path: Path
) -> None:
    registry, tokens = fresh_token_oci_registry, fresh_token_oci_registry.tokens
    tokens.stop()
    config = _docker_config(tmp_path / "config.json", registry.host, READER, READER_PASSWORD)
    name = _create(stub, registry, [registry.app], config)
    deadline = time.monotonic() + 30
    while not any(e.reason == "BuildRetrying" for e in _events(stub, name)):
        assert time.monotonic() < deadline, "the build never retried"
        time.sleep(0.05)
    (retrying,) = [e for e in _events(stub, name) if e.reason == "BuildRetrying"]
    assert f"token service {tokens.host}" in retrying.message and "unreachable" in retrying.message
    tokens.start()
    cache = _wait(stub, name)
    assert cache.state == pb.ImageCache.READY, cache.state_message
    assert cache.cached_images[0].manifest_digest == registry.app.digest
