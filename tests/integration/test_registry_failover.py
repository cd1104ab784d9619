"""Two `snapcache serve` registry replicas on one PostgreSQL database; one is SIGKILLed mid-build.

The image sits behind a gate that holds every connection, so the replica that claims the build
stalls in its pull for longer than a lease: the lease keeper must keep its lease meanwhile (the
other replica may not start a second build), and once the owner is killed the survivor takes
the build over within the lease period and finishes it. Exactly one build reaches READY; the
dead replica's attempt leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from services.cache_registry.local_provider import FAULT_DELAYS_ENV
from snapcache.demo.oci_images import ImageSpec, LayerSpec, build_image, push_image
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb
from tests.support.gated_forwarder import GatedForwarder
from tests.support.kube_cluster import free_port
from tests.support.oci_fixtures import OciRegistry

pytestmark = pytest.mark.e2e

LEASE_SECONDS = 1.5
CACHE = "imc-0000f001"


def _start(
    name: str, *, database_url: str, data_dir: Path, log_dir: Path, fault_delays: str = ""
) -> tuple[str, subprocess.Popen[bytes]]:
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "snapcache_cli.main", "serve", "--only", "registry",
               "--database-url", database_url, "--data-dir", str(data_dir), "--listen", address,
               "--instance-id", f"replica-{name}", "--lease-seconds", str(LEASE_SECONDS)]  # fmt: skip
    with open(log_dir / f"replica-{name}.log", "ab") as log_file:
        environment = {**os.environ, FAULT_DELAYS_ENV: fault_delays}
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_file, env=environment)
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
    return address, process


@pytest.fixture
def replicas(postgres_url: str, tmp_path: Path) -> Iterator[dict[str, tuple[str, subprocess.Popen[bytes]]]]:
    shared = tmp_path / "shared"  # one provider directory: what a shared volume gives replicas
    started = {
        name: _start(name, database_url=postgres_url, data_dir=shared, log_dir=tmp_path)
        for name in ("a", "b")
    }
    try:
        yield started
    finally:
        for _address, process in started.values():
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=20)


def _owner(postgres_url: str) -> str:
    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute("SELECT lease_owner FROM image_caches WHERE id = %s", (CACHE,)).fetchone()
    return str(row[0]) if row else ""


def _eventually_owner(postgres_url: str, wanted: str, timeout: float) -> float:
    started = time.monotonic()
    while (owner := _owner(postgres_url)) != wanted:
        if time.monotonic() - started > timeout:
            pytest.fail(f"lease owner {owner!r}, not {wanted!r}, after {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - started


def test_a_replica_killed_mid_build_is_taken_over_within_the_lease(
    replicas: dict[str, tuple[str, subprocess.Popen[bytes]]],
    postgres_url: str,
    fresh_oci_registry: OciRegistry,
) -> None:
    image = build_image(ImageSpec("failover/app", "1.0", [LayerSpec(256 * 1024, seed=i) for i in range(3)]))
    push_image(fresh_oci_registry.url, image)
    gate = GatedForwarder(("127.0.0.1", fresh_oci_registry.server.port))
    try:
        address = replicas["a"][0]
        with grpc.insecure_channel(address) as channel:
            stub = api_grpc.CacheRegistryServiceStub(channel)
            cache = pb.ImageCache(
                images=[f"{gate.host}/failover/app:1.0"], cache_size_gib=1, plain_http_registries=[gate.host]
            )
            stub.CreateImageCache(api.CreateImageCacheRequest(image_cache=cache, image_cache_id=CACHE))
        deadline = time.monotonic() + 20
        while not (owner := _owner(postgres_url)):
            assert time.monotonic() < deadline, "no replica claimed the build"
            time.sleep(0.01)

        # stalled in its pull for twice the lease, the owner keeps the build (its lease is renewed)
        time.sleep(2 * LEASE_SECONDS)
        assert _owner(postgres_url) == owner
        assert gate.held == 1  # one builder reached the registry, not two

        dead = owner.removeprefix("replica-")
        survivor = "b" if dead == "a" else "a"
        replicas[dead][1].send_signal(signal.SIGKILL)
        replicas[dead][1].wait()
        gate.open()
        takeover = _eventually_owner(postgres_url, f"replica-{survivor}", timeout=3 * LEASE_SECONDS)
        assert takeover <= 1.5 * LEASE_SECONDS

        with grpc.insecure_channel(replicas[survivor][0]) as channel:
            stub = api_grpc.CacheRegistryServiceStub(channel)
            deadline = time.monotonic() + 30
            while (
                found := stub.GetImageCache(api.GetImageCacheRequest(name=f"imageCaches/{CACHE}"))
            ).state != (pb.ImageCache.READY):
                assert found.state == pb.ImageCache.CREATING, found.state_message
                assert time.monotonic() < deadline, "the survivor never finished the build"
                time.sleep(0.02)
            events = stub.ListImageCacheEvents(
                api.ListImageCacheEventsRequest(parent=f"imageCaches/{CACHE}", page_size=100)
            ).events
        reasons = [event.reason for event in events]
        assert reasons.count("BuildStarted") == 2  # the dead replica's attempt and the takeover
        assert reasons.count("SnapshotCreated") == 1  # one build finished
        # pulled by the survivor alone: the dead replica never got past the gate
        assert reasons.count("ImagePulled") == 1
        _eventually_owner(postgres_url, "", timeout=10)  # released once the zones are copied too
    finally:
        gate.close()


def _temporaries(shared: Path) -> list[Path]:
    return [p for p in shared.rglob(".tmp-*")]


# where each phase's half-done work shows (the provider's layout, see local_provider)
_PHASE_TEMPORARIES = {"snapshot": "provider/snapshots/.tmp-*", "hydrate": "provider/zones/*/snapshots/.tmp-*"}


def _get(address: str, cache: str = CACHE) -> pb.ImageCache | None:
    with grpc.insecure_channel(address) as channel:
        stub = api_grpc.CacheRegistryServiceStub(channel)
        try:
            return stub.GetImageCache(api.GetImageCacheRequest(name=f"imageCaches/{cache}"), timeout=5)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                return None
            raise


@pytest.mark.parametrize("phase", ["snapshot", "hydrate", "delete"])
def test_a_replica_killed_in_each_lifecycle_phase_leaves_the_work_done_once_and_nothing_behind(
    phase: str, postgres_url: str, tmp_path: Path, fresh_oci_registry: OciRegistry
) -> None:
    """The provider pauses in the middle of the phase (fault injection) with its partial work on
    disk; its owner is SIGKILLed there; the survivor finishes the work after the lease; once the
    dead replica is back (its start-up reconcile), nothing it left is on disk."""
    shared = tmp_path / "shared"
    delays = f"{phase}={2 * LEASE_SECONDS}"
    replicas = {
        name: _start(name, database_url=postgres_url, data_dir=shared, log_dir=tmp_path, fault_delays=delays)
        for name in ("a", "b")
    }
    try:
        image = build_image(ImageSpec("phases/app", "1.0", [LayerSpec(64 * 1024, seed=i) for i in range(2)]))
        push_image(fresh_oci_registry.url, image)
        with grpc.insecure_channel(replicas["a"][0]) as channel:
            stub = api_grpc.CacheRegistryServiceStub(channel)
            host = fresh_oci_registry.host
            cache = pb.ImageCache(
                images=[f"{host}/phases/app:1.0"], cache_size_gib=1, plain_http_registries=[host]
            )
            stub.CreateImageCache(api.CreateImageCacheRequest(image_cache=cache, image_cache_id=CACHE))
            if phase == "delete":
                deadline = time.monotonic() + 60
                while (
                    (found := _get(replicas["a"][0])) is None
                    or found.state != pb.ImageCache.READY
                    or any(z.state != pb.ZoneAvailability.AVAILABLE for z in found.zone_availability)
                ):
                    assert time.monotonic() < deadline, "the cache never became READY everywhere"
                    time.sleep(0.05)
                stub.DeleteImageCache(api.DeleteImageCacheRequest(name=f"imageCaches/{CACHE}"))

        # the owner is now paused in the middle of the phase, its partial work on disk
        deadline = time.monotonic() + 60
        pattern = _PHASE_TEMPORARIES.get(phase, "")
        while not ((owner := _owner(postgres_url)) and (not pattern or list(shared.glob(pattern)))):
            assert time.monotonic() < deadline, f"no replica reached the {phase} phase"
            time.sleep(0.02)
        if phase == "delete":
            time.sleep(0.5)  # the zone copies are gone, the snapshot itself not yet
        dead = owner.removeprefix("replica-")
        survivor = "b" if dead == "a" else "a"
        replicas[dead][1].send_signal(signal.SIGKILL)
        replicas[dead][1].wait()
        _eventually_owner(postgres_url, f"replica-{survivor}", timeout=3 * LEASE_SECONDS)

        address = replicas[survivor][0]
        deadline = time.monotonic() + 60
        if phase == "delete":
            while _get(address) is not None:
                assert time.monotonic() < deadline, "the survivor never finished the deletion"
                time.sleep(0.05)
        else:
            while (
                (found := _get(address)) is None
                or found.state != pb.ImageCache.READY
                or any(z.state != pb.ZoneAvailability.AVAILABLE for z in found.zone_availability)
            ):
                assert found is None or found.state in (pb.ImageCache.CREATING, pb.ImageCache.READY), found
                assert time.monotonic() < deadline, f"the survivor never finished after the {phase} phase"
                time.sleep(0.05)
            with grpc.insecure_channel(address) as channel:
                events = (
                    api_grpc.CacheRegistryServiceStub(channel)
                    .ListImageCacheEvents(
                        api.ListImageCacheEventsRequest(parent=f"imageCaches/{CACHE}", page_size=100)
                    )
                    .events
                )
            assert [e.reason for e in events].count("SnapshotCreated") == 1

        # the dead replica comes back: its start-up reconcile clears what it left half-done
        replicas[dead] = _start(
            dead, database_url=postgres_url, data_dir=shared, log_dir=tmp_path, fault_delays=delays
        )
        deadline = time.monotonic() + 30
        while _temporaries(shared):
            assert time.monotonic() < deadline, f"left behind: {_temporaries(shared)}"
            time.sleep(0.1)
        snapshots = {p.name for p in (shared / "provider" / "snapshots").iterdir()}
        zone_copies = {p.name for p in (shared / "provider" / "zones").glob("*/snapshots/*")}
        if phase == "delete":
            assert snapshots == set() and zone_copies == set()
        else:
            assert len(snapshots) == 1 and zone_copies == snapshots  # one snapshot, a copy per zone
    finally:
        for _address, process in replicas.values():
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=20)
