"""The snapshot seeder: chain IDs, which layers it writes, where, and how it stops without harm.

The runtime is a fake at our own seam (``SnapshotRuntime``: what ``ContainerdSnapshots`` does
with containerd's overlayfs snapshotter: directories, bind/overlay mounts, commit by name); the
disk is a real OCI layout read by the real ``DiskCatalogue``, the layers applied by the real
``apply_layer``. The whole path with containerd and a kubelet is in
tests/integration/test_node_agent_real_node.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import threading
from pathlib import Path

import pytest

from services.node_agent.containerd_snapshots import Mount, RuntimeUnavailable
from services.node_agent.disk_catalogue import DiskCatalogue
from services.node_agent.pending_images import PendingImages
from services.node_agent.snapshot_seeding import (
    SeedingStopped,
    SeedResult,
    SnapshotSeeder,
    chain_ids,
    snapshot_directories,
)
from snapcache.images import parse_image_reference
from tests.support.waiting import eventually

IMAGE = "registry.example/team/app:1.0"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class Disk:
    """An OCI layout holding one image: gzip layers, and each layer's diff unless told otherwise."""

    def __init__(self, root: Path, layers: list[dict[str, bytes]], *, diffs: bool = True) -> None:
        self.path = root / "disk-1"
        self.blobs = self.path / "blobs" / "sha256"
        self.blobs.mkdir(parents=True)
        self.diffs = [_tar(files) for files in layers]
        self.diff_ids = [_sha(d) for d in self.diffs]
        descriptors = []
        for diff in self.diffs:
            compressed = gzip.compress(diff, mtime=0)
            self._put(compressed)
            if diffs:
                self._put(diff)
            descriptors.append(
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": _sha(compressed),
                    "size": len(compressed),
                }
            )
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": self.diff_ids}}
        ).encode()
        self._put(config)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": _sha(config),
                    "size": len(config),
                },
                "layers": descriptors,
            }
        ).encode()
        self._put(manifest)
        (self.path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _sha(manifest),
                    "size": len(manifest),
                    "annotations": {"org.opencontainers.image.ref.name": IMAGE},
                }
            ],
        }
        (self.path / "index.json").write_text(json.dumps(index))

    def _put(self, data: bytes) -> None:
        (self.blobs / _sha(data).removeprefix("sha256:")).write_bytes(data)

    def diff_path(self, position: int) -> Path:
        return self.blobs / self.diff_ids[position].removeprefix("sha256:")


class FakeRuntime:
    """containerd's overlayfs snapshotter as the seeder sees it: a directory per snapshot."""

    snapshotter = "overlayfs"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.active: dict[str, tuple[str, Path]] = {}  # key -> (parent, dir)
        self.committed: dict[str, tuple[str, Path]] = {}  # name -> (parent, dir)
        self.leases: list[tuple[str, float]] = []
        self.removed: list[str] = []
        self.fail_prepare = False
        self.on_commit = lambda _name: None
        self._count = 0

    def create_lease(self, *, expire_seconds: float, labels: dict[str, str] | None = None) -> str:
        self.leases.append((f"lease-{len(self.leases)}", expire_seconds))
        return self.leases[-1][0]

    def exists(self, name: str) -> bool:
        return name in self.committed or name in self.active

    def prepare(
        self, key: str, parent: str, *, lease: str, labels: dict[str, str] | None = None
    ) -> list[Mount]:
        assert lease, "a snapshot is prepared under a lease"
        if self.fail_prepare:
            raise RuntimeUnavailable("containerd could not prepare: UNAVAILABLE")
        assert not parent or parent in self.committed, f"parent {parent} not committed"
        self._count += 1
        directory = self.root / str(self._count) / "fs"
        directory.mkdir(parents=True)
        self.active[key] = (parent, directory)
        if not parent:
            return [Mount("bind", str(directory), ("rw", "rbind"))]
        lowers = []
        name = parent
        while name:
            lowers.append(str(self.committed[name][1]))
            name = self.committed[name][0]
        options = (
            f"workdir={directory.parent / 'work'}",
            f"upperdir={directory}",
            f"lowerdir={':'.join(lowers)}",
        )
        return [Mount("overlay", "overlay", options)]

    def commit(self, name: str, key: str, *, lease: str, labels: dict[str, str] | None = None) -> bool:
        self.on_commit(name)
        if name in self.committed:
            return False
        self.committed[name] = self.active.pop(key)
        return True

    def remove(self, key: str) -> None:
        self.removed.append(key)
        self.active.pop(key, None)


