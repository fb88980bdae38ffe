"""A staging tree starts as a copy-on-write view of its base snapshot:
directories keep their stored record ID until first needed ("expanded"), and
files keep their chunk list until written."""

from __future__ import annotations

import errno
import os

import trio

from ..blobcache import BlobCache
from ..errors import errno_error
from ..format import EntryKind, Snapshot
from .inode import ROOT, Inode, encode_xattrs
from .journal import Journal


class CopyOnWrite:
    def __init__(self, journal: Journal, blobs: BlobCache | None) -> None:
        self.journal = journal
        self.blobs = blobs  # None: the key cannot read stored data (WriteOnly)
        self._expanding: dict[int, trio.Event] = {}

    def seed(self, snapshot_id: bytes | None, snapshot: Snapshot | None, now: int) -> None:
        """The journal's part of a reset to a snapshot (or to an empty tree)."""
        root = snapshot.root if snapshot is not None else None
        db = self.journal.db
        self.journal.write_rows()
        with self.journal.transaction():
            db.execute("DELETE FROM dentries")
            db.execute("DELETE FROM inodes")
            db.execute("DELETE FROM inline")
            db.execute("DELETE FROM meta")
            db.execute(
                "INSERT INTO inodes (ino, kind, mode, uid, gid, atime_ns, mtime_ns, ctime_ns, nlink, dir_ref, xattrs) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 2, ?, ?)",
                (ROOT, EntryKind.DIRECTORY, root.mode if root else 0o755, root.uid if root else os.getuid(),
                 root.gid if root else os.getgid(), root.atime_ns if root else now,
                 root.mtime_ns if root else (snapshot.time_ns if snapshot else now),
                 root.ctime_ns if root else now, snapshot.root_ref.encode() if snapshot else None,
                 encode_xattrs(root.xattrs) if root else None))
            self.journal.set_meta("base", snapshot_id)
            self.journal.set_meta("max_link_id", snapshot.max_link_id if snapshot else 0)
            self.journal.set_dirty(False)
            self.journal.set_meta("folder_links", 1)
            # files inside directories not expanded yet: counted in the snapshot's totals only
            self.journal.set_meta("stored_files", snapshot.files if snapshot else 0)
            self.journal.set_meta("stored_size", snapshot.size if snapshot else 0)
        self.journal.flush()
        self.journal.forget_rows()

    async def folder_links(self, nodes: list[Inode]) -> dict[int, int]:
        """Link counts of folders not expanded yet (the journal knows the others):
        2 + the folders their stored record holds, read in one batch."""
        pending = [node for node in nodes if node.is_dir and node.dir_ref is not None]
        if not pending or self.blobs is None:
            return {}
        counts = await self.blobs.subdir_counts([node.dir_ref for node in pending if node.dir_ref])
        return {node.ino: 2 + counts[node.dir_ref.id] for node in pending
                if node.dir_ref is not None and node.dir_ref.id in counts}

    async def expand(self, ino: int) -> Inode:
        """A directory with its entries in the journal (read from its record once)."""
        node = self.journal.get(ino)
        if not node.is_dir:
            raise errno_error(errno.ENOTDIR)
        while node.dir_ref is not None:
            pending = self._expanding.get(ino)
            if pending is not None:
                await pending.wait()
                node = self.journal.get(ino)
                continue
            event = self._expanding[ino] = trio.Event()
            try:
                await self._expand_record(node)
            finally:
                del self._expanding[ino]
                event.set()
            node = self.journal.get(ino)
        return node

    async def _expand_record(self, node: Inode) -> None:
        if self.blobs is None:
            raise errno_error(errno.EACCES)
        assert node.dir_ref is not None
        listing = await self.blobs.directory(node.dir_ref)
        files = [entry for entry in listing.entries if entry.kind == EntryKind.FILE]
        journal, db = self.journal, self.journal.db
        journal.write_rows()  # (link_id is looked up by SQL)
        with journal.transaction():
            journal.set_meta("stored_files", int(journal.meta("stored_files", 0)) - len(files))
            journal.set_meta("stored_size", int(journal.meta("stored_size", 0)) - sum(entry.size for entry in files))
            for entry in listing.entries:
                existing = None
                if entry.link_id:
                    row = db.execute("SELECT ino FROM inodes WHERE link_id = ?", (entry.link_id,)).fetchone()
                    existing = row[0] if row else None
                if existing is None:
                    cursor = db.execute(
                        "INSERT INTO inodes (kind, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, rdev, nlink, "
                        "target, chunks, dir_ref, link_id, xattrs) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (entry.kind, entry.mode, entry.uid, entry.gid, entry.size, entry.atime_ns, entry.mtime_ns,
                         entry.ctime_ns, entry.rdev, max(entry.nlink, 1) if entry.link_id else
                         (2 if entry.kind == EntryKind.DIRECTORY else 1), entry.target,
                         entry.chunks_raw if entry.kind == EntryKind.FILE else None,
                         entry.dir_ref.encode() if entry.dir_ref else None,
                         entry.link_id or None, encode_xattrs(entry.xattrs) if entry.xattrs else None))
                    existing = cursor.lastrowid
                db.execute("INSERT INTO dentries (parent, name, ino) VALUES (?, ?, ?)",
                           (node.ino, entry.name, existing))
            journal.change(node.ino, dir_ref=None, nlink=2 + listing.subdirs)

    async def own_links(self, ino: int) -> None:
        """Before an inode of a base hardlink group changes: expand every directory.

        Its other names may sit in directories still unexpanded, whose stored
        records would otherwise keep the old content and metadata for them.
        Expansion maps every member of the group onto this one inode."""
        node = self.journal.get(ino)
        if node.kind != EntryKind.FILE or not node.link_id:
            return
        while True:
            self.journal.write_rows()
            pending = [row[0] for row in self.journal.db.execute("SELECT ino FROM inodes WHERE dir_ref IS NOT NULL")]
            if not pending:
                return
            for directory in pending:
                await self.expand(directory)
