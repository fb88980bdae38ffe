"""Turning file content into stored chunks: chunk, hash, seal, store.

Shared by `save` and by the mount's staging area (write-behind and commit).
The CPU work runs in worker threads under the repository's limiter; storing
happens on the trio side so packs and the known-blob table stay consistent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from .cache import KnownBlob, StatKey, stat_key
from .chunker import Chunker, ReadsInto
from .format import BlobKind, ChunkRef, Location
from .fsmeta import read_xattrs
from .localfiles import FolderOpener, FolderRef, open_file, read_small, regular_handle
from .packs import Sealed
from .repository import Repository
from .tasks import task_group
from .tuning import SMALL_FILE, STREAM_BATCH, chunks_in_flight

# A chunk ready to store: (blob ID, plaintext size, and either its sealed bytes
# (new), where it is stored (known), or None (a twin earlier in the batch))
Prepared = tuple[bytes, int, "Sealed | KnownBlob | None"]



@dataclass
class TransferStats:
    bytes_read: int = 0
    bytes_new: int = 0  # plaintext bytes of chunks the repository lacked
    bytes_stored: int = 0  # bytes written to the repository


@dataclass(slots=True, eq=False)
class SmallFile:
    """One file of a small-file batch (Uploader.prepare_small): its content, or
    a local path to read it from (a name in folder, when given: a save's
    files, localfiles.FolderOpener). The batch fills in the rest."""

    data: bytes | None = None
    path: bytes | str | None = None
    folder: FolderRef | None = None
    key: StatKey | None = None  # of the file it was read from, by its fstat (unchanged meanwhile?)
    size: int = 0  # bytes read
    error: OSError | None = None  # it could not be read: nothing prepared
    large: bool = False  # over SMALL_FILE when opened: left for upload_path()
    prepared: list[Prepared] | None = None
    want_xattrs: bool = False  # read its extended attributes too, once read (a save's walker leaves them)
    xattrs: list[tuple[bytes, bytes]] | None = None

    @property
    def ready(self) -> bool:
        return self.prepared is not None


def _take(chunks: Iterator[memoryview], limit: int) -> list[memoryview]:
    batch: list[memoryview] = []
    total = 0
    for data in chunks:
        batch.append(data)
        total += len(data)
        if total >= limit:
            break
    return batch


class Uploader:
    def __init__(self, repo: Repository, stats: TransferStats | None = None) -> None:
        assert repo.keys.chunk_seed is not None
        self.repo = repo
        self.stats = stats or TransferStats()
        self.chunker = Chunker(repo.keys.chunk_seed, repo.config.chunking)
        # chunks of large files in flight (read, not yet stored): bounds memory
        self._inflight = trio.Semaphore(chunks_in_flight(repo.threads))

    def prepare_small(self, files: list[SmallFile], limit_bytes: int | None = None,
                      read_limit: int | None = SMALL_FILE) -> int:
        """Thread side, the one small-file pipeline (save, write-behind, commit):
        read the files given by path, then chunk, hash, compress and seal the
        chunks not known yet of all of them in one go (one known-blob lookup, the
        GIL handed over as seldom as the libraries allow). Stops before a file
        once limit_bytes were read; returns how many files it handled. A file
        over read_limit is marked large and left; one that cannot be read gets
        its error. Every prepared file must go to store_small()."""
        handled = 0
        total = 0
        opener = FolderOpener()
        try:
            for item in files:
                if limit_bytes is not None and total >= limit_bytes:
                    break
                handled += 1
                if item.data is None and not self._read_small(item, opener, read_limit):
                    continue
                assert item.data is not None
                item.size = len(item.data)
                total += item.size
        finally:
            opener.close()
        todo = [(item, item.data) for item in files[:handled] if item.data is not None and item.error is None]
        for (item, _), prepared in zip(todo, self._seal_new([self.chunker.split(data) for _, data in todo])):
            item.prepared = prepared
        return handled

    @staticmethod
    def _read_small(item: SmallFile, opener: FolderOpener, read_limit: int | None) -> bool:
        """prepare_small(): read a file given by path; whether it was (not
        large, no error)."""
        assert item.path is not None
        try:
            fd = opener.open(item.folder, os.fsencode(item.path)) if item.folder else open_file(item.path)
            try:
                item.data, st = read_small(fd, read_limit)
                if item.want_xattrs and item.data is not None:
                    item.xattrs = read_xattrs(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            item.error = exc
            return False
        item.key = stat_key(st)
        item.large = item.data is None
        return not item.large

    def store_small(self, files: list[SmallFile]) -> list[list[ChunkRef] | None]:
        """Trio side: store what prepare_small() sealed; each file's chunks, or
        None for one not prepared (error, large, or beyond the batch). Await
        repo.upload_ready() afterwards."""
        refs = iter(self.store([chunk for item in files if item.prepared is not None for chunk in item.prepared]))
        out: list[list[ChunkRef] | None] = []
        for item in files:
            if item.prepared is None:
                out.append(None)
                continue
            self.stats.bytes_read += item.size
            out.append([next(refs) for _ in item.prepared])
        return out

    def discard_small(self, files: list[SmallFile]) -> None:
        """Prepared files that will not be stored (their batch failed)."""
        for item in files:
            if item.prepared is not None:
                self.repo.discard([data for _, _, data in item.prepared if isinstance(data, Sealed)])
                item.prepared = None

    def _seal_new(self, files: list[list[memoryview]]) -> list[list[Prepared]]:
        """Hash chunks already cut, and seal those not known yet."""
        codec = self.repo.codec
        pieces = [[(codec.blob_id(BlobKind.CHUNK, view), view) for view in views] for views in files]
        known = self.repo.known_many([blob_id for chunks in pieces for blob_id, _ in chunks])
        fresh: dict[bytes, memoryview] = {}  # the first of each chunk not stored yet, in order
        for chunks in pieces:
            for blob_id, view in chunks:
                if blob_id not in known and blob_id not in fresh:
                    fresh[blob_id] = view
        sealed = dict(zip(fresh, self.repo.seal_many(BlobKind.CHUNK, list(fresh.values()))))
        prepared: list[list[Prepared]] = []
        for chunks in pieces:
            out: list[Prepared] = []
            for blob_id, view in chunks:
                # the first twin of a batch carries the sealed bytes, later ones None (as known ones their place)
                out.append((blob_id, len(view), sealed.pop(blob_id, None) or known.get(blob_id)))
            prepared.append(out)
        return prepared

    def store(self, prepared: list[Prepared]) -> list[ChunkRef]:
        """Put the sealed chunks into their packs; refer to every chunk by where
        it is stored. Await repo.upload_ready() afterwards."""
        fresh = [(blob_id, size, data) for blob_id, size, data in prepared if isinstance(data, Sealed)]
        locations: dict[bytes, Location] = {}
        stored = self.repo.store_many(BlobKind.CHUNK, [(blob_id, sealed) for blob_id, _, sealed in fresh])
        for (blob_id, size, sealed), (location, was_new) in zip(fresh, stored):
            locations[blob_id] = location
            if was_new:
                self.stats.bytes_new += size
                self.stats.bytes_stored += len(sealed.data)
        refs = []
        for blob_id, size, data in prepared:
            if isinstance(data, KnownBlob):
                location = data.location
            elif blob_id in locations:
                location = locations[blob_id]
            else:
                known = self.repo.known(blob_id)
                assert known is not None, "a chunk is referenced before it is stored"
                location = known.location
            refs.append(ChunkRef(blob_id, size, location))
        return refs

    async def upload_small(self, files: list[SmallFile], limit_bytes: int | None = None,
                           read_limit: int | None = SMALL_FILE) -> list[list[ChunkRef] | None]:
        """prepare_small() in one thread hop, then store_small()."""
        await self.repo.run_small(self.prepare_small, files, limit_bytes, read_limit)
        refs = self.store_small(files)
        await self.repo.upload_ready()
        return refs

    async def upload_many(self, datas: list[bytes]) -> list[list[ChunkRef]]:
        """Every chunk of several small contents held in memory, sealed in one thread hop."""
        refs = await self.upload_small([SmallFile(data) for data in datas])
        return [chunks if chunks is not None else [] for chunks in refs]

    async def upload_stream(self, handle: ReadsInto) -> list[ChunkRef]:
        """Chunks of a large open file, many stored at once, in file order."""
        slots: list[ChunkRef | None] = []
        stream = self.chunker.stream(handle)
        async with task_group() as nursery:
            while True:
                batch = await trio.to_thread.run_sync(_take, stream, STREAM_BATCH)
                if not batch:
                    break
                for data in batch:
                    await self._inflight.acquire()
                    slots.append(None)
                    nursery.start_soon(self._store_one, slots, len(slots) - 1, data)
        chunks = [c for c in slots if c is not None]
        assert len(chunks) == len(slots)
        self.stats.bytes_read += sum(c.size for c in chunks)
        return chunks

    async def _store_one(self, slots: list[ChunkRef | None], index: int, data: memoryview) -> None:
        try:
            prepared = await self.repo.run_cpu(self._seal_new, [[data]])  # already cut
            slots[index] = self.store(prepared[0])[0]
            await self.repo.upload_ready()
        finally:
            self._inflight.release()

    async def upload_path(self, path: bytes | str | os.PathLike[str]) -> list[ChunkRef]:
        """Every chunk of a local file (the staging area's data files)."""
        handle = await trio.to_thread.run_sync(lambda: regular_handle(open_file(path)))
        try:
            size = os.fstat(handle.fileno()).st_size
            if size > SMALL_FILE:
                return await self.upload_stream(handle)
            data = await trio.to_thread.run_sync(handle.read)
            return (await self.upload_many([data]))[0]
        finally:
            handle.close()
