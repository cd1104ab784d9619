"""Benchmark `extender`: prioritize latency against an empty POST handler on the same HTTP stack.

A real registry (`snapcache serve`, 2,000 READY caches seeded as in bench/match.py, AVAILABLE in
zone-a and zone-b) and a real matcher process; two extenders (`ExtenderApp`) run in this process
with 5,000 nodes in three zones in their node-zone map (what the node cache holds), asked by a
client in another process over one keep-alive connection, as kube-scheduler does. The two
matcher modes are measured in the same rounds against the same floor:

- remote: the extender asks the matcher process over gRPC (`--matcher ADDRESS`);
- co-located (the deployed default: `serve`, and `serve --only extender --colocated-matcher` in
  deploy/): the extender asks a matcher of its own process (`ColocatedMatcher`), which follows
  the same registry into its own index.

The JSON line's ``ratio`` is the deployed default's annotated p99 ratio; the remote mode's
figures are beside it (``remote_*``).

Floor: an empty POST handler (reads the body, answers `[]`) on the same HTTP stack
(`ExtenderHTTPServer`) in this process; the client alternates extender and floor requests with
the same body, so background load weighs on both alike. The NodeNames cases and the full-Nodes
case are measured in rounds of their own: a scheduler sends one or the other, never both
(nodeCacheCapable), and a 1.1 MB full-Nodes request in between (its 40,000 objects decoded and
freed) was measured to slow the next calls: unannotated prioritize p50 146 -> 345 us, the
floor's 131 -> 190 us (--interleave-modes measures them in the same rounds). Figures:

- NodeNames mode, 5,000 nodes, each matcher mode: prioritize for an annotated pod (a new pod UID every time, so
  every call asks the matcher: the matcher call is included) and for an unannotated pod; p50 and
  p99 over the floor's. Targets: annotated p99 <= 3x, unannotated p99 <= 1.2x.
- NodeNames mode, 5,000 nodes, annotated prioritize right after a filter call with the same body
  (a new pod UID every round): what a scheduling cycle costs prioritize, the filter's matcher
  answer and its names placed in zones reused.
- the floor's make-up for the annotated case: the matcher's round trip (MatchImageCaches as the
  extender asks it) and an empty gRPC call to the matcher's server, from the client's process,
  each over the HTTP floor: annotated prioritize cannot be faster than floor + round trip.
- full Nodes mode, 500 Node objects: annotated prioritize over the floor with the same body.
- 4 concurrent client processes: requests per second of annotated prioritize (5,000 names)
  over the floor's.
- the HTTP stack itself, chosen by measurement: the empty handler on the standard library's
  server (the chosen one) against uvicorn + starlette, uvicorn with a raw ASGI app (httptools,
  uvloop) and granian (raw ASGI), each in a process of its own, same body, same client.

    python bench/extender.py [--caches 2000] [--nodes 5000] [--requests 2000] [--seconds 3]
                             [--interleave-modes]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
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
from snapcache.v1 import matcher_pb2 as mpb
from snapcache_cli.colocated_matcher import ColocatedMatcher

CLIENTS = 4
ZONES = ("zone-a", "zone-b", "zone-c")  # the seeded caches are AVAILABLE in zone-a and zone-b
HERE = Path(__file__).resolve().parent
DEPLOYED_MODE = "colocated"  # deploy/base/extender/workload.yaml: --only=extender --colocated-matcher
UID_MARK = b"00000000-uid-mark"


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
        )  # type: ignore[arg-type]
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
    """Each round sends every case once (in order); returns latencies per case in microseconds."""
    connections: dict[int, http.client.HTTPConnection] = {}
    calls = {
        index: grpc.insecure_channel(first).unary_unary(path)
        for index, (port, path, _payload, _unique, first) in enumerate(cases)
        if port == GRPC
    }
    samples: list[list[float]] = [[] for _ in cases]
    for number in range(rounds + 50):
        for index, (port, path, payload, unique, first) in enumerate(cases):
            if port == GRPC:
                t0 = time.perf_counter()
                calls[index](payload, timeout=5)
                if number >= 50:
                    samples[index].append((time.perf_counter() - t0) * 1e6)
                continue
            connection = connections.setdefault(
                port, http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            )
            uid = f"{index:02d}{number:06d}-uid-mark".encode()
            data = payload.replace(UID_MARK, uid) if unique else payload
            if first:
                _send(connection, first, data)  # the scheduler's filter call before prioritize
            t0 = time.perf_counter()
            _send(connection, path, data)
            if number >= 50:  # warm-up
                samples[index].append((time.perf_counter() - t0) * 1e6)
    out.put(samples)


def latencies(cases: list[Case], rounds: int) -> list[list[float]]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=_latency_client, args=(cases, rounds, queue))
    worker.start()
    found: list[list[float]] = queue.get(timeout=600)
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


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caches", type=int, default=2000)
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--full-nodes", type=int, default=500)
    parser.add_argument("--requests", type=int, default=2000)
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
            )  # type: ignore[arg-type]
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
                names_cases: list[Case] = [
                    (GRPC, MATCH_METHOD, match, False, running.matcher),
                    (GRPC, HEALTH_METHOD, health.SerializeToString(), False, running.matcher),
                    (app.port, "/prioritize", annotated, True, ""),
                    (floor_port, "/prioritize", annotated, True, ""),
                    (colo.port, "/prioritize", annotated, True, ""),
                    (app.port, "/prioritize", plain, False, ""),
                    (floor_port, "/prioritize", plain, False, ""),
                    (app.port, "/prioritize", annotated, True, "/filter"),
                    (floor_port, "/prioritize", annotated, True, "/filter"),
                    (colo.port, "/prioritize", annotated, True, "/filter"),
                ]
                full_cases: list[Case] = [
                    (app.port, "/prioritize", full, True, ""),
                    (floor_port, "/prioritize", full, True, ""),
                ]
                if options.interleave_modes:
                    found = latencies(names_cases + full_cases, options.requests)
                    in_extender, colo_in_extender = calls.micros[100:], colo_calls.micros[100:]
                else:  # a scheduler sends one mode or the other (nodeCacheCapable), never both
                    found = latencies(names_cases, options.requests)
                    in_extender = calls.micros[100:]  # the filter's and the annotated calls, warmed up
                    colo_in_extender = colo_calls.micros[100:]
                    found += latencies(full_cases, max(options.requests // 4, 100))
                rtt, empty_rpc, ann, ann_floor, colo_ann, un, un_floor = found[:7]
                cycle, cycle_floor, colo_cycle, full_s, full_floor = found[7:]
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
            [samples] = latencies([(port, "/prioritize", annotated, False, "")], options.requests)
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
    r50, r99 = line(
        f"annotated prioritize, NodeNames x {options.nodes}, {remote}",
        ann,
        ann_floor,
        " (target p99 <= 3)",
    )
    k50, k99 = line(
        f"annotated prioritize, NodeNames x {options.nodes}, {colocated}",
        colo_ann,
        ann_floor,
        " (target p99 <= 3)",
    )
    a50, a99 = (k50, k99) if DEPLOYED_MODE == "colocated" else (r50, r99)
    u50, u99 = line(
        f"unannotated prioritize, NodeNames x {options.nodes}", un, un_floor, " (target p99 <= 1.2)"
    )
    f50, f99 = line(f"annotated prioritize, full Nodes x {options.full_nodes}", full_s, full_floor)
    c50, c99 = line(
        f"annotated prioritize after its filter with the same names (the filter's answer and placement "
        f"reused, as in a scheduling cycle), NodeNames x {options.nodes}, {remote}",
        cycle,
        cycle_floor,
    )
    kc50, kc99 = line(f"  the same, {colocated}", colo_cycle, cycle_floor)
    m50, m99 = line(
        "  the matcher's round trip alone (MatchImageCaches, from the client's process)", rtt, ann_floor
    )
    e50, _ = line("  an empty gRPC call to the matcher's server (Health/Check)", empty_rpc, ann_floor)
    x50, _ = line("  the matcher call timed in the extender's process, remote", in_extender, ann_floor)
    kx50, _ = line(
        "  the matcher call timed in the extender's process, co-located", colo_in_extender, ann_floor
    )
    print(f"  so remote annotated prioritize cannot be under floor + matcher = {1 + m50:.2f} (p50), {1 + m99:.2f} "
          f"(p99) of the floor here; the rest is the extender's: {r50 - 1 - m50:.2f} (p50) of the floor")  # fmt: skip
    print(f"throughput, {CLIENTS} clients: annotated prioritize {ann_rate:.0f}/s remote, {colo_rate:.0f}/s "
          f"co-located, floor {ann_floor_rate:.0f}/s = {ann_rate / ann_floor_rate:.2f}, "
          f"{colo_rate / ann_floor_rate:.2f} of the floor")  # fmt: skip
    deployed_rate = colo_rate if DEPLOYED_MODE == "colocated" else ann_rate
    dc50, dc99 = (kc50, kc99) if DEPLOYED_MODE == "colocated" else (c50, c99)
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
                "nodes": options.nodes,
                "interleave_modes": options.interleave_modes,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
