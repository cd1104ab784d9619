"""Everything snapcache runs around a real node, for the real-node tests and ``bench/pod_start.py``.

``running_node_stack`` starts: an upstream ``docker-registry`` (its access log tells every blob
it served) holding the images asked for, each with a ``/pause`` entrypoint so it really runs; a
cache registry (``RegistryApp``: local provider, SQLite, one zone) with a READY cache of each
image list asked for; a matcher; the extender, which the node's kube-scheduler calls; the real
node (``real_node.running_real_node``); and ``snapcache node-agent`` as a process of its own
(``AgentProcess``: a test kills it with SIGKILL and starts it again, on the same port, so the
``hosts.toml`` containerd reads stays right).

An upstream reached through a bandwidth-limited proxy (``limit_bits_per_second``) emulates a
remote registry for the benchmark: image references then name the proxy, and the cache is built
through it too (what a cache of a remote registry's image is).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import httpx
import pytest
from kubernetes import client as k8s
from prometheus_client.parser import text_string_to_metric_families

from services.cache_registry.server import RegistryApp, RegistryConfig, ZoneConfig
from services.extender.server import ExtenderApp, ExtenderConfig
from services.matcher.server import MatcherApp, MatcherConfig
from snapcache.demo.oci_images import BuiltImage, ImageSpec, push_image
from snapcache.demo.registry_server import RegistryServer
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from tests.support.kube_cluster import free_port
from tests.support.node_images import build_pause_binary, runnable_image
from tests.support.rate_limited_proxy import RateLimitedProxy
from tests.support.real_node import RealNode, running_real_node

USE = "snapcache.io/use-image-cache"
PRIVATE_USER, PRIVATE_PASSWORD = "snap", "n0de-Pa55word"  # test-only
PULL_SECRET = "pull"
ZONE = "zone-a"
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class AgentProcess:
    """``snapcache node-agent`` for the node, as the DaemonSet runs it; start, kill, start again."""

    args: list[str]
    log_path: Path
    port: int
    metrics_port: int
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self, timeout: float = 30.0) -> AgentProcess:
        """Start and wait until the mirror answers."""
        self._log = self.log_path.open("ab")
        environment = {**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "snapcache_cli.main", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPOSITORY_ROOT,
            env=environment,
        )
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"node agent exited:\n{self.read_log()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=1).status_code == 200:
                    return self
            assert time.monotonic() < deadline, f"node agent not up:\n{self.read_log()}"
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self._close_log()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def read_log(self) -> str:
        """The agent's output so far."""
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics: (name, sorted labels) -> value."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value (0 if absent)."""
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


