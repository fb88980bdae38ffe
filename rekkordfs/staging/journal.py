"""The SQLite journal of a staging tree: its transactions, the inode rows (and
their cache), the reserve that keeps deletions possible on a full disk, and
recovery after a crash.

A change of an inode row (change()) is kept in memory, with the other rows the
open batch changed, and written with them just before the batch's COMMIT (one
executemany, not one UPDATE a request: most requests only change rows). The
batch is all or nothing either way: what a kill -9 loses is the same."""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import errno_error
from ..format import EntryKind
from ..journalspace import disk_is_short, give_back, journal_error, open_journal
from ..lru import WeightedLRU
from ..testhooks import check_inode_cache
from .inode import COLUMNS, ROOT, Content, Inode, changed_inode, inode_from_row, row_values

INODE_CACHE = 20_000  # rows kept decoded, the most recently used (about 0.5 KB each: 10 MB)
RESERVE_SIZE = 512 << 10  # freed when the disk is full, so deletions can still be journaled
# With batching on (see Journal.batching), the transactions of consecutive requests
# are committed together: once the daemon is idle (see stagingarea/batches.py), or at the
# latest after this long or this many requests. A SQLite COMMIT costs more than
# most requests; a kill -9 loses at most the requests of the open batch.
BATCH_SECONDS = 0.05
BATCH_REQUESTS = 256
SPACE_CHECK_SECONDS = 0.01  # how often a batch looks at the disk's free space (a statvfs)
_WRITE_ROW = ("UPDATE inodes SET " + " = ?, ".join(c.strip() for c in COLUMNS.split(",")[1:]) + " = ? WHERE ino = ?")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB);
CREATE TABLE IF NOT EXISTS inodes (
    ino INTEGER PRIMARY KEY AUTOINCREMENT,  -- numbers are never reused
    kind INTEGER NOT NULL, mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    atime_ns INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    rdev INTEGER NOT NULL DEFAULT 0, nlink INTEGER NOT NULL DEFAULT 1,
    target BLOB,            -- symlink target
    chunks BLOB,            -- file content as stored chunks (when local = Content.STORED)
    local INTEGER NOT NULL DEFAULT 0,   -- where file content is: a Content value (0 chunks, 1 data/<ino>, 2 inline)
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

Deleted = list[tuple[int, Content]]  # inodes a transaction deleted, and where their content was


class Journal:
    """tree.db and what is kept in memory beside it.

    Every change of an inode row goes through change() or delete_inode(),
    which keep the row cache right; SQL that reads or changes rows of `inodes`
    other than by get() calls write_rows() first, and bulk changes call
    forget_rows() after."""

    def __init__(self, folder: Path, on_deleted: Callable[[Deleted], None]) -> None:
        self.folder = folder
        self.db = open_journal(folder / "tree.db", SCHEMA)
        self.on_deleted = on_deleted  # once a transaction that deleted inodes is committed
        self.reserve = folder / "reserve"
        self.sequence = 0  # bumped on every change (in memory)
        self._dirty = bool(self.meta("dirty", 0))
        self._freed = False  # the open transaction shrank inline content: give the space back
        self._deleted: Deleted = []  # by the open transaction
        self._inodes: WeightedLRU[int, Inode] = WeightedLRU(INODE_CACHE)  # rows as journaled
        # rows the open transaction changed, not written yet (see write_rows)
        self._changed_rows: dict[int, Inode] = {}
        # inside a request's SAVEPOINT: each row's entry in _changed_rows before
        # the request first touched it (None: none), restored if it is undone
        self._undo: dict[int, Inode | None] | None = None
        self._check_cache = check_inode_cache()
        # batching: set by the owner once something calls flush() when the daemon is idle
        self.batching = False
        self.on_batch: Callable[[], None] = lambda: None  # a batch was left open
        self._depth = 0  # transaction() blocks open (they nest)
        self._batch_started = 0.0  # monotonic time of the open batch's first request
        self._batch_requests = 0
        self._space_checked = 0.0  # monotonic time of the last look at free space
        self._tidy = False  # freed space to give back when idle (see tidy())
        self._short = False  # what it found: short of space

    def close(self) -> None:
        """Commits the open batch first; closing twice is harmless."""
        try:
            if self.db.in_transaction:
                self.flush()
        except sqlite3.ProgrammingError:
            return  # closed already
        finally:
            self.db.close()

    def meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: bytes | int | None) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # --- inode rows -------------------------------------------------------------------

    def get(self, ino: int) -> Inode:
        node = self._inodes.get(ino)
        if node is not None and self._check_cache:
            journaled = self._changed_rows.get(ino)
            if journaled is None:
                row = self.db.execute(f"SELECT {COLUMNS} FROM inodes WHERE ino = ?", (ino,)).fetchone()
                assert row is not None, f"cached inode {ino} is not in the journal"
                journaled = inode_from_row(row)
            assert journaled == node, f"stale cached inode {ino}: {node} != {journaled}"
        if node is None:
            node = self._changed_rows.get(ino)  # the cache may have dropped a changed row
            if node is None:
                row = self.db.execute(f"SELECT {COLUMNS} FROM inodes WHERE ino = ?", (ino,)).fetchone()
                if row is None:
                    raise errno_error(errno.ENOENT)
                node = inode_from_row(row)
            self._inodes.put(ino, node)
        return node

    def add_inode(self, kind: EntryKind, mode: int, uid: int, gid: int, time_ns: int, size: int = 0, rdev: int = 0,
                  nlink: int = 1, target: bytes | None = None, local: Content = Content.STORED) -> Inode:
        """A new inode row (inside a transaction), cached as written: no read back."""
        cursor = self.db.execute(
            "INSERT INTO inodes (kind, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, rdev, nlink, target, "
            "local) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (kind, mode, uid, gid, size, time_ns, time_ns, time_ns, rdev, nlink, target, local))
        assert cursor.lastrowid is not None
        node = Inode(cursor.lastrowid, kind, mode, uid, gid, size, time_ns, time_ns, time_ns, rdev, nlink, target,
                     None, local, None, None, None)
        self._inodes.put(node.ino, node)
        return node

    def change(self, ino: int, **changes: Any) -> Inode:
        """Change fields of one inode row (inside a transaction): in memory, written
        by write_rows() with the transaction's other changed rows. No SQL: it
        cannot fail."""
        assert self._depth, "an inode row changed outside a transaction"
        node = changed_inode(self.get(ino), changes)
        self._keep_undo(ino)
        self._changed_rows[ino] = node
        self._inodes.put(ino, node)
        return node

    def _keep_undo(self, ino: int) -> None:
        """Inside a request's SAVEPOINT: the row's held change as it was before
        the request first touched it (None: none), for _Tx._rollback()."""
        if self._undo is not None and ino not in self._undo:
            self._undo[ino] = self._changed_rows.get(ino)

    def write_rows(self) -> None:
        """Write the changed rows into the open transaction: before its COMMIT,
        and before SQL that reads or changes `inodes` other than by get()."""
        if not self._changed_rows:
            return
        rows, self._changed_rows = self._changed_rows, {}
        if self._undo is not None:  # undoing this request puts them back
            for ino, node in rows.items():
                self._undo.setdefault(ino, node)
        try:
            _journal(self.db.executemany, _WRITE_ROW, [row_values(node) for node in rows.values()])
        except OSError:
            if self._depth == 0:  # no request to undo it: the batch is lost
                self._abandon()
            raise

    def change_alone(self, ino: int, **changes: Any) -> Inode:
        """A whole request that changes one inode row and nothing else (chmod,
        utime, a close's mtime): change() in a transaction(alone=True)."""
        with self.transaction(alone=True):
            node = self.change(ino, **changes)
            self.changed()
        return node

    def delete_inode(self, ino: int, content: Content) -> None:
        """Inside a transaction; on_deleted() hears of it once it is committed."""
        self.db.execute("DELETE FROM inodes WHERE ino = ?", (ino,))
        self._keep_undo(ino)
        self._changed_rows.pop(ino, None)
        self._inodes.pop(ino)
        self._deleted.append((ino, content))

    def forget_rows(self) -> None:
        """After a change of many rows at once (write_rows() came before it)."""
        assert not self._changed_rows, "rows changed in memory would overwrite the bulk change"
        self._inodes.clear()

    # --- changes and transactions ---------------------------------------------------------

    @property
    def dirty(self) -> bool:
        """Changed since the base snapshot (a clean tree may follow newer snapshots)."""
        return self._dirty

    def changed(self) -> None:
        """Inside a transaction: the tree differs from its base now."""
        self.sequence += 1
        if not self._dirty:
            self.set_meta("dirty", 1)
            self._dirty = True

    def set_dirty(self, dirty: bool) -> None:
        """Inside a transaction: after a seed or a commit."""
        self.set_meta("dirty", 1 if dirty else 0)
        self._dirty = dirty

    def freed(self) -> None:
        """The open transaction shrank the journal's content: give the space back."""
        self._freed = True

    def transaction(self, alone: bool = False) -> _Tx:
        """One request's changes: all or none of them reach the journal. They are
        committed at once, or with batching on, with the batch they join.

        alone: the block runs one SQL statement and nothing else that can fail
        (see change_alone), and changes inode rows (change(), in memory) only
        after it. Inside an open batch of a dirty journal it then needs no
        SAVEPOINT: a statement that fails changes nothing, and one that takes
        the batch with it abandons the batch."""
        return _Tx(self, alone)

    def flush(self) -> None:
        """Commit the open batch, if any (outside transaction blocks)."""
        if self._depth == 0 and self.db.in_transaction:
            self._commit()

    def _commit(self) -> None:
        try:
            self.write_rows()
            _journal(self.db.execute, "COMMIT")
        except OSError:
            self._abandon()
            raise
        self._after_commit()

    def _request_done(self) -> None:
        """A request's transaction ended well: commit it, or leave the batch open."""
        self._batch_requests += 1
        if not self.batching:
            self._commit()
            return
        now = time.monotonic()
        if self._batch_requests == 1:
            self._batch_started = now
            self.on_batch()
        if now - self._space_checked >= SPACE_CHECK_SECONDS:
            # On a disk short of space every request is committed on its own (see
            # freeing()); the checks' interval is far below what filling 64 MB takes.
            self._space_checked = now
            self._short = disk_is_short(self.folder)
        if self._short or self._batch_requests >= BATCH_REQUESTS or now - self._batch_started >= BATCH_SECONDS:
            self._commit()

    def _after_commit(self) -> None:
        self._batch_requests = 0
        deleted, self._deleted = self._deleted, []
        if deleted:
            self.on_deleted(deleted)
        if deleted or self._freed:
            self._freed = False
            # on a disk short of space, deleting must free space at once
            urgent = not self.reserve.exists() or disk_is_short(self.folder)
            if urgent or not self.batching:
                give_back(self.db, urgent=urgent)
            else:  # else once the daemon is idle: a commit's reply need not wait for the vacuum
                self._tidy = True
                self.on_batch()
            self.ensure_reserve()

    def tidy(self) -> None:
        """When idle, outside any transaction: give back what deletions freed
        (see journalspace.give_back), if they left that for later."""
        if self._tidy and not self.db.in_transaction:
            self._tidy = False
            give_back(self.db, urgent=False)

    def _abandon(self) -> None:
        """The open transaction (the whole batch) is lost: roll it back, unless
        SQLite already did (when it ran out of space), and forget what it did."""
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        # the in-memory state must not claim what was not written
        self._batch_requests = 0
        self._space_checked = 0.0  # the next batch looks at once
        self._inodes.clear()
        self._changed_rows = {}
        self._undo = None
        self._deleted = []
        self._freed = False
        self._dirty = bool(self.meta("dirty", 0))

    def freeing(self, apply: Callable[[], None], alone: bool = False) -> None:
        """Run apply() in a transaction (alone: see transaction()). When the disk
        is full, spend the reserve file so that operations which free space
        (unlink, rmdir, rename over) can still be recorded; it is made again
        once there is room."""
        try:
            with self.transaction(alone):
                apply()
        except OSError as exc:
            if exc.errno != errno.ENOSPC or not self.reserve.exists():
                raise
            self.reserve.unlink()
            with self.transaction(alone):
                apply()

    def ensure_reserve(self, room: int = 2 * RESERVE_SIZE) -> None:
        """Make the reserve file again, once the disk has `room` free: space a
        user just freed on a full disk is theirs first."""
        if self.reserve.exists():
            return
        try:
            st = os.statvfs(self.folder)
            if st.f_bavail * st.f_frsize < room:
                return
            with open(self.reserve, "wb") as handle:
                handle.write(bytes(RESERVE_SIZE))
        except OSError:
            self.reserve.unlink(missing_ok=True)  # still full: try again later

    def recover(self, clock: Callable[[], int]) -> set[str]:
        """After a crash: drop inodes no entry refers to. Returns the inodes
        (as file names) whose content is a data file: other data files are stale."""
        self.write_rows()
        with self.transaction():
            if self.db.execute("SELECT 1 FROM inodes WHERE ino = ?", (ROOT,)).fetchone() is None:
                created = clock()
                self.db.execute(
                    "INSERT INTO inodes (ino, kind, mode, uid, gid, atime_ns, mtime_ns, ctime_ns, nlink) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 2)",
                    (ROOT, EntryKind.DIRECTORY, 0o755, os.getuid(), os.getgid(), created, created, created))
            self.db.execute("DELETE FROM inodes WHERE ino != ? AND ino NOT IN (SELECT ino FROM dentries)", (ROOT,))
            if not self.meta("folder_links"):  # journals from before folders counted their subfolders
                self.db.execute(
                    "UPDATE inodes SET nlink = 2 + (SELECT count(*) FROM dentries d JOIN inodes c ON c.ino = d.ino "
                    "WHERE d.parent = inodes.ino AND c.kind = ?) WHERE kind = ? AND nlink > 0 AND dir_ref IS NULL",
                    (EntryKind.DIRECTORY, EntryKind.DIRECTORY))
                self.set_meta("folder_links", 1)
            self.db.execute("DELETE FROM inline WHERE ino NOT IN (SELECT ino FROM inodes WHERE local = ?)",
                            (Content.INLINE,))
        return {str(r[0]) for r in self.db.execute("SELECT ino FROM inodes WHERE local = ?", (Content.DATA_FILE,))}


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error; nestable (inner ones are
    no-ops). Inside an open batch, a SAVEPOINT: an error undoes this request's
    changes only (a block of one statement needs none: see transaction()).
    Journal failures surface as OSError: ENOSPC when the disk is full."""

    def __init__(self, journal: Journal, alone: bool) -> None:
        self.journal = journal
        self.alone = alone  # one statement (see Journal.transaction)
        self.outer = False
        self.joined = False  # into an open batch, with a SAVEPOINT
        self.bare = False  # into an open batch, without one (alone)
        self.deleted = 0

    def __enter__(self) -> None:
        journal = self.journal
        journal._depth += 1
        if journal._depth > 1:
            return
        self.outer = True
        try:
            if journal.db.in_transaction and self.alone and journal._dirty and journal.batching:
                self.bare = True  # nothing to undo if its one statement fails
            elif journal.db.in_transaction:
                _journal(journal.db.execute, "SAVEPOINT request")
                self.joined, self.deleted = True, len(journal._deleted)
                journal._undo = {}
            else:
                _journal(journal.db.execute, "BEGIN IMMEDIATE")
        except BaseException:
            journal._depth -= 1
            raise

    def __exit__(self, kind, value, traceback) -> None:
        journal = self.journal
        journal._depth -= 1
        if not self.outer:
            return
        undo, journal._undo = journal._undo, None
        if kind is None:
            try:
                if self.joined:
                    _journal(journal.db.execute, "RELEASE request")
                journal._request_done()
            except OSError:
                self._rollback(undo)
                raise
            return
        self._rollback(undo)
        if isinstance(value, sqlite3.Error):
            raise journal_error(value) from None

    def _rollback(self, undo: dict[int, Inode | None] | None) -> None:
        journal, db = self.journal, self.journal.db
        if self.bare and db.in_transaction:  # the failed statement changed nothing
            return
        if self.joined and db.in_transaction:  # undo this request, keep the batch
            try:
                db.execute("ROLLBACK TO request")
                db.execute("RELEASE request")
            except sqlite3.Error:
                pass
            else:
                del journal._deleted[self.deleted:]
                for ino, node in (undo or {}).items():  # the rows as they were before the request
                    if node is None:
                        journal._changed_rows.pop(ino, None)
                    else:
                        journal._changed_rows[ino] = node
                journal._inodes.clear()
                journal._dirty = bool(journal.meta("dirty", 0))
                return
        journal._abandon()


def _journal(execute: Callable[..., object], *args: object) -> object:
    try:
        return execute(*args)
    except sqlite3.Error as exc:
        raise journal_error(exc) from None
