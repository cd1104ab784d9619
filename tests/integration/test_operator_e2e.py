"""The ImageCache CRD and the operator, end to end: a real kube-apiserver, cache registry and OCI registries.

The CRD is installed from deploy/base/crds/ and the operator's RBAC from deploy/base/operator/
(renamed per module run, so nothing clashes with other tests on the shared cluster). The operator
runs as the real `snapcache operator` process, acting as that ServiceAccount with a token of its
own, so every test also checks that the RBAC is enough. The registry is a `RegistryApp` (the
production wiring) on SQLite, reading pull Secrets as the `limited` user; the images come from
the session's OCI registries (`pushed_images`), the private one behind htpasswd.

Each test works on ImageCaches of its own (unique names) and deletes them afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from services.cache_registry.server import RegistryApp, RegistryConfig
from services.operator.cache_specs import cache_id_for
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from tests.support.gated_forwarder import GatedForwarder
from tests.support.kube_cluster import KubeCluster, free_port
from tests.support.oci_fixtures import PRIVATE_PASSWORD, PRIVATE_USER, OciRegistry, PushedImages

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "deploy" / "base" / "crds" / "imagecaches.snapcache.io.yaml"
RBAC_PATH = ROOT / "deploy" / "base" / "operator" / "rbac.yaml"
GROUP, VERSION, PLURAL = "snapcache.io", "v1alpha1", "imagecaches"
CRD_NAME = f"{PLURAL}.{GROUP}"
FINALIZER = "snapcache.io/image-cache"
TIMEOUT = 30.0


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# --- the CRD and the operator's identity -----------------------------------------------------


def _established(ext: k8s.ApiextensionsV1Api) -> bool:
    found = ext.read_custom_resource_definition(CRD_NAME)
    return any(c.type == "Established" and c.status == "True" for c in found.status.conditions or ())


@pytest.fixture(scope="module")
def crd(kube_cluster: KubeCluster) -> dict[str, Any]:
    """The CRD from deploy/, created (or replaced: the cluster is shared) and Established."""
    document: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    with kube_cluster.api_client() as client:
        ext = k8s.ApiextensionsV1Api(client)
        try:
            ext.create_custom_resource_definition(document)
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = ext.read_custom_resource_definition(CRD_NAME)
            document["metadata"]["resourceVersion"] = current.metadata.resource_version
            ext.replace_custom_resource_definition(CRD_NAME, document)
        deadline = time.monotonic() + TIMEOUT
        while not _established(ext):
            assert time.monotonic() < deadline, "the CRD did not become Established"
            time.sleep(0.05)
    return document


@dataclass(frozen=True)
class OperatorIdentity:
    """The operator's ServiceAccount from deploy/, with a kubeconfig holding a token of its own."""

    namespace: str
    user: str  # system:serviceaccount:NAMESPACE:snapcache-operator
    kubeconfig: Path


@pytest.fixture(scope="module")
def operator_identity(
    kube_cluster: KubeCluster, crd: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorIdentity]:
    """deploy/base/operator/rbac.yaml applied under unique names; removed afterwards."""
    namespace = kube_cluster.create_namespace("snapcache-op")
    documents = list(yaml.safe_load_all(RBAC_PATH.read_text()))
    kinds = [d["kind"] for d in documents]
    assert kinds == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"], kinds
    account, role, binding = documents
    account_name = account["metadata"]["name"]
    account["metadata"]["namespace"] = namespace
    role["metadata"]["name"] = f"{role['metadata']['name']}-{namespace}"
    binding["metadata"]["name"] = role["metadata"]["name"]
    binding["roleRef"]["name"] = role["metadata"]["name"]
    assert [s["name"] for s in binding["subjects"]] == [account_name]
    binding["subjects"][0]["namespace"] = namespace
    with kube_cluster.api_client() as client:
        core, rbac = k8s.CoreV1Api(client), k8s.RbacAuthorizationV1Api(client)
        core.create_namespaced_service_account(namespace, account)
        rbac.create_cluster_role(role)
        rbac.create_cluster_role_binding(binding)
        token = core.create_namespaced_service_account_token(
            account_name,
            namespace,
            k8s.AuthenticationV1TokenRequest(
                spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
            ),
        ).status.token
    user = f"system:serviceaccount:{namespace}:{account_name}"
    kubeconfig = tmp_path_factory.mktemp("operator-identity") / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "test",
                        "cluster": {
                            "server": kube_cluster.url,
                            "certificate-authority": str(kube_cluster.ca_path),
                        },
                    }
                ],
                "users": [{"name": user, "user": {"token": token}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
                "current-context": "test",
            }
        )
    )
    try:
        yield OperatorIdentity(namespace=namespace, user=user, kubeconfig=kubeconfig)
    finally:
        with kube_cluster.api_client() as client:
            rbac = k8s.RbacAuthorizationV1Api(client)
            rbac.delete_cluster_role_binding(binding["metadata"]["name"])
            rbac.delete_cluster_role(role["metadata"]["name"])