@dataclass
class NodeStack:
    """The running stack (see the module docstring)."""

    node: RealNode
    upstream: RegistryServer
    proxy: RateLimitedProxy | None
    image_host: str  # the registry host in image references: the upstream, or the proxy
    registry: RegistryApp
    matcher: MatcherApp
    extender: ExtenderApp
    agent: AgentProcess
    images: dict[str, BuiltImage]  # "repository:tag" -> built image
    caches: dict[str, str]  # "repository:tag" of the first image -> cache id
    disk_root: Path
    workdir: Path
    namespace: str = field(default="")
    private: RegistryServer | None = None  # the htpasswd registry of ``private_images``

    def reference(self, repository_tag: str, *, host: str = "") -> str:
        """The full image reference pods use (``host``: another registry host than ``image_host``)."""
        return f"{host or self.image_host}/{repository_tag}"

    def upstream_blob_gets(self, since: int, repository: str) -> list[str]:
        """Blob downloads (GET, not HEAD) the upstream served after log offset ``since``."""
        log = self.upstream.read_log()[since:]
        return re.findall(rf'"GET /v2/{re.escape(repository)}/blobs/(sha256:[0-9a-f]+)[^"]*" 200', log)

    def registry_stub(self) -> tuple[grpc.Channel, api_grpc.CacheRegistryServiceStub]:
        """A channel (close it) and a stub of the cache registry."""
        channel = grpc.insecure_channel(f"127.0.0.1:{self.registry.port}")
        return channel, api_grpc.CacheRegistryServiceStub(channel)

    def live_disks(self, cache_id: str) -> list[str]:
        """The disk ids the registry holds for ``cache_id``."""
        channel, stub = self.registry_stub()
        with channel:
            listed = stub.ListDisks(api.ListDisksRequest(parent=f"imageCaches/{cache_id}"), timeout=10)
        return sorted(disk.name.rpartition("/")[2] for disk in listed.disks)

    def disk_dirs(self) -> list[str]:
        """The disks present under the zone's disk root."""
        if not self.disk_root.is_dir():
            return []
        return sorted(p.name for p in self.disk_root.iterdir() if not p.name.startswith("."))

    def pod(
        self,
        name: str,
        repository_tag: str,
        *,
        annotations: Mapping[str, str] | None = None,
        host: str = "",
        pull_secrets: Sequence[str] = (),
    ) -> k8s.V1Pod:
        """Create a pod of one container running the image; returns it as created."""
        body = k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(name=name, annotations=dict(annotations or {})),
            spec=k8s.V1PodSpec(
                containers=[
                    k8s.V1Container(
                        name="app",
                        image=self.reference(repository_tag, host=host),
                        image_pull_policy="Always",  # a pull each time: the runtime asks for it, not its cache
                    )
                ],
                image_pull_secrets=[k8s.V1LocalObjectReference(name=n) for n in pull_secrets] or None,
                termination_grace_period_seconds=1,
                automount_service_account_token=False,
                enable_service_links=False,
            ),
        )
        api, core = self.node.core()
        with api:
            created: k8s.V1Pod = core.create_namespaced_pod(self.namespace, body)
        return created

    def read_pod(self, name: str) -> k8s.V1Pod:
        """The pod as the API serves it now."""
        api, core = self.node.core()
        with api:
            pod: k8s.V1Pod = core.read_namespaced_pod(name, self.namespace)
        return pod

    def wait_running(self, name: str, timeout: float = 120.0) -> k8s.V1Pod:
        """Wait for the pod's phase Running; fail with its state and events otherwise."""
        deadline = time.monotonic() + timeout
        pod = self.read_pod(name)
        while time.monotonic() < deadline:
            pod = self.read_pod(name)
            if pod.status.phase == "Running":
                return pod
            assert pod.status.phase not in ("Failed", "Succeeded"), pod.status
            time.sleep(0.1)
        pytest.fail(
            f"pod {name} not Running after {timeout:.0f} s: {pod.status}\nevents: {self.events(name)}"
        )

    def events(self, pod_name: str) -> list[tuple[str, str, str]]:
        """(reason, source component, message) of the pod's events."""
        api, core = self.node.core()
        with api:
            listed = core.list_namespaced_event(
                self.namespace, field_selector=f"involvedObject.name={pod_name}"
            ).items
        return [(e.reason, e.source.component if e.source else "", e.message) for e in listed]

    def delete_pod(
        self, name: str, timeout: float = 60.0, *, force: bool = False, force_after: float | None = None
    ) -> None:
        """Delete the pod and wait until it is gone: the kubelet removes it once its containers are stopped.

        Not a forced delete (grace 0) unless ``force``: that removes the object at once, while the
        kubelet may still be syncing the pod (and pull its image again, after a test has removed
        it). Forced suits a pod whose pull is refused: the kubelet, backing off between pulls, takes
        up to a minute to confirm a graceful delete of it. ``force_after``: graceful first, forced
        if the pod is still there after that many seconds (a loaded kubelet can be that slow).
        """
        api, core = self.node.core()
        with api:
            with contextlib.suppress(k8s.ApiException):
                core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0 if force else None)
            started = time.monotonic()
            forced = force
            while time.monotonic() < started + timeout:
                try:
                    core.read_namespaced_pod(name, self.namespace)
                except k8s.ApiException as exc:
                    if exc.status == 404:
                        break
                    raise
                if not forced and force_after is not None and time.monotonic() > started + force_after:
                    forced = True
                    with contextlib.suppress(k8s.ApiException):
                        core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)
                time.sleep(0.1)
            else:
                pytest.fail(f"pod {name} not deleted after {timeout:.0f} s")

    def forget_images(self, *repository_tags: str, host: str = "") -> None:
        """Remove stopped containers, then the images, their content and snapshots: the next pod pulls.

        A container keeps its image's snapshots, and containerd skips fetching a layer whose
        snapshot exists: a pull after that downloads nothing, from the mirror or anywhere. The
        agent's seeding leases go too, which frees the snapshots it seeded and no pull used.
        """
        node = self.node
        deadline = time.monotonic() + 60  # the kubelet stops a deleted pod's containers in its own time
        while True:
            rows = [line.split() for line in node.ctr("tasks", "ls").stdout.splitlines()[1:] if line.strip()]
            running = {row[0] for row in rows if row[-1] == "RUNNING"}
            for row in rows:
                if row[0] not in running:
                    node.ctr("tasks", "rm", "-f", row[0], check=False)
            stopped = [c for c in node.ctr("containers", "ls", "-q").stdout.split() if c not in running]
            if stopped:
                node.ctr("containers", "rm", *stopped, check=False)
            for repository_tag in repository_tags:
                node.remove_image(self.reference(repository_tag, host=host))
            # the agent's seeded snapshots are held by leases until a pull references them
            seeded = [
                line.split()[0] for line in node.ctr("leases", "ls").stdout.splitlines()[1:] if line.strip()
            ]
            seeded = [lease for lease in seeded if lease.startswith("snapcache-seed-")]
            if seeded:
                node.ctr("leases", "rm", "--sync", *seeded, check=False)
            snapshots = set(node.ctr("snapshots", "ls").stdout.split())
            if not any(chain_ids(self.images[r]) & snapshots for r in repository_tags):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        pytest.fail(f"the snapshots of {repository_tags} stay in containerd: {sorted(snapshots)}")


