"""The thin pyfuse3 adapter: FUSE requests -> SnapshotView (and staging) calls.

Everything about what the filesystem contains lives in vfs.py; this module
only converts attributes, keeps open handles and maps OSError to FUSEError.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from typing import Any, Awaitable, Callable, TypeVar

import pyfuse3

from .vfs import IO_BLOCK_SIZE, Attr, FileReader, Node, SnapshotView

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

IMMUTABLE_TIMEOUT = 3600.0  # snapshot trees never change
VIRTUAL_TIMEOUT = 1.0  # channels/, ids/, latest: new snapshots appear


def _translate_errors(handler: F) -> F:
    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def entry_attributes(attr: Attr) -> pyfuse3.EntryAttributes:
    out = pyfuse3.EntryAttributes()
    out.st_ino = attr.ino
    out.generation = 0
    timeout = IMMUTABLE_TIMEOUT if attr.immutable else VIRTUAL_TIMEOUT
    out.entry_timeout = timeout
    out.attr_timeout = timeout
    out.st_mode = attr.mode
    out.st_nlink = attr.nlink
    out.st_uid = attr.uid
    out.st_gid = attr.gid
    out.st_rdev = attr.rdev
    out.st_size = attr.size
    out.st_blksize = IO_BLOCK_SIZE
    out.st_blocks = attr.blocks
    out.st_atime_ns = attr.atime_ns
    out.st_mtime_ns = attr.mtime_ns
    out.st_ctime_ns = attr.ctime_ns
    return out


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, view: SnapshotView) -> None:
        super().__init__()
        self.view = view
        self._next_handle = 1
        self._dirs: dict[int, list[tuple[bytes, Node]]] = {}
        self._files: dict[int, FileReader] = {}

    def _handle(self) -> int:
        self._next_handle += 1
        return self._next_handle

    @_translate_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        node = await self.view.lookup(parent_inode, name)
        return entry_attributes(node.attr)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.view.forget(ino, count)

    @_translate_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return entry_attributes(await self.view.getattr(inode))

    @_translate_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.view.readlink(inode)

    @_translate_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        self.view.check_readable(inode)
        handle = self._handle()
        self._dirs[handle] = await self.view.children(inode)
        return handle

    @_translate_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        items = self._dirs[fh]
        for index in range(start_id, len(items)):
            name, node = items[index]
            if not pyfuse3.readdir_reply(token, name, entry_attributes(node.attr), index + 1):
                return
            self.view.remember(node)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_translate_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise OSError(errno.EROFS, "read-only")
        reader = self.view.open(inode)
        handle = self._handle()
        self._files[handle] = reader
        return pyfuse3.FileInfo(fh=handle, keep_cache=True)

    @_translate_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.view.read(self._files[fh], off, size)

    async def release(self, fh: int) -> None:
        self._files.pop(fh, None)

    @_translate_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return self.view.getxattr(inode, name)

    @_translate_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return self.view.listxattr(inode)

    @_translate_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        for key, value in self.view.statfs().items():
            setattr(out, key, value)
        return out

    # Snapshot trees are read-only; the staging area (when present) overrides these.

    async def _read_only(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = write = create = _read_only
    setxattr = removexattr = _read_only