# --- the registry ----------------------------------------------------------------------------


@dataclass
class Registry:
    """A running `RegistryApp` and a client."""

    app: RegistryApp
    database: Path
    log_path: Path
    channel: grpc.Channel = field(init=False)
    stub: api_grpc.CacheRegistryServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.app.port}")
        self.stub = api_grpc.CacheRegistryServiceStub(self.channel)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    def get(self, cache_id: str) -> pb.ImageCache | None:
        try:
            return self.stub.GetImageCache(
                api.GetImageCacheRequest(name=f"imageCaches/{cache_id}"), timeout=10
            )
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                return None
            raise

    def event_reasons(self, cache_id: str) -> list[str]:
        request = api.ListImageCacheEventsRequest(parent=f"imageCaches/{cache_id}", page_size=1000)
        return [e.reason for e in self.stub.ListImageCacheEvents(request, timeout=10).events]

    def caches_of(self, uid: str) -> list[pb.ImageCache]:
        request = api.ListImageCachesRequest(filter=f'labels.snapcache.io/imagecache-uid = "{uid}"')
        return list(self.stub.ListImageCaches(request, timeout=10).image_caches)

    def log(self) -> str:
        """Everything this process logged (the registry runs in it) since the registry started."""
        return self.log_path.read_text(errors="replace")

    def database_text(self) -> str:
        """Every row of every table of the registry's database, as text."""
        with contextlib.closing(sqlite3.connect(self.database)) as connection:
            tables = [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            assert "image_caches" in tables or len(tables) > 3, tables
            rows = []
            for table in tables:
                for row in connection.execute(f'SELECT * FROM "{table}"'):  # names from sqlite_master
                    rows.append(
                        " ".join(v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in row)
                    )
        return "\n".join(rows)


@pytest.fixture(scope="module")
def registry(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The cache registry (zones local-a, local-b), reading Secrets as the user `limited`."""
    work = tmp_path_factory.mktemp("operator-registry")
    database = work / "registry.db"
    config = RegistryConfig(
        data_dir=work / "data",
        listen="127.0.0.1:0",
        database_url=f"sqlite:///{database}",
        worker_poll_seconds=0.1,
        grpc_workers=16,
        kubeconfig=kube_cluster.write_kubeconfig(work / "kubeconfig", user="limited"),
        kube_in_cluster=False,
    )
    # everything logged while the registry runs, at every level, into a file of its own
    handler = logging.FileHandler(work / "registry.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    # every logger at every level: an in-process CLI run earlier in the session quiets httpx
    quieted = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for name in quieted:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        app = RegistryApp(config).start()
        running = Registry(app, database, work / "registry.log")
        try:
            yield running
        finally:
            running.channel.close()
            app.stop(0)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        for name, was in quieted.items():
            logging.getLogger(name).setLevel(was)
        handler.close()


# --- the operator process --------------------------------------------------------------------


@dataclass
class OperatorProcess:
    """A running `snapcache operator`."""

    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def metric(self, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no metric {name}")

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def start_operator(
    operator_identity: OperatorIdentity, registry: Registry, tmp_path: Path
) -> Iterator[Callable[[], OperatorProcess]]:
    """Starts `snapcache operator` as the ServiceAccount and waits for /readyz; stops them all after."""
    started: list[OperatorProcess] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPCACHE_")}

    def start() -> OperatorProcess:
        port = free_port()
        log_path = tmp_path / f"operator-{len(started)}.log"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "snapcache_cli.main",
                    "operator",
                    "--registry",
                    registry.address,
                    "--kubeconfig",
                    str(operator_identity.kubeconfig),
                    "--metrics-listen",
                    f"127.0.0.1:{port}",
                    "--log-level",
                    "debug",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )
        running = OperatorProcess(process, log_path, port)
        started.append(running)
        deadline = time.monotonic() + TIMEOUT
        while not running.ready():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the operator did not become ready:\n{running.log()}")
            time.sleep(0.05)
        return running

    yield start
    for running in started:
        running.stop()
    # whatever a test checks, the operator must not have met an API error or a bug on the way
    for running in started:
        troubles = [
            line
            for line in running.log().splitlines()
            if "Traceback" in line or "Kubernetes API error" in line
        ]
        assert troubles == [], running.log()


# --- ImageCache objects ----------------------------------------------------------------------


class ImageCaches:
    """ImageCache objects made by one test, through the admin's client; deleted afterwards."""

    def __init__(self, client: k8s.ApiClient) -> None:
        self.custom = k8s.CustomObjectsApi(client)
        self.core = k8s.CoreV1Api(client)
        self.names: list[str] = []
        self.on_timeout: Callable[[], str] = lambda: ""

    def create(self, prefix: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ImageCache",
            "metadata": {"name": name},
            "spec": spec,
        }
        self.names.append(name)
        created: dict[str, Any] = self.custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
        return created

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found

    def patch(self, name: str, body: Mapping[str, Any]) -> None:
        self.custom.patch_cluster_custom_object(GROUP, VERSION, PLURAL, name, dict(body))

    def delete(self, name: str) -> None:
        self.custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)

    def wait(
        self, name: str, what: str, check: Callable[[dict[str, Any] | None], bool]
    ) -> dict[str, Any] | None:
        deadline = time.monotonic() + TIMEOUT
        found = self.get(name)
        while not check(found):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"ImageCache {name}: not {what} after {TIMEOUT:.0f}s: {found}\n{self.on_timeout()}"
                )
            time.sleep(0.05)
            found = self.get(name)
        return found

    def wait_status(self, name: str, what: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        found = self.wait(name, what, lambda o: o is not None and check(o.get("status") or {}))
        assert found is not None
        return found

    def events(self, name: str) -> list[k8s.CoreV1Event]:
        return list(
            self.core.list_namespaced_event("default", field_selector=f"involvedObject.name={name}").items
        )

    def cleanup(self) -> None:
        for name in self.names:
            with contextlib.suppress(ApiException):
                self.delete(name)
            with contextlib.suppress(ApiException):  # do not leave it to an operator that is gone
                self.patch(name, {"metadata": {"finalizers": []}})


@pytest.fixture
def imagecaches(kube_cluster: KubeCluster, crd: dict[str, Any]) -> Iterator[ImageCaches]:
    with kube_cluster.api_client() as client:
        made = ImageCaches(client)
        try:
            yield made
        finally:
            made.cleanup()


@dataclass
class Env:
    """What an operator test works with."""

    imagecaches: ImageCaches
    registry: Registry
    start_operator: Callable[[], OperatorProcess]
    images: PushedImages


@pytest.fixture
def env(
    imagecaches: ImageCaches,
    registry: Registry,
    start_operator: Callable[[], OperatorProcess],
    pushed_images: PushedImages,
) -> Env:
    return Env(imagecaches, registry, start_operator, pushed_images)


def _phase(phase: str) -> Callable[[dict[str, Any]], bool]:
    return lambda status: status.get("phase") == phase


def _condition(status: Mapping[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or () if c["type"] == kind)


# --- the CRD ---------------------------------------------------------------------------------


def kubectl_get(kube_cluster: KubeCluster, tmp_path: Path, name: str) -> list[str]:
    """`kubectl get imagecache NAME` as the admin: the header and the row."""
    kubeconfig = kube_cluster.write_kubeconfig(tmp_path / "admin-kubeconfig")
    shown = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "get", "imagecaches", name],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return shown.stdout.splitlines()


def test_crd_defaults_a_minimal_spec(
    imagecaches: ImageCaches, kube_cluster: KubeCluster, tmp_path: Path
) -> None:
    created = imagecaches.create("minimal", {"images": ["nginx:1.25"]})
    assert created["spec"] == {
        "images": ["nginx:1.25"],
        "imageCacheSize": 20,
        "retentionDays": 0,
        "platform": "linux/amd64",
    }
    header, row = kubectl_get(kube_cluster, tmp_path, created["metadata"]["name"])
    assert header.split() == ["NAME", "STATE", "SIZE", "IMAGES", "EXPIRES", "AGE"]
    assert row.split()[:2] == [created["metadata"]["name"], "20"]  # no status yet: blank columns


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"images": ["nginx"], "imageCacheSize": -1},
            "spec.imageCacheSize: Invalid value: -1: spec.imageCacheSize in body should be greater than or equal to 1",
        ),
        (
            {"images": ["nginx"], "imageCacheSize": 4096},
            "spec.imageCacheSize: Invalid value: 4096: spec.imageCacheSize in body should be less than or equal to 2048",
        ),
        ({"images": []}, "spec.images: Invalid value: 0: spec.images in body should have at least 1 items"),
        ({"imageCacheSize": 20}, "spec.images: Required value"),
        (
            {"images": [f"demo/app{n}:1" for n in range(65)]},
            "spec.images: Invalid value: 65: spec.images in body should have at most 64 items",
        ),
        ({"images": ["nginx", "nginx"]}, 'spec.images[1]: Duplicate value: "nginx"'),
        (
            {"images": ["nginx"], "retentionDays": 3651},
            "spec.retentionDays in body should be less than or equal to 3650",
        ),
        (
            {"images": ["nginx"], "retentionDays": -1},
            "spec.retentionDays in body should be greater than or equal to 0",
        ),
        ({"images": ["nginx"], "imageRegistryCredentials": ["just-a-name"]}, "spec.imageRegistryCredentials"),
        ({"images": ["nginx"], "platform": "amd64"}, 'spec.platform: Invalid value: "amd64"'),
        ({"images": ["nginx"], "plainHttpRegistries": ["http://r:5000"]}, "spec.plainHttpRegistries"),
    ],
)
def test_apiserver_rejects_invalid_specs(
    imagecaches: ImageCaches, spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ApiException) as caught:
        imagecaches.create("invalid", spec)
    assert caught.value.status == 422
    said = json.loads(caught.value.body)["message"]
    assert message in said
    assert said.startswith('ImageCache.snapcache.io "invalid-')


