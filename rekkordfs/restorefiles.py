"""Writing restored files' contents below DEST: restore.py walks the tree,
makes the folders and queues the files; this module fetches their chunks and
writes them, small files many at a time, large ones chunk by chunk.

Every chunk is authenticated and its size checked before it is written; a file
is written under a temporary name when it replaces one (destination.py) and
removed again if writing it fails, so no half-written file is left.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

from .chunkmap import pwrite_all
from .destination import FolderFds, XattrFailed, create_new, move_into_place, remove_quietly
from .errors import CorruptedData, ObjectMissing
from .format import BlobKind, ChunkRef, Raw
from .repository import Repository
from .restoreprocs import RestorePool
from .restorewrite import FileJob, SmallWriter
from .tasks import task_group
from .tuning import RESTORE_WINDOW, WORKER_FILE, restore_chunk_reads, restore_windows


def _windows(chunks: list[tuple[ChunkRef, int]]) -> list[list[tuple[ChunkRef, int]]]:
    """A large file's (chunk, offset) in runs of up to RESTORE_WINDOW stored bytes."""
    windows: list[list[tuple[ChunkRef, int]]] = []
    size = RESTORE_WINDOW
    for item in chunks:
        if size + item[0].location.length > RESTORE_WINDOW:
            windows.append([])
            size = 0
        windows[-1].append(item)
        size += item[0].location.length
    return windows


