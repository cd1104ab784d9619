"""Registry credentials from Kubernetes dockerconfigjson Secrets, on a real control plane.

A `RegistryApp` (the production wiring) reads Secrets from a real kube-apiserver (`kube_cluster`)
as a least-privileged user (RBAC `get` on `secrets` in the test's namespace only) and pulls from a
real private OCI registry. Every test checks that no password reaches the cache, its events or the
log. Each test works in namespaces of its own; the cluster is shared by the session.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from kubernetes import client as k8s

from services.cache_registry.kube_secrets import KubeSecretReader
from services.cache_registry.provider import BuildFailure, RegistryCredential
from services.cache_registry.server import RegistryApp, RegistryConfig
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from tests.support.kube_cluster import KubeCluster, free_port
from tests.support.oci_fixtures import PRIVATE_PASSWORD, PRIVATE_USER, PushedImages

pytestmark = pytest.mark.e2e

TERMINAL = {pb.ImageCache.READY, pb.ImageCache.FAILED}
WRONG_PASSWORD = "not-the-Pa55word-9"
DOCKERCONFIGJSON = "kubernetes.io/dockerconfigjson"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _dockerconfigjson(host: str, password: str) -> str:
    return json.dumps({"auths": {host: {"auth": _b64(f"{PRIVATE_USER}:{password}")}}})


@pytest.fixture
def admin(kube_cluster: KubeCluster) -> Iterator[k8s.CoreV1Api]:
    with kube_cluster.api_client() as client:
        yield k8s.CoreV1Api(client)


@pytest.fixture
def namespace(kube_cluster: KubeCluster) -> str:
    """A namespace the registry's user (``limited``) may read Secrets in."""
    name = kube_cluster.create_namespace("creds")
    kube_cluster.allow_secret_reading(name)
    return name


def _create_secret(
    api_: k8s.CoreV1Api, namespace: str, name: str, *, type_: str, data: dict[str, str]
) -> str:
    api_.create_namespaced_secret(
        namespace,
        k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name=name),
            type=type_,
            string_data=data,
        ),
    )
    return f"{namespace}/{name}"


@pytest.fixture
def pull_secret(admin: k8s.CoreV1Api, namespace: str, pushed_images: PushedImages) -> str:
    """``namespace/pull``: a dockerconfigjson Secret with the private registry's right password."""
    host = pushed_images.private_registry.host
    return _create_secret(
        admin,
        namespace,
        "pull",
        type_=DOCKERCONFIGJSON,
        data={".dockerconfigjson": _dockerconfigjson(host, PRIVATE_PASSWORD)},
    )


class Registry:
    """A running RegistryApp and a client with the waiting helpers the tests share."""

    def __init__(self, app: RegistryApp) -> None:
        self.app = app
        self.channel = grpc.insecure_channel(f"127.0.0.1:{app.port}")
        self.stub = api_grpc.CacheRegistryServiceStub(self.channel)

    def build(self, pushed: PushedImages, secret: str, *, timeout: float = 60) -> pb.ImageCache:
        private = pushed.private_registry
        created = self.stub.CreateImageCache(
            api.CreateImageCacheRequest(
                image_cache=pb.ImageCache(
                    images=[str(pushed.private.reference)],
                    cache_size_gib=1,
                    plain_http_registries=[private.host],
                    registry_credentials=[pb.RegistryCredentialRef(secret=secret)],
                )
            ),
            timeout=10,
        )
        deadline = time.monotonic() + timeout
        cache = created
        while time.monotonic() < deadline:
            cache = self.stub.GetImageCache(api.GetImageCacheRequest(name=created.name), timeout=10)
            if cache.state in TERMINAL:
                return cache
            time.sleep(0.05)
        raise AssertionError(f"{created.name} did not settle: {cache}")

    def events(self, cache: pb.ImageCache) -> list[pb.ImageCacheEvent]:
        request = api.ListImageCacheEventsRequest(parent=cache.name)
        return list(self.stub.ListImageCacheEvents(request, timeout=10).events)

    def everything_said(self, cache: pb.ImageCache) -> str:
        """The cache and its events as text: what a user or operator can see."""
        return str(cache) + "".join(str(e) for e in self.events(cache))


