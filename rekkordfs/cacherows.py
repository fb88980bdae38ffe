"""Writing rows of the local cache (cache.py) in bulk: light to import, as a
save's worker process (prepworker.py) writes a first save's rows too, off
the main process's core."""

from __future__ import annotations

import sqlite3
import struct

STAT_KEY = struct.Struct("<QqqQI")  # size, mtime, ctime, inode, path length: what a stat row's MAC covers first
MAC_SIZE = 16

_STATS = ("INSERT OR REPLACE INTO stats (path, size, mtime_ns, ctime_ns, ino, chunks, mac) "
          "VALUES (?, ?, ?, ?, ?, ?, ?)")
_BLOBS = "INSERT OR IGNORE INTO blobs (id, pack, offset, length) VALUES (?, ?, ?, ?)"


def insert_stats(db: sqlite3.Connection, rows: list[bytes]) -> None:
    """Stat rows, each a cache.stat_row() followed by its MAC, in one transaction."""
    head = STAT_KEY.size

    def values() -> list[tuple]:
        out = []
        for row in rows:
            size, mtime_ns, ctime_ns, ino, length = STAT_KEY.unpack_from(row)
            out.append((row[head:head + length], size, mtime_ns, ctime_ns, ino,
                        row[head + length:-MAC_SIZE], row[-MAC_SIZE:]))
        return out

    _insert(db, _STATS, values())


def insert_blobs(db: sqlite3.Connection, rows: list[tuple[bytes, bytes, int, int]]) -> None:
    """Blob rows (ID, pack, offset, length) in one transaction."""
    # in key order: B-tree inserts of random IDs cost a third more CPU otherwise
    _insert(db, _BLOBS, sorted(rows))


def _insert(db: sqlite3.Connection, sql: str, rows: list[tuple]) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany(sql, rows)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
