"""A real single-node Kubernetes cluster for tests and the pod_start benchmark: pods actually run.

``running_real_node`` starts, on this machine, everything a node needs beyond what
``kube_cluster.running_cluster`` gives (etcd + kube-apiserver of its own, never the session's
shared cluster, whose other tests create Nodes and schedulers of their own):

- kube-controller-manager and kube-scheduler (the default profile, with the extenders given);
- containerd with its CRI plugin: root, state and socket in a short temp dir, the registry
  ``config_path`` pointing at a directory the node agent writes ``hosts.toml`` into, a sandbox
  image imported beforehand (nothing is ever pulled from the network), the CNI ``bridge``
  plugin from Debian's containernetworking-plugins (no masquerade, no port maps: no CNI
  iptables rules), and ``restrict_oom_score_adj`` (root here lacks CAP_SYS_RESOURCE);
- a kubelet (cgroupfs driver, swap allowed, the machine's own hostname as node name, its first
  non-loopback address as node IP, the zone label given).

What a kubelet and containerd change on the host, and the teardown puts back: sysctls
(``vm.overcommit_memory``, ``kernel.panic*``, ``route_localnet``, ...), iptables ``KUBE-*``
chains and the rules that jump to them, ``/run/containerd``, ``/var/lib/cni``, ``/var/log/pods``
and the other directories they create, network namespaces and every mount under the node's
directory, the CNI bridge, the kubelet's cgroups; every process (the containers, their shims,
containerd, the kubelet, the control plane) is killed and reaped. The host state is recorded
before anything starts, and only what was not there before is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client as k8s

from snapcache.demo.oci_images import ImageSpec
from tests.support.kube_cluster import (
    KubeCluster,
    KubeProcess,
    _binary,
    _wait_until,
    free_port,
    running_cluster,
)
from tests.support.node_images import build_pause_binary, runnable_image, write_oci_archive

SANDBOX_IMAGE = "registry.snapcache.test/pause:1"
CNI_BIN_DIR = Path("/usr/lib/cni")
BRIDGE = "sccni0"
POD_SUBNET = "10.244.0.0/24"
# Sysctls the kubelet (setupKernelTunables), kube-proxy and the CNI bridge set.
SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/conf/all/route_localnet",
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
)
# Directories they create outside the node's own directory (removed only if absent before).
HOST_PATHS = (
    "/run/containerd",
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/kubelet",
    "/run/netns",
    "/var/run/netns",
    "/etc/cni",
    "/opt/cni",
)
CHAIN_PREFIXES = ("KUBE-", "CNI-")
LOCK_PATH = Path(tempfile.gettempdir()) / "snapcache-real-node.lock"
TABLES = ("filter", "nat", "mangle")


def node_ip() -> str:
    """This machine's first non-loopback IPv4 address (a kubelet refuses a loopback node IP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.255", 9))  # no packet is sent: this only picks a route
            address = str(probe.getsockname()[0])
        except OSError:
            address = ""
    if address and not address.startswith("127."):
        return address
    listed = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False).stdout.split()
    for candidate in listed:
        if "." in candidate and not candidate.startswith("127."):
            return candidate
    pytest.fail("this machine has no non-loopback IPv4 address for the kubelet's --node-ip", pytrace=False)


def _require(*commands: str) -> None:
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed: scripts/bootstrap installs them with SNAPCACHE_NEED_KUBE=1",
            pytrace=False,
        )


