"""A real Kubernetes control plane for tests: etcd + kube-apiserver (+ kube-scheduler on demand).

A pytest plugin listed in tests/conftest.py. The binaries are Kubernetes v1.20.2, built from
Debian's source package by ``scripts/build-kube`` into ``SNAPCACHE_KUBE_BIN_DIR`` (default
``~/.cache/snapcache/kubernetes-v1.20.2/bin``); etcd is Debian's ``etcd-server``.

Fixtures:

``kube_cluster`` (session) -> ``KubeCluster``
    ``.url``, ``.ca_path``, ``.admin_token``, ``.tokens`` (user -> bearer token: ``admin`` is in
    ``system:masters``; ``limited`` has no RBAC bindings, grant it what a test needs),
    ``.write_kubeconfig(path, user=...)``, ``.api_client(user=...)`` (a
    ``kubernetes.client.ApiClient``; close it), ``.create_namespace(prefix)`` (unique per call:
    tests share the cluster, so each works in namespaces of its own),
    ``.write_scheduler_config(path, extenders=...)`` and ``.start_scheduler(config_path)``.

Why some admission plugins are off: no controller-manager runs, so nothing would create the
``default`` ServiceAccount a pod needs under ``ServiceAccount`` admission, and nothing would lift the
``not-ready`` taint ``TaintNodesByCondition`` puts on every new Node. Tests create Node objects
themselves, with their ``status`` set on create.

Every process logs to a file in the session's tmp dir; a start-up failure quotes the logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from kubernetes import client as kube_client
from kubernetes import config as kube_config

KUBE_VERSION = "v1.20.2"
BUILD_COMMAND = "scripts/build-kube"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/24"


def kube_bin_dir() -> Path:
    """Where ``scripts/build-kube`` puts the binaries."""
    configured = os.environ.get("SNAPCACHE_KUBE_BIN_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "snapcache" / f"kubernetes-{KUBE_VERSION}" / "bin"


def _binary(name: str) -> str:
    path = kube_bin_dir() / name
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"{path} is missing: build the Kubernetes {KUBE_VERSION} binaries with `{BUILD_COMMAND}` "
            "(it runs from scripts/bootstrap; a few minutes, cached afterwards)",
            pytrace=False,
        )
    return str(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class KubeProcess:
    """A child process whose output goes to a log file; `stop` never leaves it running."""

    name: str
    args: Sequence[str]
    log_path: Path
    process: subprocess.Popen[bytes] = field(init=False)
    _log: IO[bytes] = field(init=False)

    def start(self) -> KubeProcess:
        self._log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                list(self.args), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
            )
        except BaseException:
            self._log.close()
            raise
        return self

    def alive(self) -> bool:
        return self.process.poll() is None

    def read_log(self, tail_lines: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-tail_lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL; always reaps the process and closes the log."""
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=timeout)
        finally:
            self._log.close()