@pytest.fixture
def start_registry(tmp_path: Path, sqlite_url: str) -> Iterator[Callable[[Path], Registry]]:
    """Starts a RegistryApp reading Secrets through the given kubeconfig; stopped after the test."""
    started: list[Registry] = []

    def start(kubeconfig: Path) -> Registry:
        config = RegistryConfig(
            data_dir=tmp_path / f"data-{len(started)}",
            listen="127.0.0.1:0",
            database_url=sqlite_url,
            worker_poll_seconds=0.1,
            grpc_workers=8,
            kubeconfig=kubeconfig,
            kube_in_cluster=False,
        )
        registry = Registry(RegistryApp(config).start())
        started.append(registry)
        return registry

    yield start
    for registry in started:
        registry.channel.close()
        registry.app.stop(0)


@pytest.fixture
def registry(
    kube_cluster: KubeCluster, tmp_path: Path, start_registry: Callable[[Path], Registry]
) -> Registry:
    """A registry acting as the ``limited`` user."""
    return start_registry(kube_cluster.write_kubeconfig(tmp_path / "registry-kubeconfig", user="limited"))


@pytest.fixture
def log_text(caplog: pytest.LogCaptureFixture) -> Callable[[], str]:
    caplog.set_level(logging.DEBUG)
    return lambda: caplog.text


def test_secret_credentials_build_ready(
    registry: Registry, pull_secret: str, pushed_images: PushedImages, log_text: Callable[[], str]
) -> None:
    cache = registry.build(pushed_images, pull_secret)
    assert cache.state == pb.ImageCache.READY, cache.state_message
    assert [c.manifest_digest for c in cache.cached_images] == [pushed_images.private.digest]
    assert PRIVATE_PASSWORD not in registry.everything_said(cache) + log_text()
    assert _b64(f"{PRIVATE_USER}:{PRIVATE_PASSWORD}") not in log_text()


def test_missing_secret_fails_not_found(
    registry: Registry, namespace: str, pushed_images: PushedImages
) -> None:
    cache = registry.build(pushed_images, f"{namespace}/no-such-secret")
    assert cache.state == pb.ImageCache.FAILED
    assert cache.state_reason == "CREDENTIALS_NOT_FOUND"
    assert f"Secret {namespace}/no-such-secret not found" in cache.state_message
    # permanent: no retries
    assert [e.reason for e in registry.events(cache)].count("BuildRetrying") == 0


def test_wrong_type_secret_fails_invalid_without_leaking(
    registry: Registry,
    admin: k8s.CoreV1Api,
    namespace: str,
    pushed_images: PushedImages,
    log_text: Callable[[], str],
) -> None:
    host = pushed_images.private_registry.host
    secret = _create_secret(
        admin,
        namespace,
        "opaque",
        type_="Opaque",
        data={".dockerconfigjson": _dockerconfigjson(host, PRIVATE_PASSWORD), "password": PRIVATE_PASSWORD},
    )
    cache = registry.build(pushed_images, secret)
    assert cache.state == pb.ImageCache.FAILED
    assert cache.state_reason == "CREDENTIALS_INVALID"
    assert f"Secret {secret} has type Opaque" in cache.state_message
    assert DOCKERCONFIGJSON in cache.state_message
    assert PRIVATE_PASSWORD not in registry.everything_said(cache) + log_text()


def test_malformed_dockerconfigjson_fails_invalid_without_leaking(
    registry: Registry,
    admin: k8s.CoreV1Api,
    namespace: str,
    pushed_images: PushedImages,
    log_text: Callable[[], str],
) -> None:
    # the API server checks that .dockerconfigjson is JSON, so break it one level down
    host = pushed_images.private_registry.host
    document = json.dumps({"auths": {host: {"auth": _b64(PRIVATE_PASSWORD)}}})
    secret = _create_secret(
        admin, namespace, "malformed", type_=DOCKERCONFIGJSON, data={".dockerconfigjson": document}
    )
    cache = registry.build(pushed_images, secret)
    assert cache.state == pb.ImageCache.FAILED and cache.state_reason == "CREDENTIALS_INVALID"
    assert secret in cache.state_message and "username:password" in cache.state_message
    assert PRIVATE_PASSWORD not in registry.everything_said(cache) + log_text()


