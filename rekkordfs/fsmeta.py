"""Local filesystem metadata <-> directory entries (used by save and restore)."""

from __future__ import annotations

import errno
import os
import stat

from .format import Entry, EntryKind

_KINDS = {
    stat.S_IFREG: EntryKind.FILE,
    stat.S_IFDIR: EntryKind.DIRECTORY,
    stat.S_IFLNK: EntryKind.SYMLINK,
    stat.S_IFIFO: EntryKind.FIFO,
    stat.S_IFCHR: EntryKind.CHAR_DEVICE,
    stat.S_IFBLK: EntryKind.BLOCK_DEVICE,
    stat.S_IFSOCK: EntryKind.SOCKET,
}

FILE_TYPE_BITS = {kind: bits for bits, kind in _KINDS.items()}


def entry_from_stat(name: bytes, st: os.stat_result, path: bytes) -> Entry | None:
    """An entry with the metadata of st; None for file types we do not store."""
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        return None
    entry = Entry(
        kind=kind,
        name=name,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        atime_ns=st.st_atime_ns,
        ctime_ns=st.st_ctime_ns,
        size=st.st_size if kind == EntryKind.FILE else 0,
        nlink=st.st_nlink if kind == EntryKind.FILE else 1,
    )
    if kind == EntryKind.SYMLINK:
        entry.target = os.readlink(path)
        entry.size = len(entry.target)
    elif kind in (EntryKind.CHAR_DEVICE, EntryKind.BLOCK_DEVICE):
        entry.rdev = st.st_rdev
    return entry


_UNSUPPORTED = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA, errno.EPERM, errno.EACCES, errno.ENOENT}


def read_xattrs(path: bytes) -> list[tuple[bytes, bytes]]:
    """Extended attributes of path (not following symlinks), sorted by name."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return []
        raise
    result = []
    for name in sorted(names):
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                continue
            raise
        result.append((os.fsencode(name), value))
    return result
