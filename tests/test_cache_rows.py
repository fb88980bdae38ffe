"""The local cache's rows (rekkordfs/cache.py, cacherows.py) in a real SQLite
file: blob rows as the main process and a save's worker process write them,
known once their pack's index is recorded and gone with it; stat rows that
apply only to the file they were made for; an older cache rebuilt."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from rekkordfs import keys
from rekkordfs.cache import SCHEMA_VERSION, LocalCache, StatKey, stat_row
from rekkordfs.cacherows import MAC_SIZE, STAT_KEY, insert_pack_rows, insert_stats, pack_rows
from rekkordfs.format import Location, encode_chunk


@pytest.fixture
def cache(tmp_path: Path) -> LocalCache:
    return LocalCache(tmp_path / "cache", keys.new_master())


def test_blob_rows_of_both_writers_count_once_indexed_and_go_with_their_index(cache: LocalCache) -> None:
    first, second = os.urandom(32), os.urandom(32)
    ids = [os.urandom(32) for _ in range(300)]
    cache.add_blobs([(blob_id, Location(first, 100 * n, 90 + n)) for n, blob_id in enumerate(ids[:200])])
    # the second pack's rows as a worker process writes them, over its own connection
    worker = sqlite3.connect(cache.database, isolation_level=None)
    places = [(5000 + n) << 32 | (2000 + n) for n in range(150)]
    insert_pack_rows(worker, second, *pack_rows(ids[150:], places))
    worker.close()
    assert cache.lookup_blobs(ids) == {}  # no index recorded yet
    cache.add_index("one", first, [])
    cache.add_index("two", second, [])
    found = cache.lookup_blobs(ids)
    assert len(found) == 300
    assert found[ids[0]].location == Location(first, 0, 90)
    assert found[ids[299]].location == Location(second, 5149, 2149)
    shared = ids[150:200]  # in both packs: avoiding one gives the other
    assert {found[b].location.pack for b in shared} <= {first, second}
    assert all(cache.lookup_blobs([b], avoid=first)[b].location == Location(second, 5000 + n, 2000 + n)
               for n, b in enumerate(shared))
    assert all(cache.lookup_blobs([b], avoid=second)[b].location.pack == first for b in shared)
    cache.forget_indexes(["one"])
    found = cache.lookup_blobs(ids)
    assert set(found) == set(ids[150:]) and {f.location.pack for f in found.values()} == {second}
    assert cache._usable_packs() == frozenset({second})


def test_a_stat_row_applies_to_its_file_only_and_not_once_tampered(cache: LocalCache) -> None:
    pack = os.urandom(32)
    ids = [os.urandom(32) for _ in range(3)]
    cache.add_blobs([(blob_id, Location(pack, 10 * n, 10)) for n, blob_id in enumerate(ids)])
    cache.add_index("i", pack, [])
    chunks = [encode_chunk(blob_id, 700, Location(pack, 10 * n, 10)) for n, blob_id in enumerate(ids)]
    paths = [b"/src/a", b"/src/bb", b"/src/\xffc"]
    keyed = [StatKey(700, 1, 2, n) for n in range(3)]
    cache.store_stats([stat_row(path, key, raw) for path, key, raw in zip(paths, keyed, chunks)])
    found = cache.lookup_stats(list(zip(paths, keyed)))
    assert [f[0] if f else None for f in found] == chunks
    assert found[2] is not None and found[2][1][0].id == ids[2]
    # another key (the file changed), another path, or rows moved between paths: no row
    assert cache.lookup_stats([(paths[0], StatKey(700, 1, 2, 9)), (b"/src/d", keyed[0])]) == [None, None]
    db = sqlite3.connect(cache.database, isolation_level=None)
    rows = dict(db.execute("SELECT path, row FROM stats").fetchall())
    head = STAT_KEY.size
    db.execute("UPDATE stats SET row = ? WHERE path = ?",  # its key and MAC, another file's chunks
               (rows[paths[0]][:head] + rows[paths[1]][head:-MAC_SIZE] + rows[paths[0]][-MAC_SIZE:], paths[0]))
    db.execute("UPDATE stats SET row = ? WHERE path = ?", (rows[paths[2]], paths[1]))  # another path's row
    db.execute("UPDATE stats SET row = ? WHERE path = ?", (rows[paths[2]][:head + 3], paths[2]))  # cut short
    db.close()
    assert cache.lookup_stats(list(zip(paths, keyed))) == [None, None, None]


def test_worker_rows_are_the_rows_the_main_process_writes(tmp_path: Path) -> None:
    """insert_stats() (the worker's) stores what store_stats() (the main process's) does."""
    master = keys.new_master()
    rows = [stat_row(b"/x/%d" % n, StatKey(n, n, n, n), os.urandom(80)) for n in range(50)]
    stored = []
    for name in ("main", "worker"):
        cache = LocalCache(tmp_path / name, master)
        if name == "main":
            cache.store_stats(rows)
        else:
            worker = sqlite3.connect(cache.database, isolation_level=None)
            insert_stats(worker, cache.signed_stats(rows))
            worker.close()
        with sqlite3.connect(cache.database) as db:
            stored.append(db.execute("SELECT path, row FROM stats ORDER BY path").fetchall())
        cache.close()
    assert stored[0] == stored[1] and len(stored[0]) == 50


def test_a_cache_of_an_older_schema_is_rebuilt(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    db = sqlite3.connect(folder / "cache.db")
    db.executescript("CREATE TABLE blobs (id BLOB, pack BLOB, offset INTEGER, length INTEGER);"
                     "CREATE TABLE stats (path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER,"
                     " ino INTEGER, chunks BLOB, mac BLOB);"
                     "INSERT INTO stats VALUES (x'2f61', 1, 2, 3, 4, x'00', x'00');"
                     f"PRAGMA user_version = {SCHEMA_VERSION - 1};")
    db.commit()
    db.close()
    cache = LocalCache(folder, keys.new_master())
    assert not cache.has_stats()
    assert cache.lookup_stats([(b"/a", StatKey(1, 2, 3, 4))]) == [None]
    cache.store_stats([stat_row(b"/a", StatKey(1, 2, 3, 4), b"")])
    assert cache.has_stats()
    cache.close()
