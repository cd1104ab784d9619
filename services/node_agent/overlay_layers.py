"""Apply an uncompressed OCI layer tar into an overlayfs snapshot directory, exactly as containerd would.

Why: the agent seeds containerd's ``overlayfs`` snapshotter from the cache disk (Prepare a
snapshot, write the layer into its directory, Commit it under the layer's chain ID), so the
kubelet's pull finds every snapshot and unpacks nothing. containerd trusts a committed snapshot
blindly, so what is written here must be what its own applier would have written: containerd's
``pkg/archive`` ``applyNaive``, with ``OverlayConvertWhiteout`` and the lower directories as
``Parents`` when the snapshot has parents (an overlay mount), and with the naive whiteout handling
when it has none (the first layer is applied through a bind mount). Hence ``lowers`` is required:
``()`` for a first layer, else the parents' directories nearest first (the mount's ``lowerdir``).

Semantics kept: numeric owners (lchown), modes with setuid/setgid/sticky set after the chown, times
to the nanosecond (PAX records parsed as Go does; atime is the later of atime and mtime; times
outside 1970..2262 become the epoch); directories' times set after the last entry, in tar order;
``SCHILY.xattr.*`` records except ``trusted.*`` (containerd ignores those, so a layer can never
plant overlay metadata; ENOTSUP ignored, EPERM ignored for ``user.*`` on special files); a later
entry replaces an earlier one unless both are directories; missing parent directories are made
0755 and, under an overlay, take owner, mode, times and xattrs from the nearest lower directory.

Refused (``LayerRefused``; the caller lets containerd unpack the layer, which is then exact by
definition): names or hard-link targets climbing out with ``..``; a parent path that goes through
an absolute symlink or a relative one climbing out of the directory (containerd would confine it
to the directory; no tool writes such a layer); hard links to directories or to nothing written
by this layer; sparse files, contiguous files and other unknown types; PAX global or Solaris
headers, STAR headers, GNU headers with atime/ctime and V7 headers with ustar-only fields (Python's
tarfile reads them differently from Go's archive/tar); PAX numbers Go would reject; ``.wh..wh.*``
names other than the opaque marker (containerd versions differ on those); anything containerd's
applier would fail on (a whiteout over an entry of this layer, a directory entry later replaced by
a symlink or removed, a malformed or truncated tar). ``LayerCorrupt``: the file's sha256 is not
the DiffID; it is computed over every byte, in a thread while the entries are written, and wins
over any refusal so a bad cache disk is always reported as such.

Speed: headers come from ``tarfile`` (it seeks over data); file data goes kernel to kernel with
``copy_file_range`` (``sendfile`` across filesystems). Measured on the 2-core dev VM (ext4, warm
page cache, median of 3): 200 MiB in 5 random files 0.21 s (GNU ``tar -xf`` 0.16 s; ``tar -xzf``
of the gzipped file 1.3 s); 20,000 files of 2 KiB 1.16 s (GNU tar 0.78 s; gzipped 0.83 s).
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import re
import shutil
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

_WHITEOUT = b".wh."
_WHITEOUT_META = b".wh..wh."
_OPAQUE = b".wh..wh..opq"
_XATTR_PREFIX = "SCHILY.xattr."
_MAX_LINKS = 255  # continuity's fs.RootPath
_NS = 1_000_000_000
_MAX_NS = 2**63 - 1  # Go's os.Chtimes limit; later (and pre-1970) times become the epoch
_MAX_ID = 2**32 - 2  # 2**32 - 1 is -1 to chown: "leave unchanged"
_GO_INT = re.compile(r"[+-]?[0-9]+")
_COPY_CHUNK = 1 << 30
_HASH_CHUNK = 1 << 20
_T = TypeVar("_T")
_NODE_TYPES = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK, tarfile.FIFOTYPE: stat.S_IFIFO}


class LayerRefused(Exception):
    """The layer cannot be applied here safely or exactly as containerd would; let containerd unpack it."""


class LayerCorrupt(LayerRefused):
    """The tar file's bytes do not hash to the layer's DiffID."""


@dataclass(frozen=True, slots=True)
class AppliedLayer:
    """What ``apply_layer`` did: tar entries read, file bytes written, wall time."""

    entries: int
    bytes: int
    seconds: float


def apply_layer(diff: Path, upper: Path, *, diff_id: str, lowers: Sequence[Path]) -> AppliedLayer:
    """Write the layer tar ``diff`` into the empty directory ``upper`` as containerd's applier would.

    ``lowers``: the snapshot's parent directories, nearest first; ``()`` for a layer without
    parents. Raises ``LayerCorrupt`` when the file's sha256 is not ``diff_id``, ``LayerRefused``
    when the layer cannot be applied faithfully here (``upper`` is then to be discarded; nothing
    outside it has been written), ``ValueError`` for a malformed ``diff_id`` or non-empty ``upper``.
    """
    algorithm, _, expected = diff_id.partition(":")
    if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ValueError(f"not a sha256 DiffID: {diff_id[:80]!r}")
    began = time.monotonic()
    root = os.fsencode(os.path.realpath(upper))
    with os.scandir(root) as listing:
        if next(listing, None) is not None:
            raise ValueError(f"{upper} is not empty")
    try:
        source = os.open(diff, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise LayerRefused(f"cannot read {diff}: {error}") from error
    try:
        hashing = _Hashing(source)
        hashing.start()
        refused: LayerRefused | None = None
        entries = written = 0
        try:
            entries, written = _Extraction(
                source, root, lowers=[os.fsencode(lower) for lower in lowers]
            ).run()
        except LayerRefused as error:
            refused = error
        finally:
            hashing.join()
    finally:
        os.close(source)
    if hashing.error is not None:
        raise LayerRefused(f"reading {diff}: {hashing.error}") from hashing.error
    if hashing.hexdigest != expected:
        raise LayerCorrupt(f"{diff} hashes to sha256:{hashing.hexdigest}, not {diff_id}") from refused
    if refused is not None:
        raise refused
    return AppliedLayer(entries=entries, bytes=written, seconds=time.monotonic() - began)


class _Hashing(threading.Thread):
    """sha256 of a whole file by positional reads; hashlib and the reads release the GIL."""

    def __init__(self, fd: int) -> None:
        super().__init__(name="layer-sha256", daemon=True)
        self._fd = fd
        self.hexdigest: str | None = None
        self.error: OSError | None = None

    def run(self) -> None:
        digest = hashlib.sha256()
        buffer = bytearray(_HASH_CHUNK)
        view = memoryview(buffer)
        offset = 0
        try:
            while count := os.preadv(self._fd, [buffer], offset):
                digest.update(view[:count])
                offset += count
        except OSError as error:
            self.error = error
            return
        self.hexdigest = digest.hexdigest()


class _RawTarInfo(tarfile.TarInfo):
    """A TarInfo keeping its 512-byte header block, for the fields tarfile reads differently from Go."""

    raw: bytes

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        # Go returns a global header as an entry of its own and reads 'X' as an unknown type,
        # where tarfile folds both into the following entries.
        if buf[156:157] in (tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
            raise tarfile.HeaderError("a global or Solaris extended header")
        info = super().frombuf(buf, encoding, errors)
        info.raw = bytes(buf)
        return info


@dataclass(frozen=True, slots=True)
class _Meta:
    uid: int
    gid: int
    mode: int
    times: tuple[int, int]  # atime, mtime in ns
    xattrs: tuple[tuple[bytes, bytes], ...]


class _Extraction:
    """One layer being applied: the tar, the directory, and what has been learnt of it so far."""

    def __init__(self, source: int, root: bytes, *, lowers: list[bytes]) -> None:
        self._source = source
        self._size = os.fstat(source).st_size
        self._root = root
        self._lowers = lowers
        self._overlay = bool(lowers)
        self._parents: dict[bytes, bytes] = {}  # parent name -> resolved path; only this layer writes here
        self._present: set[bytes] = {root}  # directories known to exist
        self._unpacked: set[bytes] = set()  # naive whiteouts: what an opaque marker keeps
        self._dirs: list[tuple[bytes, tuple[int, int]]] = []
        self._copy = self._copy_file_range
        self._written = 0

    def run(self) -> tuple[int, int]:
        entries = 0
        if self._size == 0:  # Go reads an empty stream as an empty archive
            return 0, 0
        with open(self._source, "rb", buffering=1 << 16, closefd=False) as stream:
            archive = _parsed(
                lambda: tarfile.TarFile(
                    fileobj=stream, mode="r", tarinfo=_RawTarInfo, encoding="utf-8", errors="surrogateescape"
                )
            )
            while (member := _parsed(archive.next)) is not None:
                archive.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every member
                entries += 1
                assert isinstance(member, _RawTarInfo)
                try:
                    self._apply(member)
                except OSError as error:
                    raise LayerRefused(f"entry {member.name!r}: {error}") from error
            end = archive.offset
        try:
            self._check_end(end)
            self._set_directory_times()
        except OSError as error:
            raise LayerRefused(str(error)) from error
        return entries, self._written

    def _apply(self, member: _RawTarInfo) -> None:
        _check_header(member)
        meta = _meta(member)
        name = _relative(member.name)
        if name is None:  # the root: containerd ignores it
            return
        parent_name, _, base = name.rpartition(b"/")
        if name.startswith(_WHITEOUT_META) and name != _OPAQUE:
            raise LayerRefused(f"AUFS metadata {member.name!r}: containerd versions differ on it")
        parent = self._resolve(parent_name)
        if parent != self._root:
            self._make_parents(parent)
        if base.startswith(_WHITEOUT):
            self._whiteout(parent, base, meta)
            return
        path = parent + b"/" + base
        kind = member.type
        if member.sparse is not None:
            raise LayerRefused(f"entry {member.name!r}: sparse files are not applied here")
        if kind == tarfile.DIRTYPE:
            self._directory(path, meta)
            self._dirs.append((name, meta.times))
        elif kind in (tarfile.REGTYPE, tarfile.AREGTYPE):
            self._regular(path, member, meta)
        elif kind == tarfile.SYMTYPE:
            self._symlink(path, member, meta)
        elif kind == tarfile.LNKTYPE:
            self._hardlink(path, member, meta)
        elif kind in _NODE_TYPES:
            self._node(path, member, meta)
        else:
            raise LayerRefused(f"entry {member.name!r}: type {kind!r} is not applied here")
        if not self._overlay:
            self._unpacked.add(path)

    # -- paths ----------------------------------------------------------------------------------

    def _resolve(self, name: bytes) -> bytes:
        if not name:
            return self._root
        found = self._parents.get(name)
        if found is None:
            found = self._parents[name] = _resolve_inside(self._root, name, confine=False)
        return found

    def _forget_paths(self) -> None:
        """After a symlink appears or anything is removed, earlier resolutions may be wrong."""
        self._parents.clear()
        self._present = {self._root}

    def _make_parents(self, path: bytes) -> None:
        if path in self._present:
            return
        try:
            found = os.lstat(path)
        except FileNotFoundError:
            parent = posixpath.dirname(path)
            if parent != self._root:
                self._make_parents(parent)
            os.mkdir(path, 0o755)
            os.chmod(path, 0o755)
            if self._overlay:
                self._copy_lower_directory(path)
        else:
            if not stat.S_ISDIR(found.st_mode):
                raise LayerRefused(f"{_shown(path, self._root)} is not a directory")
        self._present.add(path)

    def _copy_lower_directory(self, path: bytes) -> None:
        """Owner, mode, times and xattrs of the nearest lower directory at the same path (mkparent)."""
        name = path[len(self._root) + 1 :]
        for lower in self._lowers:
            source = _resolve_inside(lower, name, confine=True)
            try:
                found = os.lstat(source)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(found.st_mode):
                return
            os.lchown(path, found.st_uid, found.st_gid)
            os.chmod(path, stat.S_IMODE(found.st_mode))
            os.utime(path, ns=(found.st_atime_ns, found.st_mtime_ns), follow_symlinks=False)
            try:
                names = os.listxattr(source, follow_symlinks=False)
            except OSError as error:
                if error.errno in (errno.ENOTSUP, errno.ENODATA):
                    return
                raise
            for xattr in names:
                if xattr.startswith("trusted."):
                    continue
                try:
                    value = os.getxattr(source, xattr, follow_symlinks=False)
                    os.setxattr(path, xattr, value, os.XATTR_CREATE, follow_symlinks=False)
                except OSError as error:
                    if error.errno not in (errno.ENOTSUP, errno.ENODATA, errno.EEXIST):
                        raise
            return

    def _remove(self, path: bytes) -> None:
        """Whatever is at ``path`` goes (RemoveAll); a symlink is removed, never followed."""
        try:
            found = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(found.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        self._forget_paths()

    # -- whiteouts ------------------------------------------------------------------------------

    def _whiteout(self, parent: bytes, base: bytes, meta: _Meta) -> None:
        if base == _OPAQUE:
            if self._overlay:
                os.setxattr(parent, "trusted.overlay.opaque", b"y", follow_symlinks=False)
            else:
                self._remove_not_unpacked(parent)
            return
        if base.startswith(_WHITEOUT_META):
            raise LayerRefused(f"AUFS metadata {base!r}: containerd versions differ on it")
        hidden = base[len(_WHITEOUT) :]
        if hidden in (b"", b".", b".."):
            raise LayerRefused(f"invalid whiteout name {base!r}")
        path = parent + b"/" + hidden
        if self._overlay:
            os.mknod(path, stat.S_IFCHR, 0)  # over an entry of this layer: EEXIST, as in containerd
            os.lchown(path, meta.uid, meta.gid)
        else:
            self._remove(path)

    def _remove_not_unpacked(self, directory: bytes) -> None:
        """The naive opaque marker: everything under ``directory`` this layer did not unpack goes."""
        with os.scandir(directory) as listing:
            found = list(listing)
        for entry in found:
            if entry.path not in self._unpacked:
                self._remove(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                self._remove_not_unpacked(entry.path)

    # -- entries --------------------------------------------------------------------------------

    def _directory(self, path: bytes, meta: _Meta) -> None:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                self._remove(path)
                os.mkdir(path, 0o700)
        os.lchown(path, meta.uid, meta.gid)
        _set_xattrs(path, meta.xattrs, special=False)
        os.chmod(path, meta.mode)
        self._present.add(path)  # times: at the end, after its children

    def _regular(self, path: bytes, member: _RawTarInfo, meta: _Meta) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            target = os.open(path, flags, 0o600)
        except FileExistsError:
            self._remove(path)
            target = os.open(path, flags, 0o600)
        try:
            if member.size:
                self._copy_data(target, member.offset_data, member.size)
            os.fchown(target, meta.uid, meta.gid)
            for xattr, value in meta.xattrs:  # after the chown, which drops security.capability
                try:
                    os.setxattr(target, xattr, value)
                except OSError as error:
                    if error.errno != errno.ENOTSUP:
                        raise
            os.fchmod(target, meta.mode)  # after the chown, which drops setuid/setgid
            os.utime(target, ns=meta.times)
        finally:
            os.close(target)

    def _symlink(self, path: bytes, member: _RawTarInfo, meta: _Meta) -> None:
        target = _encoded(member.linkname)
        try:
            os.symlink(target, path)
        except FileExistsError:
            self._remove(path)
            os.symlink(target, path)
        self._forget_paths()
        os.lchown(path, meta.uid, meta.gid)
        _set_xattrs(path, meta.xattrs, special=True)
        os.utime(path, ns=meta.times, follow_symlinks=False)

    def _hardlink(self, path: bytes, member: _RawTarInfo, meta: _Meta) -> None:
        linkname = _encoded(member.linkname)
        if b".." in linkname.split(b"/"):
            raise LayerRefused(f"hard link {member.name!r} -> {member.linkname!r} has a '..'")
        name = _relative(member.linkname)
        if name is None:
            raise LayerRefused(f"hard link {member.name!r} to the root")
        parent_name, _, base = name.rpartition(b"/")
        source = self._resolve(parent_name) + b"/" + base
        try:
            found = os.lstat(source)
        except (FileNotFoundError, NotADirectoryError):
            raise LayerRefused(
                f"hard link {member.name!r} -> {member.linkname!r}: no such entry in this layer"
            ) from None
        if stat.S_ISDIR(found.st_mode):
            raise LayerRefused(f"hard link {member.name!r} -> {member.linkname!r} is a directory")
        try:
            os.link(source, path, follow_symlinks=False)
        except FileExistsError:
            self._remove(path)
            os.link(source, path, follow_symlinks=False)
        # The metadata is the shared inode's, as with containerd's Lchown/Lchmod on the new name.
        os.lchown(path, meta.uid, meta.gid)
        kind = stat.S_IFMT(found.st_mode)
        _set_xattrs(path, meta.xattrs, special=kind != stat.S_IFREG)
        if kind == stat.S_IFLNK:
            self._forget_paths()
        else:
            os.chmod(path, meta.mode)  # not a symlink: nothing to follow
        os.utime(path, ns=meta.times, follow_symlinks=False)

    def _node(self, path: bytes, member: _RawTarInfo, meta: _Meta) -> None:
        if not (0 <= member.devmajor <= 2**32 - 1 and 0 <= member.devminor <= 2**32 - 1):
            raise LayerRefused(f"entry {member.name!r}: device {member.devmajor}:{member.devminor}")
        mode = _NODE_TYPES[member.type] | meta.mode
        device = os.makedev(member.devmajor, member.devminor)
        try:
            os.mknod(path, mode, device)
        except FileExistsError:
            self._remove(path)
            os.mknod(path, mode, device)
        os.lchown(path, meta.uid, meta.gid)
        _set_xattrs(path, meta.xattrs, special=True)
        os.chmod(path, meta.mode)
        os.utime(path, ns=meta.times, follow_symlinks=False)

    # -- data -----------------------------------------------------------------------------------

    def _copy_data(self, target: int, offset: int, size: int) -> None:
        end = offset + size
        if end > self._size:
            raise LayerRefused(f"the tar ends inside a file's data (at {self._size}, data to {end})")
        while offset < end:
            count = self._copy(target, offset, min(end - offset, _COPY_CHUNK))
            if count <= 0:
                raise LayerRefused(f"the tar's data ended early at {offset}")
            offset += count
        self._written += size

    def _copy_file_range(self, target: int, offset: int, count: int) -> int:
        try:
            return os.copy_file_range(self._source, target, count, offset)
        except OSError as error:  # across filesystems (EXDEV) or not supported by one of them
            if error.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
        self._copy = self._sendfile
        return self._sendfile(target, offset, count)

    def _sendfile(self, target: int, offset: int, count: int) -> int:
        try:
            return os.sendfile(target, self._source, offset, count)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
        self._copy = self._read_write
        return self._read_write(target, offset, count)

    def _read_write(self, target: int, offset: int, count: int) -> int:
        data = os.pread(self._source, min(count, 1 << 20), offset)
        view = memoryview(data)
        while view:
            view = view[os.write(target, view) :]
        return len(data)

    # -- the end --------------------------------------------------------------------------------

    def _check_end(self, offset: int) -> None:
        """tarfile stops quietly at a bad header or a truncated block; Go's reader fails on both."""
        first = os.pread(self._source, 512, offset)
        if not first:
            return
        if len(first) < 512:
            raise LayerRefused(f"the tar ends inside a header at {offset}")
        if first.count(0) != 512:
            raise LayerRefused(f"an invalid header at {offset}")
        second = os.pread(self._source, 512, offset + 512)
        if second and (len(second) < 512 or second.count(0) != 512):
            raise LayerRefused(f"a single zero block then data at {offset}")

    def _set_directory_times(self) -> None:
        for name, times in self._dirs:
            parent_name, _, base = name.rpartition(b"/")
            path = self._resolve(parent_name) + b"/" + base
            try:
                found = os.lstat(path)
            except FileNotFoundError:
                raise LayerRefused(f"directory {name!r} was removed by a later entry") from None
            if stat.S_ISLNK(found.st_mode):
                raise LayerRefused(f"directory {name!r} was replaced by a symlink")
            os.utime(path, ns=times, follow_symlinks=False)


