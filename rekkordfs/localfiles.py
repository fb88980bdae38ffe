"""Reading local files for a save: without following symlinks, blocking on
FIFOs or touching access times, with as few system calls as possible, and
only from the folders the save's walker listed. Light to import: the save's
worker processes (prepworker.py) use it too.

Why folders are checked: a file is read a moment after its folder was
listed, by its name in that folder. Whoever can write to a folder on the
way (another user's home, in a save of /home) could swap it for a symlink
in between, and a read by path would then follow it and store, say,
/etc/shadow's content under their file's name. A folder is opened by path
and must be the very folder the walker listed (same device and inode), and
the file is opened by name in it with O_NOFOLLOW."""

from __future__ import annotations

import errno
import io
import os
import stat

from .fsmeta import read_xattrs
from .tuning import SMALL_FILE

# a folder a save reads from: its path and the (st_dev, st_ino) the walker listed
FolderRef = tuple[bytes, int, int]

_NOATIME = getattr(os, "O_NOATIME", 0)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | _NOATIME
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def open_folder(path: bytes, dev: int, ino: int) -> int:
    """A descriptor of the folder at path, which must be the one whose lstat
    gave (dev, ino): a folder swapped (itself or one on its way) since is
    refused. The caller closes it."""
    fd = os.open(path or b"/", _FOLDER_FLAGS)
    st = os.fstat(fd)
    if st.st_ino != ino or st.st_dev != dev:
        os.close(fd)
        raise OSError(errno.ESTALE, "its folder was replaced since it was listed")
    return fd


class FolderOpener:
    """Opens files by name in folders the walker listed (open_folder()),
    keeping the last folder open: a batch's files come folder by folder.
    A folder that cannot be opened fails each of its files with its error."""

    def __init__(self) -> None:
        self._folder: FolderRef | None = None
        self._fd = -1
        self._error: OSError | None = None

    def open(self, folder: FolderRef, name: bytes) -> int:
        """A descriptor of the regular file name in folder, opened as
        open_file() opens one (the caller closes it)."""
        if folder != self._folder:
            self.close()
            self._folder = folder
            try:
                self._fd = open_folder(*folder)
            except OSError as exc:
                self._error = exc
        if self._error is not None:
            raise OSError(self._error.errno, self._error.strerror)
        return _open_read(name, self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._folder, self._fd, self._error = None, -1, None


def open_in_folder(folder: FolderRef, name: bytes) -> io.FileIO:
    """The regular file name in folder (FolderOpener), for reading."""
    opener = FolderOpener()
    try:
        return regular_handle(opener.open(folder, name))
    finally:
        opener.close()


def open_file(path: bytes | str | os.PathLike[str]) -> int:
    """A descriptor for reading the file at path: a symlink is not followed
    (ELOOP), a FIFO does not block, its access time is left alone when we
    own it. For files of our own (the staging area's); a save opens through
    a FolderOpener."""
    return _open_read(path, None)


def regular_handle(fd: int) -> io.FileIO:
    """An unbuffered file object of fd, which must be a regular file (it is
    closed otherwise)."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "no longer a regular file")
    return os.fdopen(fd, "rb", buffering=0)


def read_small(fd: int, limit: int | None = SMALL_FILE) -> tuple[bytes | None, os.stat_result]:
    """The content of the small regular file open as fd and its fstat, with
    few system calls (fstat, one read: each lets go of the GIL). (None, stat)
    when it is over `limit` bytes; it is read whatever its size when limit is
    None. The caller closes fd."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "no longer a regular file")
    if limit is not None and st.st_size > limit:
        return None, st
    return _read_to_end(fd, st.st_size), st


def read_expected(fd: int, size: int, xattrs: int) -> tuple[bytes, list[tuple[bytes, bytes]] | None]:
    """The content of a small file whose lstat (the save's walker) said it is
    a regular file of `size` bytes, open as fd, and its extended attributes
    if xattrs is not 0 (read after the content, through the open file): one
    read, flistxattr. No fstat unless the read says otherwise (a fstat per
    file was a tenth of a save worker's system calls): a file that became
    something else meanwhile is refused as read_small() refuses it, as it
    gives more or fewer bytes than expected (a FIFO none, a device more).
    One replaced by a regular file of the same size is read as it is now:
    its content is never older than the walker's lstat, so a stat row made
    from that lstat is at worst one the next save does not trust. The caller
    closes fd."""
    data = os.read(fd, size + 1)  # a short read is the end of a regular file
    if len(data) != size:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "no longer a regular file")
        if len(data) > size:
            data = _read_rest(fd, data)
    return data, read_xattrs(fd) if xattrs else None


def _read_to_end(fd: int, size: int) -> bytes:
    data = os.read(fd, size + 1)  # a short read is the end of a regular file
    return _read_rest(fd, data) if len(data) > size else data


def _read_rest(fd: int, head: bytes) -> bytes:
    """head and the rest of a file that grew since its size was taken."""
    pieces = [head]
    while piece := os.read(fd, 1 << 20):
        pieces.append(piece)
    return b"".join(pieces)


def _open_read(path: bytes | str | os.PathLike[str], folder: int | None) -> int:
    try:
        return os.open(path, _READ_FLAGS, dir_fd=folder)
    except PermissionError:
        if not _NOATIME:
            raise
        return os.open(path, _READ_FLAGS & ~_NOATIME, dir_fd=folder)  # O_NOATIME needs ownership