@dataclass
class HostState:
    """What the node changes on the host, as it was before; ``restore`` puts it back."""

    sysctls: dict[str, str] = field(default_factory=dict)
    absent_paths: list[str] = field(default_factory=list)
    chains: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (binary, table) -> chains
    mounts: set[str] = field(default_factory=set)
    links: set[str] = field(default_factory=set)
    cgroups: set[str] = field(default_factory=set)

    @classmethod
    def record(cls) -> HostState:
        """The host as it is now."""
        state = cls()
        for name in SYSCTLS:
            with contextlib.suppress(OSError):
                state.sysctls[name] = Path("/proc/sys", name).read_text().strip()
        state.absent_paths = [p for p in HOST_PATHS if not os.path.lexists(p)]
        for binary in ("iptables", "ip6tables"):
            for table in TABLES:
                state.chains[(binary, table)] = set(_chains(binary, table))
        state.mounts = set(_mount_points())
        state.links = set(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else set()
        state.cgroups = set(_kube_cgroups())
        return state

    def restore(self, node_dir: Path) -> list[str]:
        """Put the host back; return what could not be (for the test's output)."""
        problems: list[str] = []
        for point in sorted(set(_mount_points()) - self.mounts, key=len, reverse=True):
            if point.startswith(str(node_dir)) or point.startswith(
                ("/run/", "/var/run/", "/var/lib/kubelet")
            ):
                result = subprocess.run(["umount", "-l", point], capture_output=True, text=True, check=False)
                if result.returncode:
                    problems.append(f"umount {point}: {result.stderr.strip()}")
        for (binary, table), before in self.chains.items():
            problems += _remove_chains(binary, table, keep=before)
        for link in sorted(_links() - self.links):
            if link == BRIDGE or link.startswith("veth"):
                subprocess.run(["ip", "link", "delete", link], capture_output=True, check=False)
        for group in sorted(set(_kube_cgroups()) - self.cgroups, key=len, reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(group)
        for name, value in self.sysctls.items():
            path = Path("/proc/sys", name)
            try:
                if path.read_text().strip() != value:
                    path.write_text(value + "\n")
            except OSError as exc:
                problems.append(f"sysctl {name}: {exc}")
        for path in self.absent_paths:
            if os.path.lexists(path):
                shutil.rmtree(path, ignore_errors=True)
                if os.path.lexists(path):
                    problems.append(f"{path} could not be removed")
        return problems


def _chains(binary: str, table: str) -> list[str]:
    if shutil.which(binary) is None:
        return []
    listed = subprocess.run([binary, "-w", "-t", table, "-S"], capture_output=True, text=True, check=False)
    return [line.split()[1] for line in listed.stdout.splitlines() if line.startswith(("-N ", "-P "))]


def _remove_chains(binary: str, table: str, *, keep: set[str]) -> list[str]:
    if shutil.which(binary) is None:
        return []
    listed = subprocess.run([binary, "-w", "-t", table, "-S"], capture_output=True, text=True, check=False)
    ours = [c for c in _chains(binary, table) if c.startswith(CHAIN_PREFIXES) and c not in keep]
    problems = []
    for line in listed.stdout.splitlines():
        words = shlex.split(line)
        if not line.startswith("-A ") or words[1] in ours:
            continue
        if any(word in ours for word in words):  # a rule in a chain of the host jumping to ours
            result = subprocess.run(
                [binary, "-w", "-t", table, "-D", *words[1:]], capture_output=True, text=True, check=False
            )
            if result.returncode:
                problems.append(f"{binary} -t {table} -D {' '.join(words[1:])}: {result.stderr.strip()}")
    for chain in ours:
        subprocess.run([binary, "-w", "-t", table, "-F", chain], capture_output=True, check=False)
    for chain in ours:
        result = subprocess.run(
            [binary, "-w", "-t", table, "-X", chain], capture_output=True, text=True, check=False
        )
        if result.returncode:
            problems.append(f"{binary} -t {table} -X {chain}: {result.stderr.strip()}")
    return problems


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return [line.split()[4] for line in mountinfo]


def _links() -> set[str]:
    return set(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else set()


def _kube_cgroups() -> list[str]:
    found = []
    root = Path("/sys/fs/cgroup")
    if not root.is_dir():
        return found
    for controller in root.iterdir():
        for top in ("kubepods", "kubelet"):  # the cgroupfs driver's QoS tree and the kubelet's own
            if (controller / top).is_dir():
                found += [str(p) for p, _dirs, _files in os.walk(controller / top)]
    return found


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = (
                Path("/proc", entry, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry))
    return pids


@dataclass
class RealNode:
    """A running single-node cluster (see the module docstring)."""

    cluster: KubeCluster
    name: str  # the Node's name: this machine's hostname
    ip: str
    zone: str
    directory: Path  # containerd's and the kubelet's files, short for the socket's sake
    hosts_dir: Path  # containerd's registry config_path: the node agent's hosts.toml go here
    containerd_socket: Path
    kubelet: KubeProcess
    containerd: KubeProcess
    processes: list[KubeProcess]

    def ctr(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ctr -n k8s.io ARGS`` against this node's containerd."""
        result = subprocess.run(
            ["ctr", "--address", str(self.containerd_socket), "-n", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode:
            raise AssertionError(f"ctr {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result

    def image_names(self) -> list[str]:
        """The image names containerd's CRI namespace holds."""
        return self.ctr("images", "ls", "-q").stdout.split()

    def remove_image(self, reference: str) -> None:
        """Forget an image (every name of it: tag, digest, config id) so the next pod pulls it again."""
        repository = reference.split("@", 1)[0] if "@" in reference else reference.rsplit(":", 1)[0]
        rows = [line.split() for line in self.ctr("images", "ls").stdout.splitlines()[1:] if line.strip()]
        digests = {row[2] for row in rows if row[0] == reference or row[0].startswith(repository + "@")}
        names = sorted({row[0] for row in rows if row[2] in digests})
        if names:  # a name gone meanwhile fails the command: callers check what is left
            self.ctr("images", "rm", "--sync", *names, check=False)

    def core(self) -> tuple[Any, k8s.CoreV1Api]:
        """(api client, CoreV1Api) as admin; close the client."""
        api = self.cluster.api_client()
        return api, k8s.CoreV1Api(api)


def _write_containerd_config(directory: Path, hosts_dir: Path, cni_conf: Path) -> Path:
    socket_path = directory / "c.sock"
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    text = f"""version = 2
root = "{directory / "root"}"
state = "{directory / "state"}"
[grpc]
  address = "{socket_path}"
[{cri}]
  sandbox_image = "{SANDBOX_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  max_concurrent_downloads = 3
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{cni_conf}"
[{cri}.registry]
  config_path = "{hosts_dir}"
"""
    config = directory / "containerd.toml"
    config.write_text(text)
    return config


def _write_cni_config(conf_dir: Path, directory: Path) -> None:
    conf_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "cniVersion": "0.4.0",
        "name": "snapcache-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "dataDir": str(directory / "cni-ipam"),
                },
            },
        ],
    }
    (conf_dir / "10-snapcache.conflist").write_text(json.dumps(document, indent=2))


def _write_kubelet_config(path: Path, *, address: str) -> Path:
    document = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs",
        "failSwapOn": False,
        "address": address,
        "port": free_port(),
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": free_port(),
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "resolvConf": "",
        "runtimeRequestTimeout": "5m",
        "serializeImagePulls": False,
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "nodeStatusUpdateFrequency": "5s",
        "makeIPTablesUtilChains": True,
    }
    path.write_text(json.dumps(document, indent=2))
    return path


def _kill_containers(node_socket: Path, directory: Path) -> None:
    ctr = ["ctr", "--address", str(node_socket), "-n", "k8s.io"]
    listed = subprocess.run(
        [*ctr, "tasks", "ls", "-q"], capture_output=True, text=True, timeout=30, check=False
    )
    for task in listed.stdout.split():
        subprocess.run(
            [*ctr, "tasks", "kill", "-s", "SIGKILL", task], capture_output=True, timeout=30, check=False
        )
    for task in listed.stdout.split():  # force: a task still dying is removed all the same
        subprocess.run([*ctr, "tasks", "rm", "-f", task], capture_output=True, timeout=30, check=False)
    containers = subprocess.run(
        [*ctr, "containers", "ls", "-q"], capture_output=True, text=True, timeout=30, check=False
    )
    if containers.stdout.split():
        subprocess.run(
            [*ctr, "containers", "rm", *containers.stdout.split()],
            capture_output=True,
            timeout=60,
            check=False,
        )


def _kill_leftovers(directory: Path) -> None:
    """Shims (their command line names the node's socket) and anything else started from there."""
    for _ in range(3):
        pids = _processes_mentioning(str(directory))
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)


def _wait_node_ready(cluster: KubeCluster, name: str, kubelet: KubeProcess, timeout: float) -> None:
    def ready() -> bool:
        with cluster.api_client() as api:
            try:
                node = k8s.CoreV1Api(api).read_node(name)
            except k8s.ApiException as exc:
                if exc.status == 404:
                    return False
                raise
        conditions = {c.type: c.status for c in (node.status.conditions or [])}
        return conditions.get("Ready") == "True"

    _wait_until(kubelet, ready, what="the kubelet's Node Ready", timeout=timeout)


@contextlib.contextmanager
def running_real_node(
    workdir: Path,
    *,
    extenders: Sequence[Mapping[str, Any]] = (),
    zone: str = "zone-a",
    before_kubelet: Callable[[Path], None] = lambda _hosts_dir: None,
    timeout: float = 120.0,
) -> Iterator[RealNode]:
    """A single-node cluster in ``workdir`` (see the module docstring); host state restored on exit.

    One at a time per machine (a lock file in the temp dir; another waits up to 15 minutes):
    two would share the bridge, ``/run/containerd`` and iptables, and each teardown would take
    the other's down. ``before_kubelet(hosts_dir)`` runs once containerd is up, before the kubelet.
    """
    _require("containerd", "ctr", "runc", "iptables", "ip", "umount")
    if not (CNI_BIN_DIR / "bridge").exists():
        pytest.fail(
            f"{CNI_BIN_DIR}/bridge missing: apt-get install containernetworking-plugins", pytrace=False
        )
    for name in ("kubelet", "kube-controller-manager", "kube-scheduler"):
        _binary(name)
    with _machine_lock(timeout):
        yield from _running_real_node(
            workdir, extenders=extenders, zone=zone, before_kubelet=before_kubelet, timeout=timeout
        )


@contextlib.contextmanager
def _held_lock(path: Path, timeout: float) -> Iterator[None]:
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another real node held {path} for {timeout:.0f} s", pytrace=False)
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _machine_lock(timeout: float) -> contextlib.AbstractContextManager[None]:
    """One real node per machine at a time (test runs, the benchmark): they share the host's
    bridge, /run/containerd, /var/lib/cni and iptables, and each puts them back as it found them."""
    return _held_lock(LOCK_PATH, max(timeout, 900.0))


def _running_real_node(
    workdir: Path,
    *,
    extenders: Sequence[Mapping[str, Any]],
    zone: str,
    before_kubelet: Callable[[Path], None],
    timeout: float,
) -> Iterator[RealNode]:
    host = HostState.record()
    directory = Path(tempfile.mkdtemp(prefix="sc-node-", dir="/tmp"))
    problems: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            (workdir / "control-plane").mkdir(parents=True, exist_ok=True)
            cluster = stack.enter_context(running_cluster(workdir / "control-plane"))
            name = socket.gethostname()
            ip = node_ip()
            hosts_dir = directory / "certs.d"
            hosts_dir.mkdir()
            admin_kubeconfig = cluster.write_kubeconfig(workdir / "admin-kubeconfig")
            processes: list[KubeProcess] = []

            def started(process: KubeProcess) -> KubeProcess:
                processes.append(process)
                stack.callback(process.stop)
                return process

            port = free_port()
            manager = started(
                KubeProcess(
                    "kube-controller-manager",
                    [
                        _binary("kube-controller-manager"),
                        f"--kubeconfig={admin_kubeconfig}",
                        f"--authentication-kubeconfig={admin_kubeconfig}",
                        f"--authorization-kubeconfig={admin_kubeconfig}",
                        "--bind-address=127.0.0.1",
                        f"--secure-port={port}",
                        "--port=0",
                        f"--cert-dir={workdir / 'controller-manager-certs'}",
                        "--leader-elect=false",
                        f"--service-account-private-key-file={cluster.workdir / 'sa.key'}",
                        f"--root-ca-file={cluster.ca_path}",
                        "--controllers=*,-nodeipam,-cloud-node-lifecycle,-route,-service,-bootstrapsigner,-tokencleaner",
                        "--v=1",
                    ],
                    workdir / "kube-controller-manager.log",
                ).start()
            )
            _wait_until(
                manager,
                lambda: (
                    httpx.get(f"https://127.0.0.1:{port}/healthz", verify=False, timeout=2).status_code == 200
                ),
                what="kube-controller-manager",
                timeout=timeout,
            )
            scheduler = cluster.start_scheduler(
                cluster.write_scheduler_config(workdir / "scheduler.yaml", extenders=extenders)
            )
            processes.append(scheduler.process)

            cni_conf = directory / "net.d"
            _write_cni_config(cni_conf, directory)
            config = _write_containerd_config(directory, hosts_dir, cni_conf)
            containerd = KubeProcess(
                "containerd", ["containerd", "--config", str(config)], workdir / "containerd.log"
            ).start()
            processes.append(containerd)
            socket_path = directory / "c.sock"

            def stop_containerd() -> None:
                _kill_containers(socket_path, directory)
                containerd.stop()
                _kill_leftovers(directory)

            stack.callback(stop_containerd)
            ctr = ["ctr", "--address", str(socket_path), "-n", "k8s.io"]

            def containerd_up() -> bool:
                return subprocess.run([*ctr, "version"], capture_output=True, timeout=10).returncode == 0

            _wait_until(containerd, containerd_up, what="containerd", timeout=timeout)
            pause = build_pause_binary(directory)
            sandbox = runnable_image(ImageSpec("pause", "1", []), pause)
            archive = write_oci_archive(sandbox, SANDBOX_IMAGE, directory / "pause.tar")
            subprocess.run(
                [*ctr, "images", "import", str(archive)], check=True, capture_output=True, timeout=60
            )
            before_kubelet(hosts_dir)

            kubelet_config = _write_kubelet_config(workdir / "kubelet.json", address=ip)
            kubelet = started(
                KubeProcess(
                    "kubelet",
                    [
                        _binary("kubelet"),
                        f"--config={kubelet_config}",
                        f"--kubeconfig={admin_kubeconfig}",
                        f"--root-dir={directory / 'kubelet'}",
                        f"--cert-dir={directory / 'kubelet-pki'}",
                        "--container-runtime=remote",
                        f"--container-runtime-endpoint=unix://{socket_path}",
                        f"--node-ip={ip}",
                        f"--hostname-override={name}",
                        f"--node-labels=topology.kubernetes.io/zone={zone}",
                        "--v=2",
                    ],
                    workdir / "kubelet.log",
                ).start()
            )
            _wait_node_ready(cluster, name, kubelet, timeout)
            node = RealNode(
                cluster=cluster,
                name=name,
                ip=ip,
                zone=zone,
                directory=directory,
                hosts_dir=hosts_dir,
                containerd_socket=socket_path,
                kubelet=kubelet,
                containerd=containerd,
                processes=processes,
            )
            stack.callback(_delete_all_pods, node)  # first on the way out: the kubelet stops them
            yield node
    finally:
        _kill_leftovers(directory)
        problems = host.restore(directory)
        shutil.rmtree(directory, ignore_errors=True)
    assert not problems, f"host state not fully restored: {problems}"


def _delete_all_pods(node: RealNode, timeout: float = 30.0) -> None:
    api, core = node.core()
    with api:
        pods = core.list_pod_for_all_namespaces().items
        for pod in pods:
            with contextlib.suppress(k8s.ApiException):
                core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _running_tasks(node):
            time.sleep(0.2)


def _running_tasks(node: RealNode) -> list[str]:
    """Tasks still running (a stopped one stays listed until its container is removed)."""
    rows = [line.split() for line in node.ctr("tasks", "ls", check=False).stdout.splitlines()[1:]]
    return [row[0] for row in rows if row and row[-1] == "RUNNING"]
