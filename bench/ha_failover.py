"""Benchmark `ha_failover`: a registry replica dies mid-build; how soon another takes the build over.

Two `snapcache serve --only registry` processes (replicas A and B) share one fresh PostgreSQL
database and one provider directory (what a shared volume or a cloud provider gives real
replicas), with a short work lease. Each round creates a cache whose image sits behind a gate
that holds every connection, so the replica that claims the build stalls in its pull; that
replica is killed with SIGKILL, the gate opens, and the clock runs from the kill until the
survivor holds the build's lease (read from the database every 5 ms), then until the cache is
READY. The dead replica is started again for the next round. Figure: the worst takeover of the
rounds against the lease period (target <= 1.5); the lease keeper renews every third of it, so
the dead replica's lease had between two thirds and all of it left.

    python bench/ha_failover.py [--rounds 6] [--lease-seconds 3]
        [--postgres postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
import psycopg
from match_setup import _serve, free_port, wait_serving

from snapcache.demo.oci_images import ImageSpec, LayerSpec, build_image, push_image
from snapcache.demo.registry_server import RegistryServer
from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import cache_registry_pb2_grpc as api_grpc
from snapcache.v1 import image_cache_pb2 as pb

SERVICE = "snapcache.v1.CacheRegistryService"


class Gate:
    """127.0.0.1:port -> target, holding every new connection until `open()`; `close()` shuts it again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.host = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.opened = threading.Event()
        self.stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                downstream, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(downstream,), daemon=True).start()

    def _serve(self, downstream: socket.socket) -> None:
        while not self.opened.wait(0.05):
            if self.stopping.is_set():
                return
        with contextlib.suppress(OSError), downstream, socket.create_connection(self.target) as upstream:
            downstream.settimeout(None)
            pump = threading.Thread(target=self._pump, args=(upstream, downstream), daemon=True)
            pump.start()
            self._pump(downstream, upstream)
            pump.join(timeout=5)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()


def _lease_owner(dsn: str, cache_id: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute("SELECT lease_owner FROM image_caches WHERE id = %s", (cache_id,)).fetchone()
    return str(row[0]) if row else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--lease-seconds", type=float, default=3.0)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    options = parser.parse_args()

    database = f"bench_failover_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(options.postgres, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
    dsn = options.postgres.rsplit("/", 1)[0] + f"/{database}"
    url = dsn.replace("postgresql://", "postgresql+psycopg://")
    workdir = tempfile.TemporaryDirectory(prefix="bench-failover-")
    tmp = Path(workdir.name)
    oci = RegistryServer(tmp / "oci")
    oci.start()
    replicas: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}

    def start(name: str) -> None:
        address = f"127.0.0.1:{free_port()}"
        args = ["--only", "registry", "--database-url", url, "--data-dir", str(tmp / "shared"),
                "--listen", address, "--matcher-listen", "off", "--instance-id", f"replica-{name}",
                "--lease-seconds", str(options.lease_seconds)]  # fmt: skip
        replicas[name] = (address, _serve(args, tmp / f"{name}.log"))
        wait_serving(address, SERVICE, timeout=60)

    takeovers: list[float] = []
    to_ready: list[float] = []
    try:
        image = build_image(ImageSpec("bench/app", "1.0", [LayerSpec(512 * 1024, seed=i) for i in range(3)]))
        push_image(oci.url, image)
        start("a")
        start("b")
        for number in range(options.rounds):
            gate = Gate(("127.0.0.1", oci.port))
            try:
                cache_id = f"imc-{number:08d}"
                address = replicas["a" if number % 2 == 0 else "b"][0]
                with grpc.insecure_channel(address) as channel:
                    stub = api_grpc.CacheRegistryServiceStub(channel)
                    cache = pb.ImageCache(
                        images=[f"{gate.host}/bench/app:1.0"],
                        cache_size_gib=1,
                        plain_http_registries=[gate.host],
                    )
                    stub.CreateImageCache(
                        api.CreateImageCacheRequest(image_cache=cache, image_cache_id=cache_id)
                    )
                deadline = time.monotonic() + 30
                while not (owner := _lease_owner(dsn, cache_id)):
                    if time.monotonic() > deadline:
                        raise TimeoutError("no replica claimed the build")
                    time.sleep(0.01)
                time.sleep(options.lease_seconds / 2)  # the build is under way (stalled at the gate)
                dead = owner.removeprefix("replica-")
                survivor = f"replica-{'b' if dead == 'a' else 'a'}"
                replicas[dead][1].send_signal(signal.SIGKILL)
                killed = time.monotonic()
                replicas[dead][1].wait()
                gate.opened.set()
                while _lease_owner(dsn, cache_id) != survivor:
                    if time.monotonic() - killed > 10 * options.lease_seconds:
                        raise TimeoutError(f"{survivor} never took {cache_id} over")
                    time.sleep(0.005)
                takeovers.append(time.monotonic() - killed)
                with grpc.insecure_channel(replicas[survivor.removeprefix("replica-")][0]) as channel:
                    stub = api_grpc.CacheRegistryServiceStub(channel)
                    while stub.GetImageCache(
                        api.GetImageCacheRequest(name=f"imageCaches/{cache_id}")
                    ).state != (pb.ImageCache.READY):
                        if time.monotonic() - killed > 60:
                            raise TimeoutError(f"{cache_id} never became READY")
                        time.sleep(0.01)
                to_ready.append(time.monotonic() - killed)
                print(
                    f"round {number}: killed {owner}; {survivor} took over after {takeovers[-1]:.2f}s, "
                    f"READY after {to_ready[-1]:.2f}s"
                )
                start(dead)
            finally:
                gate.stop()
    finally:
        for _address, process in replicas.values():
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
        oci.stop()
        workdir.cleanup()
        with psycopg.connect(options.postgres, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")

    worst = max(takeovers)
    ratio = worst / options.lease_seconds
    print(
        f"takeover after SIGKILL, {len(takeovers)} rounds: median {statistics.median(takeovers):.2f}s, "
        f"worst {worst:.2f}s against a {options.lease_seconds:g}s lease = {ratio:.2f} (target <= 1.5); "
        f"kill -> READY median {statistics.median(to_ready):.2f}s"
    )
    print(
        json.dumps(
            {
                "bench": "ha_failover",
                "ratio": round(ratio, 3),
                "takeover_median_s": round(statistics.median(takeovers), 3),
                "takeover_worst_s": round(worst, 3),
                "kill_to_ready_median_s": round(statistics.median(to_ready), 3),
                "lease_seconds": options.lease_seconds,
                "rounds": len(takeovers),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
