"""Benchmark `build`: Create -> READY of a ~200 MiB multi-layer image from a local registry,
against the floor of downloading the same blobs with one plain HTTP client in the same run.

    python bench/build.py [--mib 200] [--layers 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from oci_setup import big_image, median_seconds, oci_registry_with, registry_service, stub_for, wait_ready

from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import image_cache_pb2 as pb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = big_image(options.mib, layers=options.layers)
        with oci_registry_with(spec, work) as (oci, built), registry_service(work) as app:
            digests = [built.config_digest, *(layer.digest for layer in built.layers)]
            total = sum(layer.size for layer in built.layers) + len(built.config_bytes)
            floor_dir = work / "floor"
            floor_dir.mkdir()

            def plain_download() -> None:
                # one client, blob after blob, straight to files: no hashing, no bookkeeping
                with httpx.Client(base_url=oci.url, timeout=60) as client:
                    for digest in digests:
                        with client.stream("GET", f"/v2/{spec.repository}/blobs/{digest}") as response:
                            response.raise_for_status()
                            with open(floor_dir / digest.replace(":", "_"), "wb") as out:
                                for chunk in response.iter_raw(1024 * 1024):
                                    out.write(chunk)

            channel, stub = stub_for(app)
            image = f"{oci.host}/{spec.repository}:1.0"

            def build() -> float:
                t0 = time.perf_counter()
                created = stub.CreateImageCache(
                    api.CreateImageCacheRequest(
                        image_cache=pb.ImageCache(
                            images=[image], cache_size_gib=1, plain_http_registries=[oci.host]
                        )
                    )
                )
                wait_ready(stub, created)
                elapsed = time.perf_counter() - t0
                # let the zone copy that follows READY finish outside the timing, so the next
                # build does not compete with it for the disk
                wait_ready(stub, created, zones=True)
                return elapsed

            plain_download()  # warm the registry's page cache for both sides
            floor, floor_samples = median_seconds(plain_download, options.repeat)
            build_samples = [build() for _ in range(options.repeat)]
            build_time = statistics.median(build_samples)
            channel.close()
    ratio = build_time / floor
    mib = total / 1024 / 1024
    print(f"image: {mib:.0f} MiB in {options.layers} layers")
    print(
        f"floor  plain download: median {floor * 1000:.0f} ms ({mib / floor:.0f} MiB/s) {[round(s, 3) for s in floor_samples]}"
    )
    print(
        f"build  Create->READY:  median {build_time * 1000:.0f} ms ({mib / build_time:.0f} MiB/s) {[round(s, 3) for s in build_samples]}"
    )
    print(f"ratio {ratio:.2f} (target <= 1.3)")
    print(
        json.dumps(
            {
                "bench": "build",
                "ratio": round(ratio, 3),
                "floor_s": round(floor, 4),
                "build_s": round(build_time, 4),
                "mib": round(mib, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