# --- the operator ----------------------------------------------------------------------------


def test_imagecache_becomes_ready_with_its_status(
    env: Env, kube_cluster: KubeCluster, tmp_path: Path
) -> None:
    imagecaches, registry, start_operator, pushed_images = (
        env.imagecaches,
        env.registry,
        env.start_operator,
        env.images,
    )
    operator = start_operator()
    imagecaches.on_timeout = operator.log
    # a cache made through the gRPC API stays there and never shows up as an ImageCache
    api_made = registry.stub.CreateImageCache(
        api.CreateImageCacheRequest(
            image_cache=pb.ImageCache(
                images=[str(pushed_images.worker.reference)],
                cache_size_gib=1,
                plain_http_registries=[pushed_images.registry.host],
            )
        ),
        timeout=10,
    )
    spec = {
        "images": [str(pushed_images.web.reference)],
        "imageCacheSize": 1,
        "retentionDays": 7,
        "plainHttpRegistries": [pushed_images.registry.host],
    }
    created = imagecaches.create("ready", spec)
    name, uid = created["metadata"]["name"], created["metadata"]["uid"]
    cache_id = cache_id_for(uid)
    found = imagecaches.wait_status(
        name,
        "Ready with every zone AVAILABLE",
        lambda s: (
            s.get("phase") == "Ready"
            and [z["state"] for z in s.get("zoneAvailability") or ()] == ["AVAILABLE", "AVAILABLE"]
        ),
    )
    status = found["status"]
    assert found["metadata"]["finalizers"] == [FINALIZER]
    assert status["imageCacheId"] == cache_id
    assert status["observedGeneration"] == found["metadata"]["generation"] == 1
    assert (status["imageCount"], status["progress"]["percent"], status["progress"]["phase"]) == (
        1,
        100,
        "DONE",
    )
    assert status["snapshotSizeBytes"] > 0 and status["diskCount"] == 0
    assert [z["zone"] for z in status["zoneAvailability"]] == ["local-a", "local-b"]
    assert (_condition(status, "Ready")["status"], _condition(status, "Synced")["status"]) == ("True", "True")
    cache = registry.get(cache_id)
    assert cache is not None and cache.state == pb.ImageCache.READY
    assert dict(cache.labels) == {"snapcache.io/imagecache-uid": uid, "snapcache.io/imagecache": name}
    assert status["expireDateTime"] == time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(cache.expire_time.seconds)
    )
    assert status["readyTime"]
    row = kubectl_get(kube_cluster, tmp_path, name)[1].split()
    assert row[:5] == [name, "Ready", "1", "1", status["expireDateTime"]]
    events = imagecaches.events(name)
    # events carry seconds only: compare them as sets
    assert sorted((e.type, e.reason) for e in events) == [("Normal", "Created"), ("Normal", "Ready")]
    assert all(e.involved_object.uid == uid and e.source.component == "snapcache-operator" for e in events)
    ready = next(e for e in events if e.reason == "Ready")
    assert f"image cache imageCaches/{cache_id} is ready: 1 image(s)" in ready.message
    assert registry.event_reasons(cache_id).count("BuildStarted") == 1
    # the API-made cache: untouched, and no ImageCache for it
    listed = imagecaches.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
    assert name in [o["metadata"]["name"] for o in listed]
    assert all(
        o["status"].get("imageCacheId") != api_made.name.split("/")[1] for o in listed if "status" in o
    )
    assert registry.get(api_made.name.split("/")[1]) is not None
    assert operator.metric("snapcache_operator_registry_feed_live") == 1.0


