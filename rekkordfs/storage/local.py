"""Repository in a local folder.

Objects are written to tmp/ first and hard-linked to their final name: link()
fails with EEXIST instead of replacing, so nothing stored is ever overwritten
and a crash never leaves a half-written object under a real name.

flush() makes what was written since the last flush durable: each object and
its folder is fsync()ed, so other files on the same disk (the mount's staged
data, other programs' writes) are not written out with it. Large objects start
their write-back as soon as they are written, and every object is fsynced in
the background as it comes (localsync.py): a flush waits for the last few.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
from collections.abc import Callable
from typing import TypeVar

import trio

from ..errors import ObjectMissing, StorageError, TransientStorageError
from ..rawruns import pread_ranges
from ..tasks import task_group
from ..tuning import local_io
from .base import ObjectInfo, Storage
from .localsync import Unsynced, fsync_path

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000


def _syncfs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


SYNC_FILE_RANGE_WRITE = 2
EARLY_WRITEBACK = 1 << 20  # objects from this size (packs) start their write-back at once
SYNCFS_ABOVE = 4096  # flushing more objects than this: one syncfs() costs less


def _start_writeback(fd: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): queue the file's pages for disk, without waiting."""
    _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), SYNC_FILE_RANGE_WRITE)


Data = bytes | bytearray | memoryview | list[bytes | bytearray]  # a list: its pieces one after another
IOV_MAX = 1024  # buffers one writev() takes (Linux)


def _size(data: Data) -> int:
    return sum(len(piece) for piece in data) if isinstance(data, list) else len(data)


def _write_all(fd: int, data: Data) -> None:
    if not isinstance(data, list):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        return
    views = [memoryview(piece) for piece in data if piece]
    first = 0  # views before it are written (a pack of small blobs has thousands)
    while first < len(views):
        written = os.writev(fd, views[first:first + IOV_MAX])
        while first < len(views) and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]


class _LinkUnsupported(Exception):
    pass


def _link_fd(fd: int, final: str) -> None:
    """linkat(fd, "", AT_EMPTY_PATH): name an O_TMPFILE file; EEXIST if taken."""
    if _libc.linkat(fd, b"", AT_FDCWD, os.fsencode(final), AT_EMPTY_PATH) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EPERM, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
        raise _LinkUnsupported()
    raise OSError(err, os.strerror(err), final)


def _retry_in_new_folder(final: str, link: Callable[[], None]) -> None:
    """Run link(), creating the parent folder on demand; FileExistsError if taken."""
    try:
        link()
    except FileNotFoundError:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        link()


# Errors of a folder on a network filesystem (NFS, SMB) whose server or link
# went away for a moment: worth retrying. A full or failing disk is not.
TRANSIENT_ERRNOS = {errno.ETIMEDOUT, errno.ESTALE, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
                    errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH, errno.ENETRESET}


# a listing's keys (spelled here: inside the class, `list` is the method)
_Keys = list[str]