@pytest.fixture
def disk(tmp_path: Path) -> Disk:
    return Disk(
        tmp_path / "disks",
        [{"bin/tool": b"tool" * 1000}, {"etc/conf": b"conf"}, {"app/main": b"main" * 500}],
    )


def _seeder(tmp_path: Path, disk_root: Path, runtime: FakeRuntime, **kwargs: object) -> SnapshotSeeder:
    catalogue = DiskCatalogue(disk_root)
    catalogue.refresh()
    return SnapshotSeeder(runtime=runtime, disks=catalogue, **kwargs)  # type: ignore[arg-type]


def test_chain_ids_follow_the_oci_image_spec() -> None:
    a, b, c = (_sha(x) for x in (b"a", b"b", b"c"))
    ab = _sha(f"{a} {b}".encode())
    assert chain_ids([a, b, c]) == [a, ab, _sha(f"{ab} {c}".encode())]
    assert chain_ids([]) == []


def test_every_layer_is_written_into_its_snapshot_and_committed_under_its_chain_id(
    tmp_path: Path, disk: Disk
) -> None:
    runtime = FakeRuntime(tmp_path / "containerd")
    seeder = _seeder(tmp_path, disk.path.parent, runtime)
    result = seeder.seed(IMAGE, parse_image_reference(IMAGE))
    assert result.complete and result.stopped == ""
    assert (result.seeded, result.present, result.layers) == (3, 0, 3)
    assert result.bytes == sum(len(d) for d in disk.diffs)
    chain = chain_ids(disk.diff_ids)
    assert list(runtime.committed) == chain
    assert [runtime.committed[c][0] for c in chain] == ["", chain[0], chain[1]]  # each on its parent
    assert (runtime.committed[chain[0]][1] / "bin" / "tool").read_bytes() == b"tool" * 1000
    assert (runtime.committed[chain[2]][1] / "app" / "main").read_bytes() == b"main" * 500
    assert not (runtime.committed[chain[2]][1] / "bin").exists()  # an upper dir holds its own layer only
    assert len(runtime.leases) == 1 and runtime.leases[0][1] == 600.0
    assert runtime.active == {}


def test_layers_already_in_the_runtime_are_skipped_and_a_second_seeding_writes_nothing(
    tmp_path: Path, disk: Disk
) -> None:
    runtime = FakeRuntime(tmp_path / "containerd")
    seeder = _seeder(tmp_path, disk.path.parent, runtime)
    first = seeder.seed(IMAGE, parse_image_reference(IMAGE))
    again = seeder.seed(IMAGE, parse_image_reference(IMAGE))
    assert (first.seeded, again.seeded, again.present) == (3, 0, 3)
    assert again.complete and len(runtime.leases) == 1  # no lease when nothing is written


def test_a_layer_without_its_diff_on_the_disk_stops_there_and_the_lower_ones_stay(tmp_path: Path) -> None:
    disk = Disk(tmp_path / "disks", [{"a": b"a"}, {"b": b"b"}, {"c": b"c"}])
    disk.diff_path(1).unlink()
    runtime = FakeRuntime(tmp_path / "containerd")
    result = _seeder(tmp_path, disk.path.parent, runtime).seed(IMAGE, parse_image_reference(IMAGE))
    assert (result.seeded, result.complete) == (1, False)
    assert "no unpacked diff" in result.stopped
    assert list(runtime.committed) == chain_ids(disk.diff_ids)[:1]


def test_a_corrupt_diff_is_not_committed_its_snapshot_is_removed_and_the_disk_blob_marked_bad(
    tmp_path: Path, disk: Disk
) -> None:
    data = bytearray(disk.diff_path(1).read_bytes())
    data[600] ^= 0xFF  # inside the file's data
    disk.diff_path(1).write_bytes(bytes(data))
    runtime = FakeRuntime(tmp_path / "containerd")
    bad: list[tuple[str, str]] = []
    catalogue = DiskCatalogue(
        disk.path.parent, on_bad=lambda disk_id, digest, _why: bad.append((disk_id, digest))
    )
    catalogue.refresh()
    seeder = SnapshotSeeder(runtime=runtime, disks=catalogue)
    result = seeder.seed(IMAGE, parse_image_reference(IMAGE))
    chain = chain_ids(disk.diff_ids)
    assert result.seeded == 1 and not result.complete
    assert list(runtime.committed) == chain[:1]
    assert runtime.active == {} and len(runtime.removed) == 1 and runtime.removed[0].endswith(chain[1])
    assert bad == [("disk-1", disk.diff_ids[1])]


