"""Benchmark ``pod_start``: binding -> Running on a real node, a cached pod against a remote registry.

The product's headline figure. One real single-node cluster (``tests/support/real_node.py``:
etcd, kube-apiserver, controller-manager, kube-scheduler with the extender, containerd, kubelet)
and the whole snapcache stack around it (``tests/support/node_stack.py``). The pod runs a
~200 MiB image (five layers of incompressible data, plus a ``/pause`` top layer).

Three kinds of run, in turns, same node, same image, the image (content and snapshots) removed
from containerd between runs:

- **limited** (the floor): no annotation, the image pulled from the upstream registry through a
  token-bucket TCP proxy at ``--mbit`` (default 200 Mbit/s): a remote registry's link;
- **loopback**: the same pull with the upstream reached directly (loopback speed, no limit);
- **cached**: annotated ``snapcache.io/use-image-cache: auto``; the node agent provisions the
  cache's disk when the pod is bound (released between runs, so each run pays provisioning)
  and containerd pulls through the agent's mirror, from the disk;
- **prefetched**: the same, the agent also pulling the image into containerd the moment the
  disk is attached (``--prefetch-containerd``), while the kubelet sets up the pod's sandbox.

Every pull goes through the node agent's mirror, as on a node where the agent runs (uncached
images pass through). Times: binding (``spec.nodeName`` seen) -> phase Running, polled every
20 ms. Breakdown: provisioning from the agent's ``snapcache_node_agent_provisioning_seconds``;
the pull (transfer + unpack, containerd pipelines the two) from the kubelet's "Successfully pulled
image ... in" event; transfer alone measured separately by fetching every blob of the image
from the same source (3 at a time, as containerd); unpack ~ pull - transfer.

Ends with one JSON line: ``ratio`` = median cached / median limited (target <= 0.25), and
``prefetched_ratio`` the same with the prefetch.

    .venv/bin/python -m bench.pod_start [--repeat 3] [--mbit 200]     # from the repository root

Needs what the real-node tests need (root, containerd, runc, the CNI plugins, the Kubernetes
binaries from scripts/build-kube); restores the host on exit.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

try:
    from tests.support.node_stack import USE, CacheSpec, NodeStack, running_node_stack, unique
except ModuleNotFoundError:  # run as a script: the tests' support modules are not on the path
    sys.exit("run from the repository root as: .venv/bin/python -m bench.pod_start")

from snapcache.demo.oci_images import ImageSpec, LayerSpec, MiB

BIG = ImageSpec(
    "demo/big",
    "1.0",
    [
        LayerSpec(80 * MiB, seed=9101),
        LayerSpec(60 * MiB, seed=9102, file_count=3),
        LayerSpec(40 * MiB, seed=9103, file_count=8),
        LayerSpec(20 * MiB, seed=9104, file_count=20),
    ],
)
KEY = "demo/big:1.0"
PULLED = re.compile(r"Successfully pulled image .* in ([0-9.]+)(ms|s)")


def _pull_seconds(stack: NodeStack, pod: str) -> float | None:
    for reason, _component, message in stack.events(pod):
        if reason == "Pulled":
            found = PULLED.search(message or "")
            if found:
                value = float(found.group(1))
                return value / 1000 if found.group(2) == "ms" else value
    return None


def _provision_sum(stack: NodeStack) -> float:
    return stack.agent.metric("snapcache_node_agent_provisioning_seconds_sum")


def one_run(stack: NodeStack, *, kind: str, host: str, annotated: bool) -> dict[str, Any]:
    """One pod from creation to Running; then deleted and its image forgotten."""
    name = unique(kind)
    provisioned_before = _provision_sum(stack)
    since = len(stack.upstream.read_log())
    stack.pod(name, KEY, annotations={USE: "auto"} if annotated else None, host=host)
    bound = running = 0.0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        pod = stack.read_pod(name)
        now = time.monotonic()
        if not bound and pod.spec.node_name:
            bound = now
        if pod.status.phase == "Running":
            running = now
            break
        time.sleep(0.02)
    if not running:
        raise SystemExit(f"{kind} pod {name} not Running: {stack.read_pod(name).status}")
    pulled = None
    for _ in range(50):
        pulled = _pull_seconds(stack, name)
        if pulled is not None:
            break
        time.sleep(0.1)
    result = {
        "kind": kind,
        "bind_to_running_s": running - bound,
        "pull_s": pulled,
        "provision_s": _provision_sum(stack) - provisioned_before,
        "upstream_blob_gets": len(stack.upstream_blob_gets(since, "demo/big")),
    }
    stack.delete_pod(name)
    stack.forget_images(KEY, host=host)
    deadline = time.monotonic() + 60
    while stack.disk_dirs() and time.monotonic() < deadline:  # released: the next cached run provisions
        time.sleep(0.1)
    return result


def transfer_seconds(base_url: str, registry: str, stack: NodeStack) -> float:
    """Fetch every layer of the image through the mirror (3 at a time), as containerd does."""
    image = stack.images[KEY]
    blobs = [layer.digest for layer in image.layers]

    def fetch(digest: str) -> int:
        total = 0
        with httpx.stream(
            "GET", f"{base_url}/v2/demo/big/blobs/{digest}", params={"ns": registry}, timeout=300
        ) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes(1024 * 1024):
                total += len(chunk)
        return total

    started = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        sizes = list(pool.map(fetch, blobs))
    assert sum(sizes) == sum(layer.size for layer in image.layers)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mbit", type=float, default=200.0, help="the remote registry's link (Mbit/s)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pod-start-") as tmp:
        work = Path(tmp)
        started = time.monotonic()
        print(f"pod_start: starting a real node and the stack (upstream limited to {options.mbit:g} Mbit/s)")
        with running_node_stack(
            work,
            images=[BIG],
            caches=[CacheSpec([KEY])],
            limit_bits_per_second=options.mbit * 1e6,
            grace_seconds=0.5,
        ) as stack:
            print(
                f"  ready in {time.monotonic() - started:.1f} s; image {stack.images[KEY].compressed_bytes / MiB:.1f} MiB"
            )
            runs: list[dict[str, Any]] = []
            for repetition in range(options.repeat):
                for kind, host, annotated in (
                    ("limited", "", False),
                    ("loopback", stack.upstream.host, False),
                    ("cached", "", True),
                ):
                    result = one_run(stack, kind=kind, host=host, annotated=annotated)
                    runs.append(result)
                    print(
                        f"  run {repetition + 1} {kind:8s}: {result['bind_to_running_s']:6.2f} s bind->Running, "
                        f"pull {result['pull_s'] or 0:6.2f} s, provision {result['provision_s']:.3f} s, "
                        f"{result['upstream_blob_gets']} blob(s) from upstream"
                    )
            # the same cached pod with the agent pre-pulling into containerd when the disk is attached
            stack.agent.stop()
            stack.agent.args += ["--prefetch-containerd", str(stack.node.containerd_socket)]
            stack.agent.start()
            for repetition in range(options.repeat):
                result = one_run(stack, kind="prefetched", host="", annotated=True)
                runs.append(result)
                print(
                    f"  run {repetition + 1} prefetched: {result['bind_to_running_s']:6.2f} s bind->Running, "
                    f"pull {result['pull_s'] or 0:6.2f} s, provision {result['provision_s']:.3f} s, "
                    f"{result['upstream_blob_gets']} blob(s) from upstream"
                )
            # transfer alone: the disk through the mirror (a disk attached), and the limited link
            mirror = f"http://127.0.0.1:{stack.agent.port}"
            name = unique("transfer")
            stack.pod(name, KEY, annotations={USE: "auto"})
            stack.wait_running(name)
            cached_transfer = transfer_seconds(mirror, stack.image_host, stack)
            stack.delete_pod(name)
            stack.forget_images(KEY)
            limited_transfer = transfer_seconds(
                f"http://{stack.image_host}", stack.image_host, stack
            )  # the proxy itself, not the mirror: nothing to pass through
    figures: dict[str, dict[str, float]] = {}
    for kind in ("limited", "loopback", "cached", "prefetched"):
        mine = [r for r in runs if r["kind"] == kind]
        figures[kind] = {
            "bind_to_running_s": statistics.median(r["bind_to_running_s"] for r in mine),
            "pull_s": statistics.median(r["pull_s"] or 0.0 for r in mine),
            "provision_s": statistics.median(r["provision_s"] for r in mine),
            "upstream_blob_gets": max(r["upstream_blob_gets"] for r in mine),
        }
    cached, limited, loopback = figures["cached"], figures["limited"], figures["loopback"]
    prefetched = figures["prefetched"]
    ratio = cached["bind_to_running_s"] / limited["bind_to_running_s"]
    loopback_ratio = cached["bind_to_running_s"] / loopback["bind_to_running_s"]
    prefetched_ratio = prefetched["bind_to_running_s"] / limited["bind_to_running_s"]
    layer_bytes = sum(layer.size_bytes for layer in BIG.layers)
    print(
        f"the limited link delivered {layer_bytes * 8 / limited_transfer / 1e6:.0f} Mbit/s "
        f"(set to {options.mbit:g}); the mirror from the disk {layer_bytes * 8 / cached_transfer / 1e6:.0f} Mbit/s"
    )
    print(f"medians of {options.repeat} (binding -> Running):")
    for kind, values in figures.items():
        print(
            f"  {kind:8s} {values['bind_to_running_s']:6.2f} s  (pull {values['pull_s']:.2f} s, "
            f"provision {values['provision_s']:.3f} s)"
        )
    print(
        f"transfer alone: disk via mirror {cached_transfer:.2f} s, limited link {limited_transfer:.2f} s; "
        f"unpack ~ pull - transfer: cached {max(0.0, cached['pull_s'] - cached_transfer):.2f} s, "
        f"limited {max(0.0, limited['pull_s'] - limited_transfer):.2f} s"
    )
    print(
        f"ratio cached/limited {ratio:.3f} (target <= 0.25); cached/loopback {loopback_ratio:.3f}; "
        f"prefetched/limited {prefetched_ratio:.3f}, prefetched/loopback "
        f"{prefetched['bind_to_running_s'] / loopback['bind_to_running_s']:.3f}"
    )
    print(
        json.dumps(
            {
                "bench": "pod_start",
                "ratio": round(ratio, 4),
                "loopback_ratio": round(loopback_ratio, 4),
                "prefetched_ratio": round(prefetched_ratio, 4),
                "prefetched_loopback_ratio": round(
                    prefetched["bind_to_running_s"] / loopback["bind_to_running_s"], 4
                ),
                "prefetched_s": round(prefetched["bind_to_running_s"], 3),
                "limit_mbit_per_s": options.mbit,
                "repeat": options.repeat,
                "image_bytes": layer_bytes,
                "limited_link_mbit_per_s_measured": round(layer_bytes * 8 / limited_transfer / 1e6, 1),
                "cached_s": round(cached["bind_to_running_s"], 3),
                "limited_s": round(limited["bind_to_running_s"], 3),
                "loopback_s": round(loopback["bind_to_running_s"], 3),
                "cached_pull_s": round(cached["pull_s"], 3),
                "limited_pull_s": round(limited["pull_s"], 3),
                "cached_provision_s": round(cached["provision_s"], 3),
                "cached_transfer_s": round(cached_transfer, 3),
                "limited_transfer_s": round(limited_transfer, 3),
                "cached_upstream_blob_gets": cached["upstream_blob_gets"],
            }
        )
    )


if __name__ == "__main__":
    main()
