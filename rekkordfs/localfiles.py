"""Reading local files for a save: without following symlinks, blocking on
FIFOs or touching access times, with as few system calls as possible. Light
to import: the save's worker processes (prepworker.py) use it too."""

from __future__ import annotations

import errno
import io
import os
import stat

from .fsmeta import read_xattrs
from .tuning import SMALL_FILE


def open_regular(path: bytes | str | os.PathLike[str]) -> io.FileIO:
    """Open a file for reading without following symlinks or blocking on FIFOs."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0)
    try:
        fd = os.open(path, flags)
    except PermissionError:
        fd = os.open(path, flags & ~getattr(os, "O_NOATIME", 0))  # O_NOATIME needs ownership
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "no longer a regular file")
    return os.fdopen(fd, "rb", buffering=0)


def read_small(path: bytes | str, limit: int | None = SMALL_FILE) -> tuple[bytes | None, os.stat_result]:
    """The content of a small regular file and its fstat, with few system calls
    (open, fstat, one read, close: each lets go of the GIL). (None, stat) when it
    is over `limit` bytes; it is read whatever its size when limit is None."""
    fd = _open_read(path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "no longer a regular file")
        if limit is not None and st.st_size > limit:
            return None, st
        data = os.read(fd, st.st_size + 1)  # a short read is the end of a regular file
        if len(data) > st.st_size:  # it grew meanwhile: read to its end
            pieces = [data]
            while piece := os.read(fd, 1 << 20):
                pieces.append(piece)
            data = b"".join(pieces)
        return data, st
    finally:
        os.close(fd)


def read_expected(path: bytes, size: int, xattrs: int) -> tuple[bytes, list[tuple[bytes, bytes]] | None]:
    """The content of a small file whose lstat (the save's walker) said it is
    a regular file of `size` bytes, and its extended attributes if xattrs is
    not 0 (read after the content, through the open file): open, one read,
    flistxattr, close. No fstat unless the read says otherwise (a fstat per
    file was a tenth of a save worker's system calls): a file that became
    something else meanwhile is refused as read_small() refuses it, as it
    gives more or fewer bytes than expected (a FIFO none, a device more).
    One replaced by a regular file of the same size is read as it is now:
    its content is never older than the walker's lstat, so a stat row made
    from that lstat is at worst one the next save does not trust."""
    fd = _open_read(path)
    try:
        data = os.read(fd, size + 1)  # a short read is the end of a regular file
        if len(data) != size:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "no longer a regular file")
            if len(data) > size:  # it grew meanwhile: read to its end
                pieces = [data]
                while piece := os.read(fd, 1 << 20):
                    pieces.append(piece)
                data = b"".join(pieces)
        return data, read_xattrs(fd) if xattrs else None
    finally:
        os.close(fd)


def _open_read(path: bytes | str) -> int:
    try:
        return os.open(path, _READ_FLAGS)
    except PermissionError:
        if not _NOATIME:
            raise
        return os.open(path, _READ_FLAGS & ~_NOATIME)  # O_NOATIME needs ownership


_NOATIME = getattr(os, "O_NOATIME", 0)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | _NOATIME
