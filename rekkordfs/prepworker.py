"""A save's worker process: reads, chunks, hashes, compresses and seals
batches of small files on another CPU (the main process, held by the GIL to
one core, keeps the walk, the bookkeeping, the packs and the cache).

Started by prepprocs.py as `python -m rekkordfs.prepworker` in its own
process group (a Ctrl-C at the terminal is the main process's to handle),
it talks only through its stdin and stdout, in frames (frames.py).

    main -> worker  (id_key, chunk_seed, min, avg, max, data_public, pack_target, cache_db)   once
    worker -> main  ("ready",)
    main -> worker  ("batch", folders, [name, ...], want, sizes)
                                                         a batch, any number of times: its files by name,
                                                         folder by folder (folders: [(path, dev, ino),
                                                         count], localfiles.FolderOpener); want: a byte a
                                                         file, 1 to read its extended attributes; sizes:
                                                         each file's, by the walker's lstat
    main -> worker  ("contents", [bytes, ...])           a batch of contents held by the main
                                                         process (a commit's staged files)
    worker -> main  ("done", closed_packs, files)        one per batch, in order
    main -> worker  ("stats", [row, ...]) or ("pack", [pack, ids, places])
                                                         cache rows to write, unanswered (a pack's
                                                         blob rows: cacherows.pack_rows())
    worker -> main  ("failed", message)                  then it exits

Each file is (errno, message) when it could not be read, else (size, xattrs,
chunks): the bytes read (localfiles.read_expected(): no fstat, the walker's
lstat stands for it), its extended attributes (fsmeta.read_xattrs(), or
None when not wanted: the walker read them; a content sent: []) and its
chunks (their sizes add up to what was read), each chunk (blob_id, size, pack_id, sealed) or, for a
twin of an earlier chunk of the batch, (blob_id, size, None, None). The worker
seals chunks for packs of its own (only the public data key is needed for
that); closed_packs names those it will seal no more for. The secrets it needs
(the blob-ID key and the chunker's seed) come through the pipe, never argv,
the environment or a file. It also writes the save's rows of the local cache
(cacherows.py: stat rows with the MACs the main process made, and blob rows),
which were a fifth of the main process's CPU. Its stdin closing (the save
ended, or died) ends it, once what it was sent is written.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys

import zstandard

from . import crypto
from .cacherows import insert_pack_rows, insert_stats
from .chunker import Chunker, ChunkParams
from .codec import STORED_OVERHEAD, compress_many, seal_many
from .format import BlobKind
from .frames import read_frame, serve_messages
from .localfiles import FolderOpener, FolderRef, read_expected


class Preparer:
    def __init__(self, id_key: bytes, chunk_seed: int, params: ChunkParams, data_public: bytes,
                 pack_target: int) -> None:
        self.chunk_id = crypto.id_hasher(id_key, BlobKind.CHUNK)
        self.chunker = Chunker(chunk_seed, params)
        self.data_public = data_public
        self.pack_target = pack_target
        self.compressor = zstandard.ZstdCompressor(level=1)  # codec.ZSTD_LEVEL: the frames must be the same
        self.sealer = crypto.PackSealer(data_public)
        self.sealed = 0  # bytes sealed for the current pack

    def batch(self, folders: list[tuple[FolderRef, int]], names: list[bytes], want: bytes,
              sizes: list[int]) -> tuple[str, list[bytes], list[tuple]]:
        files: list[tuple] = []
        cut: list[tuple[int, list[memoryview]]] = []  # (file index, chunks) of the files read
        split, append = self.chunker.split, files.append
        places = [folder for folder, count in folders for _ in range(count)]
        opener = FolderOpener()
        try:
            for folder, name, wanted, size in zip(places, names, want, sizes):
                try:
                    fd = opener.open(folder, name)
                    try:
                        data, xattrs = read_expected(fd, size, wanted)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    append((exc.errno or 0, exc.strerror or str(exc)))
                    continue
                cut.append((len(files), split(data)))
                append((len(data), xattrs))
        finally:
            opener.close()
        return self._seal(files, cut)

    def contents(self, datas: list[bytes]) -> tuple[str, list[bytes], list[tuple]]:
        """A batch of contents sent whole: no file to read."""
        files: list[tuple] = [(len(data), []) for data in datas]
        return self._seal(files, [(index, self.chunker.split(data)) for index, data in enumerate(datas)])

    def _seal(self, files: list[tuple],
              cut: list[tuple[int, list[memoryview]]]) -> tuple[str, list[bytes], list[tuple]]:
        """Each file's chunks (cut: a file's index and its chunks) hashed, the
        new ones compressed and sealed; files is the answer, completed."""
        # hash every chunk, then compress and seal the first of each ID
        chunk_id, kind = self.chunk_id, BlobKind.CHUNK
        ids = [[chunk_id(view) for view in views] for _, views in cut]
        fresh: dict[bytes, memoryview] = {}
        for views, blob_ids in zip((views for _, views in cut), ids):
            for blob_id, view in zip(blob_ids, views):
                fresh.setdefault(blob_id, view)
        compressed = compress_many(self.compressor, list(fresh.values()))
        closed: list[bytes] = []
        items: list[tuple[crypto.PackSealer, int, bytes | bytearray | memoryview]] = []
        packs: list[bytes] = []
        for compression, payload in compressed:
            size = len(payload) + STORED_OVERHEAD
            if self.sealed and self.sealed + size > self.pack_target:
                closed.append(self.sealer.pack_id)
                self.sealer = crypto.PackSealer(self.data_public)
                self.sealed = 0
            self.sealed += size
            items.append((self.sealer, compression, payload))
            packs.append(self.sealer.pack_id)
        # the sealed bytearrays as they are: marshal writes them as bytes, no copy each
        sealed = dict(zip(fresh, zip(packs, seal_many(kind, items))))
        for (index, views), blob_ids in zip(cut, ids):
            chunks = []
            for blob_id, view in zip(blob_ids, views):
                pack, blob = sealed.pop(blob_id, (None, None))
                chunks.append((blob_id, len(view), pack, blob))
            files[index] = (*files[index], chunks)
        return "done", closed, files


def main() -> int:
    # No PR_SET_PDEATHSIG: it fires when the thread that started the worker
    # ends (trio starts processes from its worker threads). A main process
    # that dies closes the pipes, which ends the worker after its batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides what a Ctrl-C does
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    start = read_frame(stdin)
    if start is None:
        return 0
    id_key, chunk_seed, low, average, high, data_public, pack_target, cache_db = start
    preparer = Preparer(id_key, chunk_seed, ChunkParams(low, average, high), data_public, pack_target)
    del start, id_key
    db = sqlite3.connect(cache_db, isolation_level=None, timeout=60)  # waits while the main process writes
    db.execute("PRAGMA synchronous=NORMAL")  # as the main process's connection: no fsync at each commit

    def handle(message: tuple) -> tuple | None:
        try:
            return _handle(preparer, db, message)
        except Exception as exc:  # noqa: BLE001 - told to the main process, which fails the save
            return "failed", f"{type(exc).__name__}: {exc}"

    try:
        return serve_messages(stdin, stdout, handle)
    finally:
        db.close()


def _handle(preparer: Preparer, db: sqlite3.Connection, message: tuple) -> tuple | None:
    """A batch of paths or contents (its answer), or cache rows to write (no answer)."""
    kind, *rest = message
    if kind == "batch":
        return preparer.batch(*rest)
    (rows,) = rest
    if kind == "contents":
        return preparer.contents(rows)
    if kind == "stats":
        insert_stats(db, rows)
    elif kind == "pack":
        insert_pack_rows(db, *rows)
    else:
        raise ValueError(f"unknown message {kind!r}")
    return None


if __name__ == "__main__":
    sys.exit(main())