def _parsed(read: Callable[[], _T]) -> _T:
    """Call into tarfile, which meets hostile bytes with ValueError, IndexError and the like too."""
    try:
        return read()
    except Exception as error:
        raise LayerRefused(f"a tar Go's archive/tar may read otherwise: {error!r}") from error


def _resolve_inside(root: bytes, name: bytes, *, confine: bool) -> bytes:
    """``root/name`` with every symlink followed inside ``root`` (continuity's fs.RootPath).

    Missing components are taken as they are. With ``confine`` (a lower directory, only read) an
    absolute target starts again at ``root`` and ``..`` stops there, as containerd does; without
    it (the directory being written) either is refused.
    """
    pending = name.split(b"/")[::-1]
    done: list[bytes] = []
    links = 0
    while pending:
        part = pending.pop()
        if part in (b"", b"."):
            continue
        path = root + b"/" + b"/".join([*done, part])
        try:
            found = os.lstat(path)
        except FileNotFoundError:
            done.append(part)
            continue
        if not stat.S_ISLNK(found.st_mode):
            done.append(part)
            continue
        links += 1
        if links > _MAX_LINKS:
            raise LayerRefused(f"too many symlinks resolving {name!r}")
        target = os.readlink(path)
        if confine:
            joined = target if target.startswith(b"/") else b"/".join([*done, target])
            joined = posixpath.normpath(b"/" + joined.lstrip(b"/")).lstrip(b"/")
        else:
            if target.startswith(b"/"):
                raise LayerRefused(f"{name!r} goes through the absolute symlink {part!r} -> {target!r}")
            joined = posixpath.normpath(b"/".join([*done, target]))
            if joined == b".." or joined.startswith(b"../"):
                raise LayerRefused(f"{name!r} goes through the symlink {part!r} -> {target!r}, outside")
        done = []
        pending.extend(piece for piece in joined.split(b"/")[::-1] if piece not in (b"", b"."))
    return root + b"/" + b"/".join(done) if done else root


