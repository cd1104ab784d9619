"""Benchmark `snapshot`: snapshot + ProvisionDisk of a 1 GiB cache, against `cp -r` of the same bytes.

The builder disk is filled by a real pull from a local registry (untimed). Then, in the same run:
the floor copies the builder disk with `cp -r`; the product takes the snapshot (content-addressed,
hard links) and provisions a disk from it in a zone (hard links again). The zone copy between the
two (hydration, a real copy done once per zone in the background) is reported but not counted.

    python bench/snapshot.py [--mib 1024] [--repeat 3]
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

from oci_setup import big_image, oci_registry_with

from services.cache_registry.local_provider import LocalProvider, LocalProviderConfig, LocalZone
from services.cache_registry.provider import PullOptions
from snapcache.images import parse_image_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    floor_samples: list[float] = []
    product_samples: list[float] = []
    hydrate_samples: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = big_image(options.mib, layers=8, repository="bench/big")
        with oci_registry_with(spec, work) as (oci, _built):
            provider = LocalProvider(LocalProviderConfig(root=work / "provider", zones=[LocalZone("zone-a")]))
            reference = parse_image_reference(f"{oci.host}/{spec.repository}:1.0")
            pull_options = PullOptions(plain_http_registries=frozenset({oci.host}))
            for run in range(options.repeat):
                disk_id = f"builder-{run}"
                provider.create_builder_disk(disk_id=disk_id, capacity_bytes=4 * 1024**3)
                provider.pull_images(
                    disk_id=disk_id,
                    images=[reference],
                    options=pull_options,
                    capacity_bytes=4 * 1024**3,
                    on_progress=lambda _p: None,
                    cancelled=lambda: False,
                )
                builder_dir = work / "provider" / "builders" / disk_id
                assert builder_dir.is_dir(), builder_dir
                copy_dir = work / f"cp-{run}"
                t0 = time.perf_counter()
                subprocess.run(["cp", "-r", str(builder_dir), str(copy_dir)], check=True)
                floor_samples.append(time.perf_counter() - t0)
                shutil.rmtree(copy_dir)

                snapshot_id = f"snap-{run}"
                t0 = time.perf_counter()
                provider.create_snapshot(disk_id=disk_id, snapshot_id=snapshot_id)
                snapshot_time = time.perf_counter() - t0
                provider.release_builder_disk(disk_id=disk_id)
                t0 = time.perf_counter()
                provider.hydrate_zone(snapshot_id=snapshot_id, zone="zone-a")
                hydrate_samples.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                provider.provision_disk(snapshot_id=snapshot_id, zone="zone-a", disk_id=f"disk-{run}")
                product_samples.append(snapshot_time + time.perf_counter() - t0)
                # start the next run from an empty store, as the first one did
                provider.release_disk(disk_id=f"disk-{run}")
                provider.delete_snapshot(snapshot_id=snapshot_id)
                provider.collect_garbage()
    floor = statistics.median(floor_samples)
    product = statistics.median(product_samples)
    ratio = product / floor
    print(f"cache: {options.mib} MiB in 8 layers")
    print(
        f"floor   cp -r builder disk:          median {floor * 1000:.1f} ms {[round(s, 4) for s in floor_samples]}"
    )
    print(
        f"product snapshot + ProvisionDisk:    median {product * 1000:.2f} ms {[round(s, 4) for s in product_samples]}"
    )
    print(f"(not counted) zone hydration copy:   median {statistics.median(hydrate_samples) * 1000:.0f} ms")
    print(f"ratio {ratio:.4f} (target <= 0.05)")
    print(
        json.dumps(
            {
                "bench": "snapshot",
                "ratio": round(ratio, 5),
                "floor_s": round(floor, 4),
                "snapshot_and_provision_s": round(product, 5),
                "hydrate_s": round(statistics.median(hydrate_samples), 4),
                "mib": options.mib,
            }
        )
    )


if __name__ == "__main__":
    main()
