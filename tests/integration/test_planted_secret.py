"""The planted-secret search (issue 7): a password planted in a Kubernetes Secret reaches no log,
answer, event, metric, database row or file of the registry and the matcher.

A private ``docker-registry`` (htpasswd) gets a user whose password is made for this test alone.
Two dockerconfigjson Secrets on the real kube-apiserver hold it and a wrong one (also planted:
the failure path must not leak either). ``snapcache serve`` (registry and matcher, one process,
JSON logs at debug level, request lines, /metrics) builds a cache with each: one READY, one
FAILED with REGISTRY_AUTH_FAILED, and one naming a Secret that does not exist. Then everything
anyone can see is searched for each password, its base64 form and the ``user:password`` base64
``auth`` string a dockerconfigjson holds: every answer (Get, List, events, the Watch feed, the
matcher's answer, disks, the error answers of refused calls with their status details), the
process's whole output, every Kubernetes event, ``/metrics``, every row of every table of the
registry's database (SQLite and PostgreSQL; for SQLite also the database's files byte by byte,
free pages included) and every file of the data directory.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import sqlalchemy
from kubernetes import client as k8s

from snapcache.demo.oci_images import ImageSpec, LayerSpec, build_image, push_image
from snapcache.demo.registry_server import RegistryServer
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from snapcache.v1 import matcher_pb2 as mpb
from snapcache.v1 import matcher_pb2_grpc as mpb_grpc
from tests.support.kube_cluster import KubeCluster, free_port

pytestmark = pytest.mark.e2e

TERMINAL = {pb.ImageCache.READY, pb.ImageCache.FAILED}
WAIT_SECONDS = 90.0


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@dataclass(frozen=True)
class Planted:
    """The test's private registry user and the passwords planted for it."""

    user: str
    password: str  # the right one
    wrong: str  # planted in a second Secret, refused by the registry

    def forms(self) -> dict[str, str]:
        """Every form a password takes on its way: itself, base64, and the ``auth`` string."""
        found: dict[str, str] = {}
        for label, password in (("password", self.password), ("wrong password", self.wrong)):
            found[label] = password
            found[f"base64 of the {label}"] = _b64(password)
            found[f"user:{label} base64"] = _b64(f"{self.user}:{password}")
            found[f"user:{label} base64url"] = base64.urlsafe_b64encode(
                f"{self.user}:{password}".encode()
            ).decode()
        return found


@pytest.fixture
def planted() -> Planted:
    return Planted(
        user=f"planted-{secrets.token_hex(3)}",
        password=f"Planted-Pw-{secrets.token_hex(12)}",
        wrong=f"Wrong-Pw-{secrets.token_hex(12)}",
    )


@pytest.fixture
def private_registry(tmp_path: Path, planted: Planted) -> Iterator[RegistryServer]:
    server = RegistryServer(tmp_path / "oci-registry", users={planted.user: planted.password})
    server.start()
    try:
        yield server
    finally:
        server.close()


def _dockerconfigjson(host: str, user: str, password: str) -> str:
    return json.dumps({"auths": {host: {"auth": _b64(f"{user}:{password}")}}})


