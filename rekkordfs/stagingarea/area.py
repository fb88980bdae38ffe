"""StagingArea: the requests on staging/ and below, routed by inode number to
the channels' trees (the parts are this package's other modules). Like vfs.py
it raises OSError and knows nothing of FUSE."""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import trio

from ..blobcache import BlobCache
from ..commit import CommitResult
from ..control import CONTROL_CHANNEL, CONTROL_COMMIT
from ..errors import errno_error
from ..format import EntryKind
from ..fsmeta import xattr_refusal
from ..keys import Capability
from ..nodes import MUTABLE_TIMEOUT, NAME_MAX, STAGING_INO, Attr, Node, NodeKind
from ..repository import Repository
from ..staging import ROOT, Inode, StagingTree
from ..statedir import lock_state_folder, prepare_state_folder
from ..streaming import GrowingFile
from ..testhooks import stop_point
from ..vfs import SnapshotView
from ..writebehind import WriteBehind
from .batches import BatchFlusher
from .channels import Channels
from .commits import Commits
from .direct import CAPABILITY, direct_io, drop_on_write
from .inodes import InodeNumbers

log = logging.getLogger(__name__)

# Every change to a staging tree goes through the kernel, which updates its
# caches itself: they may keep entries and attributes for a while.
STAGING_TIMEOUT = 30.0


@dataclass
class Handle:
    tree: StagingTree
    ino: int  # local to the tree
    wrote: bool = False
    # for a file emptied by this handle: where its writes from the start have
    # reached (None once one lands elsewhere); past SMALL_FILE they stream out
    sequential_end: int | None = None
    stream: GrowingFile | None = None
    # past the kernel's page cache (direct.py); its writes drop set-id bits
    # and capabilities as the kernel would for the opener
    direct: bool = False
    uid: int = 0
    gid: int = 0


