"""Benchmark `extender`: prioritize latency against an empty POST handler on the same HTTP stack.

A real registry (`snapcache serve`, 2,000 READY caches seeded as in bench/match.py, AVAILABLE in
zone-a and zone-b) and a real matcher process; two extenders (`ExtenderApp`) run in this process
with 5,000 nodes in three zones in their node-zone map (what the node cache holds), asked by a
client in another process over one keep-alive connection, as kube-scheduler does. Both matcher
modes are measured in each run, each in rounds of its own with the floor's samples of those
rounds:

- co-located (the deployed default: `serve`, and `serve --only extender --colocated-matcher` in
  deploy/): the extender asks a matcher of its own process (`ColocatedMatcher`), which follows
  the same registry into its own index;
- remote: the extender asks the matcher process over gRPC (`--matcher ADDRESS`).

The JSON line's ``ratio`` is the deployed default's annotated p99 ratio; the remote mode's
figures are beside it (``remote_*``).

Floor: an empty POST handler (reads the body, answers `[]`) on the same HTTP stack
(`ExtenderHTTPServer`) in this process; the client alternates extender and floor requests with
the same body, so background load weighs on both alike. The NodeNames cases and the full-Nodes
case are measured in rounds of their own: a scheduler sends one or the other, never both
(nodeCacheCapable), and a 1.1 MB full-Nodes request in between (its 40,000 objects decoded and
freed) was measured to slow the next calls: unannotated prioritize p50 146 -> 345 us, the
floor's 131 -> 190 us (--interleave-modes measures them in the same rounds). The two matcher
modes are apart for a like reason: a deployment runs one, and a call to the matcher process
(the remote mode's, or the round trips below) slowed whatever request came next, the matcher
process finishing its call on the shared cores. Measured by the request before (p50): the floor
217-233 us after a floor call, 260-277 after a co-located extender call, 285-337 after a call
that asked the matcher process. In the same rounds and a fixed order, the annotated floor always
came right after the remote annotated request, and the co-located annotated p50 ratio read
4.2-4.4 where rounds of its own give 4.7-5.3. Figures:

- NodeNames mode, 5,000 nodes, co-located: prioritize for an annotated pod (a new pod UID every
  time, so every call asks the matcher: the matcher call is included) and for an unannotated
  pod; p50 and p99 over the floor's. Targets: annotated p99 <= 3x, unannotated p99 <= 1.2x.
  Both go to the deployed extender's one connection, as the scheduler's calls do, so the
  unannotated call is served by the thread that serves the annotated ones. Measured at p50: its
  handler takes 10 us, and it costs 10 us over the floor in rounds without annotated calls,
  24 us with them sent to another extender of the process, 40-60 us with them on its connection
  (a floor answering 110 KB on its connection does not slow its next small answer: it is the
  heavy calls' work in that thread, not the socket).
- the same annotated prioritize right after a filter call with the same body (a new pod UID
  every round): what a scheduling cycle costs prioritize, the filter's matcher answer and its
  names placed in zones reused (deploy/scheduler configures both verbs, so this is the
  deployed scheduler's prioritize of a pod that is not strict).
- full Nodes mode, 500 Node objects, co-located: annotated prioritize over the floor with the
  same body.
- the remote mode's annotated prioritize, alone and after its filter, and the floor's make-up
  for it: the matcher's round trip (MatchImageCaches as the extender asks it) and an empty gRPC
  call to the matcher's server, from the client's process, each over the HTTP floor: remote
  annotated prioritize cannot be faster than floor + round trip.
- 4 concurrent client processes: requests per second of annotated prioritize (5,000 names)
  over the floor's.
- the HTTP stack itself, chosen by measurement: the empty handler on the standard library's
  server (the chosen one) against uvicorn + starlette, uvicorn with a raw ASGI app (httptools,
  uvloop) and granian (raw ASGI), each in a process of its own, same body, same client.

How the ratios are computed. A round sends every case of its mode once, in an order shuffled
per round (seeded: the same orders every run), so that no case always follows the same one. The
first 50 rounds are not timed, then ``--blocks`` blocks of ``--requests`` rounds are (3 x 2,000:
6,000 samples a case). Every ratio printed first is pooled over all of a run's samples: the p99
(the 60th worst of 6,000) of the extender's samples over the p99 of the floor's samples of the
same rounds; that is the JSON's ``ratio`` and ``*_p99_ratio``. No sample is dropped. Beside it,
the p99 ratio of each block, their median (``*_median_of_blocks``) and range, and the floor's
own p99/p50 in each block.

Why both: the machine is shared, and bursts of other work (milliseconds to tens of them) hold up
whichever request is in flight; the slow samples of all cases come in clusters (three in four
within 50 ms of another case's slow sample). In one run of five blocks of 2,000 rounds the
floor's p99 went from 1.2 ms to 8.7 ms and back while its p50 stayed at 0.26 ms, and the
annotated p99 ratio went from 4.7 to 1.3: a p99 of 2,000 samples is the 20th worst, which one
burst decides. A request four times as long as the floor is held up four times as often, so the
p99 ratio falls in a busy block (both p99s are the machine's then) and comes to the p50 ratio in
a quiet one (floor p99/p50 below 2: annotated p99 ratios of 4.2-5.0 measured, at p50 ratios of
4.3-4.9). Read a p99 ratio with the floor's p99/p50 beside it: a low ratio on a busy machine
says little about the extender.

The extenders' process records its garbage collections (`gc.callbacks`) during the NodeNames
rounds, and reports how many there were, the longest, and how many of the annotated samples
(and of the co-located ones' slowest 1%) one ran during: the client's `time.perf_counter` is the
same monotonic clock. With ``--request-log`` every request is logged as the deployed `serve`
logs it (INFO, JSON lines; to a file here), the floor's too.

    python bench/extender.py [--caches 2000] [--nodes 5000] [--requests 2000] [--blocks 3]
                             [--seconds 3] [--request-log] [--interleave-modes]
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import logging
import multiprocessing
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from grpc_health.v1 import health_pb2
from match_setup import catalogue, free_port, registry_and_matcher, seed_registry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.extender.http_app import ExtenderHTTPServer, serve_in_thread
from services.extender.node_index import NodeIndex
from services.extender.server import ExtenderApp, ExtenderConfig
from services.matcher.server import MatcherApp, MatcherConfig
from snapcache.rpc_observer import REQUEST_LOGGER
from snapcache.v1 import matcher_pb2 as mpb
from snapcache_cli.colocated_matcher import ColocatedMatcher
from snapcache_cli.log_format import JsonLinesFormatter

CLIENTS = 4
ZONES = ("zone-a", "zone-b", "zone-c")  # the seeded caches are AVAILABLE in zone-a and zone-b
HERE = Path(__file__).resolve().parent
DEPLOYED_MODE = "colocated"  # deploy/base/extender/workload.yaml: --only=extender --colocated-matcher
UID_MARK = b"00000000-uid-mark"
WARM_UP = 50  # rounds sent before the timed ones
ORDER_SEED = 20261129  # the cases' order in each round: shuffled, the same in every run


# --- the floors -------------------------------------------------------------------------------


class EmptyRoutes:
    """Routes that read nothing and answer `[]`: the floor on the same HTTP stack."""

    def post(self, path: str, body: bytes) -> tuple[int, str, bytes]:
        return 200, "application/json", b"[]"

    def get(self, path: str) -> tuple[int, str, bytes]:
        return 200, "text/plain", b"ok"


async def empty_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The floor as a raw ASGI app (uvicorn, granian)."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": b"[]"})


def _starlette_app() -> Any:
    async def empty(request: Request) -> Response:
        await request.body()
        return Response(b"[]", media_type="application/json")

    return Starlette(routes=[Route("/{verb}", empty, methods=["POST"])])


def serve_empty(stack: str, port: int) -> None:
    """Run one stack's empty handler until killed (a child process of the comparison)."""
    if stack == "stdlib":
        server = ExtenderHTTPServer(
            ("127.0.0.1", port), EmptyRoutes(), max_body_bytes=1 << 26, socket_timeout=30
        )
        server.serve_forever()
    elif stack in ("uvicorn-starlette", "uvicorn-asgi"):
        app = _starlette_app() if stack == "uvicorn-starlette" else empty_asgi
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", http="httptools", loop="uvloop")
    else:
        raise SystemExit(f"unknown stack {stack}")