def test_editing_images_rebuilds(
    env: Env,
) -> None:
    imagecaches, registry, start_operator, pushed_images = (
        env.imagecaches,
        env.registry,
        env.start_operator,
        env.images,
    )
    imagecaches.on_timeout = start_operator().log
    web, worker = str(pushed_images.web.reference), str(pushed_images.worker.reference)
    spec = {"images": [web], "imageCacheSize": 1, "plainHttpRegistries": [pushed_images.registry.host]}
    created = imagecaches.create("rebuild", spec)
    name, cache_id = created["metadata"]["name"], cache_id_for(created["metadata"]["uid"])
    imagecaches.wait_status(name, "Ready", _phase("Ready"))
    imagecaches.patch(name, {"spec": {"images": [web, worker]}})
    found = imagecaches.wait_status(
        name,
        "Ready at generation 2",
        lambda s: s.get("phase") == "Ready" and s.get("observedGeneration") == 2,
    )
    assert found["status"]["imageCount"] == 2
    cache = registry.get(cache_id)
    assert cache is not None and list(cache.images) == [web, worker]
    assert [c.manifest_digest for c in cache.cached_images] == [
        pushed_images.web.digest,
        pushed_images.worker.digest,
    ]
    reasons = registry.event_reasons(cache_id)
    assert reasons.count("BuildStarted") == 2 and reasons.count("Updated") == 1
    assert sorted(e.reason for e in imagecaches.events(name)) == ["Created", "Ready", "Ready", "Updating"]