def _relative(name: str) -> bytes | None:
    """The entry's path relative to the root, cleaned as Go's filepath.Clean; None for the root."""
    path = posixpath.normpath(_encoded(name).lstrip(b"/"))
    if path == b".":
        return None
    if path == b".." or path.startswith(b"../"):
        raise LayerRefused(f"{name!r} climbs out of the layer")
    return path


def _encoded(name: str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise LayerRefused(f"{name!r} has a NUL byte")
    return raw


def _shown(path: bytes, root: bytes) -> str:
    return os.fsdecode(path[len(root) + 1 :] or b".")


def _check_header(member: _RawTarInfo) -> None:
    """Refuse the header layouts where Python's tarfile and Go's archive/tar read different entries."""
    raw = member.raw
    magic = raw[257:263]
    if magic == b"ustar\0":
        if raw[508:512] == b"tar\0":
            raise LayerRefused(f"entry {member.name!r}: STAR header")
    elif magic == b"ustar " and raw[263:265] == b" \0":
        if raw[345] != 0:  # GNU atime there; tarfile takes it for a name prefix
            raise LayerRefused(f"entry {member.name!r}: GNU header with atime/ctime")
    elif raw[329:500].count(0) != 171:  # V7: Go ignores device numbers and prefix
        raise LayerRefused(f"entry {member.name!r}: V7 header with ustar fields")
    if raw[156] == 0 and member.offset != member.offset_data - 512:
        # An old-style regular file whose name comes from an extension: Go and tarfile decide
        # "directory or file" from different names.
        raise LayerRefused(f"entry {member.name!r}: extended name on an old-style regular file")


def _meta(member: _RawTarInfo) -> _Meta:
    records = member.pax_headers
    uid, gid = member.uid, member.gid
    mtime = member.mtime * _NS if isinstance(member.mtime, int) else None
    atime: int | None = None
    xattrs: list[tuple[bytes, bytes]] = []
    if records:
        for key in ("uid", "gid", "size"):
            if key in records:
                _pax_int(member, key, records[key])
        if "ctime" in records:
            _pax_time(member, "ctime", records["ctime"])
        if "atime" in records:
            atime = _pax_time(member, "atime", records["atime"])
        if "mtime" in records:
            mtime = _pax_time(member, "mtime", records["mtime"])
        for key, value in records.items():
            if key.startswith(_XATTR_PREFIX):
                xattr = key[len(_XATTR_PREFIX) :].encode("utf-8", "surrogateescape")
                if not xattr.startswith(b"trusted."):  # containerd: ENOTSUP, ignored
                    xattrs.append((xattr, value.encode("utf-8", "surrogateescape")))
    if mtime is None:
        raise LayerRefused(f"entry {member.name!r}: no usable mtime")
    if not (0 <= uid <= _MAX_ID and 0 <= gid <= _MAX_ID):
        raise LayerRefused(f"entry {member.name!r}: owner {uid}:{gid}")
    latest = mtime if atime is None or atime < mtime else atime
    return _Meta(
        uid=uid,
        gid=gid,
        mode=member.mode & 0o7777,
        times=(_bounded(latest), _bounded(mtime)),
        xattrs=tuple(xattrs),
    )


def _bounded(ns: int) -> int:
    return ns if 0 <= ns <= _MAX_NS else 0


def _pax_int(member: tarfile.TarInfo, key: str, value: str) -> int:
    """strconv.ParseInt(value, 10, 64), as Go's reader parses PAX uid, gid and size."""
    if not _GO_INT.fullmatch(value) or not -(2**63) <= int(value) < 2**63:
        raise LayerRefused(f"entry {member.name!r}: PAX {key}={value[:40]!r}")
    return int(value)


def _pax_time(member: tarfile.TarInfo, key: str, value: str) -> int:
    """Go's parsePAXTime in nanoseconds: seconds, then up to 9 fraction digits (more are cut)."""
    seconds, _, fraction = value.partition(".")
    whole = _pax_int(member, key, seconds)
    if not fraction:
        return whole * _NS
    if not fraction.isascii() or not fraction.isdigit():
        raise LayerRefused(f"entry {member.name!r}: PAX {key}={value[:40]!r}")
    nanos = int(fraction[:9].ljust(9, "0"))
    return whole * _NS - nanos if seconds.startswith("-") else whole * _NS + nanos


def _set_xattrs(path: bytes, xattrs: tuple[tuple[bytes, bytes], ...], *, special: bool) -> None:
    for xattr, value in xattrs:
        try:
            os.setxattr(path, xattr, value, follow_symlinks=False)
        except OSError as error:
            if error.errno == errno.ENOTSUP:
                continue
            if error.errno == errno.EPERM and special and xattr.startswith(b"user."):
                continue  # user.* only exists on regular files and directories
            raise