def start_stack(stack: str, port: int) -> subprocess.Popen[bytes]:
    if stack == "granian":
        command = [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1",
                   "--port", str(port), "--workers", "1", "--log-level", "error", "extender:empty_asgi"]  # fmt: skip
    else:
        command = [sys.executable, str(HERE / "extender.py"), "--serve-empty", stack, "--port", str(port)]
    process = subprocess.Popen(command, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("POST", "/x", b"{}", {"Content-Type": "application/json"})
            connection.getresponse().read()
            connection.close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise TimeoutError(f"{stack} did not start")


class TimedCalls:
    """Wraps the extender's matcher port and keeps each call's duration in microseconds."""

    def __init__(self, match: Any) -> None:
        self._match = match
        self.micros: list[float] = []

    def __call__(self, query: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._match(query)
        finally:
            self.micros.append((time.perf_counter() - started) * 1e6)


# --- requests ----------------------------------------------------------------------------------


def pod(annotated: bool, images: Sequence[str]) -> dict[str, Any]:
    annotations = {"snapcache.io/use-image-cache": "auto"} if annotated else {}
    return {
        "metadata": {
            "name": "app",
            "namespace": "default",
            "uid": UID_MARK.decode(),
            "annotations": annotations,
        },
        "spec": {"containers": [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]},
    }


def node_object(name: str, zone: str) -> dict[str, Any]:
    """A Node as the scheduler sends it in full-Nodes mode (labels, capacity, conditions, images)."""
    return {
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "resourceVersion": "12345",
            "labels": {
                "kubernetes.io/hostname": name,
                "topology.kubernetes.io/zone": zone,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "m5.xlarge",
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"podCIDR": "10.0.0.0/24", "providerID": f"aws:///{zone}/{name}"},
        "status": {
            "capacity": {"cpu": "4", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"},
            "allocatable": {"cpu": "3920m", "memory": "15Gi", "pods": "110", "ephemeral-storage": "92Gi"},
            "conditions": [
                {
                    "type": t,
                    "status": "False" if t != "Ready" else "True",
                    "reason": f"Kubelet{t}",
                    "message": f"kubelet reports {t}",
                    "lastHeartbeatTime": "2026-11-29T10:00:00Z",
                    "lastTransitionTime": "2026-11-01T10:00:00Z",
                }
                for t in ("MemoryPressure", "DiskPressure", "PIDPressure", "Ready")
            ],
            "addresses": [
                {"type": "InternalIP", "address": "10.0.0.1"},
                {"type": "Hostname", "address": name},
            ],
            "nodeInfo": {
                "kubeletVersion": "v1.29.0",
                "containerRuntimeVersion": "containerd://1.7.0",
                "osImage": "Ubuntu 22.04",
                "kernelVersion": "6.1.0",
                "architecture": "amd64",
            },
            "images": [
                {"names": [f"registry.example.com/team/app{i}:v1"], "sizeBytes": 100_000_000 + i}
                for i in range(10)
            ],
        },
    }


def body(
    pod_document: dict[str, Any], *, names: Sequence[str] = (), nodes: Sequence[dict[str, Any]] = ()
) -> bytes:
    """The request as kube-scheduler's encoding/json writes it: compact, fields in struct order."""
    document: dict[str, Any]
    if nodes:
        document = {"Pod": pod_document, "Nodes": {"items": list(nodes)}, "NodeNames": None}
    else:
        document = {"Pod": pod_document, "Nodes": None, "NodeNames": list(names)}
    return json.dumps(document, separators=(",", ":")).encode()


# --- clients (separate processes) ----------------------------------------------------------------


def _send(connection: http.client.HTTPConnection, path: str, payload: bytes) -> bytes:
    connection.request("POST", path, payload, {"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"{path}: HTTP {response.status}: {data[:200]!r}")
    return data


Case = tuple[int, str, bytes, bool, str]  # port, path, body, a new pod UID each time, untimed path first
GRPC = 0  # a Case's port for a gRPC call: path is the method, body the request, first the target
MATCH_METHOD = "/snapcache.v1.MatcherService/MatchImageCaches"
HEALTH_METHOD = "/grpc.health.v1.Health/Check"


def _latency_client(cases: list[Case], rounds: int, out: Any) -> None:
    """Each round sends every case once, in an order shuffled per round (the same in every run).

    Puts, per case, the latencies in microseconds and when each call started: `time.perf_counter`
    is the machine's monotonic clock (CLOCK_MONOTONIC on Linux), the same in every process, so
    the extenders' process can line its garbage collections up with the samples.
    """
    connections: dict[int, http.client.HTTPConnection] = {}
    calls: dict[int, Any] = {
        index: grpc.insecure_channel(first).unary_unary(path)
        for index, (port, path, _payload, _unique, first) in enumerate(cases)
        if port == GRPC
    }
    samples: list[list[float]] = [[] for _ in cases]
    starts: list[list[float]] = [[] for _ in cases]
    order = list(range(len(cases)))
    shuffle = random.Random(ORDER_SEED).shuffle
    for number in range(rounds + WARM_UP):
        shuffle(order)
        for index in order:
            port, path, payload, unique, first = cases[index]
            if port == GRPC:
                t0 = time.perf_counter()
                calls[index](payload, timeout=5)
                t1 = time.perf_counter()
            else:
                connection = connections.setdefault(
                    port, http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                )
                uid = f"{index:02d}{number:06d}-uid-mark".encode()
                data = payload.replace(UID_MARK, uid) if unique else payload
                if first:
                    _send(connection, first, data)  # the scheduler's filter call before prioritize
                t0 = time.perf_counter()
                _send(connection, path, data)
                t1 = time.perf_counter()
            if number >= WARM_UP:
                samples[index].append((t1 - t0) * 1e6)
                starts[index].append(t0)
    out.put((samples, starts))


def latencies(cases: list[Case], rounds: int) -> tuple[list[list[float]], list[list[float]]]:
    """Per case: latencies (microseconds) and start times of ``rounds`` rounds after the warm-up."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=_latency_client, args=(cases, rounds, queue))
    worker.start()
    found: tuple[list[list[float]], list[list[float]]] = queue.get(timeout=1800)
    worker.join()
    return found


def _rate_client(job: tuple[int, str, bytes, bool, float, int], out: Any) -> None:
    port, path, payload, unique, seconds, offset = job
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(20):
        _send(connection, path, payload.replace(UID_MARK, b"warm-up-0-uid-mark") if unique else payload)
    done = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        data = payload.replace(UID_MARK, f"{offset + done:08d}-uid-mark".encode()) if unique else payload
        _send(connection, path, data)
        done += 1
    out.put(done / seconds)


def rate(port: int, path: str, payload: bytes, *, unique: bool, seconds: float) -> float:
    """Requests per second of CLIENTS client processes together."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(
            target=_rate_client, args=((port, path, payload, unique, seconds, (i + 1) * 10**7), queue)
        )
        for i in range(CLIENTS)
    ]
    for worker in workers:
        worker.start()
    rates = [queue.get(timeout=seconds + 120) for _ in workers]
    for worker in workers:
        worker.join()
    return float(sum(rates))


def p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def block_ratios(mine: list[float], base: list[float], size: int, q: float = 0.99) -> list[float]:
    """The ``q`` ratio in each block of ``size`` consecutive rounds (the same rounds for both)."""
    return [p(mine[i : i + size], q) / p(base[i : i + size], q) for i in range(0, len(mine), size)]


class CollectionLog:
    """The cyclic garbage collector's runs in this process (the extenders'), while entered."""

    def __init__(self) -> None:
        self.runs: list[tuple[float, float, int]] = []  # start, end (perf_counter), generation
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.runs.append((self._started, time.perf_counter(), info["generation"]))

    def __enter__(self) -> CollectionLog:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *_exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def by_generation(self) -> dict[int, tuple[int, float]]:
        """Runs and the longest in milliseconds, per generation."""
        return {
            g: (
                sum(1 for run in self.runs if run[2] == g),
                max([(run[1] - run[0]) * 1e3 for run in self.runs if run[2] == g] or [0.0]),
            )
            for g in range(3)
        }

    def overlapping(self, starts: list[float], micros: list[float]) -> list[int]:
        """Indexes of the samples during which a collection ran."""
        runs = sorted(self.runs)
        found = []
        for i, (t0, us) in enumerate(zip(starts, micros, strict=True)):
            t1 = t0 + us / 1e6
            if any(begin < t1 and end > t0 for begin, end, _ in runs):
                found.append(i)
        return found


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caches", type=int, default=2000)
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--full-nodes", type=int, default=500)
    parser.add_argument("--requests", type=int, default=2000, help="rounds per block (default %(default)s)")
    parser.add_argument(
        "--blocks",
        type=int,
        default=3,
        help="blocks of --requests rounds; p99 ratios pooled over all and per block (default %(default)s)",
    )
    parser.add_argument(
        "--request-log",
        action="store_true",
        help="log each request as the deployed `serve` does (INFO, JSON lines), to a file",
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--interleave-modes",
        action="store_true",
        help="send the full-Nodes requests in the same rounds as the NodeNames ones",
    )
    parser.add_argument("--serve-empty", default="", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve_empty:
        serve_empty(options.serve_empty, options.port)
        return 0

    cat = catalogue(caches=options.caches, images=options.caches * 2)
    names = [f"node-{i:05d}" for i in range(options.nodes)]
    zones = {name: ZONES[i % len(ZONES)] for i, name in enumerate(names)}
    images = cat.caches[len(cat.caches) // 2]  # a cache's exact images: MATCHED
    annotated = body(pod(True, images), names=names)
    plain = body(pod(False, images), names=names)
    full = body(pod(True, images), nodes=[node_object(n, zones[n]) for n in names[: options.full_nodes]])
    print(f"bodies: NodeNames x {options.nodes} = {len(annotated) / 1024:.0f} KiB; "
          f"full Nodes x {options.full_nodes} = {len(full) / 1024:.0f} KiB")  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="bench-extender-") as tmp:
        data_dir = Path(tmp) / "registry"
        seed_registry(data_dir, cat.caches)
        if options.request_log:  # as `serve` logs (INFO, JSON lines), to a file rather than stderr
            sink = logging.FileHandler(Path(tmp) / "requests.log")
            sink.setFormatter(JsonLinesFormatter())
            request_logger = logging.getLogger(REQUEST_LOGGER)
            request_logger.addHandler(sink)
            request_logger.setLevel(logging.INFO)
            request_logger.propagate = False
        with registry_and_matcher(data_dir) as running:
            # the co-located extender's own matcher: no gRPC server, the same registry's feed
            own = MatcherApp(MatcherConfig(registry_target=running.registry, listen=""))
            own.start(wait_loaded_seconds=300)
            assert own.sync.status().cache_count == options.caches, own.sync.status()
            app = ExtenderApp(
                ExtenderConfig(
                    matcher_target=running.matcher, listen="127.0.0.1:0", matcher_budget_seconds=1.0
                )
            )
            colo = ExtenderApp(
                ExtenderConfig(matcher_target="", listen="127.0.0.1:0"),
                matcher=lambda fail_open: ColocatedMatcher(own, on_fail_open=fail_open),
            )
            index = NodeIndex(zones)  # what the node cache holds
            app.scheduling.node_zones = lambda: index
            colo.scheduling.node_zones = lambda: index
            calls = TimedCalls(app.scheduling.match)  # the matcher call as the extender sees it
            app.scheduling.match = calls
            colo_calls = TimedCalls(colo.scheduling.match)
            colo.scheduling.match = colo_calls
            app.start()
            colo.start()
            floor = ExtenderHTTPServer(
                ("127.0.0.1", 0), EmptyRoutes(), max_body_bytes=1 << 26, socket_timeout=30
            )
            serve_in_thread(floor)
            floor_port = int(floor.server_address[1])
            try:
                answers = []
                for port in (app.port, colo.port):
                    check = http.client.HTTPConnection("127.0.0.1", port)
                    answers.append(json.loads(_send(check, "/prioritize", annotated)))
                    check.close()
                scores = answers[0]
                assert answers[1] == scores, "the co-located matcher answered otherwise"
                by_zone = {zones[h["Host"]]: h["Score"] for h in scores}  # nodes left out score 0
                print(f"scores by zone (both modes alike): {by_zone}")
                assert by_zone["zone-a"] == 10 and by_zone.get("zone-c", 0) == 0, by_zone

                # the matcher's share, asked from the client's process as the extender asks it
                match = mpb.MatchImageCachesRequest(images=images, zones=ZONES).SerializeToString()
                health = health_pb2.HealthCheckRequest(service="snapcache.v1.MatcherService")
                # Each mode in rounds of its own, as a deployment runs one: the remote mode's
                # gRPC traffic slowed whatever request came next (the matcher process finishing
                # its call on the shared cores; see the module docstring).
                colocated_cases: list[Case] = [
                    (colo.port, "/prioritize", annotated, True, ""),
                    (floor_port, "/prioritize", annotated, True, ""),
                    (colo.port, "/prioritize", plain, False, ""),
                    (floor_port, "/prioritize", plain, False, ""),
                    (colo.port, "/prioritize", annotated, True, "/filter"),
                    (floor_port, "/prioritize", annotated, True, "/filter"),
                ]
                remote_cases: list[Case] = [
                    (app.port, "/prioritize", annotated, True, ""),
                    (floor_port, "/prioritize", annotated, True, ""),
                    (app.port, "/prioritize", annotated, True, "/filter"),
                    (floor_port, "/prioritize", annotated, True, "/filter"),
                    (GRPC, MATCH_METHOD, match, False, running.matcher),
                    (GRPC, HEALTH_METHOD, health.SerializeToString(), False, running.matcher),
                ]
                full_cases: list[Case] = [
                    (colo.port, "/prioritize", full, True, ""),
                    (floor_port, "/prioritize", full, True, ""),
                ]
                rounds = options.blocks * options.requests
                collections = CollectionLog()
                with collections:
                    if options.interleave_modes:  # NodeNames and full Nodes in the same rounds
                        found, starts = latencies(colocated_cases + full_cases, rounds)
                        full_s, full_floor = found[6:]
                    else:  # a scheduler sends one or the other (nodeCacheCapable), never both
                        found, starts = latencies(colocated_cases, rounds)
                    colo_in_extender = colo_calls.micros[100:]  # the filter's and the annotated calls
                    remote_found, remote_starts = latencies(remote_cases, rounds)
                    in_extender = calls.micros[100:]
                if not options.interleave_modes:
                    full_s, full_floor = latencies(
                        full_cases, options.blocks * max(options.requests // 4, 100)
                    )[0]
                colo_ann, ann_floor, un, un_floor, colo_cycle, cycle_floor = found[:6]
                ann, remote_floor, cycle, remote_cycle_floor, rtt, empty_rpc = remote_found
                collected = collections.by_generation()
                colo_ann_collected = collections.overlapping(starts[0], colo_ann)
                un_collected = collections.overlapping(starts[2], un)
                remote_ann_collected = collections.overlapping(remote_starts[0], ann)
                gc.collect()  # after the rounds: what a full collection walks in this process now
                walked = len(gc.get_objects())
                t0 = time.perf_counter()
                gc.collect()
                full_collection_ms = (time.perf_counter() - t0) * 1e3
                ann_rate = rate(app.port, "/prioritize", annotated, unique=True, seconds=options.seconds)
                ann_floor_rate = rate(
                    floor_port, "/prioritize", annotated, unique=True, seconds=options.seconds
                )
                colo_rate = rate(colo.port, "/prioritize", annotated, unique=True, seconds=options.seconds)
                fail_open = app.metrics.render().decode() + colo.metrics.render().decode()
            finally:
                app.stop()
                colo.stop()
                own.stop(0)
                floor.shutdown()
                floor.server_close()
    assert "snapcache_extender_fail_open_total{" not in fail_open, "the matcher call failed during the bench"

    stacks: dict[str, dict[str, float]] = {}
    for stack in ("stdlib", "uvicorn-starlette", "uvicorn-asgi", "granian"):
        port = free_port()
        process = start_stack(stack, port)
        try:
            [samples] = latencies([(port, "/prioritize", annotated, False, "")], options.requests)[0]
            stacks[stack] = {
                "p50_us": p(samples, 0.5),
                "p99_us": p(samples, 0.99),
                "rps": rate(port, "/prioritize", annotated, unique=False, seconds=options.seconds),
            }
        finally:
            process.terminate()
            process.wait(timeout=10)

    def line(what: str, mine: list[float], base: list[float], target: str = "") -> tuple[float, float]:
        r50, r99 = p(mine, 0.5) / p(base, 0.5), p(mine, 0.99) / p(base, 0.99)
        print(f"{what}: p50 {p(mine, 0.5):.0f} us / floor {p(base, 0.5):.0f} us = {r50:.2f}; "
              f"p99 {p(mine, 0.99):.0f} / {p(base, 0.99):.0f} = {r99:.2f}{target}")  # fmt: skip
        return r50, r99

    remote = "the remote matcher (gRPC)" + (" [deployed]" if DEPLOYED_MODE == "remote" else "")
    colocated = "the co-located matcher (in process)" + (
        " [deployed]" if DEPLOYED_MODE == "colocated" else ""
    )
    k50, k99 = line(
        f"annotated prioritize, NodeNames x {options.nodes}, {colocated}",
        colo_ann,
        ann_floor,
        " (target p99 <= 3)",
    )
    u50, u99 = line(
        f"unannotated prioritize, NodeNames x {options.nodes} (co-located rounds)",
        un,
        un_floor,
        " (target p99 <= 1.2)",
    )
    kc50, kc99 = line(
        f"annotated prioritize after its filter with the same names (the filter's answer and placement "
        f"reused, as in a scheduling cycle), NodeNames x {options.nodes}, {colocated}",
        colo_cycle,
        cycle_floor,
    )
    kx50, _ = line(
        "  the matcher call timed in the extender's process, co-located", colo_in_extender, ann_floor
    )
    f50, f99 = line(
        f"annotated prioritize, full Nodes x {options.full_nodes}, {colocated}", full_s, full_floor
    )
    r50, r99 = line(
        f"annotated prioritize, NodeNames x {options.nodes}, {remote} (rounds of its own)",
        ann,
        remote_floor,
        " (target p99 <= 3)",
    )
    a50, a99 = (k50, k99) if DEPLOYED_MODE == "colocated" else (r50, r99)
    c50, c99 = line(f"  after its filter, {remote}", cycle, remote_cycle_floor)
    m50, m99 = line(
        "  the matcher's round trip alone (MatchImageCaches, from the client's process)", rtt, remote_floor
    )
    e50, _ = line("  an empty gRPC call to the matcher's server (Health/Check)", empty_rpc, remote_floor)
    x50, _ = line("  the matcher call timed in the extender's process, remote", in_extender, remote_floor)
    print(f"  so remote annotated prioritize cannot be under floor + matcher = {1 + m50:.2f} (p50), {1 + m99:.2f} "
          f"(p99) of the floor here; the rest is the extender's: {r50 - 1 - m50:.2f} (p50) of the floor")  # fmt: skip
    print(f"throughput, {CLIENTS} clients: annotated prioritize {ann_rate:.0f}/s remote, {colo_rate:.0f}/s "
          f"co-located, floor {ann_floor_rate:.0f}/s = {ann_rate / ann_floor_rate:.2f}, "
          f"{colo_rate / ann_floor_rate:.2f} of the floor")  # fmt: skip
    deployed_rate = colo_rate if DEPLOYED_MODE == "colocated" else ann_rate
    dc50, dc99 = (kc50, kc99) if DEPLOYED_MODE == "colocated" else (c50, c99)
    size = options.requests
    colo_blocks = block_ratios(colo_ann, ann_floor, size)
    remote_blocks = block_ratios(ann, remote_floor, size)
    un_blocks = block_ratios(un, un_floor, size)
    floor_spread = [
        p(ann_floor[i : i + size], 0.99) / p(ann_floor[i : i + size], 0.5)
        for i in range(0, len(ann_floor), size)
    ]
    deployed_blocks = colo_blocks if DEPLOYED_MODE == "colocated" else remote_blocks
    print(f"p99 ratios in each block of {size} rounds: median [lowest-highest], then block by block "
          f"(pooled above: all {len(colo_ann)} samples of a case)")  # fmt: skip
    for what, ratios in (
        ("annotated, co-located", colo_blocks),
        ("annotated, remote", remote_blocks),
        ("unannotated", un_blocks),
        ("the floor's own p99/p50", floor_spread),
    ):
        print(f"  {what:24} {statistics.median(ratios):5.2f} [{min(ratios):.2f}-{max(ratios):.2f}]  "
              + " ".join(f"{r:.2f}" for r in ratios))  # fmt: skip
    slowest = sorted(range(len(colo_ann)), key=colo_ann.__getitem__)[-max(1, len(colo_ann) // 100) :]
    runs = ", ".join(f"gen{g} {n} (longest {ms:.1f} ms)" for g, (n, ms) in collected.items())
    print(f"cyclic GC in the extenders' process during the NodeNames rounds: {runs}; it ran during "
          f"{len(colo_ann_collected)} of {len(colo_ann)} co-located annotated samples "
          f"({len(set(slowest) & set(colo_ann_collected))} of their slowest 1%), {len(remote_ann_collected)} "
          f"remote annotated and {len(un_collected)} unannotated ones; a full collection after the rounds: "
          f"{full_collection_ms:.1f} ms over "
          f"{walked} objects")  # fmt: skip
    print("HTTP stacks, empty handler, same body (one client p50/p99; 4 clients req/s):")
    for stack, figures in stacks.items():
        print(f"  {stack:18} p50 {figures['p50_us']:6.0f} us  p99 {figures['p99_us']:6.0f} us  "
              f"{figures['rps']:6.0f} req/s  (p50 {figures['p50_us'] / stacks['stdlib']['p50_us']:.2f}x stdlib)")  # fmt: skip
    print(
        json.dumps(
            {
                "bench": "extender",
                "ratio": round(a99, 3),
                "deployed_mode": DEPLOYED_MODE,
                "annotated_p50_ratio": round(a50, 3),
                "annotated_p99_ratio": round(a99, 3),
                "colocated_annotated_p50_ratio": round(k50, 3),
                "colocated_annotated_p99_ratio": round(k99, 3),
                "remote_annotated_p50_ratio": round(r50, 3),
                "remote_annotated_p99_ratio": round(r99, 3),
                "unannotated_p50_ratio": round(u50, 3),
                "unannotated_p99_ratio": round(u99, 3),
                "full_nodes_p50_ratio": round(f50, 3),
                "full_nodes_p99_ratio": round(f99, 3),
                "after_filter_p50_ratio": round(dc50, 3),
                "after_filter_p99_ratio": round(dc99, 3),
                "remote_after_filter_p50_ratio": round(c50, 3),
                "remote_after_filter_p99_ratio": round(c99, 3),
                "matcher_rtt_p50_ratio": round(m50, 3),
                "matcher_rtt_p99_ratio": round(m99, 3),
                "empty_grpc_p50_ratio": round(e50, 3),
                "remote_matcher_call_in_extender_p50_ratio": round(x50, 3),
                "colocated_matcher_call_in_extender_p50_ratio": round(kx50, 3),
                "throughput_ratio": round(deployed_rate / ann_floor_rate, 3),
                "remote_throughput_ratio": round(ann_rate / ann_floor_rate, 3),
                "annotated_p99_us": round(p(colo_ann if DEPLOYED_MODE == "colocated" else ann, 0.99), 1),
                "floor_p99_us": round(p(ann_floor, 0.99), 1),
                "stacks_p50_us": {k: round(v["p50_us"], 1) for k, v in stacks.items()},
                "stacks_rps": {k: round(v["rps"]) for k, v in stacks.items()},
                "annotated_p99_ratio_median_of_blocks": round(statistics.median(deployed_blocks), 3),
                "colocated_annotated_p99_ratio_blocks": [round(r, 3) for r in colo_blocks],
                "remote_annotated_p99_ratio_blocks": [round(r, 3) for r in remote_blocks],
                "unannotated_p99_ratio_median_of_blocks": round(statistics.median(un_blocks), 3),
                "unannotated_p99_ratio_blocks": [round(r, 3) for r in un_blocks],
                "floor_p99_over_p50_blocks": [round(r, 2) for r in floor_spread],
                "gc_runs": {str(g): n for g, (n, _) in collected.items()},
                "gc_longest_ms": {str(g): round(ms, 2) for g, (_, ms) in collected.items()},
                "gc_during_colocated_annotated": len(colo_ann_collected),
                "gc_during_remote_annotated": len(remote_ann_collected),
                "gc_full_collection_ms": round(full_collection_ms, 2),
                "nodes": options.nodes,
                "blocks": options.blocks,
                "rounds_per_block": options.requests,
                "samples_per_case": len(colo_ann),
                "request_log": options.request_log,
                "interleave_modes": options.interleave_modes,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
