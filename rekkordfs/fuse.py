"""The thin pyfuse3 adapter: FUSE requests -> SnapshotView and StagingArea calls.

What the filesystem contains lives in vfs.py (snapshots) and stagingarea/
(staging/); this module only routes each request by inode number, converts
attributes, keeps open handles and maps OSError to FUSEError.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3

from .format import EntryKind
from .nodes import IO_BLOCK_SIZE, Attr, FileReader
from .stagingarea import STAGING_TIMEOUT, Handle, StagingArea
from .vfs import SnapshotView

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


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
    out.entry_timeout = attr.timeout
    out.attr_timeout = attr.timeout
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


def _negative_entry() -> pyfuse3.EntryAttributes:
    """'No such entry', cached by the kernel: every creation goes through it anyway."""
    out = pyfuse3.EntryAttributes()
    out.st_ino = 0
    out.entry_timeout = STAGING_TIMEOUT
    return out


def _read_only() -> OSError:
    return OSError(errno.EROFS, "snapshots are read-only")


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, view: SnapshotView, staging: StagingArea | None = None) -> None:
        super().__init__()
        self.view = view
        self.staging = staging
        self._next_handle = 1
        # open directories: what to call with an entry's key when the kernel keeps
        # it, and each entry's (name, attributes, key)
        self._dirs: dict[int, tuple[Callable[[Any], object], list[tuple[bytes, Attr, Any]]]] = {}
        self._files: dict[int, FileReader | Handle] = {}

    def init(self) -> None:
        """The session is up: small files read ahead go into the kernel's page cache."""
        self.view.read_ahead.store = self._store_in_kernel

    def _store_in_kernel(self, pages: list[tuple[int, bytes]]) -> None:
        """(worker thread) Each small file's content into the page cache of its
        inode, which the kernel keeps across opens (keep_cache: snapshots never
        change): its first read then needs no request. Only inodes the kernel
        holds can take it; a failure only means the read asks us."""
        for ino, data in pages:
            if not self.view.holds(ino):
                continue
            try:
                pyfuse3.notify_store(ino, 0, data)
            except OSError as exc:
                if exc.errno == errno.ENOSYS:  # a kernel without it
                    self.view.read_ahead.store = None
                    return

    def _handle(self) -> int:
        self._next_handle += 1
        return self._next_handle

    def _staged(self, ino: int) -> StagingArea | None:
        """The staging area when ino belongs to it."""
        if self.staging is not None and self.staging.owns(ino):
            return self.staging
        return None

    def _writable(self, ino: int) -> StagingArea:
        staging = self._staged(ino)
        if staging is None:
            raise _read_only()
        return staging

    # --- lookups and attributes --------------------------------------------------

    @_translate_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        staging = self._staged(parent_inode)
        if staging is not None:
            try:
                attr = await staging.find(parent_inode, name)
            except FileNotFoundError:  # a channel that is not there
                attr = None
            if attr is None:
                return _negative_entry()  # the kernel remembers the miss (rsync looks twice)
            return entry_attributes(attr)
        node = await self.view.lookup(parent_inode, name)
        return entry_attributes(node.attr)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            try:
                staging = self._staged(ino)
                if staging is not None:
                    staging.forget(ino, count)
                else:
                    self.view.forget(ino, count)
            except OSError:
                pass  # a tree removed meanwhile has nothing to drop
            except Exception:  # forget cannot report errors: never let one stop the mount
                log.exception("internal error in forget")

    @_translate_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        staging = self._staged(inode)
        if staging is not None:
            return entry_attributes(await staging.getattr(inode))
        return entry_attributes(await self.view.getattr(inode))

    @_translate_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        staging = self._writable(inode)
        changes: dict[str, int | None] = {
            "mode": attr.st_mode & 0o7777 if fields.update_mode else None,
            "uid": attr.st_uid if fields.update_uid else None,
            "gid": attr.st_gid if fields.update_gid else None,
            "size": attr.st_size if fields.update_size else None,
            "atime_ns": attr.st_atime_ns if fields.update_atime else None,
            "mtime_ns": attr.st_mtime_ns if fields.update_mtime else None,
        }
        return entry_attributes(await staging.setattr(inode, **changes))

    @_translate_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        staging = self._staged(inode)
        if staging is not None:
            return await staging.readlink(inode)
        return await self.view.readlink(inode)

    # --- directories ---------------------------------------------------------------

    @_translate_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        staging = self._staged(inode)
        remember: Callable[[Any], object]
        items: list[tuple[bytes, Attr, Any]]
        if staging is not None:
            remember = staging.remember
            items = [(name, attr, attr.ino) for name, attr in await staging.children(inode)]
        else:
            self.view.check_readable(inode)
            remember, items = await self.view.entries(inode)
        handle = self._handle()
        self._dirs[handle] = (remember, items)
        return handle

    @_translate_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        remember, items = self._dirs[fh]
        reply = pyfuse3.readdir_reply
        for index in range(start_id, len(items)):
            name, attr, key = items[index]
            if not reply(token, name, entry_attributes(attr), index + 1):
                return
            remember(key)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if self.staging is not None:
            await self.staging.sync_all()

    # --- creating and removing ---------------------------------------------------------

    @_translate_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        kind = {0o010000: EntryKind.FIFO, 0o020000: EntryKind.CHAR_DEVICE, 0o060000: EntryKind.BLOCK_DEVICE,
                0o140000: EntryKind.SOCKET, 0o100000: EntryKind.FILE}.get(mode & 0o170000)
        if kind is None:
            raise OSError(errno.EINVAL, "unsupported file type")
        staging = self._writable(parent_inode)
        return entry_attributes(await staging.make(parent_inode, name, kind, mode, ctx.uid, ctx.gid, rdev))

    @_translate_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        staging = self._writable(parent_inode)
        return entry_attributes(await staging.make(parent_inode, name, EntryKind.DIRECTORY, mode, ctx.uid, ctx.gid))

    @_translate_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        staging = self._writable(parent_inode)
        return entry_attributes(await staging.make(parent_inode, name, EntryKind.SYMLINK, 0o777, ctx.uid, ctx.gid,
                                                   target=target))

    @_translate_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        staging = self._writable(inode)
        return entry_attributes(await staging.link(inode, new_parent_inode, new_name))

    @_translate_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._writable(parent_inode).unlink(parent_inode, name)

    @_translate_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._writable(parent_inode).rmdir(parent_inode, name)

    @_translate_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: Any) -> None:
        staging = self._writable(parent_inode_old)
        if self._staged(parent_inode_new) is None:
            raise OSError(errno.EXDEV, "rename out of staging")
        await staging.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # --- files -----------------------------------------------------------------------------

    @_translate_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        staging = self._staged(inode)
        handle = self._handle()
        if staging is not None:
            staged = await staging.open(inode, flags, ctx.uid, ctx.gid)
            self._files[handle] = staged
            return pyfuse3.FileInfo(fh=handle, direct_io=staged.direct)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise _read_only()
        self._files[handle] = self.view.open(inode)
        return pyfuse3.FileInfo(fh=handle, keep_cache=True)

    @_translate_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        staging = self._writable(parent_inode)
        staged, attr = await staging.create(parent_inode, name, mode, ctx.uid, ctx.gid, flags)
        handle = self._handle()
        self._files[handle] = staged
        return pyfuse3.FileInfo(fh=handle, direct_io=staged.direct), entry_attributes(attr)

    @_translate_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._files[fh]
        if isinstance(handle, Handle):
            assert self.staging is not None
            return await self.staging.read(handle, off, size)
        return await self.view.read(handle, off, size)

    @_translate_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._files[fh]
        if not isinstance(handle, Handle):
            raise _read_only()
        assert self.staging is not None
        return await self.staging.write(handle, off, buf)

    @_translate_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._files.get(fh)
        if isinstance(handle, Handle) and self.staging is not None:
            await self.staging.sync(handle)

    # No flush handler: the kernel then stops sending FLUSH on every close();
    # a staged file's new mtime is journaled on release (or fsync).

    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if isinstance(handle, Handle) and self.staging is not None:
            try:
                self.staging.release(handle)
            except Exception:  # release cannot report errors: never let one stop the mount
                log.exception("internal error in release")

    # --- extended attributes and the filesystem ---------------------------------------------

    @_translate_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        staging = self._staged(inode)
        if staging is not None:
            return staging.getxattr(inode, name)
        return self.view.getxattr(inode, name)

    @_translate_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        staging = self._staged(inode)
        if staging is not None:
            return staging.listxattr(inode)
        return self.view.listxattr(inode)

    @_translate_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        await self._writable(inode).setxattr(inode, name, value)

    @_translate_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self._writable(inode).removexattr(inode, name)

    @_translate_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        for key, value in self.view.statfs().items():
            setattr(out, key, value)
        if self.staging is not None:  # free: the room on the disk where staged data goes
            local = self.staging.statfs_all()
            free = local.f_bavail * local.f_frsize // out.f_frsize
            out.f_blocks += free
            out.f_bfree = out.f_bavail = free
            out.f_files += local.f_favail
            out.f_ffree = out.f_favail = local.f_favail
        return out
