"""A pure view of a repository's snapshots as a directory tree (no FUSE here).

Layout (the mount contract, docs/mount.md):

    /channels/<channel>/<YYYY-MM-DD_HH-MM-SS>/...   one directory per snapshot (UTC)
    /channels/<channel>/latest -> <YYYY-MM-DD_HH-MM-SS>
    /ids/<snapshot id>/...

Inode numbers are derived from what a node is (snapshot ID and path, or
hardlink group), so they are stable for the life of the mount (and across
mounts) without keeping a table of everything ever visited: the table holds only
nodes the kernel currently knows (lookup count > 0). Hardlinks of one snapshot
share an inode. Errors are raised as OSError with an errno; the FUSE adapter
turns them into replies.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable
from datetime import UTC, datetime

import trio

from .blobcache import BlobCache, DirectoryListing
from .errors import RekkordError
from .format import BlobRef, ChunkRef, Entry, EntryKind, Tag
from .fsmeta import FILE_TYPE_BITS
from .keys import Capability
from .nodes import (
    CHANNELS_INO,
    IDS_INO,
    IMMUTABLE_TIMEOUT,
    IO_BLOCK_SIZE,
    MUTABLE_TIMEOUT,
    NAME_MAX,
    ROOT_INO,
    Attr,
    FileReader,
    Node,
    NodeKind,
    derive_ino,
    tree_ino,
)
from .readahead import ReadAhead
from .repository import Repository
from .treebudget import TreeBudget

log = logging.getLogger(__name__)

STATFS_BLOCK = 4096  # the unit of sizes in statfs (df counts in it)
LATEST = b"latest"
_FILE, _DIRECTORY, _SYMLINK = EntryKind.FILE, EntryKind.DIRECTORY, EntryKind.SYMLINK


def snapshot_dir_name(time_ns: int) -> str:
    return datetime.fromtimestamp(time_ns // 1_000_000_000, tz=UTC).strftime("%Y-%m-%d_%H-%M-%S")


def _fuse_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class SnapshotView:
    """Every snapshot of a repository, or one snapshot subtree, as nodes."""

    def __init__(self, repo: Repository, blobs: BlobCache, refresh_interval: float = 10.0,
                 channels: set[str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.repo = repo
        self.blobs = blobs
        self.refresh_interval = refresh_interval
        self.channel_filter = channels
        self.clock = clock
        self.can_read = repo.keys.can(Capability.READ)
        self.nodes: dict[int, Node] = {}
        self._extra_root: dict[bytes, Callable[[], Node]] = {}  # e.g. staging/
        self._tags: list[Tag] = []
        self._channels: dict[str, list[tuple[str, Tag]]] = {}
        self._ids: dict[str, Tag] = {}
        self._refreshed_at: float | None = None
        # snapshot ID -> (root directory record, root metadata if stored)
        self._roots: dict[bytes, tuple[BlobRef, Entry | None]] = {}
        # snapshot ID -> what walking it has expanded, and the paths listed so far
        self._budgets: dict[bytes, tuple[TreeBudget, set[bytes]]] = {}
        self._refresh_lock = trio.Lock()
        self._warned: set[str] = set()  # problems already logged (each refresh meets them again)
        self.read_ahead = ReadAhead(blobs)
        self.started_ns = time.time_ns()
        self.uid, self.gid = os.getuid(), os.getgid()
        self._add_permanent(ROOT_INO)
        self._add_permanent(CHANNELS_INO)
        self._add_permanent(IDS_INO)

    def _virtual_attr(self, ino: int, mode: int = stat.S_IFDIR | 0o755, time_ns: int | None = None) -> Attr:
        moment = self.started_ns if time_ns is None else time_ns
        return Attr(ino, mode, 2 if stat.S_ISDIR(mode) else 1, self.uid, self.gid, 0, moment, moment, moment,
                    timeout=MUTABLE_TIMEOUT)

    def _add_permanent(self, ino: int) -> Node:
        node = Node(ino, NodeKind.VIRTUAL_DIR, self._virtual_attr(ino), permanent=True)
        self.nodes[ino] = node
        return node

    def add_root_folder(self, name: bytes, make: Callable[[], Node]) -> None:
        """A folder of the mount's root that another core serves (staging/)."""
        self._extra_root[name] = make

    def use_subtree(self, tag: Tag, entry: Entry) -> None:
        """Make the root a snapshot directory (`rekkord mount ID[:path] MNT`)."""
        attr = self._tree_attr(ROOT_INO, entry)
        self.nodes = {ROOT_INO: Node(ROOT_INO, NodeKind.TREE, attr, tag.snapshot_id, b"", entry, permanent=True)}

    def start(self, nursery: trio.Nursery) -> None:
        """Background work (read-ahead) runs in this nursery."""
        self.read_ahead.nursery = nursery

    # --- snapshot list -----------------------------------------------------------

    def _fresh(self) -> bool:
        return self._refreshed_at is not None and self.clock() - self._refreshed_at < self.refresh_interval

    async def refresh(self, force: bool = False) -> None:
        """Re-list snapshots if the last listing is older than the interval."""
        if not force and self._fresh():
            return  # the common case, without taking the lock
        async with self._refresh_lock:
            now = self.clock()
            if not force and self._fresh():
                return
            tags: list[Tag] = []
            if self.repo.keys.can(Capability.LIST):
                tags = await self.repo.list_tags(warn=self._warn_once)
            if self.channel_filter:
                tags = [t for t in tags if t.channel in self.channel_filter]
            if self.can_read:
                # `latest` is the newest snapshot whose record matches its tag: load
                # each channel's newest records until one does (once per snapshot)
                by_channel: dict[str, list[Tag]] = {}
                for tag in tags:
                    by_channel.setdefault(tag.channel, []).append(tag)
                for channel_tags in by_channel.values():
                    await self.repo.newest_usable(channel_tags, warn=self._warn_once)
                tags = [t for t in tags if t.snapshot_id not in self.repo.unusable]
            channels: dict[str, list[tuple[str, Tag]]] = {}
            for tag in tags:  # oldest first: same-second names get _2, _3...
                names = channels.setdefault(tag.channel, [])
                base = snapshot_dir_name(tag.time_ns)
                name, counter = base, 1
                while any(n == name for n, _ in names):
                    counter += 1
                    name = f"{base}_{counter}"
                names.append((name, tag))
            self._tags = tags
            self._channels = channels
            self._ids = {t.id_hex: t for t in tags}
            self._refreshed_at = now
            if CHANNELS_INO in self.nodes and IDS_INO in self.nodes:  # 2 + the folders each holds
                self.nodes[CHANNELS_INO].attr.nlink = 2 + len(channels)
                self.nodes[IDS_INO].attr.nlink = 2 + len(tags)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    def channel_names(self) -> list[str]:
        return sorted(self._channels)

    def latest(self, channel: str) -> str | None:
        names = self._channels.get(channel)
        return names[-1][0] if names else None

    def latest_tag(self, channel: str) -> Tag | None:
        names = self._channels.get(channel)
        return names[-1][1] if names else None

    # --- node construction -----------------------------------------------------

    def _channel_node(self, channel: str) -> Node:
        ino = derive_ino(b"channel", channel.encode())
        attr = self._virtual_attr(ino, time_ns=self._channels[channel][-1][1].time_ns)  # its newest snapshot
        attr.nlink = 2 + len(self._channels[channel])
        node = self.nodes.get(ino)
        if node is None:
            return Node(ino, NodeKind.VIRTUAL_DIR, attr, channel=channel)
        node.attr = attr
        return node

    def _latest_node(self, channel: str) -> Node:
        ino = derive_ino(b"latest", channel.encode())
        target = (self.latest(channel) or "").encode()
        node = self.nodes.get(ino)
        if node is None:
            node = Node(ino, NodeKind.LATEST, self._virtual_attr(ino, stat.S_IFLNK | 0o777), channel=channel)
        node.attr.size = len(target)
        return node

    def _snapshot_node(self, tag: Tag) -> Node:
        ino = derive_ino(tag.snapshot_id, b"/")
        node = self.nodes.get(ino)
        if node is None:
            node = Node(ino, NodeKind.SNAPSHOT_ROOT, self._snapshot_attr(ino, tag), tag.snapshot_id, b"")
        return node

    def _snapshot_attr(self, ino: int, tag: Tag) -> Attr:
        """The root's own metadata once its record is loaded (commits store it);
        until then a stand-in the kernel must not keep."""
        loaded = self._roots.get(tag.snapshot_id)
        root = loaded[1] if loaded else None
        nlink = 2 + ((self.blobs.known_subdirs(loaded[0].id) or 0) if loaded else 0)
        if root is not None:
            return Attr(ino, stat.S_IFDIR | root.mode, nlink, root.uid, root.gid, 0, root.atime_ns, root.mtime_ns,
                        root.ctime_ns)
        mode = stat.S_IFDIR | (0o755 if self.can_read else 0o000)
        return Attr(ino, mode, nlink, self.uid, self.gid, 0, tag.time_ns, tag.time_ns, tag.time_ns,
                    timeout=IMMUTABLE_TIMEOUT if loaded is not None else MUTABLE_TIMEOUT)

    def _tree_attr(self, ino: int, entry: Entry) -> Attr:
        """A folder's link count is 2 + its subfolders, once its record was read
        (subdir_counts; listing its parent reads the records of its folders)."""
        kind = entry.kind  # compared with module constants: EntryKind.X is a slow look-up
        if kind == _DIRECTORY:
            subdirs = self.blobs.known_subdirs(entry.dir_ref.id) if entry.dir_ref is not None else None
            nlink = 2 + (subdirs or 0)
        else:
            nlink = entry.nlink if entry.link_id else 1
        size = entry.size if kind == _FILE or kind == _SYMLINK else 0
        return Attr(ino, FILE_TYPE_BITS[kind] | entry.mode, max(nlink, 1), entry.uid, entry.gid, size,
                    entry.atime_ns, entry.mtime_ns, entry.ctime_ns, entry.rdev)

    def _tree_node(self, parent: Node, entry: Entry, listing: DirectoryListing, ino: int | None = None) -> Node:
        assert parent.snapshot is not None
        path = parent.path + b"/" + entry.name
        if ino is None:
            ino = tree_ino(parent.snapshot, path, entry)
        node = self.nodes.get(ino)
        if node is None:
            node = Node(ino, NodeKind.TREE, self._tree_attr(ino, entry), parent.snapshot, path, entry,
                        siblings=listing)
        return node

    def _child_inos(self, parent: Node, listing: DirectoryListing) -> list[int]:
        """The inode of each entry of a snapshot folder, derived once per folder
        node (walks list folders again: `find`, then `cat` of what it found)."""
        inos = parent.child_inos
        if inos is None or len(inos) != len(listing.entries):
            snapshot, prefix = parent.snapshot, parent.path + b"/"
            assert snapshot is not None
            inos = parent.child_inos = [tree_ino(snapshot, prefix + e.name, e) for e in listing.entries]
        return inos

    # --- lookup counting ---------------------------------------------------------

    def remember(self, node: Node) -> Node:
        """The kernel now holds one more reference to node."""
        known = self.nodes.setdefault(node.ino, node)
        known.lookups += 1
        return known

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is None:
            return
        node.lookups -= count
        if node.lookups <= 0 and not node.permanent:
            del self.nodes[ino]

    def node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise _fuse_error(errno.ENOENT)
        return node

    # --- directory operations ----------------------------------------------------

    async def _listing(self, node: Node) -> DirectoryListing:
        if not self.can_read:
            raise _fuse_error(errno.EACCES)
        ref = node.dir_ref
        if node.kind == NodeKind.SNAPSHOT_ROOT:
            assert node.snapshot is not None
            ref = await self._snapshot_root_dir(node.snapshot)
        assert ref is not None
        try:
            listing = await self.blobs.directory(ref)
            self._account(node, ref, listing)
        except RekkordError as exc:
            log.error("cannot list '%s' in snapshot %s: %s", os.fsdecode(node.path or b"/"),
                      (node.snapshot or b"").hex(), exc.message)
            raise _fuse_error(errno.EIO) from None
        return listing

    def _account(self, node: Node, ref: BlobRef, listing: DirectoryListing) -> None:
        """Count a directory the first time it is listed at its path: a snapshot
        whose records multiply work gets EIO past the limits (treebudget.py)."""
        snapshot = node.snapshot or b""
        budget, listed = self._budgets.get(snapshot) or self._budgets.setdefault(
            snapshot, (TreeBudget(f"snapshot {snapshot.hex()}"), set()))
        if node.path not in listed:
            listed.add(node.path)
            budget.visit(ref.id, len(listing.entries), node.path.count(b"/") + 1, os.fsdecode(node.path or b"/"))

    async def _snapshot_root_dir(self, snapshot_id: bytes) -> BlobRef:
        loaded = self._roots.get(snapshot_id)
        if loaded is None:
            tag = self._ids.get(snapshot_id.hex())
            if tag is None:
                raise _fuse_error(errno.ENOENT)  # forgotten since it was listed
            try:
                snapshot = await self.repo.load_snapshot(tag)
            except RekkordError as exc:
                log.error("cannot open snapshot %s: %s", snapshot_id.hex(), exc.message)
                raise _fuse_error(errno.EIO) from None
            await self.blobs.subdir_counts([snapshot.root_ref])  # for its link count
            loaded = self._roots[snapshot_id] = (snapshot.root_ref, snapshot.root)
            node = self.nodes.get(derive_ino(snapshot_id, b"/"))
            if node is not None:
                node.attr = self._snapshot_attr(node.ino, tag)
        return loaded[0]

    async def children(self, parent_ino: int) -> list[tuple[bytes, Node]]:
        """Every entry of a directory, in a stable order, as (name, node)."""
        parent = self.node(parent_ino)
        if not parent.is_dir:
            raise _fuse_error(errno.ENOTDIR)
        if parent.kind in (NodeKind.SNAPSHOT_ROOT, NodeKind.TREE):
            listing = await self._listing(parent)
            self.read_ahead.subdirs(listing)
            await self._count_subdirs(listing.entries)
            known = self.nodes.get
            return [(e.name, known(ino) or self._tree_node(parent, e, listing, ino))
                    for e, ino in zip(listing.entries, self._child_inos(parent, listing))]
        await self.refresh()
        if parent.ino == ROOT_INO:
            items = [(b"channels", self.nodes[CHANNELS_INO]), (b"ids", self.nodes[IDS_INO])]
            items += [(name, make()) for name, make in sorted(self._extra_root.items())]
            return items
        if parent.ino == CHANNELS_INO:
            return [(c.encode(), self._channel_node(c)) for c in self.channel_names()]
        if parent.ino == IDS_INO:
            return [(t.id_hex.encode(), self._snapshot_node(t)) for t in self._tags]
        channel = parent.channel
        assert channel is not None
        names = self._channels.get(channel, [])
        items = [(n.encode(), self._snapshot_node(t)) for n, t in names]
        if names:
            items.append((LATEST, self._latest_node(channel)))
        return items

    async def lookup(self, parent_ino: int, name: bytes) -> Node:
        """The child called name, remembered (its lookup count incremented)."""
        if len(name) > NAME_MAX:
            raise _fuse_error(errno.ENAMETOOLONG)
        parent = self.node(parent_ino)
        if not parent.is_dir:
            raise _fuse_error(errno.ENOTDIR)
        if parent.kind in (NodeKind.SNAPSHOT_ROOT, NodeKind.TREE):
            listing = await self._listing(parent)
            index = listing.index.get(name)
            if index is None:
                raise _fuse_error(errno.ENOENT)
            await self._count_subdirs([listing.entries[index]])
            ino = parent.child_inos[index] if parent.child_inos is not None else None
            return self.remember(self._tree_node(parent, listing.entries[index], listing, ino))
        found = await self._virtual_child(parent, name)
        if found is None:
            # a snapshot written since the last listing (another machine, a commit)
            await self.refresh(force=self._refresh_due())
            found = await self._virtual_child(parent, name)
        if found is None:
            raise _fuse_error(errno.ENOENT)
        if found.kind == NodeKind.SNAPSHOT_ROOT and self.can_read and found.snapshot is not None:
            await self._snapshot_root_dir(found.snapshot)  # reply with the root's real metadata
            found.attr = self._snapshot_attr(found.ino, self._ids[found.snapshot.hex()])
        return self.remember(found)

    async def _count_subdirs(self, entries: list[Entry]) -> None:
        """Read the records of these folders (one batch) for their link counts."""
        refs = [e.dir_ref for e in entries if e.kind == EntryKind.DIRECTORY and e.dir_ref is not None]
        if refs:
            await self.blobs.subdir_counts(refs)

    def _refresh_due(self) -> bool:
        # Unknown names must not turn every failed lookup into a LIST request.
        return self._refreshed_at is None or self.clock() - self._refreshed_at >= 1.0

    async def _virtual_child(self, parent: Node, name: bytes) -> Node | None:
        await self.refresh()
        if parent.ino == ROOT_INO:
            if name == b"channels":
                return self.nodes[CHANNELS_INO]
            if name == b"ids":
                return self.nodes[IDS_INO]
            make = self._extra_root.get(name)
            return make() if make else None
        text = os.fsdecode(name)
        if parent.ino == CHANNELS_INO:
            return self._channel_node(text) if text in self._channels else None
        if parent.ino == IDS_INO:
            tag = self._ids.get(text)
            return self._snapshot_node(tag) if tag else None
        channel = parent.channel
        if channel is None or channel not in self._channels:
            return None
        if name == LATEST:
            return self._latest_node(channel)
        for snap_name, tag in self._channels[channel]:
            if snap_name == text:
                return self._snapshot_node(tag)
        return None

    async def getattr(self, ino: int) -> Attr:
        node = self.node(ino)
        if node.kind == NodeKind.LATEST:
            self._latest_node(node.channel or "")  # refresh its size
        elif node.kind == NodeKind.SNAPSHOT_ROOT and self.can_read and node.snapshot is not None:
            await self._snapshot_root_dir(node.snapshot)
        elif node.kind == NodeKind.TREE and node.entry is not None and node.entry.kind == EntryKind.DIRECTORY:
            await self._count_subdirs([node.entry])  # a mounted subtree's root, or a record unread so far
            node.attr.nlink = self._tree_attr(ino, node.entry).nlink
        elif ino == ROOT_INO:
            node.attr.nlink = 4 + len(self._extra_root)  # channels, ids, staging
        return node.attr

    async def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        if node.kind == NodeKind.LATEST:
            await self.refresh()
            return (self.latest(node.channel or "") or "").encode()
        if node.entry is None or node.entry.kind != EntryKind.SYMLINK:
            raise _fuse_error(errno.EINVAL)
        if not self.can_read:
            raise _fuse_error(errno.EACCES)
        return node.entry.target or b""

    def check_readable(self, ino: int) -> Node:
        """For opendir: a LogOnly key sees snapshot names but nothing inside."""
        node = self.node(ino)
        if node.kind in (NodeKind.SNAPSHOT_ROOT, NodeKind.TREE) and not self.can_read:
            raise _fuse_error(errno.EACCES)
        return node

    # --- extended attributes -------------------------------------------------------

    def listxattr(self, ino: int) -> list[bytes]:
        node = self.node(ino)
        return [name for name, _ in node.entry.xattrs] if node.entry is not None else []

    def getxattr(self, ino: int, name: bytes) -> bytes:
        node = self.node(ino)
        if node.entry is not None:
            for xname, value in node.entry.xattrs:
                if xname == name:
                    return value
        raise _fuse_error(errno.ENODATA)

    # --- files ---------------------------------------------------------------------

    def open(self, ino: int) -> FileReader:
        node = self.node(ino)
        if node.entry is None or node.entry.kind != EntryKind.FILE:
            raise _fuse_error(errno.EISDIR if node.is_dir else errno.EINVAL)
        if not self.can_read:
            raise _fuse_error(errno.EACCES)
        try:
            reader = FileReader(node)
        except RekkordError as exc:
            log.error("cannot open '%s': %s", os.fsdecode(node.path), exc.message)
            raise _fuse_error(errno.EIO) from None
        self.read_ahead.files_after(node)
        return reader

    async def read(self, reader: FileReader, offset: int, size: int) -> bytes:
        if offset >= reader.map.size or size <= 0:
            return b""
        if offset == reader.next_offset:
            self.read_ahead.chunks_after(reader, reader.map.index_of(offset))
        data = await reader.map.read(functools.partial(self._chunk, reader), offset, size)
        reader.next_offset = offset + len(data)
        return data

    async def _chunk(self, reader: FileReader, chunk: ChunkRef) -> bytes | bytearray:
        try:
            data = await self.blobs.chunk(chunk)
        except RekkordError as exc:
            log.error("cannot read '%s' in snapshot %s: %s", os.fsdecode(reader.node.path),
                      (reader.node.snapshot or b"").hex(), exc.message)
            raise _fuse_error(errno.EIO) from None
        if len(data) != chunk.size:
            log.error("cannot read '%s': chunk %s has the wrong size", os.fsdecode(reader.node.path), chunk.id.hex())
            raise _fuse_error(errno.EIO)
        return data

    # --- filesystem ----------------------------------------------------------------

    def statfs(self) -> dict[str, int]:
        """What `df` shows used: the logical size of the snapshots listed (each
        once, as `rekkord snapshots` sums them) and their files. Nothing is
        free here: staging adds the room of its own disk (fuse.py)."""
        total = sum(t.size for t in self._tags)
        blocks = (total + STATFS_BLOCK - 1) // STATFS_BLOCK
        return {"f_bsize": IO_BLOCK_SIZE, "f_frsize": STATFS_BLOCK, "f_blocks": blocks, "f_bfree": 0,
                "f_bavail": 0, "f_files": sum(t.files for t in self._tags), "f_ffree": 0, "f_favail": 0,
                "f_namemax": 255}
