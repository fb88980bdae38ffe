"""Disk space of a staging journal (SQLite, WAL) on a disk that fills up.

SQLite keeps the pages it frees (deleted or shrunk inline content) inside the
database file, and the WAL keeps its size between checkpoints, so deleting
staged files would free nothing for anything else on a full disk. Here:

- journals use auto_vacuum=INCREMENTAL, so free pages can be handed back;
- give_back() checkpoints the WAL into the database, truncates both and
  returns the free pages to the filesystem: at once when the disk is short of
  space (or the staging tree spent its reserve), else once enough is free to
  be worth it;
- SQLite's "database or disk is full" reaches callers as OSError(ENOSPC), so
  a writer (rsync) is told "No space left on device", not an I/O error.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

GIVE_BACK_ABOVE = 1 << 20  # free pages worth a checkpoint when the disk is not short
SHORT_BELOW = 64 << 20  # a disk with less free is short: freed space goes back at once
INCREMENTAL = 2  # PRAGMA auto_vacuum value


def journal_error(exc: sqlite3.Error) -> OSError:
    """A journal failure as the errno a filesystem would give."""
    full = getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" or "full" in str(exc)
    return OSError(errno.ENOSPC if full else errno.EIO, f"staging journal: {exc}")


def open_journal(path: Path, schema: str) -> sqlite3.Connection:
    """The journal at path, set up; a failure (a full disk) closes it again and
    raises OSError, so no half-open connection keeps the file locked."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        # Only this process opens the journal (the mount holds the state folder's
        # lock): no file locks or shared memory on every transaction.
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        _incremental_vacuum(db)
        db.execute("PRAGMA journal_mode=WAL")
        # Every transaction reaches the OS at once, which is what survives a killed
        # process; fsync() of a staged file also syncs the journal.
        db.execute("PRAGMA synchronous=OFF")
        # keep the journal small: a full disk must still leave room for deletions
        db.execute("PRAGMA wal_autocheckpoint=256")
        db.execute(f"PRAGMA journal_size_limit={1 << 20}")
        db.executescript(schema)
    except sqlite3.Error as exc:
        db.close()
        raise journal_error(exc) from None
    except BaseException:
        db.close()
        raise
    return db


def _incremental_vacuum(db: sqlite3.Connection) -> None:
    """Free pages can go back to the filesystem. A new journal gets it now (it
    must precede the first table); one made before is converted by a VACUUM
    when there is room for it, else keeps reusing its free pages itself."""
    if db.execute("PRAGMA auto_vacuum").fetchone()[0] == INCREMENTAL:
        return
    db.execute(f"PRAGMA auto_vacuum={INCREMENTAL}")
    if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
        try:
            db.execute("VACUUM")
        except sqlite3.OperationalError:
            pass  # no room to rewrite it: converted on a later mount


def disk_is_short(folder: Path) -> bool:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize < SHORT_BELOW


def free_bytes(db: sqlite3.Connection) -> int:
    """Bytes of free pages inside the database file."""
    pages = db.execute("PRAGMA freelist_count").fetchone()[0]
    return pages * db.execute("PRAGMA page_size").fetchone()[0]


def give_back(db: sqlite3.Connection, urgent: bool) -> None:
    """Return free pages and the WAL's space to the filesystem (outside any
    transaction): always when urgent, else when enough is free. On a disk too
    full even for this, the next deletion tries again."""
    if db.in_transaction or (not urgent and free_bytes(db) < GIVE_BACK_ABOVE):
        return
    try:
        # the WAL first: emptied, it has room for the vacuum's own pages
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        # executescript steps it to the end: one execute() would free one page
        db.executescript("PRAGMA incremental_vacuum;")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # the database file shrinks here
    except sqlite3.Error:
        pass