def _wait_until(
    process: KubeProcess,
    ready: Any,
    *,
    what: str,
    timeout: float,
    also: Sequence[KubeProcess] = (),
) -> None:
    """Poll ``ready()`` until true; fail with the logs if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not process.alive():
            last = f"exited with code {process.process.returncode}"
            break
        try:
            if ready():
                return
        except (httpx.HTTPError, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    else:
        last = f"not ready after {timeout:.0f} s ({last or 'no answer'})"
    logs = "\n".join(f"--- {p.name} log ({p.log_path}) ---\n{p.read_log()}" for p in (process, *also))
    pytest.fail(f"{what} did not start: {last}\n{logs}", pytrace=False)


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed (apt-get install openssl)", pytrace=False)
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@dataclass
class Scheduler:
    """A running kube-scheduler."""

    process: KubeProcess
    secure_port: int

    @property
    def healthz_url(self) -> str:
        return f"https://127.0.0.1:{self.secure_port}/healthz"


@dataclass
class KubeCluster:
    """A running etcd + kube-apiserver (see the module docstring)."""

    url: str
    ca_path: Path
    tokens: Mapping[str, str]
    workdir: Path
    etcd_url: str  # the apiserver's etcd (tests that compact its history)
    _stack: contextlib.ExitStack

    @property
    def admin_token(self) -> str:
        return self.tokens["admin"]

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the apiserver's self-signed serving certificate."""
        return ssl.create_default_context(cafile=str(self.ca_path))

    def write_kubeconfig(self, path: Path, *, user: str = "admin") -> Path:
        """A kubeconfig for ``user`` (JSON, which is YAML); returns ``path``."""
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "test", "cluster": {"server": self.url, "certificate-authority": str(self.ca_path)}}
            ],
            "users": [{"name": user, "user": {"token": self.tokens[user]}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
            "current-context": "test",
        }
        path.write_text(json.dumps(document, indent=2))
        return path

    def api_client(self, *, user: str = "admin") -> kube_client.ApiClient:
        """A ``kubernetes.client.ApiClient`` acting as ``user``; the caller closes it."""
        configuration = kube_client.Configuration()
        configuration.host = self.url
        configuration.ssl_ca_cert = str(self.ca_path)
        configuration.api_key = {"BearerToken": self.tokens[user]}
        configuration.api_key_prefix = {"BearerToken": "Bearer"}
        return kube_client.ApiClient(configuration)

    def create_namespace(self, prefix: str = "test") -> str:
        """A new namespace with a unique name (never deleted: no namespace controller runs)."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        with self.api_client() as api:
            kube_client.CoreV1Api(api).create_namespace(
                kube_client.V1Namespace(metadata=kube_client.V1ObjectMeta(name=name))
            )
        return name

    def allow_secret_reading(self, namespace: str, *, user: str = "limited") -> None:
        """RBAC: ``user`` may get Secrets in ``namespace``, nothing more (what the registry needs to
        read the dockerconfigjson Secrets caches name); ``system:serviceaccount:NS:NAME`` names a
        ServiceAccount, anything else a User."""
        if user.startswith("system:serviceaccount:"):
            _, _, account_namespace, account = user.split(":")
            subject = kube_client.RbacV1Subject(
                kind="ServiceAccount", name=account, namespace=account_namespace
            )
        else:
            subject = kube_client.RbacV1Subject(kind="User", name=user, api_group="rbac.authorization.k8s.io")
        with self.api_client() as api:
            rbac = kube_client.RbacAuthorizationV1Api(api)
            rbac.create_namespaced_role(
                namespace,
                kube_client.V1Role(
                    metadata=kube_client.V1ObjectMeta(name="read-pull-secrets"),
                    rules=[kube_client.V1PolicyRule(api_groups=[""], resources=["secrets"], verbs=["get"])],
                ),
            )
            rbac.create_namespaced_role_binding(
                namespace,
                kube_client.V1RoleBinding(
                    metadata=kube_client.V1ObjectMeta(name="read-pull-secrets"),
                    role_ref=kube_client.V1RoleRef(
                        api_group="rbac.authorization.k8s.io", kind="Role", name="read-pull-secrets"
                    ),
                    subjects=[subject],
                ),
            )

    def write_scheduler_config(
        self, path: Path, *, extenders: Sequence[Mapping[str, Any]] = (), scheduler_name: str = ""
    ) -> Path:
        """A ``kubescheduler.config.k8s.io/v1beta1`` config talking to this cluster as admin."""
        kubeconfig = self.write_kubeconfig(path.with_name(path.stem + "-kubeconfig.yaml"))
        document: dict[str, Any] = {
            "apiVersion": "kubescheduler.config.k8s.io/v1beta1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "leaderElection": {"leaderElect": False},
        }
        # With --config, the 1.20 scheduler takes its insecure health/metrics address from the
        # file (default 0.0.0.0:10251) and ignores --port=0: give every scheduler a free port of
        # its own, so two of them (or another one on this machine) never collide.
        insecure = f"127.0.0.1:{free_port()}"
        document["healthzBindAddress"] = insecure
        document["metricsBindAddress"] = insecure
        if scheduler_name:
            document["profiles"] = [{"schedulerName": scheduler_name}]
        if extenders:
            document["extenders"] = [dict(e) for e in extenders]
        path.write_text(json.dumps(document, indent=2))
        return path

    def start_scheduler(self, config_path: Path, *, timeout: float = 60.0) -> Scheduler:
        """Start kube-scheduler with ``config_path``, wait for /healthz; stopped with the cluster."""
        port = free_port()
        process = KubeProcess(
            "kube-scheduler",
            [
                _binary("kube-scheduler"),
                f"--config={config_path}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                "--port=0",
                f"--cert-dir={self.workdir / f'scheduler-{port}-certs'}",
                "--v=2",
            ],
            self.workdir / f"kube-scheduler-{port}.log",
        ).start()
        self._stack.callback(process.stop)
        scheduler = Scheduler(process, port)

        def healthy() -> bool:
            # the serving certificate is self-signed by the scheduler itself: `curl -k`
            response = httpx.get(scheduler.healthz_url, verify=False, timeout=2)
            return response.status_code == 200 and response.text == "ok"

        _wait_until(process, healthy, what="kube-scheduler", timeout=timeout)
        return scheduler

    def stop_scheduler(self, scheduler: Scheduler) -> None:
        """Stop a scheduler before the session ends (stopping twice is harmless)."""
        scheduler.process.stop()


def _start_etcd(workdir: Path) -> tuple[KubeProcess, str]:
    etcd = shutil.which("etcd")
    if etcd is None:
        pytest.fail(
            "etcd is not installed (apt-get install etcd-server; scripts/bootstrap does it)", pytrace=False
        )
    client_url = f"http://127.0.0.1:{free_port()}"
    peer_url = f"http://127.0.0.1:{free_port()}"
    process = KubeProcess(
        "etcd",
        [
            etcd,
            "--name=snapcache-test",
            f"--data-dir={workdir / 'etcd-data'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=snapcache-test={peer_url}",
            "--initial-cluster-state=new",
        ],
        workdir / "etcd.log",
    ).start()
    return process, client_url


def _start_apiserver(workdir: Path, etcd_url: str, tokens: Mapping[str, str]) -> tuple[KubeProcess, str]:
    _openssl("genrsa", "-out", str(workdir / "sa.key"), "2048")
    _openssl("rsa", "-in", str(workdir / "sa.key"), "-pubout", "-out", str(workdir / "sa.pub"))
    groups = {"admin": "system:masters"}
    (workdir / "tokens.csv").write_text(
        "".join(f'{token},{user},{user},"{groups.get(user, "")}"\n' for user, token in tokens.items())
    )
    port = free_port()
    process = KubeProcess(
        "kube-apiserver",
        [
            _binary("kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            "--insecure-port=0",
            f"--cert-dir={workdir / 'apiserver-certs'}",
            f"--token-auth-file={workdir / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={workdir / 'sa.pub'}",
            f"--service-account-signing-key-file={workdir / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--disable-admission-plugins=ServiceAccount,TaintNodesByCondition",
            # Node and pod watches straight from etcd: a test compacts etcd's history to get the
            # 410 Gone a watcher that was away too long gets (the extender's node cache, the node
            # agent's pod watch). The watch cache would keep every change of a short test and serve
            # it, never answering 410.
            "--watch-cache-sizes=nodes#0,pods#0",
            "--v=1",
        ],
        workdir / "kube-apiserver.log",
    ).start()
    return process, f"https://127.0.0.1:{port}"


@contextlib.contextmanager
def running_cluster(workdir: Path, *, timeout: float = 90.0) -> Iterator[KubeCluster]:
    """Start etcd and kube-apiserver in ``workdir``; stop them (and any scheduler) on exit."""
    _binary("kube-apiserver")  # fail fast, before etcd starts
    tokens = {"admin": secrets.token_hex(16), "limited": secrets.token_hex(16)}
    with contextlib.ExitStack() as stack:
        etcd, etcd_url = _start_etcd(workdir)
        stack.callback(etcd.stop)

        def etcd_healthy() -> bool:
            response = httpx.get(f"{etcd_url}/health", timeout=2)
            return response.status_code == 200 and json.loads(response.text).get("health") == "true"

        _wait_until(etcd, etcd_healthy, what="etcd", timeout=timeout)

        apiserver, url = _start_apiserver(workdir, etcd_url, tokens)
        stack.callback(apiserver.stop)
        ca_path = workdir / "apiserver-certs" / "apiserver.crt"
        headers = {"Authorization": f"Bearer {tokens['admin']}"}

        def apiserver_ready() -> bool:
            if not ca_path.exists():
                return False
            context = ssl.create_default_context(cafile=str(ca_path))
            return httpx.get(f"{url}/readyz", headers=headers, verify=context, timeout=2).status_code == 200

        _wait_until(apiserver, apiserver_ready, what="kube-apiserver", timeout=timeout, also=[etcd])
        # schedulers started later are stopped first (ExitStack order), before the apiserver
        cluster_stack = stack.enter_context(contextlib.ExitStack())
        yield KubeCluster(
            url=url, ca_path=ca_path, tokens=tokens, workdir=workdir, etcd_url=etcd_url, _stack=cluster_stack
        )


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """etcd + kube-apiserver shared by the whole session (each test uses its own namespaces)."""
    with running_cluster(tmp_path_factory.mktemp("kube")) as cluster:
        yield cluster


def load_kubeconfig_client(path: Path) -> kube_client.ApiClient:
    """An ApiClient from a kubeconfig file, as a program given ``--kubeconfig`` would make it."""
    return kube_config.new_client_from_config(config_file=str(path))