def test_deleting_waits_for_live_disks_then_removes_cache_and_snapshot(
    env: Env,
) -> None:
    imagecaches, registry, start_operator, pushed_images = (
        env.imagecaches,
        env.registry,
        env.start_operator,
        env.images,
    )
    imagecaches.on_timeout = start_operator().log
    spec = {
        "images": [str(pushed_images.web.reference)],
        "imageCacheSize": 1,
        "zones": ["local-a"],
        "plainHttpRegistries": [pushed_images.registry.host],
    }
    created = imagecaches.create("delete", spec)
    name, cache_id = created["metadata"]["name"], cache_id_for(created["metadata"]["uid"])
    imagecaches.wait_status(
        name,
        "available in local-a",
        lambda s: (
            s.get("phase") == "Ready"
            and s.get("zoneAvailability") == [{"zone": "local-a", "state": "AVAILABLE"}]
        ),
    )
    snapshot_id = registry.app.registry.get(name=f"imageCaches/{cache_id}").snapshot_id
    assert snapshot_id in registry.app.provider.inventory().snapshots
    disk = registry.stub.ProvisionDisk(
        api.ProvisionDiskRequest(parent=f"imageCaches/{cache_id}", zone="local-a", disk_id=f"d-{cache_id}"),
        timeout=10,
    )

    imagecaches.delete(name)
    blocked = imagecaches.wait_status(
        name, "blocked", lambda s: _condition(s, "Synced").get("reason") == "DeletionBlocked"
    )
    assert blocked["metadata"]["finalizers"] == [FINALIZER]
    assert blocked["status"]["phase"] == "Deleting"
    assert "DISKS_IN_USE" not in _condition(blocked["status"], "Synced")["message"]
    assert "1 live disk(s)" in _condition(blocked["status"], "Synced")["message"]
    warnings = [e for e in imagecaches.events(name) if e.type == "Warning"]
    assert [e.reason for e in warnings] == ["DeletionBlocked"]
    cache = registry.get(cache_id)
    assert cache is not None and cache.state == pb.ImageCache.READY  # nothing was deleted

    registry.stub.ReleaseDisk(api.ReleaseDiskRequest(name=disk.name), timeout=10)
    imagecaches.wait(name, "gone", lambda o: o is None)
    assert registry.get(cache_id) is None
    assert snapshot_id not in registry.app.provider.inventory().snapshots
    assert all(s != snapshot_id for s, _zone in registry.app.provider.inventory().zone_snapshots)