class Served:
    """``snapcache serve`` (registry + matcher) as a process, with its output in a file."""

    def __init__(self, tmp_path: Path, database_url: str, kubeconfig: Path) -> None:
        self.ports = {name: free_port() for name in ("registry", "matcher", "metrics")}
        self.data_dir = tmp_path / "data"
        self.log_path = tmp_path / "serve.log"
        command = [
            sys.executable, "-m", "snapcache_cli.main", "--log-format", "json", "--log-level", "debug",
            "serve", "--data-dir", str(self.data_dir), "--database-url", database_url,
            "--listen", f"127.0.0.1:{self.ports['registry']}",
            "--matcher-listen", f"127.0.0.1:{self.ports['matcher']}", "--extender-listen", "off",
            "--metrics-listen", f"127.0.0.1:{self.ports['metrics']}", "--kubeconfig", str(kubeconfig),
        ]  # fmt: skip
        environment = {k: v for k, v in os.environ.items() if not k.startswith("SNAPCACHE_")}
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=environment
            )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.ports['registry']}")
        self.stub = api_grpc.CacheRegistryServiceStub(self.channel)

    def wait_serving(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                self.stub.ListImageCaches(api.ListImageCachesRequest(), timeout=2)
                return
            except grpc.RpcError:
                assert self.process.poll() is None, self.log_path.read_text()
                assert time.monotonic() < deadline, "serve did not start:\n" + self.log_path.read_text()
                time.sleep(0.2)

    def stop(self) -> str:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.log_path.read_text(errors="replace")


def _error_answer(error: grpc.RpcError) -> str:
    """All a refused call tells its caller: code, message, and every trailer (the status details too)."""
    trailers = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    said = [str(error.code()), str(error.details())]  # type: ignore[attr-defined]
    for key, value in trailers:
        said.append(f"{key}={value.decode(errors='replace') if isinstance(value, bytes) else value}")
    return "\n".join(said)


def _database_text(url: str) -> str:
    """Every row of every table, as text."""
    engine = sqlalchemy.create_engine(url)
    try:
        metadata = sqlalchemy.MetaData()
        metadata.reflect(engine)
        assert metadata.tables, "no tables found: the search would look at nothing"
        lines = []
        with engine.connect() as connection:
            for table in metadata.sorted_tables:
                for row in connection.execute(sqlalchemy.select(table)):
                    values = [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in row]
                    lines.append(f"{table.name}: {values}")
        return "\n".join(lines)
    finally:
        engine.dispose()


def _files_bytes(directory: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def test_a_planted_password_reaches_nothing_anyone_can_see(
    planted: Planted,
    private_registry: RegistryServer,
    kube_cluster: KubeCluster,
    database_url: str,
    tmp_path: Path,
) -> None:
    image = build_image(ImageSpec("private/planted", "1.0", [LayerSpec(48 * 1024, seed=911)]))
    digest = push_image(private_registry.url, image, auth=(planted.user, planted.password))
    reference = f"{private_registry.host}/private/planted:1.0"
    namespace = kube_cluster.create_namespace("planted")
    kube_cluster.allow_secret_reading(namespace)
    with kube_cluster.api_client() as client:
        core = k8s.CoreV1Api(client)
        for name, password in (("right", planted.password), ("wrong", planted.wrong)):
            core.create_namespaced_secret(
                namespace,
                k8s.V1Secret(
                    metadata=k8s.V1ObjectMeta(name=name),
                    type="kubernetes.io/dockerconfigjson",
                    string_data={
                        ".dockerconfigjson": _dockerconfigjson(private_registry.host, planted.user, password)
                    },
                ),
            )
    url = database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    served = Served(
        tmp_path, url, kube_cluster.write_kubeconfig(tmp_path / "kubeconfig.json", user="limited")
    )
    seen: dict[str, str] = {}
    try:
        served.wait_serving()
        stub = served.stub

        def create(cache_id: str, secret: str) -> pb.ImageCache:
            return stub.CreateImageCache(
                api.CreateImageCacheRequest(
                    image_cache_id=cache_id,
                    image_cache=pb.ImageCache(
                        images=[reference],
                        cache_size_gib=1,
                        plain_http_registries=[private_registry.host],
                        registry_credentials=[pb.RegistryCredentialRef(secret=secret)],
                    ),
                ),
                timeout=10,
            )

        caches = [
            create("imc-91a00001", f"{namespace}/right"),
            create("imc-91a00002", f"{namespace}/wrong"),
            create("imc-91a00003", f"{namespace}/missing"),
        ]
        deadline = time.monotonic() + WAIT_SECONDS
        final: list[pb.ImageCache] = []
        while time.monotonic() < deadline:
            final = [stub.GetImageCache(api.GetImageCacheRequest(name=c.name), timeout=10) for c in caches]
            if all(c.state in TERMINAL for c in final):
                break
            time.sleep(0.2)
        right, wrong, missing = final
        assert right.state == pb.ImageCache.READY, right.state_message
        assert [c.manifest_digest for c in right.cached_images] == [digest]
        assert (wrong.state, wrong.state_reason) == (pb.ImageCache.FAILED, "REGISTRY_AUTH_FAILED")
        assert missing.state == pb.ImageCache.FAILED and f"{namespace}/missing" in missing.state_message

        # every answer: the caches, the list, their events, the Watch feed, disks, the matcher
        answers = [str(c) for c in final]
        answers.append(str(stub.ListImageCaches(api.ListImageCachesRequest(), timeout=10)))
        for cache in final:
            answers.append(
                str(stub.ListImageCacheEvents(api.ListImageCacheEventsRequest(parent=cache.name), timeout=10))
            )
        watch = stub.WatchImageCaches(api.WatchImageCachesRequest(start_revision=0), timeout=3)
        try:
            for change in watch:
                answers.append(str(change))
        except grpc.RpcError as ended:
            assert ended.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert sum("imc-91a00002" in a for a in answers) >= 3
        disk = stub.ProvisionDisk(
            api.ProvisionDiskRequest(
                parent=right.name, zone="local-a", disk_id="planted-disk", holder="test"
            ),
            timeout=30,
        )
        answers.append(str(disk))
        answers.append(str(stub.ListDisks(api.ListDisksRequest(parent=right.name), timeout=10)))
        with grpc.insecure_channel(f"127.0.0.1:{served.ports['matcher']}") as matcher_channel:
            matcher = mpb_grpc.MatcherServiceStub(matcher_channel)
            deadline = time.monotonic() + 30
            while True:
                matched = matcher.MatchImageCaches(
                    mpb.MatchImageCachesRequest(
                        images=[reference], namespace=namespace, image_pull_secrets=["right"]
                    ),
                    timeout=10,
                )
                if matched.decision == mpb.MatchImageCachesResponse.MATCHED or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert matched.decision == mpb.MatchImageCachesResponse.MATCHED
            answers.append(str(matched))
        # error answers: refused calls, with their status details
        for refused_call in (
            lambda: create("imc-91a00002", f"{namespace}/wrong"),  # ALREADY_EXISTS
            lambda: create("imc-91a00004", "not-a-namespaced-name"),  # INVALID_ARGUMENT
            lambda: stub.GetImageCache(api.GetImageCacheRequest(name="imageCaches/imc-91a0ffff"), timeout=10),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                refused_call()
            answers.append(_error_answer(caught.value))
        seen["answers"] = "\n".join(answers)
        seen["/metrics"] = httpx.get(f"http://127.0.0.1:{served.ports['metrics']}/metrics", timeout=10).text
        assert "snapcache_registry_builds_total" in seen["/metrics"]
        with kube_cluster.api_client() as client:
            events = k8s.CoreV1Api(client).list_event_for_all_namespaces()
            seen["Kubernetes events"] = json.dumps(client.sanitize_for_serialization(events))
    finally:
        seen["the process's output"] = served.stop()
    seen["database rows"] = _database_text(url)
    assert "imc-91a00002" in seen["database rows"] and "REGISTRY_AUTH_FAILED" in seen["database rows"]
    log = seen["the process's output"]
    assert '"request_id"' in log and "CreateImageCache" in log  # JSON request lines were on
    assert f"{private_registry.host}" in log  # the pulls were logged, at debug level

    forms = planted.forms()
    # the forms searched for are those the Secrets really hold
    with kube_cluster.api_client() as client:
        stored = k8s.CoreV1Api(client).read_namespaced_secret("wrong", namespace).data[".dockerconfigjson"]
    assert forms["user:wrong password base64"] in base64.b64decode(stored).decode()
    leaks = [(where, label) for where, text in seen.items() for label, form in forms.items() if form in text]
    files = _files_bytes(served.data_dir)
    assert files, "the data directory is empty: the search would look at nothing"
    if url.startswith("sqlite:///"):  # the database's own bytes, pages no row holds any more too
        database_file = Path(url.removeprefix("sqlite:///"))
        for path in (
            database_file,
            *(database_file.with_name(database_file.name + s) for s in ("-wal", "-shm")),
        ):
            if path.exists():
                files[str(path)] = path.read_bytes()
        assert b"imc-91a00002" in files[str(database_file)] + files.get(f"{database_file}-wal", b"")
    leaks += [
        (path, label)
        for path, content in files.items()
        for label, form in forms.items()
        if form.encode() in content
    ]
    assert leaks == []
