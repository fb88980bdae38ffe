"""Writing into a restore's destination without ever harming it: every path
below DEST is opened one component at a time relative to its parent, never
following a symlink; what replaces an existing entry is made under a
temporary name and renamed over it once complete."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable

from .format import Entry, EntryKind
from .fsmeta import ACL_DEFAULT, FILE_TYPE_BITS

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
IS_ROOT = os.geteuid() == 0
TEMP_PREFIX = b".rekkord-restore-"
FOLDER_FDS = 256  # folders a restore keeps open (well under the usual limit of 1,024 descriptors)


class FolderFds:
    """Descriptors of DEST's folders, each opened once (one component at a time,
    never following a symlink) and lent out as duplicates: a restore's batches of
    small files mix folders, and walking each path again per batch cost more
    system calls than writing the files. Bounded, least recently used out first;
    a folder kept open stays the folder that was opened, whatever is renamed."""

    def __init__(self, dest_fd: int, limit: int = FOLDER_FDS) -> None:
        self._fds: OrderedDict[tuple[bytes, ...], int] = OrderedDict({(): os.dup(dest_fd)})
        self._limit = limit
        self._lock = threading.Lock()  # restore workers share it

    def open_parent(self, parts: tuple[bytes, ...]) -> int:
        """A new descriptor (the caller closes it) of the folder holding parts[-1]."""
        return self.open_folder(parts[:-1])

    def open_folder(self, folder: tuple[bytes, ...]) -> int:
        with self._lock:
            known = len(folder)
            while folder[:known] not in self._fds:  # () is always there
                known -= 1
            fd = self._fds[folder[:known]]
            self._fds.move_to_end(folder[:known])
            for depth in range(known + 1, len(folder) + 1):  # each level kept: siblings share them
                fd = self._fds[folder[:depth]] = os.open(folder[depth - 1], DIR_FLAGS, dir_fd=fd)
            lent = os.dup(fd)
            while len(self._fds) > self._limit:
                os.close(self._fds.pop(next(k for k in self._fds if k)))
            return lent

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def temp_name() -> bytes:
    return TEMP_PREFIX + os.urandom(6).hex().encode()


def create_new(dir_fd: int, name: bytes, mode: int = 0o600) -> tuple[int, bytes | None]:
    """A new empty file for name: (fd, None) when the name was free, else
    (fd, temporary name) to be put in place by move_into_place() once complete.
    mode: permission bits to create it with (the umask applies)."""
    try:
        return os.open(name, _CREATE, mode, dir_fd=dir_fd), None
    except FileExistsError:
        temp = temp_name()
        return os.open(temp, _CREATE, mode, dir_fd=dir_fd), temp


def read_umask() -> int | None:
    """The process's umask, read without setting it (os.umask() sets it for
    every thread at once); None when the kernel does not tell."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


# (owner, group, permission bits or -1 for unknown) a file has since its creation
Made = tuple[int, int, int]


class NewFiles:
    """What a file created below DEST has before its metadata is applied, so
    apply_metadata() skips the chown and chmod that would change nothing
    (they were a third of a small file's system calls). A file is created
    with its final permission bits when the umask keeps them all; set-id and
    sticky bits only ever come from the chmod after the chown."""

    def __init__(self) -> None:
        self.umask = read_umask()
        self.uid = os.geteuid()
        self.gid = os.getegid()

    def folder(self, dir_fd: int) -> tuple[int, int | None]:
        """(the group a file created in the folder gets, the umask that applies
        there, or None when unknown: a default ACL masks the mode instead)."""
        st = os.fstat(dir_fd)
        gid = st.st_gid if st.st_mode & stat.S_ISGID else self.gid
        if self.umask is None:
            return gid, None
        try:
            os.getxattr(dir_fd, ACL_DEFAULT)
            return gid, None
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                return gid, self.umask
            return gid, None  # cannot tell (EACCES, EIO...): chmod sets the mode, as before

    def create(self, dir_fd: int, name: bytes, entry: Entry, folder: tuple[int, int | None]
               ) -> tuple[int, bytes | None, Made]:
        """create_new() for entry in a folder (folder(): what it gives new
        files); also what the file has of entry's metadata."""
        gid, umask = folder
        bits = entry.mode & 0o777
        if umask is None or bits & umask or bits != entry.mode:
            bits = -1  # created 0600 (less the umask): chmod sets the mode
        fd, temp = create_new(dir_fd, name, 0o600 if bits < 0 else bits)
        return fd, temp, (self.uid, gid, bits)



