"""Local caches of one repository and key, kept in the user's cache folder.

- known blobs: IDs of blobs this key has written, or read in the pack index of
  a writer it trusts, with the pack range holding them, so a save refers to
  them instead of storing them again; and which pack indexes were already read
  (an index that disappears, because a prune deleted its pack, takes its
  blobs with it). A blob row counts only once its pack's index is recorded: a
  writer adds the rows of each pack as it uploads it (add_blobs) and records
  the indexes once they are durable (add_index);
- stat cache: for each saved path, the (size, mtime, ctime, inode) it had and
  its chunks (IDs and sizes), so an unchanged file is not read again.

Both live in one SQLite database per repository and key. Known blobs are only
recorded after the blobs are durable; stat rows may be recorded before (a save
writes them as it goes), since a stat row is used only when its MAC (keyed by
this keyfile) verifies, its chunk sizes add up to the file's size, and every
chunk is in a pack of known blobs: a tampered, stale or premature row costs a
re-read, never a snapshot that names the wrong data.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import platformdirs

from . import crypto
from .cacherows import MAC_SIZE, STAT_KEY, add_blob_rows, insert_blobs, insert_stats
from .errors import CorruptedData
from .format import ChunkRef, Location, decode_chunks
from .keys import Keyset

SCHEMA_VERSION = 7  # bump when the tables change: the cache is rebuilt, never migrated
# Rows keyed by what is looked up and no more indexes than that: a save
# writes a blob row and a stat row for every small file (cacherows.py).
SCHEMA = """
CREATE TABLE IF NOT EXISTS packs (number INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS blobs (
    id BLOB NOT NULL, pack INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
    PRIMARY KEY (id, pack)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS indexes (name TEXT PRIMARY KEY, pack BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (snapshot BLOB PRIMARY KEY, sealed_tag BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stats (path BLOB PRIMARY KEY, row BLOB NOT NULL) WITHOUT ROWID;
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


@dataclass(frozen=True, slots=True)
class KnownBlob:
    location: Location


class StatKey(NamedTuple):
    """What must not have changed for a file's stat row to apply (a tuple:
    a save makes and compares one per file)."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int


def stat_key(st: os.stat_result) -> StatKey:
    return StatKey(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def stat_row(path: bytes, key: StatKey, chunks: bytes) -> bytes:
    """A stat row in one bytes object, as a save keeps it until stored: the
    message its MAC covers (key, path length, path, encoded chunks)."""
    return STAT_KEY.pack(*key, len(path)) + path + chunks


class LocalCache:
    """Thread-safe: one connection guarded by a lock (lookups are microseconds)."""

    def __init__(self, folder: Path, keys: Keyset) -> None:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.folder = folder
        # Only this keyfile can make a stat row that verifies.
        # keyed once: a copy of the keyed state costs half a keyed start per row
        self._mac_base = hashlib.blake2b(key=crypto.kdf(bytes(keys.sign_key), b"stat-cache"),
                                         digest_size=MAC_SIZE)
        self._lock = threading.Lock()
        # packs a prune condemned: their blobs are not to be used (the repository sets it)
        self._excluded: frozenset[bytes] = frozenset()
        self._usable: frozenset[bytes] | None = None  # trusted packs less excluded ones (lookup_stat)
        self._indexed: frozenset[bytes] | None = None  # packs of recorded indexes: their blob rows count
        self._no_stats: bool | None = None  # the stat table is empty (a first save looks nothing up)
        self._db = sqlite3.connect(self.database, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        if self._db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            self._db.executescript("DROP TABLE IF EXISTS blobs; DROP TABLE IF EXISTS stats; "
                                   "DROP TABLE IF EXISTS packs; DROP TABLE IF EXISTS indexes; "
                                   "DROP TABLE IF EXISTS pending;")
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._db.executescript(SCHEMA)

    @property
    def excluded_packs(self) -> frozenset[bytes]:
        return self._excluded

    @excluded_packs.setter
    def excluded_packs(self, packs: frozenset[bytes]) -> None:
        self._excluded = packs
        self._usable = None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # known blobs

    def lookup_blob(self, blob_id: bytes) -> KnownBlob | None:
        return self.lookup_blobs([blob_id]).get(blob_id)

    def lookup_blobs(self, blob_ids: list[bytes], avoid: bytes | None = None) -> dict[bytes, KnownBlob]:
        """Where these blobs are stored (one place each, never in an excluded
        pack nor in `avoid`); unknown IDs are absent."""
        found: dict[bytes, KnownBlob] = {}
        excluded = self._excluded
        indexed = self._indexed_packs()
        if not indexed:
            return found  # no blob row counts yet (a first save into a new repository)
        for start in range(0, len(blob_ids), 500):
            part = blob_ids[start:start + 500]
            query = ("SELECT blobs.id, packs.id, offset, length FROM blobs JOIN packs ON packs.number = blobs.pack "
                     f"WHERE blobs.id IN ({','.join('?' * len(part))})")
            with self._lock:
                rows = self._db.execute(query, part).fetchall()
            for blob_id, pack, offset, length in rows:
                if pack not in excluded and pack != avoid and blob_id not in found and pack in indexed:
                    found[blob_id] = KnownBlob(Location(pack, offset, length))
        return found

    def knows_blobs(self) -> bool:
        """Whether lookup_blobs() can find anything at all (some pack index is recorded)."""
        return bool(self._indexed_packs())

    def known_indexes(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT name FROM indexes")}

    def _indexed_packs(self) -> frozenset[bytes]:
        if self._indexed is None:
            with self._lock:
                self._indexed = frozenset(row[0] for row in self._db.execute("SELECT pack FROM indexes"))
        return self._indexed

    def add_blobs(self, items: Iterable[tuple[bytes, Location]]) -> None:
        """Blob rows of a pack this key uploaded, not known until add_index()
        records its index (once durable): a writer stores them while it works,
        not all at its end (100,000 rows took 1.5 s after a save's snapshot).
        The rows of a pack whose index is never recorded are never used."""
        # in key order: B-tree inserts of random IDs cost a third more CPU otherwise
        with self._lock:
            insert_blobs(self._db, [(blob_id, at.pack, at.offset, at.length) for blob_id, at in items])

    def add_index(self, name: str, pack: bytes, items: Iterable[tuple[bytes, Location]]) -> None:
        """Record a pack index and the blobs of it this key trusts (those it
        did not give add_blobs() already), in one transaction."""
        rows = [(blob_id, at.pack, at.offset, at.length) for blob_id, at in items]
        self._usable = None
        self._indexed = None
        with self._lock:
            self._db.execute("BEGIN")
            add_blob_rows(self._db, rows)
            self._db.execute("INSERT OR IGNORE INTO indexes (name, pack) VALUES (?, ?)", (name, pack))
            self._db.execute("COMMIT")

    def index_packs(self) -> dict[str, bytes]:
        """Every pack index read so far, trusted or not, and the pack it describes
        (empty for one that could not be read)."""
        with self._lock:
            return dict(self._db.execute("SELECT name, pack FROM indexes").fetchall())

    def forget_indexes(self, names: Iterable[str]) -> None:
        """Indexes that are gone from the repository (a prune deleted their
        packs): their blobs are no longer known."""
        self._usable = None
        self._indexed = None
        with self._lock:
            self._db.execute("BEGIN")
            numbers = []
            for name in names:
                row = self._db.execute("SELECT packs.number FROM indexes JOIN packs ON packs.id = indexes.pack "
                                       "WHERE indexes.name = ?", (name,)).fetchone()
                if row is not None:
                    numbers.append(row[0])
                self._db.execute("DELETE FROM indexes WHERE name = ?", (name,))
            for start in range(0, len(numbers), 500):  # one pass over the blob rows (none is indexed by pack)
                part = numbers[start:start + 500]
                marks = ",".join("?" * len(part))
                self._db.execute(f"DELETE FROM blobs WHERE pack IN ({marks})", part)
                self._db.execute(f"DELETE FROM packs WHERE number IN ({marks})", part)
            self._db.execute("COMMIT")

    # snapshots being published: a tag not written yet (a crash between the
    # record and its tag is finished by the next writer of this key)

    def add_pending(self, snapshot_id: bytes, sealed_tag: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO pending (snapshot, sealed_tag) VALUES (?, ?)",
                             (snapshot_id, sealed_tag))

    def pending(self) -> list[tuple[bytes, bytes]]:
        with self._lock:
            return self._db.execute("SELECT snapshot, sealed_tag FROM pending").fetchall()

    def drop_pending(self, snapshot_id: bytes) -> None:
        with self._lock:
            self._db.execute("DELETE FROM pending WHERE snapshot = ?", (snapshot_id,))

    # stat cache

    def _mac(self, row: bytes) -> bytes:
        """The MAC of a stat_row()."""
        mac = self._mac_base.copy()
        mac.update(row)
        return mac.digest()

    def _usable_packs(self) -> frozenset[bytes]:
        """Packs of trusted blobs, less the condemned ones (computed once until they change)."""
        if self._usable is None:
            with self._lock:
                packs = {row[0] for row in self._db.execute("SELECT id FROM packs")}  # those with blob rows
            self._usable = frozenset((packs & self._indexed_packs()) - self._excluded)
        return self._usable

    def lookup_stat(self, path: bytes, key: StatKey) -> tuple[bytes, list[ChunkRef]] | None:
        """The chunks of an unchanged file (encoded and decoded), or None when the row is missing,
        stale, tampered with, or uses a pack this key does not trust (any more:
        a prune may have condemned or deleted it)."""
        return self.lookup_stats([(path, key)])[0]

    def lookup_stats(self, files: list[tuple[bytes, StatKey]]) -> list[tuple[bytes, list[ChunkRef]] | None]:
        """lookup_stat() of many files (a folder's), one query per 500 (each
        query lets go of the GIL: one per file made the walker's thread and the
        workers hand it back and forth); none at all while the table is empty."""
        if not files or self._stats_empty():
            return [None] * len(files)
        rows: dict[bytes, bytes] = {}
        for start in range(0, len(files), 500):
            part = [path for path, _ in files[start:start + 500]]
            query = f"SELECT path, row FROM stats WHERE path IN ({','.join('?' * len(part))})"
            with self._lock:
                rows.update(self._db.execute(query, part))
        return [self._check_stat(path, key, rows.get(path)) for path, key in files]

    def _check_stat(self, path: bytes, key: StatKey, row: object) -> tuple[bytes, list[ChunkRef]] | None:
        """A stored row (cacherows.insert_stats(): the signed row less its path) if it verifies."""
        head = STAT_KEY.pack(*key, len(path))
        if not isinstance(row, bytes) or len(row) < len(head) + MAC_SIZE or not row.startswith(head):
            return None
        raw, mac = row[len(head):-MAC_SIZE], row[-MAC_SIZE:]
        if not hmac.compare_digest(mac, self._mac(stat_row(path, key, raw))):
            return None
        try:
            chunks = decode_chunks(raw)
        except CorruptedData:
            return None
        usable = self._usable_packs()
        if sum(c.size for c in chunks) != key.size or any(c.location.pack not in usable for c in chunks):
            return None
        return raw, chunks

    def has_stats(self) -> bool:
        """Whether any stat row is stored (a first save looks nothing up)."""
        return not self._stats_empty()

    def _stats_empty(self) -> bool:
        if self._no_stats is None:
            with self._lock:
                self._no_stats = self._db.execute("SELECT 1 FROM stats LIMIT 1").fetchone() is None
        return self._no_stats

    def store_stats(self, rows: Iterable[bytes]) -> None:
        """Stat rows of files just saved, each a stat_row() (path, key, chunk
        list as encode_chunks() gave it), in one transaction."""
        signed = self.signed_stats(rows)
        with self._lock:
            insert_stats(self._db, signed)
            self._no_stats = None

    def signed_stats(self, rows: Iterable[bytes]) -> list[bytes]:
        """Stat rows followed by their MACs, as cacherows.insert_stats() takes
        them (written by this cache or by a save's worker process: the table
        is not known to be empty any more)."""
        self._no_stats = None
        base = self._mac_base
        out = []
        for row in rows:
            mac = base.copy()
            mac.update(row)
            out.append(row + mac.digest())
        return out

    @property
    def database(self) -> Path:
        """The SQLite file (a save's worker process writes rows into it too)."""
        return self.folder / "cache.db"
