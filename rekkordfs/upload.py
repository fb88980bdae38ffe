"""Turning file content into stored chunks: chunk, hash, seal, store.

Shared by `save` and by the mount's staging area (write-behind and commit).
The CPU work runs in worker threads under the repository's limiter; storing
happens on the trio side so packs and the known-blob table stay consistent.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from .cache import KnownBlob
from .chunker import Chunker, ReadsInto
from .format import BlobKind, ChunkRef, Location
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


def open_regular(path: bytes | str | os.PathLike[str]) -> io.FileIO:
    """Open a file for reading without following symlinks or blocking on FIFOs."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0)
    try:
        fd = os.open(path, flags)
    except PermissionError:
        fd = os.open(path, flags & ~getattr(os, "O_NOATIME", 0))  # O_NOATIME needs ownership
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "no longer a regular file")
    return os.fdopen(fd, "rb", buffering=0)


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

    def prepare_many(self, datas: list[bytes]) -> list[list[Prepared]]:
        """Thread side: chunk, hash, and seal the chunks not known yet of several
        files' content, with one known-blob lookup for all. Every result must
        go to store()."""
        return self._seal_new([self.chunker.split(data) for data in datas])

    def _seal_new(self, files: list[list[memoryview]]) -> list[list[Prepared]]:
        """Hash chunks already cut, and seal those not known yet."""
        codec = self.repo.codec
        pieces = [[(codec.blob_id(BlobKind.CHUNK, view), view) for view in views] for views in files]
        known = self.repo.known_many([blob_id for chunks in pieces for blob_id, _ in chunks])
        seen: set[bytes] = set()
        sealed: list[Sealed] = []
        prepared: list[list[Prepared]] = []
        try:
            for chunks in pieces:
                out: list[Prepared] = []
                for blob_id, view in chunks:
                    if blob_id in seen or blob_id in known:
                        out.append((blob_id, len(view), known.get(blob_id)))
                    else:
                        seen.add(blob_id)
                        sealed.append(self.repo.seal(BlobKind.CHUNK, view))
                        out.append((blob_id, len(view), sealed[-1]))
                prepared.append(out)
        except BaseException:
            self.repo.discard(sealed)
            raise
        return prepared

    def store(self, prepared: list[Prepared]) -> list[ChunkRef]:
        """Put the sealed chunks into their packs; refer to every chunk by where
        it is stored. Await repo.upload_ready() afterwards."""
        locations: dict[bytes, Location] = {}
        for blob_id, size, data in prepared:
            if isinstance(data, Sealed):
                locations[blob_id], was_new = self.repo.store(BlobKind.CHUNK, blob_id, data)
                if was_new:
                    self.stats.bytes_new += size
                    self.stats.bytes_stored += len(data.data)
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

    async def upload_many(self, datas: list[bytes]) -> list[list[ChunkRef]]:
        """Every chunk of several small contents, sealed in one thread hop."""
        prepared = await self.repo.run_cpu(self.prepare_many, datas)
        refs = iter(self.store([chunk for chunks in prepared for chunk in chunks]))
        await self.repo.upload_ready()
        self.stats.bytes_read += sum(len(data) for data in datas)
        return [[next(refs) for _ in chunks] for chunks in prepared]

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
        handle = await trio.to_thread.run_sync(open_regular, path)
        try:
            size = os.fstat(handle.fileno()).st_size
            if size > SMALL_FILE:
                return await self.upload_stream(handle)
            data = await trio.to_thread.run_sync(handle.read)
            return (await self.upload_many([data]))[0]
        finally:
            handle.close()