def test_failures_show_in_status_and_events(env: Env) -> None:
    imagecaches, registry, pushed_images = env.imagecaches, env.registry, env.images
    imagecaches.on_timeout = env.start_operator().log
    host = pushed_images.registry.host
    # the build fails: no such image in the OCI registry
    missing = imagecaches.create(
        "missing", {"images": [f"{host}/demo/none:1.0"], "imageCacheSize": 1, "plainHttpRegistries": [host]}
    )
    # what only the registry can judge: two names of one image, and a zone it does not have
    refused = imagecaches.create(
        "refused", {"images": ["nginx", "docker.io/library/nginx:latest"], "zones": ["zone-x"]}
    )
    failed = imagecaches.wait_status(missing["metadata"]["name"], "Failed", _phase("Failed"))["status"]
    assert failed["reason"] == "IMAGE_NOT_FOUND" and "demo/none:1.0" in failed["message"]
    assert (_condition(failed, "Ready")["reason"], _condition(failed, "Synced")["status"]) == (
        "ImageNotFound",
        "True",
    )
    (warning,) = [e for e in imagecaches.events(missing["metadata"]["name"]) if e.type == "Warning"]
    assert warning.reason == "Failed" and "IMAGE_NOT_FOUND" in warning.message

    invalid = imagecaches.wait_status(refused["metadata"]["name"], "Failed", _phase("Failed"))["status"]
    assert invalid["reason"] == "INVALID_FIELD" and invalid["observedGeneration"] == 1
    synced = _condition(invalid, "Synced")
    assert (synced["status"], synced["reason"]) == ("False", "InvalidSpec")
    assert (
        "duplicates image_cache.images[0]" in synced["message"]
        and "unknown zone 'zone-x'" in synced["message"]
    )
    assert registry.get(cache_id_for(refused["metadata"]["uid"])) is None
    events = imagecaches.events(refused["metadata"]["name"])
    assert [(e.type, e.reason) for e in events] == [("Warning", "InvalidSpec")]


@pytest.fixture
def stalling_registry(pushed_images: PushedImages) -> Iterator[GatedForwarder]:
    """The public OCI registry behind a gate that holds every request until opened."""
    host, port = pushed_images.registry.host.rsplit(":", 1)
    forwarder = GatedForwarder((host, int(port)))
    try:
        yield forwarder
    finally:
        forwarder.close()