def test_wrong_password_fails_auth_without_leaking(
    registry: Registry,
    admin: k8s.CoreV1Api,
    namespace: str,
    pushed_images: PushedImages,
    log_text: Callable[[], str],
) -> None:
    host = pushed_images.private_registry.host
    secret = _create_secret(
        admin,
        namespace,
        "wrong",
        type_=DOCKERCONFIGJSON,
        data={".dockerconfigjson": _dockerconfigjson(host, WRONG_PASSWORD)},
    )
    cache = registry.build(pushed_images, secret)
    assert cache.state == pb.ImageCache.FAILED
    assert cache.state_reason == "REGISTRY_AUTH_FAILED" and host in cache.state_message
    said = registry.everything_said(cache) + log_text()
    assert WRONG_PASSWORD not in said and PRIVATE_PASSWORD not in said


def test_forbidden_secret_names_the_missing_permission(
    registry: Registry,
    kube_cluster: KubeCluster,
    admin: k8s.CoreV1Api,
    pushed_images: PushedImages,
) -> None:
    elsewhere = kube_cluster.create_namespace("no-access")  # no Role for the registry's user here
    host = pushed_images.private_registry.host
    secret = _create_secret(
        admin,
        elsewhere,
        "pull",
        type_=DOCKERCONFIGJSON,
        data={".dockerconfigjson": _dockerconfigjson(host, PRIVATE_PASSWORD)},
    )
    cache = registry.build(pushed_images, secret)
    assert cache.state == pb.ImageCache.FAILED
    assert cache.state_reason == "CREDENTIALS_FORBIDDEN"
    message = cache.state_message
    assert f'"get" on "secrets" in namespace {elsewhere}' in message
    assert 'User "limited" cannot get resource "secrets"' in message  # the API server's own words
    assert [e.reason for e in registry.events(cache)].count("BuildRetrying") == 0
    assert PRIVATE_PASSWORD not in registry.everything_said(cache)


