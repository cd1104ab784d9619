"""Reading a layer tar as Go's archive/tar does: header layouts, agreement with tarfile, malformed bytes.

Tars are built with Python's tarfile (PAX unless said otherwise) and with GNU tar, some then edited
byte by byte; the reader reads them from a real file descriptor. What the applier makes of the
entries, and that hostile headers never write outside, is in test_node_agent_overlay_layers.py.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.node_agent.layer_tar import GLOBAL, REGULAR, TarHeader, UnreadableTar, read_headers

T = 1_700_000_000
NS = 1_000_000_000

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


def headers(content: bytes) -> list[TarHeader]:
    fd = os.memfd_create("layer")
    try:
        os.write(fd, content)
        return list(read_headers(fd, len(content)))
    finally:
        os.close(fd)


def rechecksummed(block: bytearray) -> bytearray:
    header = memoryview(block)[:512]
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header)
    return block


# -- layouts ---------------------------------------------------------------------------------------


def test_header_layouts_are_read_as_go_reads_them() -> None:
    deep = "p" * 90 + "/" + "q" * 60  # USTAR: split into prefix and name
    (ustar,) = headers(tar_bytes([entry(deep, data=b"ustar")], format=tarfile.USTAR_FORMAT))
    assert (ustar.kind, ustar.name, ustar.size) == (REGULAR, deep.encode(), 5)
    # A GNU long name; the uid in base-256.
    (gnu,) = headers(
        tar_bytes([entry("g/" + "n" * 150, data=b"long", uid=3_000_000, mtime=T)], format=tarfile.GNU_FORMAT)
    )
    assert (gnu.name, gnu.uid, gnu.size) == (b"g/" + b"n" * 150, 3_000_000, 4)
    with_atime = bytearray(tar_bytes([entry("a", data=b"a", mtime=T)], format=tarfile.GNU_FORMAT))
    with_atime[345:357] = b"%011o\0" % (T + 50)
    (gnu_atime,) = headers(bytes(rechecksummed(with_atime)))
    assert (gnu_atime.name, gnu_atime.atime, gnu_atime.mtime) == (b"a", (T + 50) * NS, T * NS)
    old_go = bytearray(tar_bytes([entry("b", data=b"b")], format=tarfile.GNU_FORMAT))
    old_go[345:348] = b"dir"  # a pre-Go1.8 writer's USTAR prefix where GNU keeps atime
    (prefixed,) = headers(bytes(rechecksummed(old_go)))
    assert (prefixed.name, prefixed.atime) == (b"dir/b", None)
    # A global header is an entry of its own: its records do not apply to later entries.
    with_global = headers(tar_bytes([entry("c", data=b"c")], pax_headers={"uid": "77", "comment": "x"}))
    assert [(found.kind, found.uid, found.records) for found in with_global] == [
        (GLOBAL, 0, {b"uid": b"77", b"comment": b"x"}),
        (REGULAR, 0, {}),
    ]
    assert with_global[1].name == b"c"


# -- the reader against tarfile --------------------------------------------------------------------

segment = st.text(st.characters(codec="utf-8", exclude_characters="\0/"), min_size=1, max_size=40)
KINDS = [
    tarfile.REGTYPE,
    tarfile.DIRTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.CHRTYPE,
    tarfile.FIFOTYPE,
]


@st.composite
def archives(draw: st.DrawFn) -> tuple[int, list[Entry]]:
    tar_format = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    entries = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(KINDS))
        entries.append(
            entry(
                "/".join(draw(st.lists(segment, min_size=1, max_size=4))),
                kind,
                data=draw(st.binary(max_size=1500)),
                mode=draw(st.integers(0, 0o7777)),
                uid=draw(
                    st.integers(0, 2**21 - 1)
                    if tar_format == tarfile.USTAR_FORMAT
                    else st.integers(0, 2**32 - 2)
                ),
                gid=draw(st.integers(0, 2**21 - 1)),
                mtime=draw(st.integers(0, 8**11 - 1)),
                linkname=draw(segment) if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else "",
                device=(draw(st.integers(0, 4095)), draw(st.integers(0, 2**20 - 1))),
            )
        )
    return tar_format, entries


@settings(max_examples=200, deadline=None)
@given(archives())
def test_the_reader_agrees_with_tarfile_on_what_tarfile_writes(archive: tuple[int, list[Entry]]) -> None:
    tar_format, entries = archive
    try:
        content = tar_bytes(entries, format=tar_format)
    except ValueError:  # USTAR cannot hold every name
        return
    ours = headers(content)
    with tarfile.open(
        fileobj=io.BytesIO(content), encoding="utf-8", errors="surrogateescape"
    ) as reference_tar:
        theirs = reference_tar.getmembers()
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.kind == reference.type
        assert mine.name.rstrip(b"/") == reference.name.encode("utf-8", "surrogateescape")
        assert mine.linkname == reference.linkname.encode("utf-8", "surrogateescape")
        assert (mine.mode, mine.uid, mine.gid) == (reference.mode, reference.uid, reference.gid)
        assert mine.mtime == int(reference.mtime) * NS and mine.atime is None
        assert (mine.data, mine.size if reference.isreg() else 0) == (reference.offset_data, reference.size)
        if reference.ischr():
            assert (mine.devmajor, mine.devminor) == (reference.devmajor, reference.devminor)


# -- what Go's reader fails on ---------------------------------------------------------------------


def test_a_truncated_or_garbled_tar_is_unreadable() -> None:
    whole = tar_bytes([entry("a", data=os.urandom(5000)), entry("b", data=b"b")])
    assert [found.name for found in headers(whole)] == [b"a", b"b"]
    garbled = bytearray(whole)
    garbled[5632] ^= 0xFF  # in the second header
    for content, reason in (
        (whole[:3000], "data of 5000 bytes"),
        (bytes(garbled), "bad header checksum at 5632"),
        (whole[:5632] + b"\0" * 512 + b"junk", "a zero block and then data"),
        (whole[: 5632 + 100], "ends inside a header at 5632"),
    ):
        with pytest.raises(UnreadableTar, match=reason):
            headers(content)


def test_sparse_files_are_unreadable(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    with open(sparse / "holes", "wb") as holes:
        holes.truncate(1 << 20)
        holes.seek(1 << 19)
        holes.write(b"data between holes")
    for tar_format in ("gnu", "posix"):  # old GNU 'S' entries; PAX GNU.sparse 1.0
        archive = tmp_path / f"sparse-{tar_format}.tar"
        subprocess.run(
            ["tar", f"--format={tar_format}", "-S", "-C", sparse, "-cf", archive, "holes"], check=True
        )
        with pytest.raises(UnreadableTar, match="sparse"):
            headers(archive.read_bytes())
