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
- **cached** (the deployed default): annotated ``snapcache.io/use-image-cache: auto``; the node
  agent provisions the cache's disk when the pod is bound (released between runs, so each run
  pays provisioning) and writes the image's layers into containerd's snapshotter from the disk's
  unpacked diffs (``--seed-containerd``) while the kubelet sets up the sandbox; the kubelet's
  pull then fetches the manifest and config through the mirror and no layer;
- **mirror** (after the other runs, the agent restarted without ``--seed-containerd``): the same
  annotated pod, containerd pulling every layer through the agent's mirror from the disk and
  unpacking it: what the disk alone is worth, and what seeding adds.

Every pull goes through the node agent's mirror, as on a node where the agent runs (uncached
images pass through). Times: binding (``spec.nodeName`` seen) -> phase Running, polled every
20 ms. Breakdown: provisioning from the agent's ``snapcache_node_agent_provisioning_seconds``,
seeding from its ``snapcache_node_agent_seeding_seconds``; the pull (transfer + unpack,
containerd pipelines the two) from the kubelet's "Successfully pulled image ... in" event
(for a seeded image: the manifest and config, the wait for the seeding included); transfer alone
measured separately by fetching every blob of the image from the same source (3 at a time, as
containerd); unpack ~ pull - transfer.

Ends with one JSON line: ``ratio`` = median cached / median limited (target <= 0.25), and
``mirror_ratio`` the same without seeding.

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


def _seed_sum(stack: NodeStack) -> float:
    return sum(
        stack.agent.metric("snapcache_node_agent_seeding_seconds_sum", result=result)
        for result in ("complete", "partial")
    )


def one_run(stack: NodeStack, *, kind: str, host: str, annotated: bool) -> dict[str, Any]:
    """One pod from creation to Running; then deleted and its image forgotten."""
    name = unique(kind)
    provisioned_before = _provision_sum(stack)
    seeded_before = _seed_sum(stack)
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
        "seed_s": _seed_sum(stack) - seeded_before,
        "upstream_blob_gets": len(stack.upstream_blob_gets(since, "demo/big")),
    }
    stack.delete_pod(name)
    stack.forget_images(KEY, host=host)
    deadline = time.monotonic() + 60
    while stack.disk_dirs() and time.monotonic() < deadline:  # released: the next cached run provisions
        time.sleep(0.1)
    return result


def _print_run(repetition: int, result: dict[str, Any]) -> None:
    print(
        f"  run {repetition + 1} {result['kind']:8s}: {result['bind_to_running_s']:6.2f} s bind->Running, "
        f"pull {result['pull_s'] or 0:6.2f} s, provision {result['provision_s']:.3f} s, "
        f"seed {result['seed_s']:.3f} s, {result['upstream_blob_gets']} blob(s) from upstream"
    )


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
                    _print_run(repetition, result)
            # the same cached pod, the agent serving the disk through its mirror only
            stack.agent.stop()
            at = stack.agent.args.index("--seed-containerd")
            del stack.agent.args[at : at + 2]
            stack.agent.start()
            for repetition in range(options.repeat):
                result = one_run(stack, kind="mirror", host="", annotated=True)
                runs.append(result)
                _print_run(repetition, result)
            # transfer alone: the disk through the mirror (a disk attached), and the limited link
            mirror_url = f"http://127.0.0.1:{stack.agent.port}"
            name = unique("transfer")
            stack.pod(name, KEY, annotations={USE: "auto"})
            stack.wait_running(name)
            cached_transfer = transfer_seconds(mirror_url, stack.image_host, stack)
            stack.delete_pod(name)
            stack.forget_images(KEY)
            limited_transfer = transfer_seconds(
                f"http://{stack.image_host}", stack.image_host, stack
            )  # the proxy itself, not the mirror: nothing to pass through
    figures: dict[str, dict[str, float]] = {}
    for kind in ("limited", "loopback", "cached", "mirror"):
        mine = [r for r in runs if r["kind"] == kind]
        figures[kind] = {
            "bind_to_running_s": statistics.median(r["bind_to_running_s"] for r in mine),
            "pull_s": statistics.median(r["pull_s"] or 0.0 for r in mine),
            "provision_s": statistics.median(r["provision_s"] for r in mine),
            "seed_s": statistics.median(r["seed_s"] for r in mine),
            "upstream_blob_gets": max(r["upstream_blob_gets"] for r in mine),
        }
    cached, limited, loopback = figures["cached"], figures["limited"], figures["loopback"]
    mirror = figures["mirror"]
    ratio = cached["bind_to_running_s"] / limited["bind_to_running_s"]
    loopback_ratio = cached["bind_to_running_s"] / loopback["bind_to_running_s"]
    mirror_ratio = mirror["bind_to_running_s"] / limited["bind_to_running_s"]
    layer_bytes = sum(layer.size_bytes for layer in BIG.layers)
    print(
        f"the limited link delivered {layer_bytes * 8 / limited_transfer / 1e6:.0f} Mbit/s "
        f"(set to {options.mbit:g}); the mirror from the disk {layer_bytes * 8 / cached_transfer / 1e6:.0f} Mbit/s"
    )
    print(f"medians of {options.repeat} (binding -> Running):")
    for kind, values in figures.items():
        print(
            f"  {kind:8s} {values['bind_to_running_s']:6.2f} s  (pull {values['pull_s']:.2f} s, "
            f"provision {values['provision_s']:.3f} s, seed {values['seed_s']:.3f} s)"
        )
    print(
        f"transfer alone: disk via mirror {cached_transfer:.2f} s, limited link {limited_transfer:.2f} s; "
        f"unpack ~ pull - transfer: mirror {max(0.0, mirror['pull_s'] - cached_transfer):.2f} s, "
        f"limited {max(0.0, limited['pull_s'] - limited_transfer):.2f} s"
    )
    print(
        f"ratio cached/limited {ratio:.3f} (target <= 0.25); cached/loopback {loopback_ratio:.3f}; "
        f"mirror only/limited {mirror_ratio:.3f}, mirror only/loopback "
        f"{mirror['bind_to_running_s'] / loopback['bind_to_running_s']:.3f}"
    )
    print(
        json.dumps(
            {
                "bench": "pod_start",
                "ratio": round(ratio, 4),
                "loopback_ratio": round(loopback_ratio, 4),
                "mirror_ratio": round(mirror_ratio, 4),
                "mirror_loopback_ratio": round(
                    mirror["bind_to_running_s"] / loopback["bind_to_running_s"], 4
                ),
                "mirror_s": round(mirror["bind_to_running_s"], 3),
                "mirror_pull_s": round(mirror["pull_s"], 3),
                "cached_seed_s": round(cached["seed_s"], 3),
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