def test_a_config_that_does_not_match_its_digest_seeds_nothing(tmp_path: Path, disk: Disk) -> None:
    catalogue = DiskCatalogue(disk.path.parent)
    catalogue.refresh()
    (manifest,) = catalogue.manifests(parse_image_reference(IMAGE))
    config_digest = json.loads(manifest.path.read_bytes())["config"]["digest"]
    config = disk.blobs / config_digest.removeprefix("sha256:")
    config.write_bytes(config.read_bytes().replace(b'"amd64"', b'"arm64"'))
    runtime = FakeRuntime(tmp_path / "containerd")
    result = SnapshotSeeder(runtime=runtime, disks=catalogue).seed(IMAGE, parse_image_reference(IMAGE))
    assert result.seeded == 0 and "does not match its digest" in result.stopped
    assert runtime.committed == {} and runtime.leases == []


def test_a_layer_committed_by_the_pull_meanwhile_counts_as_done(tmp_path: Path, disk: Disk) -> None:
    runtime = FakeRuntime(tmp_path / "containerd")
    chain = chain_ids(disk.diff_ids)

    def pull_wins(name: str) -> None:  # containerd's unpacker commits the same layer first
        if name == chain[1] and name not in runtime.committed:
            runtime.committed[name] = (chain[0], tmp_path / "unpacked-by-the-pull")

    runtime.on_commit = pull_wins
    result = _seeder(tmp_path, disk.path.parent, runtime).seed(IMAGE, parse_image_reference(IMAGE))
    assert result.complete and list(runtime.committed) == chain
    assert (result.seeded, result.present) == (2, 1)
    assert runtime.committed[chain[1]][1] == tmp_path / "unpacked-by-the-pull"
    assert len(runtime.removed) == 1  # our copy of that layer removed


def test_containerd_failing_stops_the_image_and_leaves_no_active_snapshot(tmp_path: Path, disk: Disk) -> None:
    runtime = FakeRuntime(tmp_path / "containerd")
    runtime.fail_prepare = True
    result = _seeder(tmp_path, disk.path.parent, runtime).seed(IMAGE, parse_image_reference(IMAGE))
    assert result.seeded == 0 and "UNAVAILABLE" in result.stopped
    assert runtime.active == {} and runtime.committed == {}


def test_the_images_repository_is_pending_while_it_is_seeded_and_released_after(
    tmp_path: Path, disk: Disk
) -> None:
    runtime = FakeRuntime(tmp_path / "containerd")
    pending = PendingImages()
    inside = threading.Event()
    release = threading.Event()
    seen_while_seeding: list[frozenset[str]] = []

    def slow_commit(_name: str) -> None:
        seen_while_seeding.append(pending.names)
        inside.set()
        release.wait(5)

    runtime.on_commit = slow_commit
    done: list[SeedResult] = []
    seeder = _seeder(
        tmp_path,
        disk.path.parent,
        runtime,
        on_pending=lambda names: pending.publish(names, source="runtime"),
        on_done=done.append,
    )
    pending.publish({"registry.example/team/other"}, source="disks")
    assert seeder.submit([IMAGE, "registry.example/team/not-on-a-disk:1", "::bad::"]) == [IMAGE]
    assert seeder.submit([IMAGE]) == []  # in flight: not twice
    assert inside.wait(5)
    assert pending.names == {"registry.example/team/app", "registry.example/team/other"}
    release.set()
    assert pending.wait("registry.example/team/app", 5) is True
    assert pending.names == {"registry.example/team/other"}  # the other source's hold stays
    # the hold is lifted first (the kubelet waits on it), then the result is reported
    (result,) = eventually(lambda: done, what="the seeding reported")
    assert result.complete
    assert seen_while_seeding[0] >= {"registry.example/team/app"}
    seeder.close()


def test_only_overlayfs_mounts_are_seeded() -> None:
    assert snapshot_directories([Mount("bind", "/s/1/fs", ("rw", "rbind"))]) == (Path("/s/1/fs"), [])
    overlay = Mount(
        "overlay",
        "overlay",
        ("index=off", "workdir=/s/3/work", "upperdir=/s/3/fs", "lowerdir=/s/2/fs:/s/1/fs"),
    )
    assert snapshot_directories([overlay]) == (Path("/s/3/fs"), [Path("/s/2/fs"), Path("/s/1/fs")])
    with pytest.raises(SeedingStopped, match="only overlayfs"):
        snapshot_directories([Mount("ext4", "/dev/dm-3", ())])
    with pytest.raises(SeedingStopped):
        snapshot_directories([Mount("overlay", "overlay", ("lowerdir=/a:/b",))])  # a view: nothing to write