class LocalStorage(Storage):
    conditional_writes = True
    remote = False

    def __init__(self, root: str, threads: int = 4) -> None:
        self.root = self.local_root = os.path.abspath(root)
        self._tmp = os.path.join(self.root, "tmp")
        self._limiter = trio.CapacityLimiter(local_io(threads))
        # O_TMPFILE + linkat(AT_EMPTY_PATH): no temporary name to create and unlink (and
        # nothing to clean up after a crash); plain temp files where unsupported.
        self._use_tmpfile = hasattr(os, "O_TMPFILE")
        self._unsynced = Unsynced(self.root)  # written since the last flush() (by worker threads)

    @property
    def description(self) -> str:
        return self.root

    def _error(self, exc: OSError, action: str, key: str) -> StorageError:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENOSPC:
            reason = "no space left on device"
        kind = TransientStorageError if exc.errno in TRANSIENT_ERRNOS else StorageError
        return kind(f"cannot {action} '{os.path.join(self.root, key)}': {reason}")

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def connect(self) -> None:
        if not os.path.isdir(self.root):
            raise ObjectMissing(f"no repository at '{self.root}': folder does not exist")

    async def create(self) -> None:
        await self._run(self._create_sync)

    def _create_sync(self) -> None:
        try:
            if os.path.exists(self.root):
                if not os.path.isdir(self.root):
                    raise StorageError(f"'{self.root}' exists and is not a folder")
                # a repository is left to put() to refuse; an interrupted init leaves only tmp/
                existing = set(os.listdir(self.root))
                if "rekkord" not in existing and existing - {"tmp"}:
                    raise StorageError(f"folder '{self.root}' is not empty")
            os.makedirs(self._tmp, exist_ok=True)  # other folders are made on demand
        except OSError as exc:
            raise self._error(exc, "create", "") from None

    async def put(self, key: str, data: bytes | bytearray) -> bool:
        return await self._run(self.put_sync, key, data)

    async def put_pieces(self, key: str, pieces: list[bytes | bytearray]) -> bool:
        return await self._run(self.put_sync, key, pieces)

    def put_sync(self, key: str, data: Data) -> bool:
        final = os.path.join(self.root, key)
        try:
            self._link_new(final, data)
            self._unsynced.written(final)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise self._error(exc, "write", key) from None

    def _link_new(self, final: str, data: Data) -> None:
        """Write data to an unnamed file, then give it its name unless taken."""
        if self._use_tmpfile:
            try:
                fd = os.open(self._tmp, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self._use_tmpfile = False
            else:
                try:
                    _write_all(fd, data)
                    if _size(data) >= EARLY_WRITEBACK:
                        _start_writeback(fd)
                    _retry_in_new_folder(final, lambda: _link_fd(fd, final))
                    return
                except _LinkUnsupported:
                    self._use_tmpfile = False  # e.g. no CAP_DAC_READ_SEARCH on old kernels
                finally:
                    os.close(fd)
        tmp = os.path.join(self._tmp, secrets.token_hex(12))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            _retry_in_new_folder(final, lambda: os.link(tmp, final, follow_symlinks=False))
        finally:
            os.unlink(tmp)

    async def get(self, key: str) -> bytes:
        return await self._run(self.get_sync, key)

    def get_sync(self, key: str) -> bytes:
        try:
            with open(os.path.join(self.root, key), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise ObjectMissing(f"object '{key}' is missing from '{self.root}'") from None
        except OSError as exc:
            raise self._error(exc, "read", key) from None

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        return await self._run(self._get_range_sync, key, offset, length)

    def read_blocking(self, key: str, offset: int | None = None, length: int | None = None) -> bytes:
        if offset is None or length is None:
            return self.get_sync(key)
        return self._get_range_sync(key, offset, length)

    async def get_ranges(self, ranges: list[tuple[str, int, int]]) -> list[bytes]:
        return await self._run(self._get_ranges_sync, ranges)

    def _get_ranges_sync(self, ranges: list[tuple[str, int, int]]) -> list[bytes]:
        """Many ranges, mostly of a few packs: each file is opened once."""
        try:
            return pread_ranges(self.root, ranges)
        except OSError as exc:
            raise self._error(exc, "read", exc.filename) from None

    def _open_object(self, key: str) -> int:
        try:
            return os.open(os.path.join(self.root, key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectMissing(f"object '{key}' is missing from '{self.root}'") from None
        except OSError as exc:
            raise self._error(exc, "read", key) from None

    def _get_range_sync(self, key: str, offset: int, length: int) -> bytes:
        fd = self._open_object(key)
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise self._error(exc, "read", key) from None
        finally:
            os.close(fd)

    async def exists(self, key: str) -> bool:
        return await self._run(os.path.exists, os.path.join(self.root, key))

    async def object_size(self, key: str) -> int:
        return await self._run(self._size_sync, key)

    def _size_sync(self, key: str) -> int:
        try:
            return os.stat(os.path.join(self.root, key)).st_size
        except FileNotFoundError:
            raise ObjectMissing(f"object '{key}' is missing from '{self.root}'") from None
        except OSError as exc:
            raise self._error(exc, "check", key) from None

    async def list(self, prefix: str) -> list[str]:
        return await self._run(self._list_sync, prefix)

    def _list_sync(self, prefix: str) -> _Keys:
        base = prefix.rstrip("/")
        start = os.path.join(self.root, base)
        keys: _Keys = []
        try:
            stack = [(start, base)]
            while stack:
                folder, rel = stack.pop()
                with os.scandir(folder) as it:
                    for item in it:
                        name = f"{rel}/{item.name}" if rel else item.name
                        if item.is_dir(follow_symlinks=False):
                            stack.append((item.path, name))
                        else:
                            keys.append(name)
        except FileNotFoundError:
            return keys
        except OSError as exc:
            raise self._error(exc, "list", prefix) from None
        return keys

    async def list_details(self, prefix: str) -> dict[str, ObjectInfo]:
        return await self._run(self._list_details_sync, prefix)

    def _list_details_sync(self, prefix: str) -> dict[str, ObjectInfo]:
        found: dict[str, ObjectInfo] = {}
        for key in self._list_sync(prefix):
            try:
                st = os.stat(os.path.join(self.root, key))
            except FileNotFoundError:
                continue
            found[key] = ObjectInfo(st.st_size, st.st_mtime_ns)
        return found

    async def delete(self, key: str) -> None:
        await self._run(self._delete_sync, key)

    def _delete_sync(self, key: str) -> None:
        path = os.path.join(self.root, key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(exc, "delete", key) from None
        # a folder made for this object alone (a tag's) goes with it; top-level folders stay
        folder = os.path.dirname(path)
        if os.path.dirname(folder) != self.root:
            try:
                os.rmdir(folder)
            except OSError:
                pass  # not empty, or gone: either is fine

    async def flush(self) -> None:
        written, folders = self._unsynced.take()
        try:
            if len(written) > SYNCFS_ABOVE:
                await self._run(_syncfs, self.root)
                return
            for paths in (written, folders):  # the objects, then their names
                async with task_group() as nursery:
                    for path in paths:
                        nursery.start_soon(self._run, fsync_path, path)
        except OSError as exc:
            self._unsynced.give(written, folders)
            raise self._error(exc, "sync", "") from None
