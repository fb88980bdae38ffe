"""What is inside a snapshot, as nodes: each snapshot's root record, folder
listings (counted against the tree budget), and the nodes and attributes of
their entries. Inode numbers derive from snapshot ID and path (nodes.py)."""

from __future__ import annotations

import errno
import logging
import os
import stat

from .blobcache import BlobCache, DirectoryListing
from .errors import RekkordError, errno_error
from .format import BlobRef, Entry, EntryKind, Tag
from .fsmeta import FILE_TYPE_BITS
from .nodes import (
    IMMUTABLE_TIMEOUT,
    MUTABLE_TIMEOUT,
    Attr,
    Node,
    NodeKind,
    child_inos,
    derive_ino,
    tree_ino,
)
from .readahead import ReadAhead
from .snapshotlist import SnapshotList
from .treebudget import TreeBudget

log = logging.getLogger(__name__)

_FILE, _DIRECTORY, _SYMLINK = EntryKind.FILE, EntryKind.DIRECTORY, EntryKind.SYMLINK
_TREE = NodeKind.TREE  # one look-up, not one per entry (enum members are slow attributes)


class SnapshotTrees:
    """Snapshot roots and folders; nodes come from and go to the view's table."""

    def __init__(self, snapshots: SnapshotList, blobs: BlobCache, nodes: dict[int, Node]) -> None:
        self.snapshots = snapshots
        self.repo = snapshots.repo
        self.blobs = blobs
        self.read_ahead = ReadAhead(blobs)
        self.nodes = nodes  # the view's table of the nodes the kernel holds
        self.can_read = snapshots.can_read
        self.uid, self.gid = os.getuid(), os.getgid()
        # snapshot ID -> (root directory record, root metadata if stored)
        self._roots: dict[bytes, tuple[BlobRef, Entry | None]] = {}
        # snapshot ID -> what walking it has expanded, and the paths listed so far
        self._budgets: dict[bytes, tuple[TreeBudget, set[bytes]]] = {}

    # --- snapshot roots ------------------------------------------------------------

    def snapshot_node(self, tag: Tag) -> Node:
        ino = derive_ino(tag.snapshot_id, b"/")
        node = self.nodes.get(ino)
        if node is None:
            node = Node(ino, NodeKind.SNAPSHOT_ROOT, self.snapshot_attr(ino, tag), tag.snapshot_id, b"")
        return node

    def snapshot_attr(self, ino: int, tag: Tag) -> Attr:
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

    async def root_dir(self, snapshot_id: bytes) -> BlobRef:
        """The snapshot's root record, loading the snapshot the first time."""
        loaded = self._roots.get(snapshot_id)
        if loaded is None:
            tag = self.snapshots.ids.get(snapshot_id.hex())
            if tag is None:
                raise errno_error(errno.ENOENT)  # forgotten since it was listed
            try:
                snapshot = await self.repo.load_snapshot(tag)
            except RekkordError as exc:
                log.error("cannot open snapshot %s: %s", snapshot_id.hex(), exc.message)
                raise errno_error(errno.EIO) from None
            await self.blobs.subdir_counts([snapshot.root_ref])  # for its link count
            loaded = self._roots[snapshot_id] = (snapshot.root_ref, snapshot.root)
            node = self.nodes.get(derive_ino(snapshot_id, b"/"))
            if node is not None:
                node.attr = self.snapshot_attr(node.ino, tag)
        return loaded[0]

    async def load_root(self, node: Node) -> None:
        """Reply with a snapshot root's real metadata (its record loaded)."""
        if self.can_read and node.snapshot is not None:
            await self.root_dir(node.snapshot)
            node.attr = self.snapshot_attr(node.ino, self.snapshots.ids[node.snapshot.hex()])

    # --- folders -------------------------------------------------------------------

    async def listing(self, node: Node) -> DirectoryListing:
        if not self.can_read:
            raise errno_error(errno.EACCES)
        ref = node.dir_ref
        if node.kind == NodeKind.SNAPSHOT_ROOT:
            assert node.snapshot is not None
            ref = await self.root_dir(node.snapshot)
        assert ref is not None
        try:
            listing = await self.blobs.directory(ref)
            self._account(node, ref, listing)
        except RekkordError as exc:
            log.error("cannot list '%s' in snapshot %s: %s", os.fsdecode(node.path or b"/"),
                      (node.snapshot or b"").hex(), exc.message)
            raise errno_error(errno.EIO) from None
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

    async def count_subdirs(self, entries: list[Entry]) -> None:
        """Read the records of these folders (one batch) for their link counts."""
        refs = [e.dir_ref for e in entries if e.kind == _DIRECTORY and e.dir_ref is not None]
        if refs:
            await self.blobs.subdir_counts(refs)

    # --- entries -------------------------------------------------------------------

    def tree_attr(self, ino: int, entry: Entry) -> Attr:
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

    def tree_node(self, parent: Node, entry: Entry, listing: DirectoryListing, ino: int | None = None) -> Node:
        assert parent.snapshot is not None
        path = parent.path + b"/" + entry.name
        if ino is None:
            ino = tree_ino(parent.snapshot, path, entry)
        node = self.nodes.get(ino)
        if node is None:
            node = Node(ino, _TREE, self.tree_attr(ino, entry), parent.snapshot, path, entry,
                        siblings=listing)
        return node

    def child_inos(self, parent: Node, listing: DirectoryListing) -> list[int]:
        """The inode of each entry of a snapshot folder, derived once per folder
        node (walks list folders again: `find`, then `cat` of what it found)."""
        inos = parent.child_inos
        if inos is None or len(inos) != len(listing.entries):
            assert parent.snapshot is not None
            inos = parent.child_inos = child_inos(parent.snapshot, parent.path, listing.entries)
        return inos

    async def children(self, parent: Node) -> list[tuple[bytes, Node]]:
        """Every entry of a snapshot folder, as (name, node)."""
        listing, inos, attrs = await self.entry_attrs(parent)
        known, snapshot, prefix = self.nodes.get, parent.snapshot, parent.path + b"/"
        items = []
        for entry, ino, attr in zip(listing.entries, inos, attrs):
            node = known(ino)
            if node is None:
                node = Node(ino, _TREE, attr, snapshot, prefix + entry.name, entry, siblings=listing)
            items.append((entry.name, node))
        return items

    async def entry_attrs(self, parent: Node) -> tuple[DirectoryListing, list[int], list[Attr]]:
        """A snapshot folder's listing, its entries' inode numbers and
        attributes, without building their nodes (readdirplus: the view
        builds one only when the kernel asks for it)."""
        listing = await self.listing(parent)
        self.read_ahead.subdirs(listing)
        await self.count_subdirs(listing.entries)
        inos = self.child_inos(parent, listing)
        attr_of = self.tree_attr
        return listing, inos, [attr_of(ino, entry) for entry, ino in zip(listing.entries, inos)]

    async def child(self, parent: Node, name: bytes) -> Node:
        """The entry called name of a snapshot folder (not remembered)."""
        listing = await self.listing(parent)
        index = listing.index.get(name)
        if index is None:
            raise errno_error(errno.ENOENT)
        await self.count_subdirs([listing.entries[index]])
        ino = parent.child_inos[index] if parent.child_inos is not None else None
        return self.tree_node(parent, listing.entries[index], listing, ino)

    async def refresh_nlink(self, node: Node) -> None:
        """A folder's link count once its record is read (a mounted subtree's
        root, or a record unread so far)."""
        assert node.entry is not None
        await self.count_subdirs([node.entry])
        node.attr.nlink = self.tree_attr(node.ino, node.entry).nlink
