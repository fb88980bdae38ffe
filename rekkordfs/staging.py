"""A writable staging tree for one channel, journaled on local disk (no FUSE here).

State lives in a folder per repository and channel:

    tree.db     SQLite (WAL): inodes, directory entries, metadata, and the
                content of small written files (up to INLINE_MAX); every
                operation is one transaction, so a killed process loses nothing
                that was written before it
    data/<ino>  content of larger files written since the base snapshot
    frozen/     content captured by a running commit (see capture())

The tree starts as a copy-on-write view of a base snapshot: directories keep
their stored record ID until first touched ("expanded"), files keep their chunk
list until written. Unchanged parts thus cost nothing and are committed as the
very same records. Errors are OSError with an errno; the FUSE adapter replies
with it.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from .blobcache import BlobCache
from .chunkmap import ChunkMap, pwrite_all
from .format import BlobRef, ChunkRef, Entry, EntryKind, Snapshot, decode_chunks, encode_chunks
from .fsmeta import ACL_ACCESS, FILE_TYPE_BITS, acl_after_chmod, mode_from_acl
from .journalspace import disk_is_short, give_back, journal_error, open_journal
from .lru import WeightedLRU
from .testhooks import check_inode_cache

ROOT = 1
NAME_MAX = 255
INODE_CACHE = 100_000
CHUNK_MAPS = 1024  # decoded chunk lists of stored files being read
INLINE_WRITE = 1 << 20  # every FUSE write (max_write is 1 MiB) goes to the page cache inline
# Files up to this size keep their content in the journal: creating a file on
# disk costs far more than a journal transaction, and most files are small.
INLINE_MAX = 128 << 10
# Where a file's content is (the `local` column).
STORED, DATA_FILE, INLINE = 0, 1, 2
RESERVE_SIZE = 512 << 10  # freed when the disk is full, so deletions can still be journaled

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB);
CREATE TABLE IF NOT EXISTS inodes (
    ino INTEGER PRIMARY KEY AUTOINCREMENT,  -- numbers are never reused
    kind INTEGER NOT NULL, mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    atime_ns INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    rdev INTEGER NOT NULL DEFAULT 0, nlink INTEGER NOT NULL DEFAULT 1,
    target BLOB,            -- symlink target
    chunks BLOB,            -- file content as stored chunks (when local = 0)
    local INTEGER NOT NULL DEFAULT 0,   -- file content is: 0 chunks, 1 data/<ino>, 2 table inline
    dir_ref BLOB,           -- directory not expanded yet: its stored record (format.BlobRef)
    link_id INTEGER,        -- hardlink group of the base snapshot
    xattrs BLOB
);
CREATE TABLE IF NOT EXISTS dentries (
    parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL, PRIMARY KEY (parent, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dentries_by_ino ON dentries (ino);
CREATE TABLE IF NOT EXISTS inline (ino INTEGER PRIMARY KEY, data BLOB NOT NULL);  -- small files' content
"""

DIR_REF_COLUMN = 14  # position of dir_ref in COLUMNS
COLUMNS = ("ino, kind, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, rdev, nlink, target, chunks, local, "
           "dir_ref, link_id, xattrs")


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def encode_xattrs(items: list[tuple[bytes, bytes]]) -> bytes:
    out = bytearray(struct.pack("<H", len(items)))
    for name, value in items:
        out += struct.pack("<HI", len(name), len(value)) + name + value
    return bytes(out)


def decode_xattrs(raw: bytes | None) -> list[tuple[bytes, bytes]]:
    if not raw:
        return []
    (count,) = struct.unpack_from("<H", raw, 0)
    pos, items = 2, []
    for _ in range(count):
        name_len, value_len = struct.unpack_from("<HI", raw, pos)
        pos += 6
        items.append((raw[pos:pos + name_len], raw[pos + name_len:pos + name_len + value_len]))
        pos += name_len + value_len
    return items


@dataclass(slots=True)
class Inode:
    ino: int
    kind: EntryKind
    mode: int  # permission bits
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int
    nlink: int
    target: bytes | None
    chunks: bytes | None
    local: int  # STORED, DATA_FILE or INLINE (true: the content is written here, not stored)
    dir_ref: BlobRef | None
    link_id: int | None
    xattrs: bytes | None

    @property
    def is_dir(self) -> bool:
        return self.kind == EntryKind.DIRECTORY

    @property
    def full_mode(self) -> int:
        return FILE_TYPE_BITS[self.kind] | self.mode

    def entry(self, name: bytes) -> Entry:
        """Its metadata as a directory entry (content fields are the caller's)."""
        return Entry(self.kind, name, self.mode, self.uid, self.gid, self.mtime_ns, self.atime_ns, self.ctime_ns,
                     self.size, self.nlink, 0, self.rdev, decode_xattrs(self.xattrs), target=self.target)


def _row(row: tuple) -> Inode:
    values = list(row)
    values[1] = EntryKind(values[1])
    values[DIR_REF_COLUMN] = BlobRef.decode(values[DIR_REF_COLUMN]) if values[DIR_REF_COLUMN] else None
    return Inode(*values)


@dataclass
class Capture:
    """The tree as it was when a commit began (see StagingTree.capture)."""

    inodes: dict[int, Inode]
    children: dict[int, list[tuple[bytes, int]]]  # expanded directories only
    frozen: dict[int, Path]  # files whose content must be uploaded from these paths
    inline: list[int]  # files whose content must be uploaded from the journal (captured_content())
    uploaded: dict[int, list[ChunkRef]]  # files whose write-behind upload matches the captured content
    versions: dict[int, int]
    sequence: int
    max_link_id: int
    stored_files: int = 0  # files (and their bytes) in directories never expanded,
    stored_size: int = 0  # which the commit does not walk


