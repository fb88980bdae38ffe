"""A commit's view of a staging tree: captured in one step (frozen content
included), released when the commit ends, made the new base when it succeeds."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..format import EntryKind, Snapshot, chunks_size
from ..journalspace import journal_error
from .content import ContentStore
from .inode import COLUMNS, ROOT, Content, Inode, inode_from_row
from .journal import Journal
from .uploads import Uploads

_PREFIXED = ", ".join("i." + column.strip() for column in COLUMNS.split(","))


@dataclass
class Capture:
    """The tree as it was when a commit began (see Capturer.capture).

    The tree itself (inode rows and names) is a copy inside the journal's
    connection, in temporary tables, read one folder at a time (node(),
    children()): a commit holds the entries of the folders it is writing, not
    the whole tree. In memory are only the written files' facts."""

    db: sqlite3.Connection
    tables: str  # suffix of this capture's temporary tables
    frozen: dict[int, Path]  # files whose content must be uploaded from these paths
    inline: list[int]  # files whose content must be uploaded from the journal (captured_contents())
    # files whose write-behind upload matches the captured content (the commit adds the others' as it uploads them)
    uploaded: dict[int, bytes]  # encoded chunk lists (format.encode_chunks)
    versions: dict[int, int]
    data_files: set[int]  # written files whose content was a data file (deleted once committed)
    sequence: int
    max_link_id: int
    stored_files: int = 0  # files (and their bytes) in directories never expanded,
    stored_size: int = 0  # which the commit does not walk

    def node(self, ino: int) -> Inode:
        row = self.db.execute(f"SELECT {COLUMNS} FROM temp.inodes_{self.tables} WHERE ino = ?", (ino,)).fetchone()
        assert row is not None, f"inode {ino} is not in the capture"
        return inode_from_row(row)

    def children(self, ino: int) -> list[tuple[bytes, Inode]]:
        """The entries of one folder, by name (none for a folder never expanded)."""
        rows = self.db.execute(
            f"SELECT d.name, {_PREFIXED} FROM temp.dentries_{self.tables} d "
            f"JOIN temp.inodes_{self.tables} i ON i.ino = d.ino WHERE d.parent = ? ORDER BY d.name",
            (ino,)).fetchall()
        return [(row[0], inode_from_row(row[1:])) for row in rows]

    def levels(self) -> list[list[int]]:
        """The captured folders by depth, the root's level first."""
        levels: list[list[int]] = []
        for ino, depth in self.db.execute(
                f"WITH RECURSIVE level(ino, depth) AS (SELECT {ROOT}, 0 UNION ALL "
                f"SELECT d.ino, level.depth + 1 FROM temp.dentries_{self.tables} d "
                f"JOIN level ON d.parent = level.ino "
                f"JOIN temp.inodes_{self.tables} i ON i.ino = d.ino AND i.kind = {int(EntryKind.DIRECTORY)}) "
                "SELECT ino, depth FROM level ORDER BY depth, ino"):
            if depth == len(levels):
                levels.append([])
            levels[depth].append(ino)
        return levels

    def link_counts(self) -> list[tuple[int, int | None, int]]:
        """Files that are hardlinked (more than one name) or were in the base
        snapshot: (ino, link_id, names), by inode number."""
        return self.db.execute(
            f"SELECT i.ino, i.link_id, count(*) FROM temp.inodes_{self.tables} i "
            f"JOIN temp.dentries_{self.tables} d ON d.ino = i.ino WHERE i.kind = {int(EntryKind.FILE)} "
            "GROUP BY i.ino HAVING i.link_id OR count(*) > 1 ORDER BY i.ino").fetchall()

    def drop(self) -> None:
        _drop(self.db, self.tables)