def move_into_place(dir_fd: int, temp: bytes, name: bytes) -> None:
    """Rename temp over name; a folder standing there goes only now."""
    try:
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except (IsADirectoryError, OSError) as exc:
        if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
            raise
        shutil.rmtree(name, dir_fd=dir_fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def remove_quietly(dir_fd: int, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def name_taken(dir_fd: int, name: bytes) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


def clear_name(dir_fd: int, name: bytes, keep_dir: bool) -> None:
    """Remove what stands at name unless it is a directory we may keep."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if keep_dir:
            return
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


# Extended attributes that cannot be set for these reasons are skipped silently:
# the destination has no xattrs at all, or a namespace we may not write (trusted.*
# when not root). Any other failure (too large for this filesystem...) is warned
# about, naming the file and the attribute, and the restore goes on, as rsync -X does.
_XATTR_SILENT = (errno.ENOTSUP, errno.EPERM, errno.EACCES)

XattrFailed = Callable[[bytes, OSError], None]


def set_xattrs(set_one: Callable[[bytes, bytes], None], entry: Entry, failed: XattrFailed) -> None:
    for name, value in entry.xattrs:
        try:
            set_one(name, value)
        except OSError as exc:
            if exc.errno not in _XATTR_SILENT:
                failed(name, exc)


def apply_metadata(fd: int, entry: Entry, xattr_failed: XattrFailed, made: Made | None = None) -> None:
    """Owner, mode, xattrs and times on an open file or directory (made: what
    NewFiles.create() says the file has already)."""
    if IS_ROOT and (made is None or made[0] != entry.uid or made[1] != entry.gid):
        os.chown(fd, entry.uid, entry.gid)
    if made is None or made[2] != entry.mode:
        os.chmod(fd, entry.mode)  # after chown, which clears set-id bits
    set_xattrs(lambda name, value: os.setxattr(fd, name, value), entry, xattr_failed)
    os.utime(fd, ns=(entry.atime_ns, entry.mtime_ns))


def make_special(folders: FolderFds, parts: tuple[bytes, ...], entry: Entry, xattr_failed: XattrFailed) -> None:
    """A symlink, FIFO or device node at parts below DEST, with its metadata;
    made under a temporary name when the name is taken, then renamed over it."""
    fd = folders.open_parent(parts)
    name = parts[-1]
    temp = temp_name() if name_taken(fd, name) else None
    made = temp or name
    try:
        if entry.kind == EntryKind.SYMLINK:
            assert entry.target is not None
            os.symlink(entry.target, made, dir_fd=fd)
        elif entry.kind == EntryKind.FIFO:
            os.mkfifo(made, entry.mode, dir_fd=fd)
        else:
            os.mknod(made, entry.mode | FILE_TYPE_BITS[entry.kind], entry.rdev, dir_fd=fd)
        try:
            _apply_path_metadata(fd, made, entry, xattr_failed)
            if temp is not None:
                move_into_place(fd, temp, name)
        except BaseException:
            if temp is not None:
                remove_quietly(fd, temp)
            raise
    finally:
        os.close(fd)


def _apply_path_metadata(dir_fd: int, name: bytes, entry: Entry, xattr_failed: XattrFailed) -> None:
    """Metadata of a symlink or special file, never following links."""
    if IS_ROOT:
        os.chown(name, entry.uid, entry.gid, dir_fd=dir_fd, follow_symlinks=False)
    if entry.kind != EntryKind.SYMLINK:
        os.chmod(name, entry.mode, dir_fd=dir_fd)
    proc_path = f"/proc/self/fd/{dir_fd}/".encode() + name
    set_xattrs(lambda xname, value: os.setxattr(proc_path, xname, value, follow_symlinks=False), entry,
               xattr_failed)
    os.utime(name, ns=(entry.atime_ns, entry.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