def chain_ids(image: BuiltImage) -> set[str]:
    """The snapshot keys containerd gives the image's unpacked layers (OCI image spec ChainID)."""
    found: list[str] = []
    for layer in image.layers:
        found.append(
            layer.diff_id
            if not found
            else "sha256:" + hashlib.sha256(f"{found[-1]} {layer.diff_id}".encode()).hexdigest()
        )
    return set(found)


@dataclass(frozen=True)
class CacheSpec:
    """A cache to build: the images (``repository:tag`` of the image specs) it holds."""

    images: Sequence[str]
    private: bool = False  # of the private registry, built with the stack's pull Secret


def _wait_ready(stub: api_grpc.CacheRegistryServiceStub, name: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        cache = stub.GetImageCache(api.GetImageCacheRequest(name=name), timeout=10)
        available = all(z.state == pb.ZoneAvailability.AVAILABLE for z in cache.zone_availability)
        if cache.state == pb.ImageCache.READY and cache.zone_availability and available:
            return
        assert cache.state != pb.ImageCache.FAILED, cache.state_message
        assert time.monotonic() < deadline, cache
        time.sleep(0.1)


@contextlib.contextmanager
def running_node_stack(
    workdir: Path,
    *,
    images: Sequence[ImageSpec],
    caches: Sequence[CacheSpec],
    private_images: Sequence[ImageSpec] = (),
    limit_bits_per_second: float = 0.0,
    grace_seconds: float = 2.0,
    seed_containerd: bool = True,
    agent_args: Sequence[str] = (),
) -> Iterator[NodeStack]:
    """The whole stack around a real node (see the module docstring); everything stopped on exit.

    ``private_images`` go to a second registry with htpasswd auth (``PRIVATE_USER``); the stack's
    namespace gets a dockerconfigjson Secret ``PULL_SECRET`` for it, and a ``CacheSpec`` with
    ``private=True`` is built with that Secret (the cache records its images as private).
    ``seed_containerd``: the agent seeds containerd's snapshots from the disks, as deployed.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        upstream = RegistryServer(workdir / "upstream")
        upstream.start()
        stack.callback(upstream.close)
        proxy: RateLimitedProxy | None = None
        image_host = upstream.host
        if limit_bits_per_second:
            proxy = RateLimitedProxy(("127.0.0.1", upstream.port), bits_per_second=limit_bits_per_second)
            proxy.start()
            stack.callback(proxy.stop)
            image_host = f"127.0.0.1:{proxy.port}"
        private: RegistryServer | None = None
        if private_images:
            private = RegistryServer(workdir / "private", users={PRIVATE_USER: PRIVATE_PASSWORD})
            private.start()
            stack.callback(private.close)
        pause = build_pause_binary(workdir)
        built: dict[str, BuiltImage] = {}
        for spec in images:
            image = runnable_image(spec, pause, blob_dir=workdir / "blobs")
            push_image(upstream.url, image, timeout_seconds=300)
            built[f"{spec.repository}:{spec.tag}"] = image
        for spec in private_images:
            assert private is not None
            image = runnable_image(spec, pause, blob_dir=workdir / "blobs")
            push_image(private.url, image, auth=(PRIVATE_USER, PRIVATE_PASSWORD), timeout_seconds=300)
            built[f"{spec.repository}:{spec.tag}"] = image

        extender_port = free_port()
        extender_rule = {
            "urlPrefix": f"http://127.0.0.1:{extender_port}/",
            "filterVerb": "filter",
            "prioritizeVerb": "prioritize",
            "weight": 5,
            "nodeCacheCapable": True,
            "ignorable": True,
            "httpTimeout": "2s",
        }
        node = stack.enter_context(running_real_node(workdir / "node", extenders=[extender_rule], zone=ZONE))
        kubeconfig = node.cluster.write_kubeconfig(workdir / "snapcache-kubeconfig")
        namespace = node.cluster.create_namespace("real-node")
        if private is not None:
            auths = {private.host: {"username": PRIVATE_USER, "password": PRIVATE_PASSWORD}}
            client, core = node.core()
            with client:
                core.create_namespaced_secret(
                    namespace,
                    k8s.V1Secret(
                        metadata=k8s.V1ObjectMeta(name=PULL_SECRET),
                        type="kubernetes.io/dockerconfigjson",
                        string_data={".dockerconfigjson": json.dumps({"auths": auths})},
                    ),
                )

        zone_root = workdir / "zone-a"
        registry = RegistryApp(
            RegistryConfig(
                data_dir=workdir / "registry",
                listen="127.0.0.1:0",
                zones=(ZoneConfig(ZONE, root=zone_root),),
                worker_poll_seconds=0.05,
                grpc_workers=8,
                kubeconfig=kubeconfig,  # the dockerconfigjson Secret of private caches
                kube_in_cluster=False,
            )
        ).start()
        stack.callback(registry.stop, 0)
        cache_ids: dict[str, str] = {}
        with grpc.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
            stub = api_grpc.CacheRegistryServiceStub(channel)
            for cache in caches:
                host = private.host if cache.private and private is not None else image_host
                created = stub.CreateImageCache(
                    api.CreateImageCacheRequest(
                        image_cache=pb.ImageCache(
                            images=[f"{host}/{i}" for i in cache.images],
                            plain_http_registries=[host],
                            registry_credentials=[
                                pb.RegistryCredentialRef(secret=f"{namespace}/{PULL_SECRET}")
                            ]
                            if cache.private
                            else [],
                        )
                    ),
                    timeout=10,
                )
                _wait_ready(stub, created.name)
                cache_ids[cache.images[0]] = created.name.removeprefix("imageCaches/")
        disk_root = zone_root / "disks"
        disk_root.mkdir(parents=True, exist_ok=True)
        matcher = MatcherApp(
            MatcherConfig(
                registry_target=f"127.0.0.1:{registry.port}", listen="127.0.0.1:0", hit_flush_seconds=0.2
            )
        ).start(wait_loaded_seconds=10)
        stack.callback(matcher.stop, 0)
        extender = ExtenderApp(
            ExtenderConfig(
                matcher_target=f"127.0.0.1:{matcher.port}",
                listen=f"127.0.0.1:{extender_port}",
                kubeconfig=kubeconfig,
            )
        ).start(wait_nodes_seconds=10)
        stack.callback(extender.stop)
        plain_http = [upstream.host, image_host, *([private.host] if private is not None else [])]
        agent_port, metrics_port = free_port(), free_port()
        agent = AgentProcess(
            args=[
                "--registry",
                f"127.0.0.1:{registry.port}",
                "node-agent",
                "--listen",
                f"127.0.0.1:{agent_port}",
                "--metrics-listen",
                f"127.0.0.1:{metrics_port}",
                "--disk-root",
                str(disk_root),
                *[arg for host in dict.fromkeys(plain_http) for arg in ("--upstream-plain-http", host)],
                "--default-registry",
                image_host,
                "--containerd-hosts-dir",
                str(node.hosts_dir),
                "--rescan-seconds",
                "0.5",
                "--matcher",
                f"127.0.0.1:{matcher.port}",
                "--node-name",
                node.name,
                "--zone",
                ZONE,
                "--kubeconfig",
                str(kubeconfig),
                "--disk-grace-seconds",
                str(grace_seconds),
                *(["--seed-containerd", str(node.containerd_socket)] if seed_containerd else []),
                *agent_args,
            ],
            log_path=workdir / "node-agent.log",
            port=agent_port,
            metrics_port=metrics_port,
        )
        agent.start()
        stack.callback(agent.stop)
        yield NodeStack(
            node=node,
            upstream=upstream,
            proxy=proxy,
            image_host=image_host,
            registry=registry,
            matcher=matcher,
            extender=extender,
            agent=agent,
            images=built,
            caches=cache_ids,
            disk_root=disk_root,
            workdir=workdir,
            namespace=namespace,
            private=private,
        )


def unique(prefix: str) -> str:
    """A pod name of its own."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def pod_timestamps(pod: k8s.V1Pod) -> dict[str, Any]:
    """The pod's condition times (PodScheduled, Initialized, ContainersReady, Ready)."""
    return {c.type: c.last_transition_time for c in (pod.status.conditions or [])}