class Capturer:
    def __init__(self, journal: Journal, content: ContentStore, uploads: Uploads,
                 open_files: dict[int, int]) -> None:
        self.journal = journal
        self.content = content
        self.uploads = uploads
        self.open_files = open_files  # the kernel's, kept up to date by names.Namespace
        self._captures = 0  # names this tree's captures' tables

    def capture(self, durable: Callable[[dict[int, bytes]], set[int]]) -> Capture:
        """The whole tree as it is now, for a commit; must not await. durable:
        of write-behind's uploads (ino -> encoded chunks), those whose chunks
        are all stored (see commit.durable_files); the others are uploaded again.

        Its rows are copied into temporary tables (SQLite copies 100,000 rows
        in a fraction of what building them in Python takes, and they stay on
        disk). Files whose content is local and not yet uploaded are frozen: a
        link to their data file is kept for the commit, and a write that comes
        later goes to a copy (see ContentStore.unfreeze); inline content is kept
        in memory before it changes. So the commit sees exactly this moment,
        which the journal holds durably (the open batch is committed first).
        """
        self.journal.flush()
        db = self.journal.db
        self._captures += 1
        tables = str(self._captures)
        try:
            _copy_tree(db, tables)
        except sqlite3.Error as exc:  # e.g. no room for the temporary tables
            _drop(db, tables)
            raise journal_error(exc) from None
        frozen: dict[int, Path] = {}
        inline: list[int] = []
        uploaded: dict[int, bytes] = {}
        versions: dict[int, int] = {}
        data_files: set[int] = set()
        local_files = db.execute(f"SELECT ino, local FROM temp.inodes_{tables} WHERE kind = ? AND local != ?",
                                 (EntryKind.FILE, Content.STORED)).fetchall()
        done: dict[int, bytes] = {}  # write-behind uploads of the captured versions
        for ino, _ in local_files:
            versions[ino] = self.uploads.version(ino)
            result = self.uploads.result(ino, versions[ino])
            if result is not None:
                done[ino] = result
        kept = durable(done)
        for ino, local in local_files:
            if local == Content.DATA_FILE:
                data_files.add(ino)
            if ino in kept:
                uploaded[ino] = done[ino]
            elif local == Content.INLINE:
                inline.append(ino)
                self.content.freeze_inline(ino)
            else:
                frozen[ino] = self.content.freeze(ino, self.journal.sequence)
        max_link_id = int(self.journal.meta("max_link_id", 0) or 0)
        stored = (int(self.journal.meta("stored_files", 0)), int(self.journal.meta("stored_size", 0)))
        return Capture(db, tables, frozen, inline, uploaded, versions, data_files, self.journal.sequence,
                       max_link_id, *stored)

    def release(self, capture: Capture) -> None:
        self.content.release(capture.frozen, capture.inline)
        capture.drop()

    def committed(self, capture: Capture, snapshot_id: bytes, snapshot: Snapshot,
                  contents: dict[int, bytes], link_ids: dict[int, int]) -> list[str]:
        """After a successful commit: what it stored becomes the new base.

        Returns the data files no longer needed, for the caller to delete
        (off the event loop; a crash before that leaves them to recovery)."""
        clean_files = {ino for ino in contents
                       if self.uploads.version(ino) == capture.versions.get(ino) and not self.open_files.get(ino)}
        self.journal.write_rows()  # before the bulk change: none may overwrite it
        with self.journal.transaction():
            # others were written again since, or may still be: they stay local
            _store(self.journal.db, capture.tables, ((ino, contents[ino]) for ino in clean_files), link_ids)
            self.journal.freed()
            self.journal.forget_rows()
            self.journal.set_meta("base", snapshot_id)
            self.journal.set_meta("max_link_id", snapshot.max_link_id)
            self.journal.set_dirty(self.journal.sequence != capture.sequence)
        self.journal.flush()  # before the caller deletes the data files it no longer needs
        for ino in clean_files:
            self.uploads.committed(ino)
        for ino, chunks in contents.items():
            if ino not in clean_files:  # still local: the next commit reuses this upload
                self.uploads.record(ino, capture.versions[ino], chunks)
        self.release(capture)
        return [self.content.data_path(ino) for ino in clean_files if ino in capture.data_files]


def _store(db: sqlite3.Connection, tables: str, stored: Iterable[tuple[int, bytes]],
           link_ids: dict[int, int]) -> None:
    """Inside the commit's transaction: files' contents are the chunks stored
    (their inline rows go), and the hardlink groups get their IDs. Set-based:
    the rows are listed in a temporary table, then each table is changed by one
    statement (per-row UPDATE and DELETE cost seconds at 100,000 files)."""
    db.execute(f"CREATE TEMP TABLE stored_{tables} (ino INTEGER PRIMARY KEY, chunks BLOB, size INTEGER)")
    db.execute(f"CREATE TEMP TABLE links_{tables} (ino INTEGER PRIMARY KEY, link_id INTEGER)")
    try:
        db.executemany(f"INSERT INTO temp.stored_{tables} VALUES (?, ?, ?)",
                       ((ino, chunks, chunks_size(chunks)) for ino, chunks in sorted(stored)))
        db.executemany(f"INSERT INTO temp.links_{tables} VALUES (?, ?)", sorted(link_ids.items()))
        db.execute(f"UPDATE inodes SET local = {int(Content.STORED)}, chunks = s.chunks, size = s.size "
                   f"FROM temp.stored_{tables} s WHERE inodes.ino = s.ino AND inodes.local != {int(Content.STORED)}")
        db.execute(f"DELETE FROM inline WHERE ino IN (SELECT ino FROM temp.stored_{tables})")
        db.execute(f"UPDATE inodes SET link_id = l.link_id FROM temp.links_{tables} l WHERE inodes.ino = l.ino")
    finally:
        db.execute(f"DROP TABLE IF EXISTS temp.stored_{tables}")  # (gone already if the error rolled back)
        db.execute(f"DROP TABLE IF EXISTS temp.links_{tables}")


def _copy_tree(db: sqlite3.Connection, tables: str) -> None:
    """The rows and names the root reaches (unlinked inodes still open are left
    out), into this capture's temporary tables. Outside any transaction: a
    later batch's rollback cannot touch them."""
    db.execute(f"CREATE TEMP TABLE inodes_{tables} (ino INTEGER PRIMARY KEY, {COLUMNS.split(',', 1)[1]})")
    db.execute(f"CREATE TEMP TABLE dentries_{tables} (parent INTEGER NOT NULL, name BLOB NOT NULL, "
               "ino INTEGER NOT NULL, PRIMARY KEY (parent, name)) WITHOUT ROWID")
    db.execute(f"WITH RECURSIVE reach(ino) AS (SELECT {ROOT} UNION "
               "SELECT d.ino FROM dentries d JOIN reach ON d.parent = reach.ino) "
               f"INSERT INTO temp.inodes_{tables} SELECT {COLUMNS} FROM inodes "
               "WHERE ino IN (SELECT ino FROM reach)")
    db.execute(f"INSERT INTO temp.dentries_{tables} SELECT parent, name, ino FROM dentries "
               f"WHERE parent IN (SELECT ino FROM temp.inodes_{tables})")


def _drop(db: sqlite3.Connection, tables: str) -> None:
    try:
        db.execute(f"DROP TABLE IF EXISTS temp.dentries_{tables}")
        db.execute(f"DROP TABLE IF EXISTS temp.inodes_{tables}")
    except sqlite3.Error:
        pass  # the journal is closed (they went with it) or failing: the next capture has new tables
