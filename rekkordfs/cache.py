"""Local caches of one repository, kept in the user's cache folder.

- known blobs: IDs this machine has written or seen stored, with the pack
  range holding them when they are packed, so a save skips uploading them (the
  repository never deletes blobs, so a known blob stays); and which pack
  indexes were already read into it;
- stat cache: for each saved path, the (size, mtime, ctime, inode) it had and
  its chunk list, so an unchanged file is not read again.

Both live in one SQLite database per repository, named by the repository ID.
Entries are only recorded after the blobs they name are durable.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import platformdirs

from .format import Location

SCHEMA_VERSION = 2  # bump when the tables change: the cache is rebuilt, never migrated
SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    id BLOB PRIMARY KEY, pack BLOB, offset INTEGER, length INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS indexes (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stats (
    path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER,
    ino INTEGER, chunks BLOB
) WITHOUT ROWID;
"""


def default_cache_root() -> Path:
    override = os.environ.get("REKKORD_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir("rekkord"))


def default_state_dir() -> Path:
    """Where staged data lives (kept across reboots, unlike a cache)."""
    override = os.environ.get("REKKORD_STATE_DIR")
    return Path(override) if override else Path(platformdirs.user_state_dir("rekkord"))


def repository_cache_dir(repo_id: str, root: Path | None = None) -> Path:
    folder = (root or default_cache_root()) / repo_id
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


@dataclass(frozen=True)
class KnownBlob:
    location: Location | None  # None: a standalone object


@dataclass(frozen=True)
class StatKey:
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int


class LocalCache:
    """Thread-safe: one connection guarded by a lock (lookups are microseconds)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._db = sqlite3.connect(folder / "cache.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        if self._db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            self._db.executescript("DROP TABLE IF EXISTS blobs; DROP TABLE IF EXISTS stats; DROP TABLE IF EXISTS indexes;")
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # known blobs

    def lookup_blob(self, blob_id: bytes) -> KnownBlob | None:
        with self._lock:
            row = self._db.execute("SELECT pack, offset, length FROM blobs WHERE id = ?", (blob_id,)).fetchone()
        if row is None:
            return None
        return KnownBlob(Location(row[0], row[1], row[2]) if row[0] is not None else None)

    def lookup_blobs(self, blob_ids: list[bytes]) -> dict[bytes, KnownBlob]:
        """lookup_blob() of many IDs in a few queries; unknown IDs are absent."""
        found: dict[bytes, KnownBlob] = {}
        for start in range(0, len(blob_ids), 500):
            part = blob_ids[start:start + 500]
            query = f"SELECT id, pack, offset, length FROM blobs WHERE id IN ({','.join('?' * len(part))})"
            with self._lock:
                rows = self._db.execute(query, part).fetchall()
            for blob_id, pack, offset, length in rows:
                found[blob_id] = KnownBlob(Location(pack, offset, length) if pack is not None else None)
        return found

    def add_blobs(self, items: Iterable[tuple[bytes, Location | None]]) -> None:
        rows = ((i, l.pack, l.offset, l.length) if l else (i, None, None, None) for i, l in items)
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO blobs (id, pack, offset, length) VALUES (?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")

    def known_indexes(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT name FROM indexes")}

    def add_index(self, name: str, items: Iterable[tuple[bytes, Location]]) -> None:
        """Record a pack index and its blobs in one transaction."""
        rows = [(i, l.pack, l.offset, l.length) for i, l in items]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO blobs (id, pack, offset, length) VALUES (?, ?, ?, ?)", rows)
            self._db.execute("INSERT OR IGNORE INTO indexes (name) VALUES (?)", (name,))
            self._db.execute("COMMIT")

    # stat cache

    def lookup_stat(self, path: bytes, key: StatKey) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT size, mtime_ns, ctime_ns, ino, chunks FROM stats WHERE path = ?", (path,)
            ).fetchone()
        if row is None or StatKey(*row[:4]) != key:
            return None
        return row[4]

    def store_stats(self, rows: Iterable[tuple[bytes, StatKey, bytes]]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO stats (path, size, mtime_ns, ctime_ns, ino, chunks) VALUES (?, ?, ?, ?, ?, ?)",
                ((p, k.size, k.mtime_ns, k.ctime_ns, k.ino, c) for p, k, c in rows),
            )
            self._db.execute("COMMIT")