class FileWriter:
    """Writes FileJobs' contents; counts the files and bytes it wrote."""

    def __init__(self, repo: Repository, folders: FolderFds, show: Callable[[tuple[bytes, ...]], str],
                 xattr_failed: Callable[[tuple[bytes, ...]], XattrFailed], pool: RestorePool | None = None) -> None:
        self.repo = repo
        self.folders = folders
        self.show = show  # a path below DEST as the user gave it, for messages
        self.small = SmallWriter(self._unpack, folders, show, xattr_failed)
        self.pool = pool  # worker processes writing batches of small files, or None
        self.files = 0
        self.bytes_written = 0
        # chunks fetched at once: remote backends need many requests in flight,
        # and chunks share packs (about 8 per pack), so several packs load at once
        self._chunk_slots = trio.Semaphore(restore_chunk_reads(repo.threads, repo.storage.remote))
        self._window_slots = trio.Semaphore(restore_windows(repo.threads))

    def _unpack(self, blob_id: bytes, pack_id: bytes, stored: bytes | bytearray | memoryview) -> bytes | bytearray:
        return self.repo.codec.unpack(BlobKind.CHUNK, blob_id, pack_id, stored)

    async def write(self, batch: list[FileJob]) -> None:
        """One large file, or a batch of small ones."""
        if len(batch) == 1 and batch[0].large:
            await self._restore_file(batch[0])
        else:
            await self._restore_small(batch)

    async def _restore_small(self, batch: list[FileJob]) -> None:
        """Small files: fetch their chunks together, then write them all in one
        thread hop (on a local disk the reads happen in that hop too), or in a
        worker process (restoreprocs.py; from a local disk it reads them too)."""
        written = None
        if self.repo.storage.read_blocking is not None:
            if self.pool is not None and self.pool.ready:
                written = await self.pool.write(batch, None)  # None: it could not read them, nothing written
            if written is None:
                try:
                    written = await self._run_small(self._read_write_small, batch)
                except ObjectMissing:
                    pass  # a pack was pruned (nothing written yet): read_raws() finds where its blobs are now
        if written is None:
            wanted = self._wanted(batch)
            try:
                raws = await self.repo.read_raws(wanted)
            except (CorruptedData, ObjectMissing) as exc:
                raise self._batch_error(batch, exc) from None
            found = dict(zip((c.id for c in wanted), raws))
            written = await self._write_small(batch, found)
        self.bytes_written += written
        self.files += len(batch)

    async def _run_small(self, fn: Callable[..., int], *args: object) -> int:
        """A batch of small files written in a thread. Beside a worker process,
        in one thread at a time: more only hand the GIL back and forth on each
        file's system calls while the worker does the rest; without one, in
        `threads` (one left the disk idle while a file creation waited on it)."""
        if self.pool is not None:
            return await self.repo.run_small(fn, *args)
        return await self.repo.run_cpu(fn, *args)

    async def _write_small(self, batch: list[FileJob], found: dict[bytes, Raw]) -> int:
        """The tiniest files to a worker process, if one is ready (their cost is
        per file: Python and system calls), the others in a thread meanwhile
        (theirs is per byte, in C code that lets go of the GIL)."""
        pool = self.pool
        if pool is None or not pool.ready:
            return await self.repo.run_cpu(self.small.write_batch, batch, found)
        tiny = [job for job in batch if job.entry.size <= WORKER_FILE]
        if len(tiny) == len(batch):
            return await self._in_worker(pool, batch, found)
        rest = [job for job in batch if job.entry.size > WORKER_FILE]
        written = [0]

        async def in_thread() -> None:
            written[0] = await self.repo.run_cpu(self.small.write_batch, rest, found)

        async with task_group() as nursery:
            nursery.start_soon(in_thread)
            written.append(await self._in_worker(pool, tiny, found) if tiny else 0)
        return sum(written)

    @staticmethod
    async def _in_worker(pool: RestorePool, batch: list[FileJob], found: dict[bytes, Raw]) -> int:
        written = await pool.write(batch, found)
        assert written is not None  # given their bytes, it reads nothing
        return written

    def _batch_error(self, batch: list[FileJob], exc: CorruptedData | ObjectMissing) -> Exception:
        return type(exc)(f"restoring '{self.show(batch[0].parts)}' and nearby files: {exc.message}")

    def _wanted(self, batch: list[FileJob]) -> list[ChunkRef]:
        """The chunks a batch of small files needs read (none for an empty or all-zero file)."""
        is_zero = self.repo.is_zero_chunk
        return [chunks[0] for chunks in (job.chunks for job in batch) if chunks and not is_zero(chunks[0])]

    def _read_write_small(self, batch: list[FileJob]) -> int:
        wanted = self._wanted(batch)
        try:
            raws = self.repo.read_raws_blocking(wanted)  # everything is read before anything is written
        except CorruptedData as exc:
            raise self._batch_error(batch, exc) from None
        return self.small.write_batch(batch, dict(zip((c.id for c in wanted), raws)))

    async def _restore_file(self, job: FileJob) -> None:
        entry = job.entry
        chunks = job.chunks
        total = sum(c.size for c in chunks)
        if total != entry.size:
            raise CorruptedData(f"'{self.show(job.parts)}': chunk sizes do not add up to the file size")
        parent = await trio.to_thread.run_sync(self.folders.open_parent, job.parts)
        try:
            fd, temp = await trio.to_thread.run_sync(create_new, parent, job.parts[-1])
            try:
                try:
                    offsets = []
                    offset = 0
                    for chunk in chunks:
                        offsets.append(offset)
                        offset += chunk.size
                    if len(chunks) <= 1:
                        for chunk, off in zip(chunks, offsets):
                            await self._write_chunk(fd, chunk, off, job.parts)
                    elif self.repo.storage.remote:
                        # runs of neighbouring chunks, each read with as few ranged requests as it
                        # takes (a whole pack would be fetched for each chunk otherwise)
                        async with task_group() as nursery:
                            for window in _windows(list(zip(chunks, offsets))):
                                await self._window_slots.acquire()
                                nursery.start_soon(self._write_window_slot, fd, window, job.parts)
                    else:
                        async with task_group() as nursery:
                            for chunk, off in zip(chunks, offsets):
                                await self._chunk_slots.acquire()
                                nursery.start_soon(self._write_chunk_slot, fd, chunk, off, job.parts)
                    await trio.to_thread.run_sync(self.small.finish_file, fd, entry, job.parts)
                finally:
                    os.close(fd)
                if temp is not None:
                    await trio.to_thread.run_sync(move_into_place, parent, temp, job.parts[-1])
            except BaseException:
                remove_quietly(parent, temp or job.parts[-1])  # no half-written file is left
                raise
        finally:
            os.close(parent)
        self.files += 1

    async def _write_chunk_slot(self, fd: int, chunk: ChunkRef, offset: int, parts: tuple[bytes, ...]) -> None:
        try:
            await self._write_chunk(fd, chunk, offset, parts)
        finally:
            self._chunk_slots.release()

    async def _write_window_slot(self, fd: int, window: list[tuple[ChunkRef, int]], parts: tuple[bytes, ...]) -> None:
        try:
            wanted = [(chunk, offset) for chunk, offset in window if not self.repo.is_zero_chunk(chunk)]
            try:
                raws = await self.repo.read_raws([chunk for chunk, _ in wanted])
            except (CorruptedData, ObjectMissing) as exc:
                raise type(exc)(f"'{self.show(parts)}': {exc.message}") from None
            self.bytes_written += await self.repo.run_cpu(self._write_window, fd, wanted, raws, parts)
        finally:
            self._window_slots.release()

    def _write_window(self, fd: int, wanted: list[tuple[ChunkRef, int]], raws: list[Raw],
                      parts: tuple[bytes, ...]) -> int:
        written = 0
        for (chunk, offset), raw in zip(wanted, raws):
            data = self.small.unpack_chunk(chunk, raw, parts)
            pwrite_all(fd, data, offset)
            written += len(data)
        return written

    async def _write_chunk(self, fd: int, chunk: ChunkRef, offset: int, parts: tuple[bytes, ...]) -> None:
        if self.repo.is_zero_chunk(chunk):
            return  # leave a hole; _finish_file sets the final size
        try:
            data = await self.repo.read_chunk(chunk)
        except (CorruptedData, ObjectMissing) as exc:
            raise type(exc)(f"'{self.show(parts)}': {exc.message}") from None
        if len(data) != chunk.size:
            raise CorruptedData(f"'{self.show(parts)}': chunk {chunk.id.hex()} has the wrong size")
        await trio.to_thread.run_sync(pwrite_all, fd, data, offset)
        self.bytes_written += len(data)