class StagingArea:
    def __init__(self, repo: Repository, blobs: BlobCache, view: SnapshotView, state_dir: Path,
                 mountpoint: str | None = None) -> None:
        repo.keys.require(Capability.WRITE)
        self.repo = repo
        self.blobs = blobs if repo.keys.can(Capability.READ) else None
        self.view = view
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = lock_state_folder(state_dir, mountpoint)
        try:
            prepare_state_folder(state_dir, repo.keys, repo.id_hex)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.behind = WriteBehind(repo)
        self.numbers = InodeNumbers()
        self.channels = Channels(repo, self.blobs, view, state_dir, self.behind, self.numbers)
        self.trees = self.channels.trees
        self.batches = BatchFlusher(self.trees.values)
        self.commits = Commits(repo, view, self.channels, self.behind)
        self.root_attr = Attr(STAGING_INO, stat.S_IFDIR | 0o755, 2, os.getuid(), os.getgid(), 0,
                              view.started_ns, view.started_ns, view.started_ns, timeout=MUTABLE_TIMEOUT)
        view.add_root_folder(b"staging", self.root_node)

    def start(self, nursery: trio.Nursery) -> None:
        self.commits.nursery = nursery
        self.behind.start(nursery)
        nursery.start_soon(self.batches.run)
        self.channels.on_open = self.batches.batch
        for tree in self.trees.values():
            self.batches.batch(tree)

    def close(self) -> None:
        self.channels.close()
        os.close(self._lock_fd)

    def root_node(self) -> Node:
        self.root_attr.nlink = 2 + len(self.channels.known())
        return Node(STAGING_INO, NodeKind.VIRTUAL_DIR, self.root_attr, permanent=True)

    owns = staticmethod(InodeNumbers.owns)

    def attr(self, tree: StagingTree, node: Inode, links: dict[int, int] | None = None) -> Attr:
        """links: link counts of folders not expanded yet (StagingTree.folder_links)."""
        touched = tree.touched_mtime(node.ino)
        now = tree.clock()
        size, blocks = tree.usage_of(node)
        nlink = links.get(node.ino, node.nlink) if links else node.nlink
        return Attr(self.numbers.of(tree, node.ino), node.full_mode, nlink, node.uid, node.gid,
                    size, node.atime_ns, now if touched else node.mtime_ns,
                    now if touched else node.ctime_ns, node.rdev, timeout=STAGING_TIMEOUT, allocated=blocks)

    async def _attr(self, tree: StagingTree, node: Inode) -> Attr:
        if node.dir_ref is None:  # not a folder whose stored record counts its links
            return self.attr(tree, node)
        return self.attr(tree, node, await tree.folder_links([node]))

    async def channel_names(self) -> list[str]:
        return await self.channels.names()

    # --- directory operations ----------------------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> Attr:
        attr = await self.find(parent, name)
        if attr is None:
            raise errno_error(errno.ENOENT)
        return attr

    async def find(self, parent: int, name: bytes) -> Attr | None:
        """lookup(), None for a missing name in a channel's tree."""
        if len(name) > NAME_MAX:  # what every call naming it must answer (chmod, unlink, rename...)
            raise OSError(errno.ENAMETOOLONG, "file name too long")
        if parent == STAGING_INO:
            tree = await self.channels.named(name)
            node: Inode | None = tree.get(ROOT)
        else:
            tree, local = self.numbers.split(parent)
            node = await tree.find(local, name)
        if node is None:
            return None
        attr = await self._attr(tree, node)
        tree.remember(node.ino)  # nothing may fail once the kernel is to hold it
        return attr

    def remember(self, ino: int) -> None:
        if ino == STAGING_INO:
            return
        tree, local = self.numbers.split(ino)
        tree.remember(local)

    def forget(self, ino: int, count: int) -> None:
        if ino == STAGING_INO:
            return
        tree, local = self.numbers.split(ino)
        tree.forget(local, count)

    async def getattr(self, ino: int) -> Attr:
        if ino == STAGING_INO:
            self.root_attr.nlink = 2 + len(self.channels.known())
            return self.root_attr
        tree, local = self.numbers.split(ino)
        return await self._attr(tree, tree.get(local))

    async def children(self, ino: int) -> list[tuple[bytes, Attr]]:
        if ino == STAGING_INO:
            items = []
            for channel in await self.channels.names():
                try:
                    tree = await self.channels.tree(channel)
                except OSError:
                    continue  # logged: one unreadable channel must not hide the others
                items.append((channel.encode(), await self._attr(tree, tree.get(ROOT))))
            self.root_attr.nlink = 2 + len(items)
            return items
        tree, local = self.numbers.split(ino)
        entries = await tree.listdir(local)
        links = await tree.folder_links([node for _, node in entries])
        return [(name, self.attr(tree, node, links)) for name, node in entries]

    async def readlink(self, ino: int) -> bytes:
        tree, local = self.numbers.split(ino)
        node = tree.get(local)
        if node.kind != EntryKind.SYMLINK:
            raise OSError(errno.EINVAL, "not a symlink")
        return node.target or b""

    async def make(self, parent: int, name: bytes, kind: EntryKind, mode: int, uid: int, gid: int,
                   rdev: int = 0, target: bytes | None = None) -> Attr:
        """mknod, mkdir, symlink and create; `mkdir staging/NEW` starts a channel."""
        if parent == STAGING_INO:
            if kind != EntryKind.DIRECTORY:
                raise OSError(errno.EPERM, "only channel folders belong here")
            if self.channels.exists(os.fsdecode(name)):
                raise OSError(errno.EEXIST, "channel exists")
            tree = await self.channels.named(name, create=True)
            node = await tree.setattr(ROOT, mode=mode & 0o7777, uid=uid, gid=gid)
        else:
            tree, local = self.numbers.split(parent)
            node = await tree.create(local, name, kind, mode, uid, gid, rdev, target)
        attr = await self._attr(tree, node)
        tree.remember(node.ino)
        return attr

    async def link(self, ino: int, parent: int, name: bytes) -> Attr:
        tree, local = self.numbers.split(ino)
        parent_tree, parent_local = self.numbers.split_dir(parent)
        if parent_tree is not tree:
            raise OSError(errno.EXDEV, "hardlinks cannot cross channels")
        node = await tree.link(local, parent_local, name)
        tree.remember(node.ino)
        return self.attr(tree, node)

    async def unlink(self, parent: int, name: bytes) -> None:
        tree, local = self.numbers.split_dir(parent)
        await tree.unlink(local, name)

    async def rmdir(self, parent: int, name: bytes) -> None:
        if parent == STAGING_INO:
            await self.channels.remove(name)
            return
        tree, local = self.numbers.split(parent)
        await tree.rmdir(local, name)

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int) -> None:
        old_tree, old_local = self.numbers.split_dir(old_parent)
        new_tree, new_local = self.numbers.split_dir(new_parent)
        if old_tree is not new_tree:
            raise OSError(errno.EXDEV, "rename across channels")
        await old_tree.rename(old_local, old_name, new_local, new_name, flags)

    async def setattr(self, ino: int, **changes: int | None) -> Attr:
        if ino == STAGING_INO:
            raise OSError(errno.EPERM, "the staging folder itself cannot change")
        tree, local = self.numbers.split(ino)
        if changes.get("size") is not None:
            self.behind.abort_stream(tree, local)
        node = await tree.setattr(local, **changes)
        return await self._attr(tree, node)

    # --- extended attributes and control requests -----------------------------------------

    def listxattr(self, ino: int) -> list[bytes]:
        if ino == STAGING_INO:
            return []
        tree, local = self.numbers.split(ino)
        return tree.listxattr(local)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if ino == STAGING_INO:
            raise OSError(errno.ENODATA, "no such attribute")
        tree, local = self.numbers.split(ino)
        if local == ROOT:
            if name == CONTROL_CHANNEL:
                return tree.channel.encode()
            reply = self.commits.reply(name)
            if reply is not None:
                return reply
        return tree.getxattr(local, name)

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        if ino == STAGING_INO:
            raise OSError(errno.EPERM, "the staging folder itself cannot change")
        tree, local = self.numbers.split(ino)
        if local == ROOT and name == CONTROL_COMMIT:
            await self.commits.request(tree, value)
            return
        refusal = xattr_refusal(name, value)
        if refusal is not None:
            raise errno_error(refusal)
        await tree.setxattr(local, name, value)

    async def removexattr(self, ino: int, name: bytes) -> None:
        tree, local = self.numbers.split_dir(ino)
        await tree.removexattr(local, name)

    async def commit(self, channel: str) -> CommitResult:
        return await self.commits.commit(channel)

    # --- files ---------------------------------------------------------------------------

    async def open(self, ino: int, flags: int, uid: int = 0, gid: int = 0) -> Handle:
        tree, local = self.numbers.split(ino)
        node = tree.get(local)
        if node.kind != EntryKind.FILE:
            raise OSError(errno.EISDIR if node.is_dir else errno.EINVAL, "not a file")
        writing = flags & (os.O_WRONLY | os.O_RDWR)
        if writing:
            self.behind.abort_stream(tree, local)
        if flags & os.O_TRUNC and writing:
            await tree.truncate(local, 0)
            handle = Handle(tree, local, sequential_end=0)
        else:
            if writing:
                await tree.make_local(local)
            handle = Handle(tree, local)
        handle.direct, handle.uid, handle.gid = direct_io(flags, created=False), uid, gid
        tree.opened(local)
        return handle

    async def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
                     flags: int = os.O_RDWR) -> tuple[Handle, Attr]:
        attr = await self.make(parent, name, EntryKind.FILE, mode, uid, gid)
        tree, local = self.numbers.split(attr.ino)
        tree.opened(local)
        return Handle(tree, local, sequential_end=0, direct=direct_io(flags, created=True), uid=uid, gid=gid), attr

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        return await handle.tree.read(handle.ino, offset, size)

    async def write(self, handle: Handle, offset: int, data: bytes) -> int:
        stop_point("staging-write")
        if handle.direct:
            await self._drop_on_write(handle)
        appending = self.behind.before_write(handle, offset)
        written = await handle.tree.write(handle.ino, offset, data)
        handle.wrote = True
        if appending:
            self.behind.appended(handle, written)
        return written

    async def _drop_on_write(self, handle: Handle) -> None:
        """What the kernel drops before a write through its page cache (direct.py)."""
        mode, capability = drop_on_write(handle.tree.get(handle.ino), handle.uid, handle.gid)
        if mode is not None:
            await handle.tree.setattr(handle.ino, mode=mode)
        if capability:
            await handle.tree.removexattr(handle.ino, CAPABILITY)

    async def sync(self, handle: Handle) -> None:
        handle.tree.flush(handle.ino)
        handle.tree.journal.flush()
        await trio.to_thread.run_sync(handle.tree.sync, handle.ino)

    async def sync_all(self) -> None:
        for tree in list(self.trees.values()):
            tree.journal.flush()
            await trio.to_thread.run_sync(tree.sync)

    def release(self, handle: Handle) -> None:
        """The last close of a file: it cannot fail, so a full journal only delays
        recording the new mtime (the next fsync, close or setattr records it)."""
        try:
            handle.tree.flush(handle.ino)
        except OSError as exc:
            log.warning("staging/%s: cannot journal the mtime of inode %d yet: %s",
                        handle.tree.channel, handle.ino, exc.strerror)
        self.behind.closed(handle)  # uploaded in the background, so commit has less to do
        handle.tree.released(handle.ino)

    def statfs_all(self) -> os.statvfs_result:
        """Room left where staged data is kept."""
        return os.statvfs(self.state_dir)
