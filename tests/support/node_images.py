"""Images a real kubelet can run, built here without a network: a static ``pause`` program on top.

The demo images (``snapcache.demo.oci_images``) are layers of data with no program in them. A pod
needs a process, and its sandbox needs a pause image that is already in containerd: both get a
top layer holding ``/pause``, a tiny C program (sleeps until SIGTERM/SIGINT, then exits 0) built
with ``gcc -static`` so it needs no libc in the image. Everything stays deterministic: same specs
and same compiler give the same digests.

``write_oci_archive`` writes an OCI image layout as a tar, which ``ctr -n k8s.io images import``
takes (the sandbox image is imported that way, never pulled).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from snapcache.demo.oci_images import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    BuiltImage,
    BuiltLayer,
    ImageSpec,
    build_image,
    canonical_json,
    sha256_digest,
)

PAUSE_SOURCE = r"""
#include <signal.h>
#include <unistd.h>
static void done(int signal_number) { (void)signal_number; _exit(0); }
int main(void) {
    signal(SIGTERM, done);
    signal(SIGINT, done);
    for (;;) pause();
}
"""


def build_pause_binary(workdir: Path) -> Path:
    """``workdir/pause``: a static program that waits for SIGTERM (needs gcc and libc6-dev)."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is not installed (apt-get install gcc libc6-dev; scripts/bootstrap does it)")
    source = workdir / "pause.c"
    binary = workdir / "pause"
    source.write_text(PAUSE_SOURCE)
    subprocess.run(
        ["gcc", "-static", "-O2", "-s", "-o", str(binary), str(source)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return binary


def _pause_layer(binary: Path) -> tuple[BuiltLayer, bytes]:
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        data = binary.read_bytes()
        info = tarfile.TarInfo("pause")
        info.size = len(data)
        info.mode = 0o755
        info.mtime = 0
        info.uname = info.gname = "root"
        archive.addfile(info, io.BytesIO(data))
    tar_bytes = tar_buffer.getvalue()
    gzip_buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=gzip_buffer, mode="wb", mtime=0) as compressed:
        compressed.write(tar_bytes)
    blob = gzip_buffer.getvalue()
    layer = BuiltLayer(
        digest=sha256_digest(blob),
        size=len(blob),
        diff_id=sha256_digest(tar_bytes),
        uncompressed_size=len(tar_bytes),
    )
    return layer, blob


def runnable_image(spec: ImageSpec, pause: Path, *, blob_dir: Path | None = None) -> BuiltImage:
    """``spec``'s layers plus a top layer with ``/pause``, which is the entrypoint."""
    base = build_image(spec, blob_dir=blob_dir)
    pause_layer, pause_blob = _pause_layer(pause)
    layers = (*base.layers, pause_layer)
    config = json.loads(base.config_bytes)
    config["config"] = {"Env": ["PATH=/"], "Entrypoint": ["/pause"]}
    config["rootfs"]["diff_ids"] = [layer.diff_id for layer in layers]
    config["history"] = [{"created": "1970-01-01T00:00:00Z", "created_by": "snapcache test"} for _ in layers]
    config_bytes = canonical_json(config)
    config_digest = sha256_digest(config_bytes)
    manifest_bytes = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
            "layers": [
                {"mediaType": OCI_LAYER_GZIP, "digest": layer.digest, "size": layer.size} for layer in layers
            ],
        }
    )
    blobs = {config_digest: config_bytes}
    blobs.update({d: c for d, c in base.blobs.items() if d != base.config_digest})
    blobs[pause_layer.digest] = pause_blob
    return dataclasses.replace(
        base,
        manifest_bytes=manifest_bytes,
        manifest_digest=sha256_digest(manifest_bytes),
        config=config,
        config_bytes=config_bytes,
        config_digest=config_digest,
        layers=layers,
        blobs=blobs,
        compressed_bytes=len(config_bytes) + sum(layer.size for layer in layers),
        uncompressed_bytes=len(config_bytes) + sum(layer.uncompressed_size for layer in layers),
    )


def write_oci_archive(image: BuiltImage, name: str, path: Path) -> Path:
    """An OCI layout tar of ``image`` named ``name`` (a full reference) for ``ctr images import``."""
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": image.manifest_digest,
                "size": len(image.manifest_bytes),
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name.rpartition(":")[2],
                },
            }
        ],
    }

    def add(archive: tarfile.TarFile, member: str, content: bytes | Path) -> None:
        info = tarfile.TarInfo(member)
        info.mtime = 0
        if isinstance(content, Path):
            info.size = content.stat().st_size
            with content.open("rb") as handle:
                archive.addfile(info, handle)
        else:
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))

    with tarfile.open(path, mode="w") as archive:
        add(archive, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add(archive, "index.json", canonical_json(index))
        add(archive, f"blobs/sha256/{image.manifest_digest.removeprefix('sha256:')}", image.manifest_bytes)
        for digest, content in image.blobs.items():
            add(archive, f"blobs/sha256/{digest.removeprefix('sha256:')}", content)
    return path
