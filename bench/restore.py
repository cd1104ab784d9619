"""Benchmark `restore`: ProvisionDisk of a READY cache holding a ~200 MiB image, against pulling
the same image from the local registry — how much sooner a pod's images are there.

The floor is a real pull by an independent client (`skopeo copy docker://... oci:...`, which is
what a node's runtime would do, minus unpacking) into a fresh directory each time. The product is
the ProvisionDisk RPC through the registry service, for a zone where the snapshot is available;
its result is itself an OCI layout holding the image (checked with skopeo once).

    python bench/restore.py [--mib 200] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from oci_setup import big_image, oci_registry_with, registry_service, stub_for, wait_ready

from snapcache.v1 import cache_registry_pb2 as api
from snapcache.v1 import image_cache_pb2 as pb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = big_image(options.mib, layers=8)
        with oci_registry_with(spec, work) as (oci, built), registry_service(work) as app:
            image = f"{oci.host}/{spec.repository}:1.0"
            channel, stub = stub_for(app)
            created = stub.CreateImageCache(
                api.CreateImageCacheRequest(
                    image_cache=pb.ImageCache(
                        images=[image], cache_size_gib=1, plain_http_registries=[oci.host]
                    )
                )
            )
            cache = wait_ready(stub, created, zones=True)
            ref = cache.cached_images[0].normalized_image

            pull_samples = []
            for run in range(options.repeat + 1):
                target = work / f"pulled-{run}"
                t0 = time.perf_counter()
                subprocess.run(
                    [
                        "skopeo",
                        "copy",
                        "--quiet",
                        "--src-tls-verify=false",
                        f"docker://{image}",
                        f"oci:{target}:{ref}",
                    ],
                    check=True,
                )
                if run:  # the first pull warms the registry's page cache
                    pull_samples.append(time.perf_counter() - t0)
                shutil.rmtree(target)

            provision_samples = []
            for run in range(options.repeat + 1):
                t0 = time.perf_counter()
                disk = stub.ProvisionDisk(
                    api.ProvisionDiskRequest(parent=created.name, zone="zone-a", disk_id=f"node-{run}")
                )
                if run:
                    provision_samples.append(time.perf_counter() - t0)
                if run == 0:
                    inspected = subprocess.run(
                        ["skopeo", "inspect", f"oci:{disk.location}:{ref}"],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    assert json.loads(inspected.stdout)["Digest"] == built.manifest_digest
                stub.ReleaseDisk(api.ReleaseDiskRequest(name=disk.name))
            channel.close()
    pull = statistics.median(pull_samples)
    provision = statistics.median(provision_samples)
    ratio = provision / pull
    print(f"image: {options.mib} MiB in 8 layers")
    print(
        f"floor   skopeo pull from the local registry: median {pull * 1000:.0f} ms {[round(s, 3) for s in pull_samples]}"
    )
    print(
        f"product ProvisionDisk over gRPC:             median {provision * 1000:.2f} ms {[round(s, 4) for s in provision_samples]}"
    )
    print(f"ratio {ratio:.4f} (target <= 0.02): the images are there {pull / provision:.0f}x sooner")
    print(
        json.dumps(
            {
                "bench": "restore",
                "ratio": round(ratio, 5),
                "pull_s": round(pull, 4),
                "provision_s": round(provision, 5),
                "mib": options.mib,
            }
        )
    )


if __name__ == "__main__":
    main()