class _TcpForwarder:
    """Forwards 127.0.0.1:port to another address once `open()` is called; refuses until then."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def open(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        listener.settimeout(0.2)
        self._listener = listener
        self._spawn(self._accept_loop)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                downstream, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            downstream.settimeout(None)
            upstream = socket.create_connection(self.target)
            self._sockets += [downstream, upstream]
            self._spawn(self._pump, downstream, upstream)
            self._spawn(self._pump, upstream, downstream)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the other side or close() ended the connection

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        for sock in self._sockets:  # ends the pumps of connections the client keeps alive
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)


def test_unreachable_apiserver_is_retried_until_it_answers(
    kube_cluster: KubeCluster,
    pull_secret: str,
    pushed_images: PushedImages,
    tmp_path: Path,
    start_registry: Callable[[Path], Registry],
) -> None:
    # the registry's kubeconfig points at a port where the API server is not reachable yet
    apiserver_port = int(kube_cluster.url.rsplit(":", 1)[1])
    forwarder = _TcpForwarder(free_port(), ("127.0.0.1", apiserver_port))
    kubeconfig = kube_cluster.write_kubeconfig(tmp_path / "kubeconfig", user="limited")
    document = json.loads(kubeconfig.read_text())
    document["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{forwarder.port}"
    kubeconfig.write_text(json.dumps(document))
    registry = start_registry(kubeconfig)
    try:
        # open the way once the first attempt has failed and a retry is scheduled
        opened = threading.Event()

        def open_after_first_failure() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                listed = registry.stub.ListImageCaches(api.ListImageCachesRequest(), timeout=10)
                for cache in listed.image_caches:
                    if any(e.reason == "BuildRetrying" for e in registry.events(cache)):
                        forwarder.open()
                        opened.set()
                        return
                time.sleep(0.05)

        opener = threading.Thread(target=open_after_first_failure, daemon=True)
        opener.start()
        cache = registry.build(pushed_images, pull_secret)
        opener.join(timeout=30)
        assert opened.is_set()
        assert cache.state == pb.ImageCache.READY, cache.state_message
        retrying = [e for e in registry.events(cache) if e.reason == "BuildRetrying"]
        assert len(retrying) == 1
        assert retrying[0].attributes["reason"] == "KUBERNETES_API_UNAVAILABLE"
        assert f"cannot reach the Kubernetes API at https://127.0.0.1:{forwarder.port}" in retrying[0].message
    finally:
        forwarder.close()


def test_in_cluster_reader_uses_a_service_account_token(
    kube_cluster: KubeCluster, admin: k8s.CoreV1Api, tmp_path: Path, pushed_images: PushedImages
) -> None:
    namespace = kube_cluster.create_namespace("in-cluster")
    admin.create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="snapcache"))
    )
    kube_cluster.allow_secret_reading(namespace, user=f"system:serviceaccount:{namespace}:snapcache")
    token = admin.create_namespaced_service_account_token(
        "snapcache",
        namespace,
        k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=600)),
    ).status.token
    token_file = tmp_path / "token"
    token_file.write_text(token)
    host = pushed_images.private_registry.host
    secret = _create_secret(
        admin,
        namespace,
        "pull",
        type_=DOCKERCONFIGJSON,
        data={".dockerconfigjson": _dockerconfigjson(host, PRIVATE_PASSWORD)},
    )
    port = kube_cluster.url.rsplit(":", 1)[1]
    reader = KubeSecretReader.in_cluster(
        token_file=str(token_file),
        ca_file=str(kube_cluster.ca_path),
        environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port},
    )
    try:
        assert reader.registry_credentials(secret) == {
            host: RegistryCredential(PRIVATE_USER, PRIVATE_PASSWORD)
        }
        with pytest.raises(BuildFailure) as caught:
            reader.registry_credentials("kube-system/anything")
        assert caught.value.reason == "CREDENTIALS_FORBIDDEN"
        assert f"system:serviceaccount:{namespace}:snapcache" in caught.value.message
    finally:
        reader.close()


def test_in_cluster_outside_a_pod_stops_start_up() -> None:
    with pytest.raises(ValueError, match="in-cluster"):
        KubeSecretReader.in_cluster(environ={})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kubeconfig": Path("/nonexistent/kubeconfig")}, "is not a file"),
        ({"kubeconfig": Path(__file__), "kube_in_cluster": True}, "not both"),
    ],
)
def test_bad_kubernetes_access_is_refused_at_start_up(
    tmp_path: Path, fields: dict[str, object], message: str
) -> None:
    config = RegistryConfig(data_dir=tmp_path / "data", **fields)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_unusable_kubeconfig_stops_start_up(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n")
    with pytest.raises(ValueError, match=f"cannot use kubeconfig {kubeconfig}"):
        RegistryApp(RegistryConfig(data_dir=tmp_path / "data", kubeconfig=kubeconfig, kube_in_cluster=False))
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_environment_configures_kubernetes_access(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kube_cluster: KubeCluster
) -> None:
    kubeconfig = kube_cluster.write_kubeconfig(tmp_path / "kubeconfig", user="limited")
    monkeypatch.setenv("SNAPCACHE_KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("SNAPCACHE_KUBE_IN_CLUSTER", raising=False)
    assert RegistryConfig(data_dir=tmp_path).kubeconfig == kubeconfig
    monkeypatch.delenv("SNAPCACHE_KUBECONFIG")
    monkeypatch.setenv("SNAPCACHE_KUBE_IN_CLUSTER", "true")
    config = RegistryConfig(data_dir=tmp_path)
    assert config.kube_in_cluster and config.kubeconfig is None
