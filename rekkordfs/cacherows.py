"""Writing rows of the local cache (cache.py) in bulk: light to import, as a
save's worker process (prepworker.py) writes a first save's rows too, off
the main process's core.

The rows are small and keyed by what is looked up (a SQLite row costs
microseconds a column and a byte): a blob row names its pack by a number
(the packs table), with no index by pack; a stat row is the path and one
bytes value, the signed row as the save made it, less the path.
"""

from __future__ import annotations

import sqlite3
import struct
from array import array
from collections.abc import Callable

from .format import ID_SIZE

STAT_KEY = struct.Struct("<QqqQI")  # size, mtime, ctime, inode, path length: what a stat row's MAC covers first
MAC_SIZE = 16
_PATH_LENGTH = struct.Struct("<I")  # the last field of STAT_KEY
_PATH_AT = STAT_KEY.size - _PATH_LENGTH.size

_STATS = "INSERT OR REPLACE INTO stats (path, row) VALUES (?, ?)"
_BLOBS = "INSERT OR IGNORE INTO blobs (id, pack, offset, length) VALUES (?, ?, ?, ?)"


def insert_stats(db: sqlite3.Connection, rows: list[bytes]) -> None:
    """Stat rows, each a cache.stat_row() followed by its MAC, in one transaction."""
    head, length_at, length_of = STAT_KEY.size, _PATH_AT, _PATH_LENGTH.unpack_from
    values = []
    for row in rows:
        end = head + length_of(row, length_at)[0]
        values.append((row[head:end], row[:head] + row[end:]))
    _transaction(db, lambda: db.executemany(_STATS, values))


def insert_blobs(db: sqlite3.Connection, rows: list[tuple[bytes, bytes, int, int]]) -> None:
    """Blob rows (ID, pack, offset, length) in one transaction."""
    _transaction(db, lambda: add_blob_rows(db, rows))


def pack_rows(blob_ids: list[bytes], places: list[int]) -> tuple[bytes, bytes]:
    """The blob rows of one pack as a worker process is sent them: the IDs
    joined, and each blob's offset << 32 | length (a list of 4-tuples cost
    the main process a tuple a row and marshal's work on each)."""
    return b"".join(blob_ids), array("Q", places).tobytes()


def insert_pack_rows(db: sqlite3.Connection, pack: bytes, blob_ids: bytes, places: bytes) -> None:
    """insert_blobs() of a pack's rows as pack_rows() gave them."""
    numbers = array("Q")
    numbers.frombytes(places)
    insert_blobs(db, [(blob_ids[at:at + ID_SIZE], pack, place >> 32, place & 0xFFFFFFFF)
                      for at, place in zip(range(0, len(blob_ids), ID_SIZE), numbers)])


def add_blob_rows(db: sqlite3.Connection, rows: list[tuple[bytes, bytes, int, int]]) -> None:
    """insert_blobs() inside the caller's transaction."""
    numbers = {pack: pack_number(db, pack) for pack in {row[1] for row in rows}}
    # in key order: B-tree inserts of random IDs cost a third more CPU otherwise
    db.executemany(_BLOBS, sorted([(blob_id, numbers[pack], offset, length)
                                   for blob_id, pack, offset, length in rows]))


def pack_number(db: sqlite3.Connection, pack: bytes) -> int:
    """The number blob rows name this pack by (given one here if it has none)."""
    db.execute("INSERT OR IGNORE INTO packs (id) VALUES (?)", (pack,))
    number: int = db.execute("SELECT number FROM packs WHERE id = ?", (pack,)).fetchone()[0]
    return number


def _transaction(db: sqlite3.Connection, work: Callable[[], object]) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        work()
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