@dataclass
class _Upload:
    version: int
    chunks: list[ChunkRef]


class StagingTree:
    def __init__(self, folder: Path, channel: str, blobs: BlobCache | None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.folder = folder
        self.channel = channel
        self.blobs = blobs  # None: the key cannot read stored data (WriteOnly)
        self.clock = clock
        self.data_dir = folder / "data"
        self._data_prefix = os.fsdecode(self.data_dir) + "/"
        self.frozen_dir = folder / "frozen"
        new = not (folder / "tree.db").exists()
        try:
            for path in (folder, self.data_dir, self.frozen_dir):
                path.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.db = open_journal(folder / "tree.db", SCHEMA)
        except BaseException:
            _discard(folder, new)
            raise
        self.lookups: dict[int, int] = {}  # kernel references, for deferred deletion
        self.open_files: dict[int, int] = {}
        self.versions: dict[int, int] = {}  # bumped on every content change (in memory)
        self.uploads: dict[int, _Upload] = {}  # write-behind results
        self.uploading: dict[int, trio.Event] = {}  # write-behind in progress, set when done
        self.frozen: dict[int, Path] = {}  # content a running commit still needs
        # inline content a running commit still needs: None while the journal
        # still holds it unchanged, else the content it had (see _preserve_inline)
        self.frozen_inline: dict[int, bytes | None] = {}
        self.sequence = 0  # bumped on every change
        self._touched: set[int] = set()  # files written since their last flush
        self._expanding: dict[int, trio.Event] = {}
        self._chunk_maps: WeightedLRU[int, ChunkMap] = WeightedLRU(CHUNK_MAPS)  # decoded, for reads
        self._dirty = bool(self._meta("dirty", 0))
        self._reserve = folder / "reserve"
        self._freed = False  # the open transaction shrank inline content: give the space back
        self._doomed: list[tuple[int, bool]] = []  # (inode, has a data file) deleted by the open transaction
        # rows as journaled: every change of a row goes through _update_inode() or
        # _delete_inode(), which drop it here; bulk changes and rollbacks clear it all
        self._inodes: dict[int, Inode] = {}
        self._check_cache = check_inode_cache()  # tests: compare with the journal
        try:
            self._recover()
            self._ensure_reserve(room=RESERVE_SIZE)
            if new and not self._reserve.exists():
                # a new tree starts only with its reserve, or it could not even be deleted from
                raise OSError(errno.ENOSPC, "no room for a new staging tree")
        except BaseException:
            self.db.close()  # an open connection would keep the journal locked
            _discard(folder, new)
            raise

    # --- journal helpers ---------------------------------------------------------

    def close(self) -> None:
        self.db.close()

    def _meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def _set_meta(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _transaction(self) -> _Tx:
        return _Tx(self.db, self._after_commit, self._after_rollback)

    def _update_inode(self, ino: int, assignments: str, *values: object) -> None:
        """UPDATE inodes SET <assignments> for one inode (inside a transaction)."""
        self.db.execute(f"UPDATE inodes SET {assignments} WHERE ino = ?", (*values, ino))
        self._inodes.pop(ino, None)

    def _delete_inode(self, ino: int) -> None:
        self.db.execute("DELETE FROM inodes WHERE ino = ?", (ino,))
        self._inodes.pop(ino, None)

    def _after_commit(self) -> None:
        doomed, self._doomed = self._doomed, []
        for ino, has_file in doomed:
            if has_file:
                _unlink(self.data_path(ino))
            self.uploads.pop(ino, None)
            self.versions.pop(ino, None)
            self._chunk_maps.pop(ino)
        if doomed or self._freed:
            self._freed = False
            # on a disk short of space, deleting must free space at once
            give_back(self.db, urgent=not self._reserve.exists() or disk_is_short(self.folder))
            self._ensure_reserve()

    def _after_rollback(self) -> None:
        """The in-memory state must not claim what was not written."""
        self._inodes.clear()
        self._doomed = []
        self._freed = False
        self._dirty = bool(self._meta("dirty", 0))

    def _journal_freeing(self, apply: Callable[[], None]) -> None:
        """Run apply() in a transaction. When the disk is full, spend the reserve
        file so that operations which free space (unlink, rmdir, rename over)
        can still be recorded; it is made again once there is room."""
        try:
            with self._transaction():
                apply()
        except OSError as exc:
            if exc.errno != errno.ENOSPC or not self._reserve.exists():
                raise
            self._reserve.unlink()
            with self._transaction():
                apply()

    def _ensure_reserve(self, room: int = 2 * RESERVE_SIZE) -> None:
        """Make the reserve file again, once the disk has `room` free: space a
        user just freed on a full disk is theirs first."""
        if self._reserve.exists():
            return
        try:
            st = os.statvfs(self.folder)
            if st.f_bavail * st.f_frsize < room:
                return
            with open(self._reserve, "wb") as handle:
                handle.write(bytes(RESERVE_SIZE))
        except OSError:
            self._reserve.unlink(missing_ok=True)  # still full: try again later

    def _recover(self) -> None:
        """After a crash: drop inodes no entry refers to, and stale frozen copies."""
        with self._transaction():
            if self.db.execute("SELECT 1 FROM inodes WHERE ino = ?", (ROOT,)).fetchone() is None:
                now = self.clock()
                self.db.execute(
                    "INSERT INTO inodes (ino, kind, mode, uid, gid, atime_ns, mtime_ns, ctime_ns, nlink) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 2)",
                    (ROOT, EntryKind.DIRECTORY, 0o755, os.getuid(), os.getgid(), now, now, now))
            self.db.execute("DELETE FROM inodes WHERE ino != ? AND ino NOT IN (SELECT ino FROM dentries)", (ROOT,))
            if not self._meta("folder_links"):  # journals from before folders counted their subfolders
                self.db.execute(
                    "UPDATE inodes SET nlink = 2 + (SELECT count(*) FROM dentries d JOIN inodes c ON c.ino = d.ino "
                    "WHERE d.parent = inodes.ino AND c.kind = ?) WHERE kind = ? AND nlink > 0 AND dir_ref IS NULL",
                    (EntryKind.DIRECTORY, EntryKind.DIRECTORY))
                self._set_meta("folder_links", 1)
            self.db.execute("DELETE FROM inline WHERE ino NOT IN (SELECT ino FROM inodes WHERE local = ?)", (INLINE,))
        local = {str(r[0]) for r in self.db.execute("SELECT ino FROM inodes WHERE local = ?", (DATA_FILE,))}
        for path in self.data_dir.iterdir():  # data of deleted or committed files, copies in progress
            if path.name not in local:
                path.unlink()
        for path in self.frozen_dir.iterdir():
            path.unlink()

    @property
    def base(self) -> bytes | None:
        return self._meta("base")

    @property
    def dirty(self) -> bool:
        """Changed since the base snapshot (a clean tree may follow newer snapshots)."""
        return self._dirty

    def _changed(self) -> None:
        self.sequence += 1
        if not self._dirty:
            self._set_meta("dirty", 1)
            self._dirty = True

    # --- seeding -------------------------------------------------------------------

    def seed(self, snapshot_id: bytes | None, snapshot: Snapshot | None) -> None:
        """Reset to a copy-on-write view of a snapshot (or to an empty tree)."""
        now = self.clock()
        root = snapshot.root if snapshot is not None else None
        with self._transaction():
            self.db.execute("DELETE FROM dentries")
            self.db.execute("DELETE FROM inodes")
            self.db.execute("DELETE FROM inline")
            self.db.execute("DELETE FROM meta")
            self.db.execute(
                "INSERT INTO inodes (ino, kind, mode, uid, gid, atime_ns, mtime_ns, ctime_ns, nlink, dir_ref, xattrs) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 2, ?, ?)",
                (ROOT, EntryKind.DIRECTORY, root.mode if root else 0o755, root.uid if root else os.getuid(),
                 root.gid if root else os.getgid(), root.atime_ns if root else now,
                 root.mtime_ns if root else (snapshot.time_ns if snapshot else now),
                 root.ctime_ns if root else now, snapshot.root_ref.encode() if snapshot else None,
                 encode_xattrs(root.xattrs) if root else None))
            self._set_meta("base", snapshot_id)
            self._set_meta("max_link_id", snapshot.max_link_id if snapshot else 0)
            self._set_meta("dirty", 0)
            self._set_meta("folder_links", 1)
            # files inside directories not expanded yet: counted in the snapshot's totals only
            self._set_meta("stored_files", snapshot.files if snapshot else 0)
            self._set_meta("stored_size", snapshot.size if snapshot else 0)
        self._inodes.clear()
        self._dirty = False
        self._chunk_maps = WeightedLRU(CHUNK_MAPS)
        for path in self.data_dir.iterdir():
            path.unlink()
        self.uploads.clear()
        self.versions.clear()
        self.sequence += 1

    # --- reading the tree ------------------------------------------------------------

    def get(self, ino: int) -> Inode:
        node = self._inodes.get(ino)
        if node is not None and self._check_cache:
            row = self.db.execute(f"SELECT {COLUMNS} FROM inodes WHERE ino = ?", (ino,)).fetchone()
            assert row is not None and _row(row) == node, f"stale cached inode {ino}: {node} != {row}"
        if node is None:
            row = self.db.execute(f"SELECT {COLUMNS} FROM inodes WHERE ino = ?", (ino,)).fetchone()
            if row is None:
                raise _error(errno.ENOENT)
            if len(self._inodes) > INODE_CACHE:
                self._inodes.clear()
            node = self._inodes[ino] = _row(row)
        return node

    async def folder_links(self, nodes: list[Inode]) -> dict[int, int]:
        """Link counts of folders not expanded yet (the journal knows the others):
        2 + the folders their stored record holds, read in one batch."""
        pending = [node for node in nodes if node.is_dir and node.dir_ref is not None]
        if not pending or self.blobs is None:
            return {}
        counts = await self.blobs.subdir_counts([node.dir_ref for node in pending if node.dir_ref])
        return {node.ino: 2 + counts[node.dir_ref.id] for node in pending
                if node.dir_ref is not None and node.dir_ref.id in counts}

    def size_of(self, node: Inode) -> int:
        return self.usage_of(node)[0]

    def usage_of(self, node: Inode) -> tuple[int, int | None]:
        """Size, and 512-byte blocks used when known: a data file may have holes."""
        if node.kind == EntryKind.FILE and node.local == DATA_FILE:
            try:
                st = os.stat(self.data_path(node.ino))
            except FileNotFoundError:
                return 0, 0
            return st.st_size, st.st_blocks
        return node.size, None

    async def expand(self, ino: int) -> Inode:
        """A directory with its entries in the journal (read from its record once)."""
        node = self.get(ino)
        if not node.is_dir:
            raise _error(errno.ENOTDIR)
        while node.dir_ref is not None:
            pending = self._expanding.get(ino)
            if pending is not None:
                await pending.wait()
                node = self.get(ino)
                continue
            event = self._expanding[ino] = trio.Event()
            try:
                await self._expand_record(node)
            finally:
                del self._expanding[ino]
                event.set()
            node = self.get(ino)
        return node

    async def _expand_record(self, node: Inode) -> None:
        if self.blobs is None:
            raise _error(errno.EACCES)
        assert node.dir_ref is not None
        listing = await self.blobs.directory(node.dir_ref)
        files = [entry for entry in listing.entries if entry.kind == EntryKind.FILE]
        with self._transaction():
            self._set_meta("stored_files", int(self._meta("stored_files", 0)) - len(files))
            self._set_meta("stored_size", int(self._meta("stored_size", 0)) - sum(entry.size for entry in files))
            for entry in listing.entries:
                existing = None
                if entry.link_id:
                    row = self.db.execute("SELECT ino FROM inodes WHERE link_id = ?", (entry.link_id,)).fetchone()
                    existing = row[0] if row else None
                if existing is None:
                    cursor = self.db.execute(
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
                self.db.execute("INSERT INTO dentries (parent, name, ino) VALUES (?, ?, ?)",
                                (node.ino, entry.name, existing))
            self._update_inode(node.ino, "dir_ref = NULL, nlink = ?", 2 + listing.subdirs)

    async def own_links(self, ino: int) -> None:
        """Before an inode of a base hardlink group changes: expand every directory.

        Its other names may sit in directories still unexpanded, whose stored
        records would otherwise keep the old content and metadata for them.
        Expansion maps every member of the group onto this one inode."""
        node = self.get(ino)
        if node.kind != EntryKind.FILE or not node.link_id:
            return
        while True:
            pending = [row[0] for row in self.db.execute("SELECT ino FROM inodes WHERE dir_ref IS NOT NULL")]
            if not pending:
                return
            for directory in pending:
                await self.expand(directory)

    async def lookup(self, parent: int, name: bytes) -> Inode:
        await self.expand(parent)
        row = self.db.execute("SELECT ino FROM dentries WHERE parent = ? AND name = ?", (parent, name)).fetchone()
        if row is None:
            raise _error(errno.ENOENT)
        return self.get(row[0])

    async def listdir(self, parent: int) -> list[tuple[bytes, Inode]]:
        await self.expand(parent)
        rows = self.db.execute(
            f"SELECT d.name, {', '.join('i.' + c.strip() for c in COLUMNS.split(','))} FROM dentries d "
            "JOIN inodes i ON i.ino = d.ino WHERE d.parent = ? ORDER BY d.name", (parent,)).fetchall()
        return [(row[0], _row(row[1:])) for row in rows]

    def _child(self, parent: int, name: bytes) -> int | None:
        row = self.db.execute("SELECT ino FROM dentries WHERE parent = ? AND name = ?", (parent, name)).fetchone()
        return row[0] if row else None

    def _has_children(self, ino: int) -> bool:
        return self.db.execute("SELECT 1 FROM dentries WHERE parent = ? LIMIT 1", (ino,)).fetchone() is not None

    # --- creating and removing entries -------------------------------------------------

    @staticmethod
    def _check_name(name: bytes) -> None:
        if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
            raise _error(errno.EINVAL)
        if len(name) > NAME_MAX:
            raise _error(errno.ENAMETOOLONG)

    async def create(self, parent: int, name: bytes, kind: EntryKind, mode: int, uid: int, gid: int,
                     rdev: int = 0, target: bytes | None = None) -> Inode:
        self._check_name(name)
        parent_node = await self.expand(parent)
        if self._child(parent, name) is not None:
            raise _error(errno.EEXIST)
        now = self.clock()
        if parent_node.mode & stat.S_ISGID:  # BSD group semantics of set-group-ID directories
            gid = parent_node.gid
            if kind == EntryKind.DIRECTORY:
                mode |= stat.S_ISGID
        with self._transaction():
            cursor = self.db.execute(
                "INSERT INTO inodes (kind, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, rdev, nlink, target, "
                "local) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (kind, mode & 0o7777, uid, gid, len(target) if target is not None else 0, now, now, now, rdev,
                 2 if kind == EntryKind.DIRECTORY else 1, target, INLINE if kind == EntryKind.FILE else STORED))
            ino = cursor.lastrowid
            assert ino is not None
            if kind == EntryKind.FILE:
                self.db.execute("INSERT INTO inline (ino, data) VALUES (?, ?)", (ino, b""))
            self.db.execute("INSERT INTO dentries (parent, name, ino) VALUES (?, ?, ?)", (parent, name, ino))
            self._touch_dir(parent, now)
            if kind == EntryKind.DIRECTORY:
                self._add_links(parent, 1)
            self._changed()
        if kind == EntryKind.FILE:
            self._content_changed(ino)
        return self.get(ino)

    def _touch_dir(self, ino: int, now: int) -> None:
        self._update_inode(ino, "mtime_ns = ?, ctime_ns = ?", now, now)

    def _add_links(self, folder: int, delta: int) -> None:
        """A folder gained or lost subfolders: its link count is 2 + their number
        (inside a transaction; folders are expanded before their entries change)."""
        if delta:
            self._update_inode(folder, "nlink = nlink + ?", delta)

    async def link(self, ino: int, parent: int, name: bytes) -> Inode:
        self._check_name(name)
        node = self.get(ino)
        if node.is_dir:
            raise _error(errno.EPERM)
        await self.own_links(ino)
        await self.expand(parent)
        if self._child(parent, name) is not None:
            raise _error(errno.EEXIST)
        now = self.clock()
        with self._transaction():
            self.db.execute("INSERT INTO dentries (parent, name, ino) VALUES (?, ?, ?)", (parent, name, ino))
            self._update_inode(ino, "nlink = nlink + 1, ctime_ns = ?", now)
            self._touch_dir(parent, now)
            self._changed()
        return self.get(ino)

    async def unlink(self, parent: int, name: bytes) -> None:
        await self.expand(parent)
        ino = self._child(parent, name)
        if ino is None:
            raise _error(errno.ENOENT)
        if self.get(ino).is_dir:
            raise _error(errno.EISDIR)
        await self.own_links(ino)

        def apply() -> None:
            self._remove_entry(parent, name, ino)
            self._changed()

        self._journal_freeing(apply)

    async def rmdir(self, parent: int, name: bytes) -> None:
        await self.expand(parent)
        ino = self._child(parent, name)
        if ino is None:
            raise _error(errno.ENOENT)
        if not self.get(ino).is_dir:
            raise _error(errno.ENOTDIR)
        await self.expand(ino)
        if self._has_children(ino):
            raise _error(errno.ENOTEMPTY)

        def apply() -> None:
            self._remove_entry(parent, name, ino)
            self._changed()

        self._journal_freeing(apply)

    def _remove_entry(self, parent: int, name: bytes, ino: int) -> None:
        """Inside a transaction: drop one entry; the inode goes with its last link."""
        now = self.clock()
        self.db.execute("DELETE FROM dentries WHERE parent = ? AND name = ?", (parent, name))
        self._touch_dir(parent, now)
        node = self.get(ino)
        if node.is_dir:
            self._add_links(parent, -1)
        links = 0 if node.is_dir else node.nlink - 1
        if links > 0:
            self._update_inode(ino, "nlink = ?, ctime_ns = ?", links, now)
        else:
            self._update_inode(ino, "nlink = 0, ctime_ns = ?", now)
            self._maybe_delete(ino)

    def _maybe_delete(self, ino: int) -> None:
        """Delete an unlinked inode once neither the kernel nor an open file holds it."""
        if self.lookups.get(ino) or self.open_files.get(ino):
            return
        row = self.db.execute("SELECT nlink, local FROM inodes WHERE ino = ?", (ino,)).fetchone()
        if row is None or row[0] > 0 or ino == ROOT:
            return
        if row[1] == INLINE:
            self._preserve_inline(ino)
            self.db.execute("DELETE FROM inline WHERE ino = ?", (ino,))
        self._delete_inode(ino)
        self._doomed.append((ino, row[1] == DATA_FILE))  # its data file goes once the transaction is committed

    def _is_ancestor(self, ancestor: int, ino: int) -> bool:
        """True when ancestor is ino or one of its parent directories."""
        current = ino
        while current != ROOT:
            if current == ancestor:
                return True
            row = self.db.execute("SELECT parent FROM dentries WHERE ino = ? LIMIT 1", (current,)).fetchone()
            if row is None:
                return False
            current = row[0]
        return ancestor == ROOT

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                     flags: int = 0) -> None:
        self._check_name(new_name)
        await self.expand(old_parent)
        await self.expand(new_parent)
        moved = self._child(old_parent, old_name)
        if moved is None:
            raise _error(errno.ENOENT)
        target = self._child(new_parent, new_name)
        moved_node = self.get(moved)
        exchange = bool(flags & RENAME_EXCHANGE)
        if flags & RENAME_NOREPLACE and target is not None:
            raise _error(errno.EEXIST)
        if exchange and target is None:
            raise _error(errno.ENOENT)
        if moved == target:
            return  # two links of one inode: POSIX says do nothing
        if moved_node.is_dir and self._is_ancestor(moved, new_parent):
            raise _error(errno.EINVAL)
        if exchange:
            assert target is not None
            if self.get(target).is_dir and self._is_ancestor(target, old_parent):
                raise _error(errno.EINVAL)
        elif target is not None:
            target_node = self.get(target)
            if moved_node.is_dir and not target_node.is_dir:
                raise _error(errno.ENOTDIR)
            if not moved_node.is_dir and target_node.is_dir:
                raise _error(errno.EISDIR)
            if target_node.is_dir:
                await self.expand(target)
                if self._has_children(target):
                    raise _error(errno.ENOTEMPTY)
            await self.own_links(target)
        now = self.clock()

        # folders moving to another parent carry one link of that parent with them
        moving = int(moved_node.is_dir) - int(exchange and self.get(target).is_dir) if old_parent != new_parent else 0

        def apply() -> None:
            if exchange:
                self.db.execute("UPDATE dentries SET ino = ? WHERE parent = ? AND name = ?",
                                (target, old_parent, old_name))
                self.db.execute("UPDATE dentries SET ino = ? WHERE parent = ? AND name = ?",
                                (moved, new_parent, new_name))
                self._update_inode(moved, "ctime_ns = ?", now)
                self._update_inode(target, "ctime_ns = ?", now)
            else:
                if target is not None:
                    self._remove_entry(new_parent, new_name, target)
                self.db.execute("DELETE FROM dentries WHERE parent = ? AND name = ?", (old_parent, old_name))
                self.db.execute("INSERT INTO dentries (parent, name, ino) VALUES (?, ?, ?)",
                                (new_parent, new_name, moved))
                self._update_inode(moved, "ctime_ns = ?", now)
            self._add_links(old_parent, -moving)
            self._add_links(new_parent, moving)
            self._touch_dir(old_parent, now)
            self._touch_dir(new_parent, now)
            self._changed()

        self._journal_freeing(apply)

    # --- attributes ----------------------------------------------------------------------

    async def setattr(self, ino: int, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                      size: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None) -> Inode:
        await self.own_links(ino)
        node = self.get(ino)
        if size is not None:
            if node.kind != EntryKind.FILE:
                raise _error(errno.EISDIR if node.is_dir else errno.EINVAL)
            await self.truncate(ino, size)
        now = self.clock()
        updates: dict[str, int | bytes | None] = {"ctime_ns": now}
        if mode is not None:
            updates["mode"] = mode & 0o7777
            xattrs = decode_xattrs(node.xattrs)
            if any(k == ACL_ACCESS for k, _ in xattrs):
                updates["xattrs"] = encode_xattrs([(k, acl_after_chmod(v, mode) if k == ACL_ACCESS else v)
                                                   for k, v in xattrs])
        if uid is not None:
            updates["uid"] = uid
        if gid is not None:
            updates["gid"] = gid
        if atime_ns is not None:
            updates["atime_ns"] = atime_ns
        if mtime_ns is not None:
            updates["mtime_ns"] = mtime_ns
            self._touched.discard(ino)  # an explicit time wins over the write that came before
        assignments = ", ".join(f"{k} = ?" for k in updates)
        with self._transaction():
            self._update_inode(ino, assignments, *updates.values())
            self._changed()
        return self.get(ino)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        for key, value in decode_xattrs(self.get(ino).xattrs):
            if key == name:
                return value
        raise _error(errno.ENODATA)

    def listxattr(self, ino: int) -> list[bytes]:
        return [name for name, _ in decode_xattrs(self.get(ino).xattrs)]

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        await self.own_links(ino)
        node = self.get(ino)
        items = [(k, v) for k, v in decode_xattrs(node.xattrs) if k != name]
        items.append((name, value))
        items.sort()
        mode = mode_from_acl(node.mode, value) if name == ACL_ACCESS else node.mode
        with self._transaction():
            self._update_inode(ino, "xattrs = ?, mode = ?, ctime_ns = ?", encode_xattrs(items), mode, self.clock())
            self._changed()

    async def removexattr(self, ino: int, name: bytes) -> None:
        await self.own_links(ino)
        items = decode_xattrs(self.get(ino).xattrs)
        kept = [(k, v) for k, v in items if k != name]
        if len(kept) == len(items):
            raise _error(errno.ENODATA)
        with self._transaction():
            self._update_inode(ino, "xattrs = ?, ctime_ns = ?", encode_xattrs(kept) if kept else None, self.clock())
            self._changed()

    # --- file content ----------------------------------------------------------------------

    def data_path(self, ino: int) -> str:
        return self._data_prefix + str(ino)  # on every write and stat: no pathlib

    def inline_data(self, ino: int) -> bytes | None:
        """The content of a file kept in the journal (None: it is not)."""
        row = self.db.execute("SELECT data FROM inline WHERE ino = ?", (ino,)).fetchone()
        return row[0] if row else None

    async def make_local(self, ino: int, keep_content: bool = True) -> None:
        """Give a stored file a local copy before it is modified (copy-up)."""
        node = self.get(ino)
        if node.kind != EntryKind.FILE:
            raise _error(errno.EINVAL)
        await self.own_links(ino)
        await self._unfreeze(ino)
        node = self.get(ino)
        if node.local:
            return
        if not keep_content or not node.chunks or node.size <= INLINE_MAX:
            await self._copy_up_inline(node, keep_content)
            return
        path = self.data_path(ino)
        tmp = self.data_dir / f"{ino}.copy"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if keep_content and node.chunks:
                if self.blobs is None:
                    raise _error(errno.EACCES)
                offset = 0
                for chunk in decode_chunks(node.chunks):
                    data = await self.blobs.chunk(chunk)
                    await trio.to_thread.run_sync(pwrite_all, fd, data, offset)
                    offset += chunk.size
                os.ftruncate(fd, node.size)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        with self._transaction():
            self._update_inode(ino, "local = ?, chunks = NULL, size = 0", DATA_FILE)
            self._changed()
        self._content_changed(ino)

    async def _copy_up_inline(self, node: Inode, keep_content: bool) -> None:
        data = b""
        if keep_content and node.chunks:
            if self.blobs is None:
                raise _error(errno.EACCES)
            data = await self._chunk_map(node).read(self.blobs.chunk, 0, node.size, node.size)
        if self.get(node.ino).local:
            return  # another request made it local meanwhile
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO inline (ino, data) VALUES (?, ?)", (node.ino, data))
            self._update_inode(node.ino, "local = ?, chunks = NULL, size = ?", INLINE, len(data))
            self._changed()
        self._content_changed(node.ino)

    def _preserve_inline(self, ino: int) -> None:
        """Before inline content changes: a running commit that captured it keeps the old one."""
        if ino in self.frozen_inline and self.frozen_inline[ino] is None:
            self.frozen_inline[ino] = self.inline_data(ino)

    def captured_content(self, ino: int) -> bytes:
        """The content of an inline file as the running commit captured it."""
        kept = self.frozen_inline[ino]
        if kept is None:
            kept = self.inline_data(ino)
            assert kept is not None, "captured inline content changed without being preserved"
        return kept

    def _set_inline(self, node: Inode, data: bytes) -> None:
        self._preserve_inline(node.ino)
        with self._transaction():
            self._freed = self._freed or len(data) < node.size
            self.db.execute("UPDATE inline SET data = ? WHERE ino = ?", (data, node.ino))
            self._update_inode(node.ino, "size = ?", len(data))
            if not self._dirty:
                self._changed()

    def _write_inline(self, node: Inode, offset: int, data: bytes) -> None:
        """One transaction, new mtime included (a data file's write has none: its
        mtime is journaled at close, see flush())."""
        self._preserve_inline(node.ino)
        end = offset + len(data)
        now = self.clock()
        with self._transaction():
            if offset >= node.size:  # appending (after a hole, if any): SQLite joins the bytes
                self.db.execute("UPDATE inline SET data = CAST(data || ? AS BLOB) WHERE ino = ?",
                                (bytes(offset - node.size) + data, node.ino))
            else:
                old = self.inline_data(node.ino) or b""
                self.db.execute("UPDATE inline SET data = ? WHERE ino = ?",
                                (old[:offset] + data + old[end:], node.ino))
            self._update_inode(node.ino, "size = ?, mtime_ns = ?, ctime_ns = ?", max(node.size, end), now, now)
            if not self._dirty:
                self._changed()

    def _spill(self, node: Inode) -> None:
        """Inline content about to grow past INLINE_MAX moves to a data file.
        No await: no other request may change it meanwhile."""
        self._preserve_inline(node.ino)
        data = self.inline_data(node.ino) or b""
        fd = os.open(self.data_path(node.ino), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            pwrite_all(fd, data, 0)
        finally:
            os.close(fd)
        with self._transaction():  # a crash before this leaves a data file that _recover() deletes
            self.db.execute("DELETE FROM inline WHERE ino = ?", (node.ino,))
            self._update_inode(node.ino, "local = ?, size = 0", DATA_FILE)

    async def _unfreeze(self, ino: int) -> None:
        """A running commit holds this file's content: write from now on to a copy."""
        if ino not in self.frozen:
            return
        path = self.data_path(ino)
        tmp = self.data_dir / f"{ino}.copy"
        await trio.to_thread.run_sync(shutil.copyfile, path, tmp)
        os.replace(tmp, path)
        del self.frozen[ino]

    def _content_changed(self, ino: int) -> None:
        self.versions[ino] = self.versions.get(ino, 0) + 1
        self._chunk_maps.pop(ino)
        self.uploads.pop(ino, None)
        self.sequence += 1

    async def truncate(self, ino: int, size: int) -> None:
        node = self.get(ino)
        if not node.local:
            await self.make_local(ino, keep_content=size > 0)
        else:
            await self._unfreeze(ino)
        node = self.get(ino)
        if node.local == INLINE and size <= INLINE_MAX:
            data = self.inline_data(ino) or b""
            self._set_inline(node, data[:size] + bytes(max(0, size - len(data))))
        else:
            if node.local == INLINE:
                self._spill(node)
            await trio.to_thread.run_sync(os.truncate, self.data_path(ino), size)
        self._content_changed(ino)
        self._touched.add(ino)
        self._changed()

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        node = self.get(ino)
        if node.local == INLINE:
            if offset + len(data) <= INLINE_MAX:
                self._write_inline(node, offset, data)
                self._content_changed(ino)
                return len(data)
            self._spill(node)
        elif ino in self.frozen:
            await self._unfreeze(ino)
        fd = os.open(self.data_path(ino), os.O_WRONLY | os.O_CLOEXEC)
        try:
            if len(data) <= INLINE_WRITE:
                pwrite_all(fd, data, offset)  # into the page cache: cheaper than a thread hop
            else:
                await trio.to_thread.run_sync(pwrite_all, fd, data, offset)
        finally:
            os.close(fd)
        self._content_changed(ino)
        self._touched.add(ino)
        if not self._dirty:
            self._changed()
        return len(data)

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        node = self.get(ino)
        if node.local == INLINE:
            row = self.db.execute("SELECT substr(data, ?, ?) FROM inline WHERE ino = ?",
                                  (offset + 1, size, ino)).fetchone()
            return (row[0] if row else None) or b""  # SQLite: NULL for an empty blob
        if node.local:
            fd = os.open(self.data_path(ino), os.O_RDONLY | os.O_CLOEXEC)
            try:
                return await trio.to_thread.run_sync(os.pread, fd, size, offset)
            finally:
                os.close(fd)
        if not node.chunks or self.blobs is None:
            return b""
        return await self._chunk_map(node).read(self.blobs.chunk, offset, size, node.size)

    def _chunk_map(self, node: Inode) -> ChunkMap:
        cached = self._chunk_maps.get(node.ino)
        if cached is None:
            cached = ChunkMap(decode_chunks(node.chunks or b""))
            self._chunk_maps.put(node.ino, cached)
        return cached

    def flush(self, ino: int) -> None:
        """close()/fsync(): the file's new mtime goes into the journal."""
        if ino in self._touched:
            now = self.clock()
            with self._transaction():
                self._update_inode(ino, "mtime_ns = ?, ctime_ns = ?", now, now)
                self._changed()
            self._touched.discard(ino)

    def sync(self, ino: int | None = None) -> None:
        """fsync(): the file's data and the journal reach the disk."""
        paths = [self.folder / "tree.db-wal", self.folder / "tree.db"]
        if ino is not None and self.get(ino).local == DATA_FILE:
            paths.append(self.data_path(ino))
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def touched_mtime(self, ino: int) -> bool:
        return ino in self._touched

    # --- kernel references ---------------------------------------------------------------

    def remember(self, ino: int) -> None:
        self.lookups[ino] = self.lookups.get(ino, 0) + 1

    def forget(self, ino: int, count: int) -> None:
        left = self.lookups.get(ino, 0) - count
        if left > 0:
            self.lookups[ino] = left
            return
        self.lookups.pop(ino, None)
        try:
            unlinked = self.get(ino).nlink == 0
        except OSError:
            return
        if unlinked:
            self._journal_freeing(lambda: self._maybe_delete(ino))

    def opened(self, ino: int) -> None:
        self.open_files[ino] = self.open_files.get(ino, 0) + 1

    def released(self, ino: int) -> None:
        left = self.open_files.get(ino, 0) - 1
        if left > 0:
            self.open_files[ino] = left
            return
        self.open_files.pop(ino, None)
        if self.get(ino).nlink == 0:
            self._journal_freeing(lambda: self._maybe_delete(ino))

    # --- write-behind and commit -----------------------------------------------------------

    def version(self, ino: int) -> int:
        return self.versions.get(ino, 0)

    def record_upload(self, ino: int, version: int, chunks: list[ChunkRef]) -> None:
        if self.versions.get(ino, 0) == version:
            self.uploads[ino] = _Upload(version, chunks)

    def capture(self, is_durable: Callable[[list[ChunkRef]], bool]) -> Capture:
        """The whole tree as it is now, for a commit; must not await.

        Files whose content is local and not yet uploaded are frozen: a link to
        their data file is kept for the commit, and a write that comes later goes
        to a copy (see _unfreeze); inline content is kept in memory before it
        changes (see _preserve_inline). So the commit sees exactly this moment.
        """
        inodes = {row[0]: _row(row) for row in self.db.execute(f"SELECT {COLUMNS} FROM inodes")}
        children: dict[int, list[tuple[bytes, int]]] = {}
        for parent, name, ino in self.db.execute("SELECT parent, name, ino FROM dentries ORDER BY parent, name"):
            children.setdefault(parent, []).append((name, ino))
        reachable = _reachable(children)
        inodes = {ino: node for ino, node in inodes.items() if ino in reachable}
        frozen: dict[int, Path] = {}
        inline: list[int] = []
        uploaded: dict[int, list[ChunkRef]] = {}
        versions: dict[int, int] = {}
        for ino, node in inodes.items():
            if node.kind != EntryKind.FILE or not node.local:
                continue
            versions[ino] = self.version(ino)
            done = self.uploads.get(ino)
            if done is not None and done.version == versions[ino] and is_durable(done.chunks):
                uploaded[ino] = done.chunks
                continue
            if node.local == INLINE:
                inline.append(ino)
                self.frozen_inline[ino] = None
                continue
            link = self.frozen_dir / f"{ino}.{self.sequence}"
            link.unlink(missing_ok=True)
            os.link(self.data_path(ino), link)
            frozen[ino] = link
            self.frozen[ino] = link
        max_link_id = int(self._meta("max_link_id", 0) or 0)
        stored = (int(self._meta("stored_files", 0)), int(self._meta("stored_size", 0)))
        return Capture(inodes, children, frozen, inline, uploaded, versions, self.sequence, max_link_id, *stored)

    def release_capture(self, capture: Capture) -> None:
        for ino, link in capture.frozen.items():
            if self.frozen.get(ino) == link:
                del self.frozen[ino]
            link.unlink(missing_ok=True)
        for ino in capture.inline:
            self.frozen_inline.pop(ino, None)

    def committed(self, capture: Capture, snapshot_id: bytes, snapshot: Snapshot,
                  contents: dict[int, list[ChunkRef]], link_ids: dict[int, int]) -> list[str]:
        """After a successful commit: what it stored becomes the new base.

        Returns the data files no longer needed, for the caller to delete
        (off the event loop; a crash before that leaves them to _recover)."""
        clean_files = [ino for ino in contents
                       if self.versions.get(ino, 0) == capture.versions.get(ino) and not self.open_files.get(ino)]
        with self._transaction():
            # others were written again since, or may still be: they stay local
            self.db.executemany(
                "UPDATE inodes SET local = 0, chunks = ?, size = ? WHERE ino = ? AND local != 0",
                [(encode_chunks(contents[ino]), sum(c.size for c in contents[ino]), ino) for ino in clean_files])
            self.db.executemany("DELETE FROM inline WHERE ino = ?", [(ino,) for ino in clean_files])
            self._freed = True
            self.db.executemany("UPDATE inodes SET link_id = ? WHERE ino = ?",
                                [(link_id, ino) for ino, link_id in link_ids.items()])
            self._inodes.clear()
            self._set_meta("base", snapshot_id)
            self._set_meta("max_link_id", snapshot.max_link_id)
            clean = self.sequence == capture.sequence
            self._set_meta("dirty", 0 if clean else 1)
            self._dirty = not clean
        for ino in clean_files:
            self.uploads.pop(ino, None)
        kept = set(contents) - set(clean_files)
        for ino in kept:  # still local: the next commit reuses this upload
            if self.versions.get(ino, 0) == capture.versions.get(ino):
                self.uploads[ino] = _Upload(capture.versions[ino], contents[ino])
        self.release_capture(capture)
        return [self.data_path(ino) for ino in clean_files if capture.inodes[ino].local == DATA_FILE]

    def iter_local_files(self) -> Iterator[int]:
        """Files whose content is written here and not yet committed (a data file or inline)."""
        for (ino,) in self.db.execute("SELECT ino FROM inodes WHERE local != ? AND kind = ?", (STORED, EntryKind.FILE)):
            yield ino

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.folder)


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error; nestable (inner ones are
    no-ops). Journal failures surface as OSError: ENOSPC when the disk is full."""

    def __init__(self, db: sqlite3.Connection, on_commit: Callable[[], None],
                 on_rollback: Callable[[], None]) -> None:
        self.db = db
        self.on_commit = on_commit
        self.on_rollback = on_rollback
        self.outer = False

    def __enter__(self) -> None:
        if not self.db.in_transaction:
            _journal(self.db.execute, "BEGIN IMMEDIATE")
            self.outer = True

    def __exit__(self, kind, value, traceback) -> None:
        if not self.outer:
            return
        if kind is None:
            try:
                _journal(self.db.execute, "COMMIT")
            except OSError:
                self._rollback()
                raise
            self.on_commit()
            return
        self._rollback()
        if isinstance(value, sqlite3.Error):
            raise journal_error(value) from None


    def _rollback(self) -> None:
        if self.db.in_transaction:  # SQLite already rolled back when it ran out of space
            self.db.execute("ROLLBACK")
        self.on_rollback()


def _journal(execute: Callable[..., object], *args: object) -> object:
    try:
        return execute(*args)
    except sqlite3.Error as exc:
        raise journal_error(exc) from None


def _discard(folder: Path, new: bool) -> None:
    """Remove what a failed start of a new tree made (a half-made tree would
    be listed as a channel); an existing one keeps its staged data."""
    if new:
        shutil.rmtree(folder, ignore_errors=True)


def remove_files(paths: list[str]) -> None:
    for path in paths:
        _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _reachable(children: dict[int, list[tuple[bytes, int]]]) -> set[int]:
    seen = {ROOT}
    stack = [ROOT]
    while stack:
        for _, ino in children.get(stack.pop(), ()):
            if ino not in seen:
                seen.add(ino)
                stack.append(ino)
    return seen
