"""StagingTree: one channel's staging tree, made of the parts of this package
(journal, names, copy-on-write, content, uploads, capture); it owns the
attributes and extended attributes itself."""

from __future__ import annotations

import errno
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..blobcache import BlobCache
from ..errors import errno_error
from ..format import EntryKind, Snapshot
from ..fsmeta import ACL_ACCESS, acl_after_chmod, mode_from_acl
from .capture import Capture, Capturer
from .content import ContentStore
from .copyonwrite import CopyOnWrite
from .inode import Inode, decode_xattrs, encode_xattrs
from .journal import RESERVE_SIZE, Deleted, Journal
from .names import Namespace
from .uploads import Uploads


class StagingTree:
    def __init__(self, folder: Path, channel: str, blobs: BlobCache | None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.folder = folder
        self.channel = channel
        self.blobs = blobs  # None: the key cannot read stored data (WriteOnly)
        self.clock = clock
        new = not (folder / "tree.db").exists()
        try:
            for path in (folder, folder / "data", folder / "frozen"):
                path.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.journal = Journal(folder, self._deleted)
        except BaseException:
            _discard(folder, new)
            raise
        self.uploads = Uploads()  # what write-behind and commits uploaded of the written files
        self.content = ContentStore(folder, self.journal, self.uploads, blobs, clock)
        self.cow = CopyOnWrite(self.journal, blobs)
        self.names = Namespace(self.journal, self.cow, self.content, clock)
        self.lookups, self.open_files = self.names.lookups, self.names.open_files  # the kernel's references
        self.commits = Capturer(self.journal, self.content, self.uploads, self.open_files)
        try:
            self.content.recover(self.journal.recover(clock))
            self.journal.ensure_reserve(room=RESERVE_SIZE)
            if new and not self.journal.reserve.exists():
                # a new tree starts only with its reserve, or it could not even be deleted from
                raise OSError(errno.ENOSPC, "no room for a new staging tree")
        except BaseException:
            self.journal.close()  # an open connection would keep the journal locked
            _discard(folder, new)
            raise

    def _deleted(self, deleted: Deleted) -> None:
        self.content.deleted(deleted)

    def close(self) -> None:
        self.content.close_files()
        self.journal.close()

    @property
    def base(self) -> bytes | None:
        return self.journal.meta("base")

    @property
    def dirty(self) -> bool:
        """Changed since the base snapshot (a clean tree may follow newer snapshots)."""
        return self.journal.dirty

    def seed(self, snapshot_id: bytes | None, snapshot: Snapshot | None) -> None:
        """Reset to a copy-on-write view of a snapshot (or to an empty tree)."""
        self.cow.seed(snapshot_id, snapshot, self.clock())
        self.content.reset()
        self.uploads.reset()
        self.journal.sequence += 1

    def get(self, ino: int) -> Inode:
        return self.journal.get(ino)

    # --- names (names.py) and copy-on-write (copyonwrite.py) ------------------------------

    async def lookup(self, parent: int, name: bytes) -> Inode:
        return await self.names.lookup(parent, name)

    async def find(self, parent: int, name: bytes) -> Inode | None:
        return await self.names.find(parent, name)

    async def listdir(self, parent: int) -> list[tuple[bytes, Inode]]:
        return await self.names.listdir(parent)

    async def create(self, parent: int, name: bytes, kind: EntryKind, mode: int, uid: int, gid: int,
                     rdev: int = 0, target: bytes | None = None) -> Inode:
        return await self.names.create(parent, name, kind, mode, uid, gid, rdev, target)

    async def link(self, ino: int, parent: int, name: bytes) -> Inode:
        return await self.names.link(ino, parent, name)

    async def unlink(self, parent: int, name: bytes) -> None:
        await self.names.unlink(parent, name)

    async def rmdir(self, parent: int, name: bytes) -> None:
        await self.names.rmdir(parent, name)

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                     flags: int = 0) -> None:
        await self.names.rename(old_parent, old_name, new_parent, new_name, flags)

    def remember(self, ino: int) -> None:
        self.names.remember(ino)

    def forget(self, ino: int, count: int) -> None:
        self.names.forget(ino, count)

    def opened(self, ino: int) -> None:
        self.names.opened(ino)

    def released(self, ino: int) -> None:
        self.names.released(ino)

    async def folder_links(self, nodes: list[Inode]) -> dict[int, int]:
        return await self.cow.folder_links(nodes)

    # --- attributes -----------------------------------------------------------------------

    async def setattr(self, ino: int, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                      size: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None) -> Inode:
        """One transaction at most; none when nothing changes (rsync sets mode,
        owner and times one call each, most of them to what they are already:
        unlike a local filesystem, such a call leaves ctime as it is)."""
        await self.cow.own_links(ino)
        node = self.get(ino)
        if size is not None:
            if node.kind != EntryKind.FILE:
                raise errno_error(errno.EISDIR if node.is_dir else errno.EINVAL)
            await self.truncate(ino, size)
            node = self.get(ino)
        changes: dict[str, int | bytes | None] = {}
        if mode is not None and mode & 0o7777 != node.mode:
            changes["mode"] = mode & 0o7777
            xattrs = decode_xattrs(node.xattrs)
            if any(k == ACL_ACCESS for k, _ in xattrs):
                changes["xattrs"] = encode_xattrs([(k, acl_after_chmod(v, mode) if k == ACL_ACCESS else v)
                                                   for k, v in xattrs])
        if uid is not None and uid != node.uid:
            changes["uid"] = uid
        if gid is not None and gid != node.gid:
            changes["gid"] = gid
        if atime_ns is not None and atime_ns != node.atime_ns:
            changes["atime_ns"] = atime_ns
        if mtime_ns is not None and (mtime_ns != node.mtime_ns or self.content.touched_mtime(ino)):
            changes["mtime_ns"] = mtime_ns
            self.content.mtime_set(ino)
        if not changes and size is None:
            return node
        changes["ctime_ns"] = self.clock()
        return self.journal.change_alone(ino, **changes)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        for key, value in decode_xattrs(self.get(ino).xattrs):
            if key == name:
                return value
        raise errno_error(errno.ENODATA)

    def listxattr(self, ino: int) -> list[bytes]:
        return [name for name, _ in decode_xattrs(self.get(ino).xattrs)]

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        await self.cow.own_links(ino)
        node = self.get(ino)
        items = [(k, v) for k, v in decode_xattrs(node.xattrs) if k != name]
        items.append((name, value))
        items.sort()
        mode = mode_from_acl(node.mode, value) if name == ACL_ACCESS else node.mode
        with self.journal.transaction():
            self.journal.change(ino, xattrs=encode_xattrs(items), mode=mode, ctime_ns=self.clock())
            self.journal.changed()

    async def removexattr(self, ino: int, name: bytes) -> None:
        await self.cow.own_links(ino)
        items = decode_xattrs(self.get(ino).xattrs)
        kept = [(k, v) for k, v in items if k != name]
        if len(kept) == len(items):
            raise errno_error(errno.ENODATA)
        with self.journal.transaction():
            self.journal.change(ino, xattrs=encode_xattrs(kept) if kept else None, ctime_ns=self.clock())
            self.journal.changed()

    # --- content (content.py) --------------------------------------------------------------

    def data_path(self, ino: int) -> str:
        return self.content.data_path(ino)

    def inline_data(self, ino: int) -> bytes | None:
        return self.content.inline_data(ino)

    def usage_of(self, node: Inode) -> tuple[int, int | None]:
        return self.content.usage_of(node)

    def size_of(self, node: Inode) -> int:
        return self.content.usage_of(node)[0]

    def touched_mtime(self, ino: int) -> bool:
        return self.content.touched_mtime(ino)

    def is_frozen(self, ino: int) -> bool:
        """A running commit holds this file's data file (a write goes to a copy)."""
        return ino in self.content.frozen

    async def make_local(self, ino: int, keep_content: bool = True) -> None:
        """Give a stored file a local copy before it is modified (copy-up)."""
        if self.get(ino).kind != EntryKind.FILE:
            raise errno_error(errno.EINVAL)
        await self.cow.own_links(ino)
        await self.content.copy_up(ino, keep_content)

    async def truncate(self, ino: int, size: int) -> None:
        if not self.get(ino).local:
            await self.make_local(ino, keep_content=size > 0)
        await self.content.truncate(ino, size)

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        return await self.content.write(ino, offset, data)

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        return await self.content.read(ino, offset, size)

    def flush(self, ino: int) -> None:
        self.content.flush(ino)

    def sync(self, ino: int | None = None) -> None:
        self.content.sync(ino)

    # --- commits (capture.py) ---------------------------------------------------------------

    def capture(self, durable: Callable[[dict[int, bytes]], set[int]]) -> Capture:
        return self.commits.capture(durable)

    def captured_contents(self, inos: list[int]) -> list[bytes]:
        return self.content.captured_contents(inos)

    def release_capture(self, capture: Capture) -> None:
        self.commits.release(capture)

    def committed(self, capture: Capture, snapshot_id: bytes, snapshot: Snapshot,
                  contents: dict[int, bytes], link_ids: dict[int, int]) -> list[str]:
        return self.commits.committed(capture, snapshot_id, snapshot, contents, link_ids)


def _discard(folder: Path, new: bool) -> None:
    """Remove what a failed start of a new tree made (a half-made tree would
    be listed as a channel); an existing one keeps its staged data."""
    if new:
        shutil.rmtree(folder, ignore_errors=True)
