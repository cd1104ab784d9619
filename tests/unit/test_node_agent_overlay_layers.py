"""Applying a layer tar into an overlay upper directory as containerd would: real tars, real files, real mounts.

Tars are built with Python's tarfile (PAX unless said otherwise) and with GNU tar; the result is
checked on disk (lstat, xattrs, device numbers), against GNU tar's own extraction of the same tar,
and through a real overlay mount. We run as root, so owners, devices and trusted.* xattrs are real.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.node_agent.overlay_layers import AppliedLayer, LayerCorrupt, LayerRefused, apply_layer

T = 1_700_000_000
NS = 1_000_000_000
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service+ep

Entry = tuple[tarfile.TarInfo, bytes | None]


def entry(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    *,
    data: bytes = b"",
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = T,
    linkname: str = "",
    pax: dict[str, str] | None = None,
    device: tuple[int, int] = (0, 0),
) -> Entry:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = mtime
    info.linkname = linkname
    info.devmajor, info.devminor = device
    info.pax_headers = dict(pax or {})
    if kind in (tarfile.REGTYPE, tarfile.AREGTYPE):
        info.size = len(data)
        return info, data
    return info, None


def tar_bytes(entries: Sequence[Entry], *, format: int = tarfile.PAX_FORMAT, **options: object) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format, **options) as archive:  # type: ignore[call-overload]
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def write_layer(directory: Path, content: bytes) -> tuple[Path, str]:
    diff = directory / "diff.tar"
    diff.write_bytes(content)
    return diff, "sha256:" + hashlib.sha256(content).hexdigest()


def apply(
    tmp_path: Path, entries: Sequence[Entry], *, lowers: Sequence[Path] = (), name: str = "upper"
) -> tuple[Path, AppliedLayer]:
    diff, diff_id = write_layer(tmp_path, tar_bytes(entries))
    upper = tmp_path / name
    upper.mkdir()
    return upper, apply_layer(diff, upper, diff_id=diff_id, lowers=lowers)


def mtime_ns(path: Path) -> int:
    return os.lstat(path).st_mtime_ns


# -- what lands on disk ----------------------------------------------------------------------------


def test_every_entry_type_lands_with_owner_mode_times_and_xattrs(tmp_path: Path) -> None:
    big = os.urandom(3 << 20)
    upper, applied = apply(
        tmp_path,
        [
            entry("./", tarfile.DIRTYPE, mode=0o700, uid=7),  # the root: ignored
            entry("d/", tarfile.DIRTYPE, mode=0o750, uid=1000, gid=2000, pax={"mtime": f"{T}.123456789"}),
            entry(
                "d/f",
                data=b"hello",
                mode=0o4755,
                uid=1001,
                gid=1002,
                pax={
                    "mtime": f"{T + 5}.5",
                    "SCHILY.xattr.user.note": "v\u00e9",
                    "SCHILY.xattr.security.capability": CAPABILITY.decode("utf-8", "surrogateescape"),
                },
            ),
            entry("d/big", data=big, mode=0o2644, uid=3, gid=4),
            entry("d/l", tarfile.SYMTYPE, linkname="f", uid=1003, gid=1004, mtime=T + 9),
            entry(  # a hard link's metadata is the shared inode's: its chown would drop the capability
                "d/h",
                tarfile.LNKTYPE,
                linkname="d/f",
                mode=0o4755,
                uid=1001,
                gid=1002,
                mtime=T + 6,
                pax={"SCHILY.xattr.security.capability": CAPABILITY.decode("utf-8", "surrogateescape")},
            ),
            entry("/abs/e", data=b"leading slash"),
            entry("dev/c", tarfile.CHRTYPE, mode=0o620, device=(1, 3), uid=5),
            entry("dev/b", tarfile.BLKTYPE, mode=0o660, device=(8, 17)),
            entry("p", tarfile.FIFOTYPE, mode=0o600),
            entry("t/", tarfile.DIRTYPE, mode=0o1777),
        ],
    )
    d, f = upper / "d", upper / "d" / "f"
    assert stat.S_IMODE(os.lstat(upper).st_mode) == 0o755 and os.lstat(upper).st_uid == 0
    st = os.lstat(d)
    assert (stat.S_ISDIR(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (
        True,
        0o750,
        1000,
        2000,
    )
    assert st.st_mtime_ns == T * NS + 123456789  # after its children were written
    st = os.lstat(f)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, f.read_bytes()) == (0o4755, 1001, 1002, b"hello")
    assert (st.st_mtime_ns, st.st_atime_ns) == ((T + 6) * NS, (T + 6) * NS)  # set again through d/h
    assert os.getxattr(f, "user.note") == "v\u00e9".encode()
    assert os.getxattr(f, "security.capability") == CAPABILITY
    assert (upper / "d" / "big").read_bytes() == big
    assert stat.S_IMODE(os.lstat(upper / "d" / "big").st_mode) == 0o2644
    st = os.lstat(upper / "d" / "l")
    assert stat.S_ISLNK(st.st_mode) and os.readlink(upper / "d" / "l") == "f"
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (1003, 1004, (T + 9) * NS)
    assert os.lstat(upper / "d" / "h").st_ino == os.lstat(f).st_ino and os.lstat(f).st_nlink == 2
    assert (upper / "abs" / "e").read_bytes() == b"leading slash"
    st = os.lstat(upper / "dev" / "c")
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o620, 5)
    st = os.lstat(upper / "dev" / "b")
    assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (8, 17)
    assert stat.S_ISFIFO(os.lstat(upper / "p").st_mode)
    assert stat.S_IMODE(os.lstat(upper / "t").st_mode) == 0o1777
    # Implied parents are made 0755 (containerd's mkparent), their times whatever the writes left.
    assert stat.S_IMODE(os.lstat(upper / "dev").st_mode) == 0o755
    assert applied.entries == 11 and applied.bytes == 5 + len(big) + len(b"leading slash")


def test_trusted_xattrs_from_the_archive_are_ignored_as_containerd_does(tmp_path: Path) -> None:
    upper, _ = apply(
        tmp_path,
        [
            entry("d/", tarfile.DIRTYPE, pax={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
            entry("f", pax={"SCHILY.xattr.trusted.overlay.redirect": "/etc", "SCHILY.xattr.user.k": "v"}),
            entry("l", tarfile.SYMTYPE, linkname="f", pax={"SCHILY.xattr.user.k": "v"}),  # EPERM, ignored
        ],
    )
    assert os.listxattr(upper / "d") == []
    assert os.listxattr(upper / "f") == ["user.k"]
    assert os.listxattr(upper / "l", follow_symlinks=False) == []


def test_times_follow_go_pax_parsing_and_containerd_bounds(tmp_path: Path) -> None:
    upper, _ = apply(
        tmp_path,
        [
            entry("a", pax={"mtime": f"{T}.1234567891", "atime": f"{T - 100}.5"}),  # atime: the later
            entry("b", pax={"mtime": f"{T}", "atime": f"{T + 100}.25"}),
            entry("c", pax={"mtime": "-5.5"}),  # before 1970: the epoch
            entry("d", mtime=0),
        ],
    )
    assert (os.lstat(upper / "a").st_mtime_ns, os.lstat(upper / "a").st_atime_ns) == (T * NS + 123456789,) * 2
    assert (os.lstat(upper / "b").st_mtime_ns, os.lstat(upper / "b").st_atime_ns) == (
        T * NS,
        (T + 100) * NS + NS // 4,
    )
    assert mtime_ns(upper / "c") == 0 and mtime_ns(upper / "d") == 0


def test_later_entries_replace_earlier_ones_and_directories_merge(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    upper, _ = apply(
        tmp_path,
        [
            entry("f", data=b"old"),
            entry("keep", tarfile.LNKTYPE, linkname="f"),
            entry("f", data=b"new", mode=0o600),
            entry("d/", tarfile.DIRTYPE, mode=0o700, uid=1),
            entry("d/child", data=b"c"),
            entry("d/", tarfile.DIRTYPE, mode=0o755, uid=2, mtime=T + 1),
            entry("x", data=b"file first"),
            entry("x/", tarfile.DIRTYPE),
            entry("x/inside", data=b"i"),
            entry("s", tarfile.SYMTYPE, linkname=str(victim / "f")),
            entry("s", data=b"not through the link"),
            entry("y/", tarfile.DIRTYPE, mtime=T + 7),
            entry("y", data=b"dir replaced by a file", mtime=T + 8),
        ],
    )
    assert (upper / "f").read_bytes() == b"new" and (upper / "keep").read_bytes() == b"old"
    assert stat.S_IMODE(os.lstat(upper / "f").st_mode) == 0o600
    st = os.lstat(upper / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns) == (0o755, 2, (T + 1) * NS)
    assert (upper / "d" / "child").read_bytes() == b"c"
    assert (upper / "x" / "inside").read_bytes() == b"i"
    assert not os.path.islink(upper / "s") and (upper / "s").read_bytes() == b"not through the link"
    assert list(victim.iterdir()) == []
    # containerd's last pass gives each directory entry's times to whatever is at its path.
    assert (upper / "y").read_bytes() == b"dir replaced by a file" and mtime_ns(upper / "y") == (T + 7) * NS


def test_a_global_header_creates_nothing_and_its_records_apply_to_no_entry(tmp_path: Path) -> None:
    diff, diff_id = write_layer(
        tmp_path, tar_bytes([entry("c", data=b"c")], pax_headers={"uid": "77", "mtime": f"{T + 1}"})
    )
    upper = tmp_path / "upper"
    upper.mkdir()
    assert apply_layer(diff, upper, diff_id=diff_id, lowers=()).entries == 2
    assert os.listdir(upper) == ["c"]
    assert (os.lstat(upper / "c").st_uid, mtime_ns(upper / "c")) == (0, T * NS)


def test_entries_through_a_symlink_inside_the_layer_land_where_it_points(tmp_path: Path) -> None:
    upper, _ = apply(
        tmp_path,
        [
            entry("real/", tarfile.DIRTYPE),
            entry("via", tarfile.SYMTYPE, linkname="real"),
            entry("deep/link", tarfile.SYMTYPE, linkname="../real"),
            entry("via/a", data=b"a"),
            entry("deep/link/b", data=b"b"),
            entry("hl", tarfile.LNKTYPE, linkname="via/a"),
        ],
    )
    assert (upper / "real" / "a").read_bytes() == b"a" and (upper / "real" / "b").read_bytes() == b"b"
    assert os.lstat(upper / "hl").st_ino == os.lstat(upper / "real" / "a").st_ino


# -- whiteouts -------------------------------------------------------------------------------------


def test_overlay_whiteouts_become_devices_and_opaque_xattrs(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    (lower / "o").mkdir(parents=True)
    upper, applied = apply(
        tmp_path,
        [
            entry(".wh.gone", uid=33, gid=44),
            entry("sub/.wh.also", data=b"ignored data"),
            entry("o/", tarfile.DIRTYPE),
            entry("o/.wh..wh..opq"),
            entry("o/new", data=b"n"),
        ],
        lowers=[lower],
    )
    for path, owner in ((upper / "gone", (33, 44)), (upper / "sub" / "also", (0, 0))):
        st = os.lstat(path)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and stat.S_IMODE(st.st_mode) == 0
        assert (st.st_uid, st.st_gid) == owner
    assert not any(name.startswith(".wh.") for _, dirs, files in os.walk(upper) for name in dirs + files)
    assert os.getxattr(upper / "o", "trusted.overlay.opaque") == b"y"
    assert (upper / "o" / "new").read_bytes() == b"n"
    assert applied.bytes == 1


def test_without_parents_whiteouts_remove_as_the_naive_applier_does(tmp_path: Path) -> None:
    # A first layer is applied through a bind mount: whiteouts delete what this layer wrote
    # before them; an opaque marker deletes what it did not unpack, implied parents included.
    upper, _ = apply(
        tmp_path,
        [
            entry("a/b/f", data=b"under implied parents"),
            entry("a/g", data=b"g"),
            entry("a/.wh..wh..opq"),
            entry("x", data=b"x"),
            entry(".wh.x"),
            entry(".wh.never-there"),
        ],
    )
    assert sorted(os.listdir(upper)) == ["a"]
    assert os.listdir(upper / "a") == ["g"]
    assert os.listxattr(upper / "a") == []


def test_missing_parents_take_the_nearest_lower_directorys_metadata(tmp_path: Path) -> None:
    near, far = tmp_path / "near", tmp_path / "far"
    (near / "a").mkdir(parents=True)
    (far / "a" / "b").mkdir(parents=True)
    os.chown(near / "a", 11, 12)
    os.chmod(near / "a", 0o2710)
    os.utime(near / "a", ns=(T * NS, T * NS))
    os.setxattr(near / "a", "user.origin", b"near")
    os.setxattr(near / "a", "trusted.overlay.opaque", b"y")
    os.chown(far / "a" / "b", 21, 22)
    os.chmod(far / "a" / "b", 0o750)
    os.symlink("/a", near / "link")  # resolved inside the lower, as containerd does: near/a
    upper, _ = apply(
        tmp_path,
        [entry("a/b/c/f", data=b"f"), entry("link/g", data=b"g")],
        lowers=[near, far],
    )
    st = os.lstat(upper / "a")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_atime_ns) == (0o2710, 11, 12, T * NS)
    assert os.listxattr(upper / "a") == ["user.origin"]  # trusted.* is not copied up
    st = os.lstat(upper / "a" / "b")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 21, 22)
    st = os.lstat(upper / "a" / "b" / "c")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 0)
    st = os.lstat(upper / "link")
    assert (stat.S_ISDIR(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid) == (True, 0o2710, 11)


@pytest.fixture
def overlay_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    lower, merged, work = tmp_path / "lower", tmp_path / "merged", tmp_path / "work"
    for path in (lower, merged, work):
        path.mkdir()
    yield lower, merged
    if os.path.ismount(merged):
        subprocess.run(["umount", merged], check=True)


def test_a_mounted_overlay_of_the_result_hides_what_the_whiteouts_say(
    tmp_path: Path, overlay_mount: tuple[Path, Path]
) -> None:
    lower, merged = overlay_mount
    (lower / "gone").write_text("lower file")
    (lower / "o").mkdir()
    (lower / "o" / "old").write_text("hidden by the opaque dir")
    (lower / "keep").mkdir()
    (lower / "keep" / "k").write_text("still here")
    (lower / "keep" / "rm").write_text("whited out")
    upper, _ = apply(
        tmp_path,
        [
            entry(".wh.gone"),
            entry("o/", tarfile.DIRTYPE),
            entry("o/.wh..wh..opq"),
            entry("o/new", data=b"new"),
            entry("keep/.wh.rm"),
            entry("added", data=b"a"),
        ],
        lowers=[lower],
    )
    options = f"lowerdir={lower},upperdir={upper},workdir={tmp_path / 'work'}"
    mounted = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, merged], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount overlay here: {mounted.stderr.decode().strip()}")
    assert sorted(os.listdir(merged)) == ["added", "keep", "o"]
    assert os.listdir(merged / "o") == ["new"]
    assert os.listdir(merged / "keep") == ["k"]
    assert (merged / "keep" / "k").read_text() == "still here" and (merged / "added").read_text() == "a"


# -- faithful to other tar writers -----------------------------------------------------------------


@pytest.mark.parametrize("tar_format", ["gnu", "posix"])
def test_a_gnu_tar_archive_lands_as_gnu_tar_extracts_it(tmp_path: Path, tar_format: str) -> None:
    tree = tmp_path / "tree"
    long_dir = tree / ("d" * 120) / ("e" * 80)
    long_dir.mkdir(parents=True)
    (long_dir / ("f" * 110)).write_bytes(os.urandom(70_000))
    (tree / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(tree / "suid", 0o4751)
    os.chown(tree / "suid", 123, 456)
    os.link(tree / "suid", tree / "suid-link")
    os.symlink("d" * 120, tree / "sym")
    (tree / "empty").mkdir()
    os.chmod(tree / "empty", 0o1730)
    os.mkfifo(tree / "fifo")
    for path in sorted(tree.rglob("*"), reverse=True):
        os.utime(path, ns=(T * NS + 777, T * NS + 999_000_001), follow_symlinks=False)
    archive = tmp_path / "tree.tar"
    subprocess.run(
        ["tar", f"--format={tar_format}", "--numeric-owner", "--xattrs", "-C", tree, "-cf", archive, "."],
        check=True,
    )
    by_gnu = tmp_path / "by-gnu"
    by_gnu.mkdir()
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "-xpf", archive, "-C", by_gnu], check=True)
    upper = tmp_path / "upper"
    upper.mkdir()
    diff_id = "sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest()
    apply_layer(archive, upper, diff_id=diff_id, lowers=())

    def describe(root: Path) -> dict[str, tuple[object, ...]]:
        found: dict[str, tuple[object, ...]] = {}
        inodes: dict[int, str] = {}
        for path in sorted(root.rglob("*")):
            st = os.lstat(path)
            name = str(path.relative_to(root))
            first = inodes.setdefault(st.st_ino, name)
            content = (
                path.read_bytes()
                if stat.S_ISREG(st.st_mode)
                else os.readlink(path)
                if path.is_symlink()
                else None
            )
            found[name] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, first, content)
        return found

    expected = describe(by_gnu)
    assert describe(upper) == expected
    assert len(expected) == 8


# -- refusals --------------------------------------------------------------------------------------


REFUSALS: list[object] = [
    pytest.param(lambda victim: [entry("../x", data=b"x")], id="dotdot"),
    pytest.param(lambda victim: [entry("/../x", data=b"x")], id="rooted-dotdot"),
    pytest.param(lambda victim: [entry("a/../../x", data=b"x")], id="inner-dotdot"),
    pytest.param(
        lambda victim: [entry("a", tarfile.SYMTYPE, linkname=str(victim)), entry("a/passwd", data=b"x")],
        id="absolute-symlink-parent",
    ),
    pytest.param(
        lambda victim: [entry("a", tarfile.SYMTYPE, linkname="../victim"), entry("a/f", data=b"x")],
        id="relative-symlink-parent",
    ),
    pytest.param(
        lambda victim: [
            entry("d/", tarfile.DIRTYPE),
            entry("d/a", tarfile.SYMTYPE, linkname="../../x"),
            entry("d/a/f", data=b"x"),
        ],
        id="relative-symlink-parent-deeper",
    ),
    pytest.param(
        lambda victim: [entry("h", tarfile.LNKTYPE, linkname="../victim/secret")], id="hardlink-outside"
    ),
    pytest.param(
        lambda victim: [entry("h", tarfile.LNKTYPE, linkname=str(victim / "secret"))], id="hardlink-absolute"
    ),
    pytest.param(
        lambda victim: [
            entry("a", tarfile.SYMTYPE, linkname=str(victim)),
            entry("h", tarfile.LNKTYPE, linkname="a/secret"),
        ],
        id="hardlink-through-symlink",
    ),
    pytest.param(lambda victim: [entry("h", tarfile.LNKTYPE, linkname="missing")], id="hardlink-missing"),
    pytest.param(
        lambda victim: [entry("d/", tarfile.DIRTYPE), entry("h", tarfile.LNKTYPE, linkname="d")],
        id="hardlink-directory",
    ),
    pytest.param(lambda victim: [entry(".wh..wh.plnk/1", data=b"x")], id="aufs-metadata"),
    pytest.param(lambda victim: [entry("d/.wh.")], id="empty-whiteout"),
    pytest.param(lambda victim: [entry("c", tarfile.CONTTYPE, data=b"x")], id="contiguous-file"),
    pytest.param(lambda victim: [entry("f", pax={"mtime": ".5"})], id="pax-time-go-rejects"),
    pytest.param(lambda victim: [entry("f", pax={"uid": "1_000"})], id="pax-uid-go-rejects"),
    pytest.param(lambda victim: [entry("f", pax={"path": "a\x00b"})], id="nul-in-name"),
    pytest.param(lambda victim: [entry("f", pax={"GNU.sparse.major": "1"})], id="sparse-file"),
    pytest.param(
        lambda victim: [entry("d/", tarfile.DIRTYPE), entry("d/e/", tarfile.DIRTYPE), entry("d", data=b"x")],
        id="directory-removed-by-later-entry",
    ),
]


@pytest.mark.parametrize("make", REFUSALS)
@pytest.mark.parametrize("with_lowers", [False, True], ids=["first-layer", "overlay"])
def test_refused_layers_write_nothing_outside(
    tmp_path: Path, make: Callable[[Path], list[Entry]], with_lowers: bool
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret").write_text("s")
    lower = tmp_path / "lower"
    lower.mkdir()
    with pytest.raises(LayerRefused) as refused:
        apply(tmp_path, make(victim), lowers=[lower] if with_lowers else ())
    assert not isinstance(refused.value, LayerCorrupt)
    assert sorted(os.listdir(victim)) == ["secret"] and (victim / "secret").read_text() == "s"
    assert os.lstat(victim / "secret").st_nlink == 1


def test_an_overlay_whiteout_over_an_entry_of_the_layer_is_refused_as_containerd_fails(
    tmp_path: Path,
) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    with pytest.raises(LayerRefused, match="File exists"):
        apply(tmp_path, [entry("f", data=b"x"), entry(".wh.f")], lowers=[lower])


def fix_checksum(header: memoryview) -> None:
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)


def test_a_truncated_or_garbled_tar_is_refused_even_when_its_hash_matches(tmp_path: Path) -> None:
    whole = tar_bytes([entry("a", data=os.urandom(5000)), entry("b", data=b"b")])
    garbled = bytearray(whole)
    garbled[5632] ^= 0xFF  # in the second header: bad checksum
    for number, content in enumerate((whole[:3000], bytes(garbled), whole[:5632] + b"\0" * 512 + b"junk")):
        work = tmp_path / str(number)
        work.mkdir()
        diff, diff_id = write_layer(work, content)
        (work / "upper").mkdir()
        with pytest.raises(LayerRefused) as refused:
            apply_layer(diff, work / "upper", diff_id=diff_id, lowers=())
        assert not isinstance(refused.value, LayerCorrupt)


# -- integrity -------------------------------------------------------------------------------------


def test_bytes_not_matching_the_diff_id_are_corrupt(tmp_path: Path) -> None:
    content = tar_bytes([entry("f", data=os.urandom(100_000))])
    diff, diff_id = write_layer(tmp_path, content)
    for number, (changed, expected_id) in enumerate(
        [
            (content, "sha256:" + "0" * 64),  # the wrong DiffID
            (content[:50_000] + bytes([content[50_000] ^ 1]) + content[50_001:], diff_id),  # one bit in data
            (content[:100] + b"X" + content[101:], diff_id),  # a header: refused, and corrupt wins
        ]
    ):
        diff.write_bytes(changed)
        upper = tmp_path / f"upper-{number}"
        upper.mkdir()
        with pytest.raises(LayerCorrupt):
            apply_layer(diff, upper, diff_id=expected_id, lowers=())


def test_empty_layers_apply_to_nothing(tmp_path: Path) -> None:
    for number, content in enumerate((b"\0" * 1024, b"", tar_bytes([]))):
        work = tmp_path / str(number)
        work.mkdir()
        diff, diff_id = write_layer(work, content)
        (work / "upper").mkdir()
        applied = apply_layer(diff, work / "upper", diff_id=diff_id, lowers=())
        assert (applied.entries, applied.bytes, os.listdir(work / "upper")) == (0, 0, [])


def test_the_archive_may_end_without_its_last_padding_as_go_reads_it(tmp_path: Path) -> None:
    whole = tar_bytes([entry("f", data=b"x" * 700)])
    diff, diff_id = write_layer(tmp_path, whole[: 512 + 700])  # no padding, no end-of-archive blocks
    upper = tmp_path / "upper"
    upper.mkdir()
    assert apply_layer(diff, upper, diff_id=diff_id, lowers=()).entries == 1
    assert (upper / "f").read_bytes() == b"x" * 700


def test_caller_mistakes_are_value_errors(tmp_path: Path) -> None:
    diff, diff_id = write_layer(tmp_path, tar_bytes([]))
    upper = tmp_path / "upper"
    upper.mkdir()
    with pytest.raises(ValueError, match="DiffID"):
        apply_layer(diff, upper, diff_id="sha256:ABC", lowers=())
    (upper / "x").touch()
    with pytest.raises(ValueError, match="not empty"):
        apply_layer(diff, upper, diff_id=diff_id, lowers=())


def test_data_is_copied_across_filesystems(tmp_path: Path) -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm (tmpfs) to put the tar on another filesystem")
    data = os.urandom(1 << 20)
    content = tar_bytes([entry("f", data=data), entry("g", data=b"small")])
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        diff, diff_id = write_layer(Path(shm), content)
        assert os.stat(diff).st_dev != os.stat(tmp_path).st_dev
        upper = tmp_path / "upper"
        upper.mkdir()
        apply_layer(diff, upper, diff_id=diff_id, lowers=())
    assert (upper / "f").read_bytes() == data and (upper / "g").read_bytes() == b"small"


# -- hostile bytes ---------------------------------------------------------------------------------

BASE = tar_bytes(
    [
        entry("d/", tarfile.DIRTYPE, mode=0o755),
        entry("d/f", data=b"data" * 300, uid=5),
        entry("d/l", tarfile.SYMTYPE, linkname="f"),
        entry("d/h", tarfile.LNKTYPE, linkname="d/f"),
        entry("d/.wh.x"),
        entry("o/.wh..wh..opq"),
        entry("p" * 120, data=b"long name", pax={"SCHILY.xattr.user.a": "b", "mtime": f"{T}.5"}),
        entry("c", tarfile.CHRTYPE, device=(1, 3)),
    ]
)


def header_offsets(content: bytes) -> list[int]:
    found, offset = [], 0
    while content[offset : offset + 512].strip(b"\0"):
        found.append(offset)
        size, kind = int(content[offset + 124 : offset + 136].strip(b" \0") or b"0", 8), content[offset + 156]
        offset += 512 + (0 if chr(kind) in "123456" else -(-size // 512) * 512)
    return found


HEADERS = header_offsets(BASE)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(HEADERS), st.integers(0, 511), st.integers(0, 255)), min_size=1, max_size=4
    ),
    st.booleans(),
)
def test_hostile_headers_are_applied_or_refused_and_never_written_outside(
    changes: list[tuple[int, int, int]], with_lowers: bool
) -> None:
    content = bytearray(BASE)
    for header, position, value in changes:
        content[header + position] = value
    for header in HEADERS:  # with valid checksums, so the fields themselves are what is tried
        fix_checksum(memoryview(content)[header : header + 512])
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        victim, lower, upper = work / "victim", work / "lower", work / "upper"
        for path in (victim, lower, upper):
            path.mkdir()
        (victim / "secret").write_text("s")
        diff, diff_id = write_layer(work, bytes(content))
        try:
            apply_layer(diff, upper, diff_id=diff_id, lowers=[lower] if with_lowers else ())
        except LayerRefused as refused:
            assert not isinstance(refused, LayerCorrupt)
        assert os.listdir(victim) == ["secret"] and os.listdir(lower) == []
        assert sorted(os.listdir(work)) == ["diff.tar", "lower", "upper", "victim"]