def test_operator_killed_mid_build_and_restarted_builds_once(
    env: Env,
    stalling_registry: GatedForwarder,
) -> None:
    imagecaches, registry, start_operator, pushed_images = (
        env.imagecaches,
        env.registry,
        env.start_operator,
        env.images,
    )
    first = start_operator()
    image = f"{stalling_registry.host}/{pushed_images.web.reference.repository}:1.0"
    spec = {"images": [image], "imageCacheSize": 1, "plainHttpRegistries": [stalling_registry.host]}
    created = imagecaches.create("restart", spec)
    name, uid = created["metadata"]["name"], created["metadata"]["uid"]
    # mid-build: the registry's builder is waiting on the stalled OCI registry
    deadline = time.monotonic() + TIMEOUT
    while stalling_registry.held < 1:
        assert time.monotonic() < deadline, f"no build started:\n{first.log()}"
        time.sleep(0.05)
    (building,) = registry.caches_of(uid)
    assert building.state == pb.ImageCache.CREATING
    first.kill()
    # the worst moment to die: the cache exists but the ImageCache does not say so yet
    imagecaches.custom.patch_cluster_custom_object_status(
        GROUP, VERSION, PLURAL, name, {"status": {"imageCacheId": None, "phase": None, "conditions": None}}
    )

    second = start_operator()
    imagecaches.on_timeout = second.log
    imagecaches.wait_status(name, "Creating again", _phase("Creating"))
    stalling_registry.open()
    found = imagecaches.wait_status(name, "Ready", _phase("Ready"))
    caches = registry.caches_of(uid)
    assert [c.name for c in caches] == [building.name]  # exactly one cache, the first operator's
    assert found["status"]["imageCacheId"] == building.name.removeprefix("imageCaches/") == cache_id_for(uid)
    reasons = registry.event_reasons(building.name.removeprefix("imageCaches/"))
    assert (reasons.count("Created"), reasons.count("BuildStarted"), reasons.count("Updated")) == (1, 1, 0)
    assert [e.reason for e in imagecaches.events(name)].count("Created") == 1


# --- RBAC ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        # what the operator does
        ("list", GROUP, PLURAL, "", "", True),
        ("watch", GROUP, PLURAL, "", "", True),
        ("patch", GROUP, PLURAL, "", "", True),
        ("patch", GROUP, PLURAL, "status", "", True),
        ("update", GROUP, PLURAL, "finalizers", "", True),
        ("create", "", "events", "", "default", True),
        ("patch", "", "events", "", "default", True),
        # and nothing else
        ("get", "", "secrets", "", "default", False),
        ("list", "", "secrets", "", "", False),
        ("watch", "", "secrets", "", "kube-system", False),
        ("create", GROUP, PLURAL, "", "", False),
        ("delete", GROUP, PLURAL, "", "", False),
        ("update", GROUP, PLURAL, "", "", False),
        ("update", GROUP, PLURAL, "status", "", False),
        ("list", "apiextensions.k8s.io", "customresourcedefinitions", "", "", False),
        ("create", "coordination.k8s.io", "leases", "", "snapcache-system", False),
        ("list", "", "pods", "", "", False),
        ("list", "", "nodes", "", "", False),
        ("delete", "", "events", "", "default", False),
        ("escalate", "rbac.authorization.k8s.io", "clusterroles", "", "", False),
    ],
)
def test_operator_service_account_can_do_what_it_needs_and_nothing_else(
    kube_cluster: KubeCluster, operator_identity: OperatorIdentity, case: tuple[str, str, str, str, str, bool]
) -> None:
    verb, group, resource, subresource, namespace, allowed = case
    review = k8s.V1SubjectAccessReview(
        spec=k8s.V1SubjectAccessReviewSpec(
            user=operator_identity.user,
            groups=["system:serviceaccounts", f"system:serviceaccounts:{operator_identity.namespace}"],
            resource_attributes=k8s.V1ResourceAttributes(
                verb=verb,
                group=group,
                resource=resource,
                subresource=subresource or None,
                namespace=namespace or None,
            ),
        )
    )
    with kube_cluster.api_client() as client:
        answer = k8s.AuthorizationV1Api(client).create_subject_access_review(review)
    assert answer.status.allowed is allowed, answer.status


