"""A pure view of a repository's snapshots as a directory tree (no FUSE here).

Layout (the mount contract, docs/mount.md):

    /channels/<channel>/<YYYY-MM-DD_HH-MM-SS>/...   one directory per snapshot (UTC)
    /channels/<channel>/latest -> <YYYY-MM-DD_HH-MM-SS>
    /ids/<snapshot id>/...

Inode numbers are derived from what a node is (snapshot ID and path, or
hardlink group), so they are stable for the life of the mount (and across
mounts) without keeping a table of everything ever visited: the table holds only
nodes the kernel currently knows (lookup count > 0). An entry the kernel knows
only from a listing is kept as its place in that listing (nodes.Listed) until
the kernel asks for it. Hardlinks of one snapshot share an inode. Errors are
raised as OSError with an errno; the FUSE adapter turns them into replies.

This module keeps that table and routes each request; the parts are
snapshotlist.py (which snapshots exist), virtualdirs.py (the folders above
them) and snapshottree.py (what is inside each).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .blobcache import BlobCache
from .errors import RekkordError, errno_error
from .format import ChunkRef, Entry, EntryKind, Tag
from .nodes import (
    CHANNELS_INO,
    IDS_INO,
    IO_BLOCK_SIZE,
    NAME_MAX,
    ROOT_INO,
    Attr,
    FileReader,
    Listed,
    Node,
    NodeKind,
)
from .repository import Repository
from .snapshotlist import SnapshotList, snapshot_dir_name
from .snapshottree import SnapshotTrees
from .virtualdirs import VirtualDirs

if TYPE_CHECKING:
    from .blobcache import DirectoryListing

__all__ = ["SnapshotView", "snapshot_dir_name"]

log = logging.getLogger(__name__)

STATFS_BLOCK = 4096  # the unit of sizes in statfs (df counts in it)


class SnapshotView:
    """Every snapshot of a repository, or one snapshot subtree, as nodes."""

    def __init__(self, repo: Repository, blobs: BlobCache, refresh_interval: float = 10.0,
                 channels: set[str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.repo = repo
        self.blobs = blobs
        self.nodes: dict[int, Node] = {}  # what the kernel holds (shared with the parts)
        self.listed: dict[int, Listed] = {}  # what it holds from listings only, never in nodes as well
        self.snapshots = SnapshotList(repo, refresh_interval, channels, clock)
        self.can_read = self.snapshots.can_read
        self.trees = SnapshotTrees(self.snapshots, blobs, self.nodes)
        self.virtual = VirtualDirs(self.snapshots, self.trees, self.nodes)
        self.read_ahead = self.trees.read_ahead
        self.started_ns = self.virtual.started_ns
        for ino in (ROOT_INO, CHANNELS_INO, IDS_INO):
            self.virtual.add_permanent(ino)

    def add_root_folder(self, name: bytes, make: Callable[[], Node]) -> None:
        """A folder of the mount's root that another core serves (staging/)."""
        self.virtual.extra_root[name] = make

    def use_subtree(self, tag: Tag, entry: Entry) -> None:
        """Make the root a snapshot directory (`rekkord mount ID[:path] MNT`)."""
        attr = self.trees.tree_attr(ROOT_INO, entry)
        self.nodes.clear()
        self.listed.clear()
        self.nodes[ROOT_INO] = Node(ROOT_INO, NodeKind.TREE, attr, tag.snapshot_id, b"", entry, permanent=True)

    def start(self, nursery: trio.Nursery) -> None:
        """Background work (read-ahead) runs in this nursery."""
        self.read_ahead.nursery = nursery

    # --- snapshot list -----------------------------------------------------------

    async def refresh(self, force: bool = False) -> None:
        """Re-list snapshots if the last listing is older than the interval."""
        if await self.snapshots.refresh(force):
            self.virtual.count_links()

    def channel_names(self) -> list[str]:
        return self.snapshots.channel_names()

    def latest(self, channel: str) -> str | None:
        return self.snapshots.latest(channel)

    def latest_tag(self, channel: str) -> Tag | None:
        return self.snapshots.latest_tag(channel)

    # --- lookup counting ---------------------------------------------------------

    def remember(self, node: Node) -> Node:
        """The kernel now holds one more reference to node."""
        known = self.nodes.get(node.ino) or self._build_listed(node.ino)
        if known is None:
            known = self.nodes[node.ino] = node
        known.lookups += 1
        return known

    def _remember_listed(self, parent: Node, listing: DirectoryListing, inos: list[int], index: int) -> None:
        """The kernel now holds one more reference to entry index of a listing."""
        ino = inos[index]
        known: Node | Listed | None = self.nodes.get(ino) or self.listed.get(ino)
        if known is None:
            self.listed[ino] = Listed(parent, listing, index)
        else:
            known.lookups += 1

    def _build_listed(self, ino: int) -> Node | None:
        """The node of an entry held from a listing, now that it is asked for."""
        listed = self.listed.pop(ino, None)
        if listed is None:
            return None
        entry = listed.listing.entries[listed.index]
        node = self.trees.tree_node(listed.parent, entry, listed.listing, ino)
        node.lookups += listed.lookups
        self.nodes[ino] = node
        return node

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is not None:
            node.lookups -= count
            if node.lookups <= 0 and not node.permanent:
                del self.nodes[ino]
            return
        listed = self.listed.get(ino)
        if listed is not None:
            listed.lookups -= count
            if listed.lookups <= 0:
                del self.listed[ino]

    def holds(self, ino: int) -> bool:
        """Whether the kernel holds this inode (from a lookup or a listing)."""
        return ino in self.nodes or ino in self.listed

    def node(self, ino: int) -> Node:
        node = self.nodes.get(ino) or self._build_listed(ino)
        if node is None:
            raise errno_error(errno.ENOENT)
        return node

    # --- directory operations ----------------------------------------------------

    async def children(self, parent_ino: int) -> list[tuple[bytes, Node]]:
        """Every entry of a directory, in a stable order, as (name, node)."""
        parent = self.node(parent_ino)
        if not parent.is_dir:
            raise errno_error(errno.ENOTDIR)
        if parent.kind in (NodeKind.SNAPSHOT_ROOT, NodeKind.TREE):
            return await self.trees.children(parent)
        await self.refresh()
        return self.virtual.children(parent)

    async def entries(self, parent_ino: int) -> tuple[Callable[[Any], object], list[tuple[bytes, Attr, Any]]]:
        """What readdirplus hands the kernel: each entry's (name, attributes,
        key), and what to call with its key once the kernel keeps the entry.
        Inside a snapshot the key is the entry's place in its listing and no
        node is built (nodes.Listed)."""
        parent = self.node(parent_ino)
        if parent.kind not in (NodeKind.SNAPSHOT_ROOT, NodeKind.TREE) or not parent.is_dir:
            return self.remember, [(name, node.attr, node) for name, node in await self.children(parent_ino)]
        listing, inos, attrs = await self.trees.entry_attrs(parent)
        remember = functools.partial(self._remember_listed, parent, listing, inos)
        return remember, [(entry.name, attr, index) for index, (entry, attr) in enumerate(zip(listing.entries, attrs))]

    async def lookup(self, parent_ino: int, name: bytes) -> Node:
        """The child called name, remembered (its lookup count incremented)."""
        if len(name) > NAME_MAX:
            raise errno_error(errno.ENAMETOOLONG)
        parent = self.node(parent_ino)
        if not parent.is_dir:
            raise errno_error(errno.ENOTDIR)
        if parent.kind in (NodeKind.SNAPSHOT_ROOT, NodeKind.TREE):
            return self.remember(await self.trees.child(parent, name))
        await self.refresh()
        found = self.virtual.child(parent, name)
        if found is None:
            # a snapshot written since the last listing (another machine, a commit)
            await self.refresh(force=self.snapshots.refresh_due())
            found = self.virtual.child(parent, name)
        if found is None:
            raise errno_error(errno.ENOENT)
        if found.kind == NodeKind.SNAPSHOT_ROOT:
            await self.trees.load_root(found)  # reply with the root's real metadata
        return self.remember(found)

    async def getattr(self, ino: int) -> Attr:
        node = self.node(ino)
        if node.kind == NodeKind.LATEST:
            self.virtual.latest_node(node.channel or "")  # refresh its size
        elif node.kind == NodeKind.SNAPSHOT_ROOT and self.can_read and node.snapshot is not None:
            await self.trees.root_dir(node.snapshot)
        elif node.kind == NodeKind.TREE and node.entry is not None and node.entry.kind == EntryKind.DIRECTORY:
            await self.trees.refresh_nlink(node)
        elif ino == ROOT_INO:
            node.attr.nlink = 4 + len(self.virtual.extra_root)  # channels, ids, staging
        return node.attr

    async def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        if node.kind == NodeKind.LATEST:
            await self.refresh()
            return (self.latest(node.channel or "") or "").encode()
        if node.entry is None or node.entry.kind != EntryKind.SYMLINK:
            raise errno_error(errno.EINVAL)
        if not self.can_read:
            raise errno_error(errno.EACCES)
        return node.entry.target or b""

    def check_readable(self, ino: int) -> Node:
        """For opendir: a LogOnly key sees snapshot names but nothing inside."""
        node = self.node(ino)
        if node.kind in (NodeKind.SNAPSHOT_ROOT, NodeKind.TREE) and not self.can_read:
            raise errno_error(errno.EACCES)
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
        raise errno_error(errno.ENODATA)

    # --- files ---------------------------------------------------------------------

    def open(self, ino: int) -> FileReader:
        node = self.node(ino)
        if node.entry is None or node.entry.kind != EntryKind.FILE:
            raise errno_error(errno.EISDIR if node.is_dir else errno.EINVAL)
        if not self.can_read:
            raise errno_error(errno.EACCES)
        try:
            reader = FileReader(node)
        except RekkordError as exc:
            log.error("cannot open '%s': %s", os.fsdecode(node.path), exc.message)
            raise errno_error(errno.EIO) from None
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
            raise errno_error(errno.EIO) from None
        if len(data) != chunk.size:
            log.error("cannot read '%s': chunk %s has the wrong size", os.fsdecode(reader.node.path), chunk.id.hex())
            raise errno_error(errno.EIO)
        return data

    # --- filesystem ----------------------------------------------------------------

    def statfs(self) -> dict[str, int]:
        """What `df` shows used: the logical size of the snapshots listed (each
        once, as `rekkord snapshots` sums them) and their files. Nothing is
        free here: staging adds the room of its own disk (fuse.py)."""
        total = sum(t.size for t in self.snapshots.tags)
        blocks = (total + STATFS_BLOCK - 1) // STATFS_BLOCK
        return {"f_bsize": IO_BLOCK_SIZE, "f_frsize": STATFS_BLOCK, "f_blocks": blocks, "f_bfree": 0,
                "f_bavail": 0, "f_files": sum(t.files for t in self.snapshots.tags), "f_ffree": 0, "f_favail": 0,
                "f_namemax": 255}
