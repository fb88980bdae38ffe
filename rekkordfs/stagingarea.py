"""The mount's writable `staging/` folder: one StagingTree per channel.

    MNT/staging/<channel>/...   starts as a copy-on-write view of the channel's
                                latest snapshot; `mkdir MNT/staging/NEW` starts
                                a new, empty channel

This module maps the mount's inode numbers onto the trees, tells write-behind
(writebehind.py) of writes and closes, and runs commits (asked for by
`rekkord commit` through an extended attribute, see control.py).
Like vfs.py it raises OSError and knows nothing of FUSE.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import trio
import trio.testing

from .blobcache import BlobCache
from .commit import CommitResult, Committer
from .control import CONTROL_CHANNEL, CONTROL_COMMIT, CommitReply
from .errors import RekkordError, UsageError
from .format import EntryKind, validate_channel
from .fsmeta import xattr_refusal
from .keys import Capability
from .nodes import MUTABLE_TIMEOUT, NAME_MAX, STAGING_INO, Attr, Node, NodeKind
from .repository import Repository
from .staging import ROOT, Inode, StagingTree, remove_files
from .staging.journal import BATCH_SECONDS
from .statedir import lock_state_folder, prepare_state_folder
from .streaming import GrowingFile
from .testhooks import stop_point
from .vfs import SnapshotView
from .writebehind import WriteBehind

log = logging.getLogger(__name__)

STAGING_BIT = 1 << 62
SLOT_SHIFT = 40
LOCAL_MASK = (1 << SLOT_SHIFT) - 1


# Every change to a staging tree goes through the kernel, which updates its
# caches itself: they may keep entries and attributes for a while.
STAGING_TIMEOUT = 30.0
# An open journal batch is committed once every task has waited this long
# (the writer paused: nothing more is coming soon).
IDLE_SECONDS = 0.001


@dataclass
class Handle:
    tree: StagingTree
    ino: int  # local to the tree
    wrote: bool = False
    # for a file emptied by this handle: where its writes from the start have
    # reached (None once one lands elsewhere); past SMALL_FILE they stream out
    sequential_end: int | None = None
    stream: GrowingFile | None = None


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
        self.trees: dict[str, StagingTree] = {}
        self.behind = WriteBehind(repo)
        self._slots: dict[str, int] = {}
        self._by_slot: dict[int, StagingTree] = {}
        self._next_slot = 0
        self._nursery: trio.Nursery | None = None
        self._locks: dict[str, trio.Lock] = {}
        self._results: dict[bytes, bytes] = {}
        self._batch_open = trio.Event()  # some tree's journal holds uncommitted requests
        self.root_attr = Attr(STAGING_INO, stat.S_IFDIR | 0o755, 2, os.getuid(), os.getgid(), 0,
                              view.started_ns, view.started_ns, view.started_ns, timeout=MUTABLE_TIMEOUT)
        view.add_root_folder(b"staging", self.root_node)

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.behind.start(nursery)
        nursery.start_soon(self._flush_when_idle)
        for tree in self.trees.values():
            self._batch(tree)

    def _batch(self, tree: StagingTree) -> None:
        """The tree's journal commits requests in batches, flushed here."""
        tree.journal.batching = True
        tree.journal.on_batch = self._batch_opened

    def _batch_opened(self) -> None:
        self._batch_open.set()  # the event of now: _flush_when_idle makes a new one each time

    async def _flush_when_idle(self) -> None:
        """Commit open journal batches as soon as the daemon is idle (or after
        BATCH_SECONDS): what a kill -9 can lose is the last moment's requests."""
        try:
            while True:
                await self._batch_open.wait()
                self._batch_open = trio.Event()
                with trio.move_on_after(BATCH_SECONDS):
                    # trio's own "every other task is blocked" wait: cheap, and
                    # exactly "the writer paused"
                    await trio.testing.wait_all_tasks_blocked(IDLE_SECONDS)
                self._flush_all()
        finally:
            self._flush_all()

    def _flush_all(self) -> None:
        for tree in list(self.trees.values()):
            try:
                tree.journal.flush()
            except OSError as exc:
                log.error("staging/%s: the journal lost its last requests: %s", tree.channel, exc.strerror)
            tree.journal.tidy()

    def _background(self, fn, *args) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    def close(self) -> None:
        for tree in self.trees.values():
            tree.close()
        os.close(self._lock_fd)

    def root_node(self) -> Node:
        self.root_attr.nlink = 2 + len(self._known_channels())
        return Node(STAGING_INO, NodeKind.VIRTUAL_DIR, self.root_attr, permanent=True)

    # --- inode numbers -------------------------------------------------------------

    @staticmethod
    def owns(ino: int) -> bool:
        return ino == STAGING_INO or bool(ino & STAGING_BIT)

    def _global(self, tree: StagingTree, local: int) -> int:
        return STAGING_BIT | (self._slots[tree.channel] << SLOT_SHIFT) | local

    def _split(self, ino: int) -> tuple[StagingTree, int]:
        tree = self._by_slot.get((ino & ~STAGING_BIT) >> SLOT_SHIFT)
        if tree is None:
            raise OSError(errno.ENOENT, "stale staging inode")
        return tree, ino & LOCAL_MASK

    def attr(self, tree: StagingTree, node: Inode, links: dict[int, int] | None = None) -> Attr:
        """links: link counts of folders not expanded yet (StagingTree.folder_links)."""
        touched = tree.touched_mtime(node.ino)
        now = tree.clock()
        size, blocks = tree.usage_of(node)
        nlink = links.get(node.ino, node.nlink) if links else node.nlink
        return Attr(self._global(tree, node.ino), node.full_mode, nlink, node.uid, node.gid,
                    size, node.atime_ns, now if touched else node.mtime_ns,
                    now if touched else node.ctime_ns, node.rdev, timeout=STAGING_TIMEOUT, allocated=blocks)

    async def _attr(self, tree: StagingTree, node: Inode) -> Attr:
        return self.attr(tree, node, await tree.folder_links([node]))

    # --- the channels ----------------------------------------------------------------

    def _state_names(self) -> set[str]:
        return {p.name for p in self.state_dir.iterdir() if (p / "tree.db").exists()}

    async def channel_names(self) -> list[str]:
        await self.view.refresh()
        return sorted(set(self.view.channel_names()) | self._state_names() | set(self.trees))

    async def tree(self, channel: str, create: bool = False) -> StagingTree:
        """The staging tree of a channel, opened (and seeded) on first use."""
        tree = self.trees.get(channel)
        if tree is None:
            exists = channel in self._state_names()
            if not exists and not create and channel not in self.view.channel_names():
                raise OSError(errno.ENOENT, "no such channel")
            tree = StagingTree(self.state_dir / channel, channel, self.blobs)
            self._next_slot += 1
            slot = self._next_slot  # never reused: inodes of a removed channel must stay unknown
            self._slots[channel] = slot
            self._by_slot[slot] = tree
            self.trees[channel] = tree
            self.behind.add_channel(channel)
            if self._nursery is not None:
                self._batch(tree)
            if not exists:
                try:
                    await self._follow_latest(tree, force=True)
                except OSError:
                    self._drop_tree(tree)  # retried on the next use; other channels are unaffected
                    raise
                return tree
        # a clean tree follows newer snapshots, also one opened from the state
        # folder (committed meanwhile by another key or machine)
        try:
            await self._follow_latest(tree)
        except OSError:
            pass  # logged; the tree stays on the base it has
        return tree

    def _drop_tree(self, tree: StagingTree) -> None:
        """Forget a tree that was just created and could not be seeded."""
        del self.trees[tree.channel]
        self.behind.drop_channel(tree.channel)
        del self._by_slot[self._slots.pop(tree.channel)]
        tree.close()
        shutil.rmtree(tree.folder, ignore_errors=True)

    async def _follow_latest(self, tree: StagingTree, force: bool = False) -> None:
        """A clean tree shows the channel's newest snapshot (unless the kernel holds
        inodes of it: their numbers would change under it)."""
        if self.blobs is None or (tree.dirty and not force):
            return
        latest = self.view.latest_tag(tree.channel)
        if latest is None or latest.snapshot_id == tree.base:
            return
        if not force and any(ino != ROOT for ino in tree.lookups):
            return
        try:
            snapshot = await self.repo.load_snapshot(latest)
        except RekkordError as exc:
            log.error("staging/%s: cannot start from snapshot %s: %s", tree.channel, latest.id_hex, exc.message)
            raise OSError(errno.EIO, "the channel's latest snapshot is unreadable") from None
        tree.seed(latest.snapshot_id, snapshot)

    async def _channel_tree(self, name: bytes, create: bool = False) -> StagingTree:
        channel = os.fsdecode(name)
        try:
            validate_channel(channel)
        except UsageError:
            raise OSError(errno.EINVAL, "not a valid channel name") from None
        return await self.tree(channel, create)

    # --- directory operations ----------------------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> Attr:
        if len(name) > NAME_MAX:  # what every call naming it must answer (chmod, unlink, rename...)
            raise OSError(errno.ENAMETOOLONG, "file name too long")
        if parent == STAGING_INO:
            tree = await self._channel_tree(name)
            node = tree.get(ROOT)
        else:
            tree, local = self._split(parent)
            node = await tree.lookup(local, name)
        attr = await self._attr(tree, node)
        tree.remember(node.ino)  # nothing may fail once the kernel is to hold it
        return attr

    def remember(self, ino: int) -> None:
        if ino == STAGING_INO:
            return
        tree, local = self._split(ino)
        tree.remember(local)

    def forget(self, ino: int, count: int) -> None:
        if ino == STAGING_INO:
            return
        tree, local = self._split(ino)
        tree.forget(local, count)

    async def getattr(self, ino: int) -> Attr:
        if ino == STAGING_INO:
            self.root_attr.nlink = 2 + len(self._known_channels())
            return self.root_attr
        tree, local = self._split(ino)
        return await self._attr(tree, tree.get(local))

    def _known_channels(self) -> set[str]:
        """Channels as last listed (no listing of the repository here)."""
        return set(self.view.channel_names()) | self._state_names() | set(self.trees)

    async def children(self, ino: int) -> list[tuple[bytes, Attr]]:
        if ino == STAGING_INO:
            items = []
            for channel in await self.channel_names():
                try:
                    tree = await self.tree(channel)
                except OSError:
                    continue  # logged: one unreadable channel must not hide the others
                items.append((channel.encode(), await self._attr(tree, tree.get(ROOT))))
            self.root_attr.nlink = 2 + len(items)
            return items
        tree, local = self._split(ino)
        entries = await tree.listdir(local)
        links = await tree.folder_links([node for _, node in entries])
        return [(name, self.attr(tree, node, links)) for name, node in entries]

    async def readlink(self, ino: int) -> bytes:
        tree, local = self._split(ino)
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
            channel = os.fsdecode(name)
            if channel in self.trees or channel in self._state_names() or channel in self.view.channel_names():
                raise OSError(errno.EEXIST, "channel exists")
            tree = await self._channel_tree(name, create=True)
            node = await tree.setattr(ROOT, mode=mode & 0o7777, uid=uid, gid=gid)
        else:
            tree, local = self._split(parent)
            node = await tree.create(local, name, kind, mode, uid, gid, rdev, target)
        attr = await self._attr(tree, node)
        tree.remember(node.ino)
        return attr

    async def link(self, ino: int, parent: int, name: bytes) -> Attr:
        tree, local = self._split(ino)
        parent_tree, parent_local = self._split_dir(parent)
        if parent_tree is not tree:
            raise OSError(errno.EXDEV, "hardlinks cannot cross channels")
        node = await tree.link(local, parent_local, name)
        tree.remember(node.ino)
        return self.attr(tree, node)

    def _split_dir(self, ino: int) -> tuple[StagingTree, int]:
        if ino == STAGING_INO:
            raise OSError(errno.EPERM, "only channel folders belong here")
        return self._split(ino)

    async def unlink(self, parent: int, name: bytes) -> None:
        tree, local = self._split_dir(parent)
        await tree.unlink(local, name)

    async def rmdir(self, parent: int, name: bytes) -> None:
        if parent == STAGING_INO:
            await self._remove_channel(name)
            return
        tree, local = self._split(parent)
        await tree.rmdir(local, name)

    async def _remove_channel(self, name: bytes) -> None:
        """rmdir staging/NEW: drop the empty staging tree of a channel without snapshots."""
        tree = await self._channel_tree(name)
        if await tree.listdir(ROOT):
            raise OSError(errno.ENOTEMPTY, "staging tree is not empty")
        if tree.channel in self.view.channel_names():
            raise OSError(errno.EBUSY, "the staging folder of a channel with snapshots stays")
        if tree.lookups.get(ROOT, 0) > 1 or tree.open_files:
            raise OSError(errno.EBUSY, "in use")
        tree.close()
        del self.trees[tree.channel]
        self.behind.drop_channel(tree.channel)
        del self._by_slot[self._slots.pop(tree.channel)]
        shutil.rmtree(tree.folder)

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int) -> None:
        old_tree, old_local = self._split_dir(old_parent)
        new_tree, new_local = self._split_dir(new_parent)
        if old_tree is not new_tree:
            raise OSError(errno.EXDEV, "rename across channels")
        await old_tree.rename(old_local, old_name, new_local, new_name, flags)

    async def setattr(self, ino: int, **changes: int | None) -> Attr:
        if ino == STAGING_INO:
            raise OSError(errno.EPERM, "the staging folder itself cannot change")
        tree, local = self._split(ino)
        if changes.get("size") is not None:
            self.behind.abort_stream(tree, local)
        node = await tree.setattr(local, **changes)
        return await self._attr(tree, node)

    # --- extended attributes and control requests -----------------------------------------

    def listxattr(self, ino: int) -> list[bytes]:
        if ino == STAGING_INO:
            return []
        tree, local = self._split(ino)
        return tree.listxattr(local)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if ino == STAGING_INO:
            raise OSError(errno.ENODATA, "no such attribute")
        tree, local = self._split(ino)
        if local == ROOT and name == CONTROL_CHANNEL:
            return tree.channel.encode()
        if local == ROOT and name.startswith(CONTROL_COMMIT + b"."):
            result = self._results.get(name[len(CONTROL_COMMIT) + 1:])
            if result is None:
                raise OSError(errno.ENODATA, "no such commit")
            return result
        return tree.getxattr(local, name)

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        if ino == STAGING_INO:
            raise OSError(errno.EPERM, "the staging folder itself cannot change")
        tree, local = self._split(ino)
        if local == ROOT and name == CONTROL_COMMIT:
            await self._commit_request(tree, value)
            return
        refusal = xattr_refusal(name, value)
        if refusal is not None:
            raise OSError(refusal, os.strerror(refusal))
        await tree.setxattr(local, name, value)

    async def removexattr(self, ino: int, name: bytes) -> None:
        tree, local = self._split_dir(ino)
        await tree.removexattr(local, name)

    async def _commit_request(self, tree: StagingTree, token: bytes) -> None:
        if not token or len(token) > 64:
            raise OSError(errno.EINVAL, "bad commit token")
        while len(self._results) >= 64:  # results are read right away; keep only recent ones
            del self._results[next(iter(self._results))]
        stop_point("commit")
        try:
            result = await self.commit(tree.channel)
        except RekkordError as exc:
            log.error("commit of staging/%s failed: %s", tree.channel, exc.message)
            self._results[token] = CommitReply(error=exc.message).encode()
            raise OSError(errno.EIO, exc.message) from None
        self._results[token] = CommitReply(
            id=result.tag.id_hex, channel=result.tag.channel, time_ns=result.tag.time_ns, files=result.files,
            size=result.size, bytes_new=result.bytes_new, bytes_stored=result.bytes_stored,
            duration=round(result.duration, 3)).encode()

    async def commit(self, channel: str) -> CommitResult:
        lock = self._locks.setdefault(channel, trio.Lock())
        async with lock:
            tree = await self.tree(channel)
            await self.behind.learn_stored(again=True)
            committer = Committer(self.repo, tree, self.behind.uploader(channel))
            result = await committer.run()
        if committer.garbage:  # deleting thousands of files need not delay the reply
            self._background(trio.to_thread.run_sync, remove_files, committer.garbage)
        log.info("committed staging/%s as snapshot %s", channel, result.tag.id_hex)
        await self.view.refresh(force=True)
        return result

    # --- files ---------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> Handle:
        tree, local = self._split(ino)
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
        tree.opened(local)
        return handle

    async def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> tuple[Handle, Attr]:
        attr = await self.make(parent, name, EntryKind.FILE, mode, uid, gid)
        tree, local = self._split(attr.ino)
        tree.opened(local)
        return Handle(tree, local, sequential_end=0), attr

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        return await handle.tree.read(handle.ino, offset, size)

    async def write(self, handle: Handle, offset: int, data: bytes) -> int:
        stop_point("staging-write")
        appending = self.behind.before_write(handle, offset)
        written = await handle.tree.write(handle.ino, offset, data)
        handle.wrote = True
        if appending:
            self.behind.appended(handle, written)
        return written

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