# --- credentials ------------------------------------------------------------------------------


@pytest.fixture
def pull_secret(kube_cluster: KubeCluster, private_oci_registry: OciRegistry) -> str:
    """`namespace/pull`: the private registry's password in a dockerconfigjson Secret the registry may read."""
    namespace = kube_cluster.create_namespace("operator-creds")
    auth = _b64(f"{PRIVATE_USER}:{PRIVATE_PASSWORD}")
    with kube_cluster.api_client() as client:
        core, rbac = k8s.CoreV1Api(client), k8s.RbacAuthorizationV1Api(client)
        core.create_namespaced_secret(
            namespace,
            k8s.V1Secret(
                metadata=k8s.V1ObjectMeta(name="pull"),
                type="kubernetes.io/dockerconfigjson",
                string_data={
                    ".dockerconfigjson": json.dumps({"auths": {private_oci_registry.host: {"auth": auth}}})
                },
            ),
        )
        rule = k8s.V1PolicyRule(api_groups=[""], resources=["secrets"], verbs=["get"])
        rbac.create_namespaced_role(
            namespace, k8s.V1Role(metadata=k8s.V1ObjectMeta(name="pull"), rules=[rule])
        )
        rbac.create_namespaced_role_binding(
            namespace,
            k8s.V1RoleBinding(
                metadata=k8s.V1ObjectMeta(name="pull"),
                role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="pull"),
                subjects=[
                    k8s.RbacV1Subject(kind="User", name="limited", api_group="rbac.authorization.k8s.io")
                ],
            ),
        )
    return f"{namespace}/pull"


def test_registry_password_never_leaks(
    env: Env,
    pull_secret: str,
) -> None:
    imagecaches, registry, start_operator, pushed_images = (
        env.imagecaches,
        env.registry,
        env.start_operator,
        env.images,
    )
    operator = start_operator()
    imagecaches.on_timeout = operator.log
    private = pushed_images.private_registry
    spec = {
        "images": [str(pushed_images.private.reference)],
        "imageCacheSize": 1,
        "imageRegistryCredentials": [pull_secret],
        "plainHttpRegistries": [private.host],
    }
    created = imagecaches.create("private", spec)
    name, cache_id = created["metadata"]["name"], cache_id_for(created["metadata"]["uid"])
    found = imagecaches.wait_status(name, "Ready", _phase("Ready"))
    cache = registry.get(cache_id)
    assert cache is not None and [c.manifest_digest for c in cache.cached_images] == [
        pushed_images.private.digest
    ]
    assert [r.secret for r in cache.registry_credentials] == [pull_secret]

    client = imagecaches.custom.api_client
    events = k8s.CoreV1Api(client).list_event_for_all_namespaces()
    seen = {
        "the ImageCache": json.dumps(found),
        "events": json.dumps(client.sanitize_for_serialization(events)),
        "the operator's log": operator.log(),
        "the registry's log": registry.log(),
        "the registry's database": registry.database_text(),
        "the registry's answers": str(cache) + "".join(registry.event_reasons(cache_id)),
    }
    # the search looks where the cache is, and for the forms the Secret really holds
    assert cache_id in seen["the registry's database"]
    assert name in seen["events"] and name in seen["the operator's log"]
    assert f"GET http://{private.host}/v2/private/app/manifests/1.0" in seen["the registry's log"]
    namespace, secret_name = pull_secret.split("/")
    stored = k8s.CoreV1Api(client).read_namespaced_secret(secret_name, namespace).data[".dockerconfigjson"]
    assert _b64(f"{PRIVATE_USER}:{PRIVATE_PASSWORD}") in base64.b64decode(stored).decode()
    forms = [PRIVATE_PASSWORD, _b64(f"{PRIVATE_USER}:{PRIVATE_PASSWORD}"), _b64(PRIVATE_PASSWORD)]
    leaks = [(where, form) for where, text in seen.items() for form in forms if form in text]
    assert leaks == []
