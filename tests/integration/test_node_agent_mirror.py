"""The node agent's mirror end to end: a real upstream registry, a READY cache, a disk, skopeo.

One module-scoped world: a ``docker-registry`` upstream holding a multi-layer image (and the
demo images, one of them multi-arch), a real registry service (``RegistryApp``, the local
provider, SQLite) that builds a cache of them and provisions a disk from its snapshot, and a
node agent serving that disk. The upstream's access log tells what reached it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from services.cache_registry.server import RegistryApp, RegistryConfig, ZoneConfig
from services.node_agent.disk_catalogue import DiskCatalogue
from services.node_agent.disk_keeper import DiskKeeper
from services.node_agent.registry_disks import RegistryDisks
from services.node_agent.server import NodeAgentApp, NodeAgentConfig
from snapcache.demo.oci_images import (
    BuiltImage,
    ImageSpec,
    LayerSpec,
    MiB,
    build_image,
    push_demo_images,
    push_image,
)
from snapcache.demo.registry_server import RegistryServer
from snapcache.images import parse_image_reference
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from tests.support.oci_fixtures import PRIVATE_PASSWORD, PRIVATE_USER, PushedImages
from tests.support.token_auth import READER, READER_PASSWORD, TokenOciRegistry

pytestmark = pytest.mark.e2e

APP_SPEC = ImageSpec(
    "demo/app",
    "2.0",
    [
        LayerSpec(3 * MiB, seed=801),  # streamed with its last chunk held back
        LayerSpec(1536 * 1024, seed=802, file_count=2),
        LayerSpec(64 * 1024, seed=803),  # small: checked whole before sending
    ],
)


@dataclass
class World:
    upstream: RegistryServer
    registry: RegistryApp
    disk_location: Path
    app_image: BuiltImage
    app_digest: str
    base_index_digest: str
    base_amd64_digest: str
    cache_id: str


def _upstream_requests(server: RegistryServer, since: int, pattern: str) -> list[str]:
    log = server.read_log()[since:]
    return re.findall(rf'"(?:GET|HEAD) {pattern}[^"]*"', log)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("node-agent")
    upstream = RegistryServer(root / "upstream")
    upstream.start()
    registry: RegistryApp | None = None
    try:
        app_image = build_image(APP_SPEC)
        app_digest = push_image(upstream.url, app_image)
        pushed = {p.repository: p for p in push_demo_images(upstream.url)}
        registry = RegistryApp(
            RegistryConfig(
                data_dir=root / "registry",
                listen="127.0.0.1:0",
                zones=(ZoneConfig("zone-a"),),
                worker_poll_seconds=0.05,
                grpc_workers=4,
            )
        ).start()
        with grpc.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
            stub = api_grpc.CacheRegistryServiceStub(channel)
            images = [
                f"{upstream.host}/demo/app:2.0",
                f"{upstream.host}/demo/web:1.0",
                f"{upstream.host}/demo/base:1.0",
            ]
            created = stub.CreateImageCache(
                api.CreateImageCacheRequest(
                    image_cache=pb.ImageCache(images=images, plain_http_registries=[upstream.host])
                ),
                timeout=10,
            )
            deadline = time.monotonic() + 60
            while True:
                cache = stub.GetImageCache(api.GetImageCacheRequest(name=created.name), timeout=10)
                zones_ready = all(z.state == pb.ZoneAvailability.AVAILABLE for z in cache.zone_availability)
                if cache.state == pb.ImageCache.READY and cache.zone_availability and zones_ready:
                    break
                assert cache.state not in (pb.ImageCache.FAILED,), cache.state_message
                assert time.monotonic() < deadline, cache
                time.sleep(0.05)
            disk = stub.ProvisionDisk(
                api.ProvisionDiskRequest(parent=created.name, zone="zone-a", disk_id="node-1"), timeout=10
            )
        base = pushed["demo/base"]
        yield World(
            upstream=upstream,
            registry=registry,
            disk_location=Path(disk.location),
            app_image=app_image,
            app_digest=app_digest,
            base_index_digest=base.digest,
            base_amd64_digest=base.images[0].manifest_digest,
            cache_id=created.name.removeprefix("imageCaches/"),
        )
    finally:
        if registry is not None:
            registry.stop(0)
        upstream.close()


def _agent(world: World, disk_root: Path, **options: object) -> NodeAgentApp:
    settings: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "upstream_plain_http": frozenset({world.upstream.host}),
        "default_registry": world.upstream.host,
        "rescan_seconds": 0.1,
        **options,
    }
    config = NodeAgentConfig(disk_root=disk_root, **settings)  # type: ignore[arg-type]
    return NodeAgentApp(config).start()


@pytest.fixture
def agent(world: World, tmp_path: Path) -> Iterator[NodeAgentApp]:
    started = _agent(world, world.disk_location.parent, hosts_dir=tmp_path / "certs.d")
    try:
        yield started
    finally:
        started.stop()


def _metric(agent: NodeAgentApp, name: str, **labels: str) -> float:
    value = agent.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def _metric_reaches(agent: NodeAgentApp, name: str, floor: float, **labels: str) -> bool:
    """A streamed answer is counted once its last byte is out: the client may see it first."""
    deadline = time.monotonic() + 5
    while _metric(agent, name, **labels) < floor and time.monotonic() < deadline:
        time.sleep(0.01)
    return _metric(agent, name, **labels) >= floor


def _skopeo_copy(source: str, destination: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", source, f"oci:{destination}:copied"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _oci_digest(layout: Path) -> str:
    inspected = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{layout}:copied"], capture_output=True, timeout=30, check=True
    )
    import hashlib

    return "sha256:" + hashlib.sha256(inspected.stdout).hexdigest()


def test_a_cached_image_is_pulled_from_the_disk_with_no_blob_from_upstream(
    world: World, agent: NodeAgentApp, tmp_path: Path
) -> None:
    since = len(world.upstream.read_log())
    result = _skopeo_copy(f"docker://127.0.0.1:{agent.port}/demo/app:2.0", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert _oci_digest(tmp_path / "out") == world.app_digest
    layers = sorted(p.name for p in (tmp_path / "out" / "blobs" / "sha256").iterdir())
    expected = sorted(layer.digest.removeprefix("sha256:") for layer in world.app_image.layers)
    assert set(expected) <= set(layers)
    assert _upstream_requests(world.upstream, since, "/v2/demo/app/") == []  # not even a manifest
    blob_bytes = sum(layer.size for layer in world.app_image.layers)
    assert _metric_reaches(agent, "snapcache_node_agent_served_bytes_total", blob_bytes, source="disk")
    for kind in ("manifest", "blob"):  # only skopeo's /v2/ probe went upstream (its auth challenge)
        assert (
            _metric(agent, "snapcache_node_agent_requests_total", kind=kind, source="upstream", code="200")
            == 0
        )
    assert _metric(agent, "snapcache_node_agent_disks_attached") == 1


def test_containerd_style_requests_with_ns_by_tag_and_by_index_digest(
    world: World, agent: NodeAgentApp
) -> None:
    since = len(world.upstream.read_log())
    ns = world.upstream.host
    accept = ", ".join(
        [
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        ]
    )
    with httpx.Client(base_url=f"http://127.0.0.1:{agent.port}") as client:
        head = client.head("/v2/demo/app/manifests/2.0", params={"ns": ns}, headers={"Accept": accept})
        assert head.status_code == 200
        assert head.headers["docker-content-digest"] == world.app_digest
        assert int(head.headers["content-length"]) > 0 and head.content == b""
        # a tag built from a multi-arch index answers that index (the runtime picks its platform;
        # only the cache's platform is on the disk, the others pass through), and the platform
        # manifest to a client that does not take indexes
        tagged = client.head("/v2/demo/base/manifests/1.0", params={"ns": ns}, headers={"Accept": accept})
        assert tagged.headers["docker-content-digest"] == world.base_index_digest
        single = client.head(
            "/v2/demo/base/manifests/1.0",
            params={"ns": ns},
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        assert single.headers["docker-content-digest"] == world.base_amd64_digest
        # the multi-arch image by its index digest (a pod pinned by digest), then its amd64 manifest
        index = client.get(
            f"/v2/demo/base/manifests/{world.base_index_digest}",
            params={"ns": ns},
            headers={"Accept": accept},
        )
        assert index.status_code == 200, index.text
        assert index.headers["docker-content-digest"] == world.base_index_digest
        assert world.base_amd64_digest in index.text
        manifest = client.get(
            f"/v2/demo/base/manifests/{world.base_amd64_digest}",
            params={"ns": ns},
            headers={"Accept": accept},
        )
        assert manifest.status_code == 200
        for layer in json.loads(manifest.content)["layers"]:
            blob = client.get(f"/v2/demo/base/blobs/{layer['digest']}", params={"ns": ns})
            assert blob.status_code == 200 and len(blob.content) == layer["size"]
        probe = client.get("/v2/")
        assert probe.status_code == 200 and probe.headers["docker-distribution-api-version"] == "registry/2.0"
    assert _upstream_requests(world.upstream, since, "/v2/demo/") == []
    # a blob on the disk is served only under a repository whose manifest lists it, as a
    # registry scopes blobs: asked under another name, the question goes upstream
    foreign = world.app_image.layers[2].digest
    with httpx.Client(base_url=f"http://127.0.0.1:{agent.port}") as client:
        assert client.head(f"/v2/demo/web/blobs/{foreign}", params={"ns": ns}).status_code == 404
    assert len(_upstream_requests(world.upstream, since, f"/v2/demo/web/blobs/{foreign}")) == 1


def test_an_image_on_no_disk_passes_through_intact(world: World, agent: NodeAgentApp, tmp_path: Path) -> None:
    other = build_image(
        ImageSpec("demo/other", "1.0", [LayerSpec(1536 * 1024, seed=901), LayerSpec(4096, seed=902)])
    )
    digest = push_image(world.upstream.url, other)
    since = len(world.upstream.read_log())
    result = _skopeo_copy(f"docker://127.0.0.1:{agent.port}/demo/other:1.0", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert _oci_digest(tmp_path / "out") == digest
    fetched = _upstream_requests(world.upstream, since, "/v2/demo/other/blobs/")
    assert len(fetched) >= len(other.layers)
    other_bytes = sum(layer.size for layer in other.layers)
    assert _metric_reaches(agent, "snapcache_node_agent_served_bytes_total", other_bytes, source="upstream")
    # not in the registry at all: the upstream's 404 is relayed
    with httpx.Client(base_url=f"http://127.0.0.1:{agent.port}") as client:
        missing = client.get("/v2/demo/nothing/manifests/1.0")
        assert missing.status_code == 404
        assert "MANIFEST_UNKNOWN" in missing.text or "NAME_UNKNOWN" in missing.text


def test_a_corrupt_blob_on_the_disk_is_never_served_as_good(world: World, tmp_path: Path) -> None:
    # a disk of its own (a copy: the provisioned disk's blobs are hard links shared with the zone)
    disk = tmp_path / "disks" / "node-2"
    shutil.copytree(world.disk_location, disk)
    big, _middle, small = world.app_image.layers
    for layer in (big, small):
        path = disk / "blobs" / "sha256" / layer.digest.removeprefix("sha256:")
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, other content
        path.chmod(0o644)
        path.write_bytes(bytes(data))
    agent = _agent(world, disk.parent)
    try:
        since = len(world.upstream.read_log())
        with httpx.Client(base_url=f"http://127.0.0.1:{agent.port}") as client:
            # the big layer is streamed: the client gets a truncated body, never the whole bad blob
            with pytest.raises(httpx.RemoteProtocolError):
                client.get(f"/v2/demo/app/blobs/{big.digest}")
            assert _metric(agent, "snapcache_node_agent_digest_failures_total", source="disk") == 1
            assert _metric(agent, "snapcache_node_agent_bad_blobs") == 1
            # the retry passes through to upstream and is intact
            retry = client.get(f"/v2/demo/app/blobs/{big.digest}")
            assert retry.status_code == 200 and len(retry.content) == big.size
            # the small layer is checked before a byte is sent: passed through at once
            direct = client.get(f"/v2/demo/app/blobs/{small.digest}")
            assert direct.status_code == 200 and len(direct.content) == small.size
        assert _metric(agent, "snapcache_node_agent_digest_failures_total", source="disk") == 2
        fetched = _upstream_requests(world.upstream, since, "/v2/demo/app/blobs/")
        assert len(fetched) == 2 and all(d.digest in "".join(fetched) for d in (big, small))
        # a whole pull through the mirror now succeeds: good blobs from the disk, bad ones upstream
        result = _skopeo_copy(f"docker://127.0.0.1:{agent.port}/demo/app:2.0", tmp_path / "out")
        assert result.returncode == 0, result.stderr
        assert _oci_digest(tmp_path / "out") == world.app_digest
    finally:
        agent.stop()


def _raw(port: int, method: str, target: str) -> tuple[int, bytes, dict[str, str]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest(method, target, skip_host=False, skip_accept_encoding=True)
        connection.putheader("Content-Length", "0")
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH", "OPTIONS", "FOO"])
def test_anything_but_get_and_head_is_405(agent: NodeAgentApp, method: str) -> None:
    status, body, headers = _raw(agent.port, method, "/v2/demo/app/manifests/2.0")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


@pytest.mark.parametrize(
    "target",
    [
        "/v2/../../../../etc/passwd",
        "/v2/demo/../../../etc/blobs/sha256:" + "0" * 64,
        "/v2/%2e%2e/%2e%2e/etc/blobs/sha256:" + "0" * 64,
        "/v2/demo/app/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd",
        "/../../etc/passwd",
        "/v2/demo/app/manifests/..",
    ],
)
def test_path_traversal_is_refused(world: World, agent: NodeAgentApp, target: str) -> None:
    since = len(world.upstream.read_log())
    status, body, _ = _raw(agent.port, "GET", target)
    assert status in (400, 404), (status, body)
    assert b"root:" not in body
    assert _upstream_requests(world.upstream, since, "/") == []  # refused before reaching anything


def test_hosts_toml_for_docker_hub_and_the_disks_registries(world: World, agent: NodeAgentApp) -> None:
    import tomllib

    hosts_dir = agent.config.hosts_dir
    assert hosts_dir is not None
    written = sorted(p.name for p in hosts_dir.iterdir())
    assert written == sorted(["docker.io", world.upstream.host])
    parsed = tomllib.loads((hosts_dir / world.upstream.host / "hosts.toml").read_text())
    assert parsed["server"] == f"http://{world.upstream.host}"
    assert parsed["host"] == {f"http://127.0.0.1:{agent.port}": {"capabilities": ["pull", "resolve"]}}


def test_disks_attached_and_released_are_followed(world: World, tmp_path: Path) -> None:
    root = tmp_path / "disks"
    root.mkdir()
    agent = _agent(world, root)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{agent.port}") as client:
            # as the provider attaches a disk: built under a dot name, renamed into place
            shutil.copytree(world.disk_location, root / ".tmp-node-3")
            (root / ".tmp-node-3").rename(root / "node-3")
            deadline = time.monotonic() + 5
            while agent.catalogue.disk_ids != ["node-3"]:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert client.head("/v2/demo/web/manifests/1.0").status_code == 200
            assert (
                _metric(
                    agent, "snapcache_node_agent_requests_total", kind="manifest", source="disk", code="200"
                )
                == 1
            )
            shutil.rmtree(root / "node-3")
            while agent.catalogue.disk_ids:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            # now from upstream (which answers an OCI manifest only to a client that accepts one)
            oci = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
            answer = client.head("/v2/demo/web/manifests/1.0", headers=oci)
            assert answer.status_code == 200
            assert (
                _metric(
                    agent,
                    "snapcache_node_agent_requests_total",
                    kind="manifest",
                    source="upstream",
                    code="200",
                )
                == 1
            )
    finally:
        agent.stop()


def _skopeo_inspect(source: str, *credentials: str) -> subprocess.CompletedProcess[str]:
    creds = ["--creds", credentials[0]] if credentials else []
    return subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", *creds, source],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_private_images_pass_through_only_with_the_clients_own_credentials(
    world: World, pushed_images: PushedImages, token_oci_registry: TokenOciRegistry, tmp_path: Path
) -> None:
    """The agent has no credentials: a 401 it cannot answer anonymously goes back to the client."""
    basic = pushed_images.private_registry  # htpasswd (Basic)
    cases = [
        (basic.host, "private/app:1.0", f"{PRIVATE_USER}:{PRIVATE_PASSWORD}", pushed_images.private.digest),
        (
            token_oci_registry.host,
            "private/app:1.0",
            f"{READER}:{READER_PASSWORD}",
            token_oci_registry.app.digest,
        ),
    ]
    for host, image, credentials, digest in cases:
        agent = _agent(
            world, tmp_path / "no-disks", upstream_plain_http=frozenset({host}), default_registry=host
        )
        try:
            source = f"docker://127.0.0.1:{agent.port}/{image}"
            refused = _skopeo_inspect(source)
            assert refused.returncode != 0
            assert (
                "unauthorized" in refused.stderr.lower()
                or "authentication required" in refused.stderr.lower()
            )
            allowed = _skopeo_inspect(source, credentials)
            assert allowed.returncode == 0, allowed.stderr
            assert "sha256:" + hashlib.sha256(allowed.stdout.encode()).hexdigest() == digest
            with httpx.Client(base_url=f"http://127.0.0.1:{agent.port}") as client:
                challenge = client.get(f"/v2/{image.replace(':', '/manifests/')}")
                assert challenge.status_code == 401 and challenge.headers["www-authenticate"]
        finally:
            agent.stop()
    # the mirror asked the token service anonymously only; the reader's token came to skopeo
    scope = "repository:private/app:pull"
    assert token_oci_registry.tokens.issued(user="", scope=scope) >= 1
    assert token_oci_registry.tokens.issued(user=READER, scope=scope) >= 1


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[str]:
    """A containerd of the test's own (root, state and socket in a temp dir; no CRI): its socket."""
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.fail(
            "containerd is not installed (apt-get install containerd; scripts/bootstrap does it)",
            pytrace=False,
        )
    base = Path(tempfile.mkdtemp(prefix="sc-ctrd-", dir="/tmp"))  # a socket path must stay short
    socket_path = base / "c.sock"
    config = base / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{base / "root"}"\n'
        f'state = "{base / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        "[grpc]\n"
        f'  address = "{socket_path}"\n'
    )
    log = (tmp_path / "containerd.log").open("wb")
    process = subprocess.Popen(
        ["containerd", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(
            ["ctr", "--address", str(socket_path), "version"], capture_output=True
        ).returncode:
            assert process.poll() is None, (tmp_path / "containerd.log").read_text()
            assert time.monotonic() < deadline, "containerd did not start"
            time.sleep(0.1)
        yield str(socket_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def test_containerd_pulls_a_cached_image_through_the_mirror_with_no_blob_from_upstream(
    world: World, agent: NodeAgentApp, containerd: str
) -> None:
    """containerd's own resolver and fetcher, configured by the hosts.toml the agent wrote."""
    assert agent.config.hosts_dir is not None
    since = len(world.upstream.read_log())
    ctr = ["ctr", "--address", containerd, "-n", "snapcache-test"]
    hosts_dir = str(agent.config.hosts_dir)
    for reference, digest in (
        (f"{world.upstream.host}/demo/app:2.0", world.app_digest),
        (f"{world.upstream.host}/demo/base:1.0", world.base_index_digest),  # multi-arch: an index
    ):
        pulled = subprocess.run(
            [*ctr, "images", "pull", "--snapshotter", "native", "--hosts-dir", hosts_dir, reference],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
        listed = subprocess.run(
            [*ctr, "images", "ls"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert digest in listed.stdout  # the same image a pull from the registry gives
    assert _upstream_requests(world.upstream, since, "/v2/demo/") == []
    app_bytes = sum(layer.size for layer in world.app_image.layers)
    assert _metric_reaches(agent, "snapcache_node_agent_served_bytes_total", app_bytes, source="disk")


def test_node_disks_are_provisioned_shared_released_and_recovered_through_the_registry(world: World) -> None:
    """The next step's core and registry edge against the real registry (the pod watch is not built)."""
    clock = [0.0]
    root = world.disk_location.parent  # the zone's disks: node-1's (another node) is there too
    app_image = parse_image_reference(f"{world.upstream.host}/demo/app:2.0")
    with grpc.insecure_channel(f"127.0.0.1:{world.registry.port}") as channel:
        registry = RegistryDisks(channel, holder="node-a")
        stub = api_grpc.CacheRegistryServiceStub(channel)

        def keeper() -> DiskKeeper:
            return DiskKeeper(
                registry=registry,
                node="node-a.example",
                zone="zone-a",
                grace_seconds=60,
                clock=lambda: clock[0],
            )

        def live_disks() -> set[str]:
            listed = stub.ListDisks(api.ListDisksRequest(parent=f"imageCaches/{world.cache_id}"), timeout=10)
            return {disk.name.rpartition("/")[2] for disk in listed.disks}

        first = keeper()
        catalogue = DiskCatalogue(root, accept=lambda name: name in first.disk_ids)
        assert first.reconcile({"pod-1": world.cache_id}).provision == (world.cache_id,)
        (disk_id,) = first.disk_ids
        assert disk_id in live_disks() and (root / disk_id).is_dir()
        catalogue.refresh()
        assert catalogue.disk_ids == [disk_id]  # this node's disk only
        assert catalogue.manifests(app_image)
        # a second pod of the same cache shares the disk
        assert first.reconcile({"pod-1": world.cache_id, "pod-2": world.cache_id}).provision == ()
        assert len([d for d in live_disks() if d != "node-1"]) == 1
        # both pods gone: kept through the grace period, then released
        first.reconcile({})
        clock[0] = 59.0
        assert first.reconcile({}).release == () and (root / disk_id).is_dir()
        clock[0] = 60.0
        assert [d.disk_id for d in first.reconcile({}).release] == [disk_id]
        assert disk_id not in live_disks() and not (root / disk_id).exists() and first.disk_ids == frozenset()
        # an agent restarted while holding a disk finds it again by its id, and releases it in time
        first.reconcile({"pod-3": world.cache_id})
        restarted = keeper()
        assert restarted.recover(sorted(p.name for p in root.iterdir())) == [disk_id]
        restarted.reconcile({})
        clock[0] = 200.0
        assert [d.disk_id for d in restarted.reconcile({}).release] == [disk_id]
        assert disk_id not in live_disks()
        # a cache that cannot be provisioned: its pods pull; no call again before the retry time
        missing = "imc-zzzzzzzz"
        assert restarted.reconcile({"pod-4": missing}).provision == (missing,)
        assert restarted.disk_ids == frozenset()
        assert restarted.reconcile({"pod-4": missing}).provision == ()
        clock[0] = 230.0
        assert restarted.reconcile({"pod-4": missing}).provision == (missing,)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        "node-1"
    ]  # nothing leaked
