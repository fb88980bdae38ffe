"""Batches of small files prepared in worker processes (prepworker.py), for
a save of many of them (or a commit of many staged files, sent as contents
rather than paths): the CPU work of a small file (read, chunk, hash,
compress, seal) is about as much as the main process's bookkeeping of it,
and under the GIL both ran on one core.

The main process keeps everything that is shared: which blobs are known,
the packs (a worker seals for packs of its own, which the main process adopts:
packs.PackWriter.adopt), the cache and the snapshot. How workers are
started, fed and ended: workerprocs.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import trio

from .format import CHUNK_STRUCT as _CHUNK
from .format import encode_chunk
from .frames import frame
from .localfiles import FolderRef
from .packs import PACK_TARGET
from .repository import Repository
from .upload import TransferStats
from .workerprocs import Worker, WorkerFailed, WorkerPool

__all__ = ["PrepPool", "PreparedFile", "WorkerFailed"]


@dataclass(slots=True)
class PreparedFile:
    """A small file a worker read and whose chunks are stored (in packs not
    uploaded yet: repository.upload_ready())."""

    size: int  # bytes read (a file of the size its lstat gave is taken as unchanged)
    chunks_raw: bytes  # format.encode_chunks() of its chunks
    xattrs: list[tuple[bytes, bytes]] | None  # its extended attributes, read after its content if asked


class _Reply:
    __slots__ = ("done", "files", "packs")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.files: list[PreparedFile | OSError] | None = None
        self.packs: set[bytes] = set()  # those the batch's chunks are in


class PrepPool(WorkerPool):
    """Worker processes preparing batches of small files for one save. start()
    it in a nursery; prepare() once ready; close() when no batch is left."""

    module = "prepworker"
    operation = "save"

    def __init__(self, repo: Repository, processes: int, stats: TransferStats) -> None:
        super().__init__(processes)
        self.repo = repo
        self.stats = stats
        self.ready = False  # a worker takes batches
        self.batches = 0  # answered so far

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.to_thread.run_sync(self.repo.cache.knows_blobs)  # computed once, off the loop
        await super().run()

    def start_frame(self, worker: Worker) -> bytes:
        """What a worker needs to know, sent through its stdin only."""
        keys, chunking = self.repo.keys, self.repo.config.chunking
        return frame((keys.id_key, keys.chunk_seed, chunking.min_size, chunking.avg_size, chunking.max_size,
                      keys.data_public, PACK_TARGET, os.fsencode(self.repo.cache.database)))

    async def serve(self, worker: Worker) -> None:
        if not await self.wait_ready(worker):
            return
        self.ready = True
        while (message := await self.answer(worker)) is not None:
            if message[0] != "done":
                await self.failed(worker, str(message[1]))
            _, closed, files = message
            reply: _Reply = worker.waiting.popleft()
            self.batches += 1
            reply.files = await self._store(files, reply.packs)  # in order: a twin follows its first, a pack its blobs
            for pack in closed:
                self.repo.close_adopted(pack)
            reply.done.set()

    async def _store(self, files: list[tuple], packs: set[bytes]) -> list[PreparedFile | OSError]:
        """Store the chunks a worker sealed (those the repository knows are
        referred to where they are: the worker cannot know which); each
        file's chunk list, or why it could not be read; the packs they are
        in go into packs. Runs once per file on the loop, the save's busiest
        core: each chunk is encoded once, where it is placed."""
        sealed = [(pack, blob_id, blob, size) for item in files if len(item) == 3
                  for blob_id, size, pack, blob in item[2] if blob is not None]
        encoded: dict[bytes, bytes] = {}  # blob ID -> format.encode_chunk() of it
        fresh = sealed
        if self.repo.cache.knows_blobs():
            known = await trio.to_thread.run_sync(self.repo.known_many, [item[1] for item in sealed])
            fresh = [item for item in sealed if item[1] not in known]
            for _, blob_id, _, size in sealed:
                found = known.get(blob_id)
                if found is not None:
                    encoded[blob_id] = encode_chunk(blob_id, size, found.location)
                    packs.add(found.location.pack)
        stored = self.repo.store_adopted([(pack, blob_id, blob) for pack, blob_id, blob, _ in fresh])
        stats, pack_chunk = self.stats, _CHUNK.pack
        new = stored_bytes = 0
        for (_, blob_id, blob, size), (location, was_new) in zip(fresh, stored):
            encoded[blob_id] = pack_chunk(blob_id, size, location.pack, location.offset, location.length)
            if was_new:
                new += size
                stored_bytes += len(blob)
        stats.bytes_new += new
        stats.bytes_stored += stored_bytes
        packs.update(location.pack for location, _ in stored)
        out: list[PreparedFile | OSError] = []
        append = out.append
        read = 0
        for item in files:
            if len(item) == 2:
                append(OSError(item[0], item[1]))
                continue
            chunks = item[2]
            if len(chunks) == 1:  # most small files: no list to join
                blob_id, length, _, _ = chunks[0]
                raw = encoded[blob_id]
            else:  # several, or none (emptied since it was listed); a twin's first is in the same batch
                raw = b"".join([encoded[chunk[0]] for chunk in chunks])
                length = sum(chunk[1] for chunk in chunks)
            read += length
            append(PreparedFile(length, raw, item[1]))
        stats.bytes_read += read
        return out

    async def prepare(self, folders: list[tuple[FolderRef, int]], names: list[bytes], want: bytes,
                      sizes: list[int]) -> tuple[list[PreparedFile | OSError], set[bytes]]:
        """The files read, cut, sealed by a worker and stored, and the packs
        their chunks are in (names: the files', folder by folder: folders
        gives each folder and how many of them it holds, localfiles.FolderOpener;
        want: 1 for each file whose extended attributes are to be read too;
        sizes: each file's by its lstat, which stands for a fstat:
        localfiles.read_expected()); await repository.upload_ready() afterwards."""
        return await self._ask(frame(("batch", folders, names, want, sizes)))

    async def prepare_contents(self, datas: list[bytes]) -> tuple[list[PreparedFile | OSError], set[bytes]]:
        """prepare() of contents held in memory (a commit's staged files):
        every item is a PreparedFile."""
        return await self._ask(frame(("contents", datas)))

    async def _ask(self, message: bytes) -> tuple[list[PreparedFile | OSError], set[bytes]]:
        await self._spawned.wait()
        worker = min(self.workers, key=lambda w: len(w.waiting))
        reply = _Reply()
        async with worker.lock:
            worker.waiting.append(reply)
            await self.send(worker, message)
        await reply.done.wait()
        assert reply.files is not None
        return reply.files, reply.packs

    async def write_rows(self, kind: str, rows: list) -> bool:
        """Cache rows for the first worker to write ("stats": signed stat rows,
        cacherows.insert_stats(); "pack": [pack, *cacherows.pack_rows()]);
        False when no worker takes them any more (the caller writes them)."""
        if not self.ready or not self._spawned.is_set():
            return False
        worker = self.workers[0]
        async with worker.lock:
            if worker.closing:
                return False
            await self.send(worker, frame((kind, rows)))
        return True
