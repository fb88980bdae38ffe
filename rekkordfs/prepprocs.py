"""Batches of small files prepared in worker processes (prepworker.py), for
a save of many of them: the CPU work of a small file (read, chunk, hash,
compress, seal) is about as much as the main process's bookkeeping of it,
and under the GIL both ran on one core.

The main process keeps everything that is shared: which blobs are known,
the packs (a worker seals for packs of its own, which the main process adopts:
packs.PackWriter.adopt), the cache and the snapshot. A worker is started with
subprocess (fork and exec at once: the main process runs threads and trio,
which a bare fork would copy in whatever state they were), in its own process
group (Ctrl-C is the main process's), and ends when its stdin closes or the
main process dies. A worker that dies or fails fails the save with one line.
"""

from __future__ import annotations

import marshal
import os
import subprocess
import sys
from collections import deque
from typing import NoReturn

import trio

from .cache import KnownBlob, StatKey
from .errors import RekkordError
from .packs import PACK_TARGET, Sealed
from .prepworker import HEADER, frame
from .repository import Repository
from .upload import Prepared, SmallFile


class WorkerFailed(RekkordError):
    """A save's worker process died or failed."""


class _Worker:
    """One worker process and the batches sent to it, answered in order."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lock = trio.Lock()  # one sender at a time; batches queue in send order
        self.waiting: deque[_Reply] = deque()
        self.buffer = bytearray()
        self.closing = False

    async def receive(self) -> object | None:
        """The next message, or None once the worker closed its stdout."""
        assert self.process.stdout is not None
        while True:
            if len(self.buffer) >= HEADER.size:
                (size,) = HEADER.unpack_from(self.buffer)
                if len(self.buffer) >= HEADER.size + size:
                    body = bytes(self.buffer[HEADER.size:HEADER.size + size])
                    del self.buffer[:HEADER.size + size]
                    return marshal.loads(body)
            data = await self.process.stdout.receive_some(1 << 20)
            if not data:
                return None
            self.buffer += data


class _Reply:
    __slots__ = ("done", "files")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.files: list[SmallFile] | None = None


class PrepPool:
    """Worker processes preparing batches of small files for one save. start()
    it in a nursery; prepare() once ready; close() when no batch is left."""

    def __init__(self, repo: Repository, processes: int) -> None:
        self.repo = repo
        self.processes = processes
        self.ready = False
        self.batches = 0  # answered so far
        self._workers: list[_Worker] = []
        self._spawned = trio.Event()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the workers, then deliver their answers until close(); fails
        with WorkerFailed if one dies. Cancelled, it kills them."""
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.processes):
                    worker = _Worker(await self._spawn())
                    self._workers.append(worker)
                    nursery.start_soon(self._serve, worker)
                self._spawned.set()
            for worker in self._workers:
                await worker.process.wait()  # each ends once its stdin is closed
        finally:
            for worker in self._workers:
                if worker.process.returncode is None:
                    worker.process.kill()
            with trio.CancelScope(shield=True):
                for worker in self._workers:
                    await worker.process.wait()

    async def _spawn(self) -> trio.Process:
        keys, chunking = self.repo.keys, self.repo.config.chunking
        process = await trio.lowlevel.open_process(
            [sys.executable, "-P", "-m", "rekkordfs.prepworker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, process_group=0, env=_environment())
        assert process.stdin is not None
        # the secrets travel through the pipe only
        await process.stdin.send_all(frame((keys.id_key, keys.chunk_seed, chunking.min_size, chunking.avg_size,
                                            chunking.max_size, keys.data_public, PACK_TARGET)))
        return process

    async def _serve(self, worker: _Worker) -> None:
        if await worker.receive() != ("ready",):
            await self._failed(worker, None)
        if not self.ready:
            self.ready = True
        while True:
            message = await worker.receive()
            if message is None:
                if worker.closing and not worker.waiting:
                    return
                await self._failed(worker, None)
            assert isinstance(message, tuple)
            if message[0] != "done":
                await self._failed(worker, str(message[1]))
            _, closed, files = message
            reply = worker.waiting.popleft()
            self.batches += 1
            reply.files = self._files(files)  # their blobs adopted in order, before the packs close
            for pack in closed:
                self.repo.close_adopted(pack)
            reply.done.set()

    def _files(self, files: list[tuple]) -> list[SmallFile]:
        blobs: dict[bytes, list[bytes]] = {}
        for item in files:
            if len(item) == 5:
                for _, _, pack, blob in item[4]:
                    if pack is not None:
                        blobs.setdefault(pack, []).append(blob)
        sealed = {pack: iter(self.repo.adopt(pack, datas)) for pack, datas in blobs.items()}
        out: list[SmallFile] = []
        for item in files:
            if len(item) == 2:
                out.append(SmallFile(error=OSError(item[0], item[1])))
                continue
            size, mtime, ctime, ino, chunks = item
            prepared: list[Prepared] = [(blob_id, length, next(sealed[pack]) if pack is not None else None)
                                        for blob_id, length, pack, _ in chunks]
            out.append(SmallFile(key=StatKey(size, mtime, ctime, ino), size=sum(chunk[1] for chunk in chunks),
                                 prepared=prepared))
        return out

    async def _failed(self, worker: _Worker, why: str | None) -> NoReturn:
        if why is None:
            code = await worker.process.wait()
            why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        raise WorkerFailed(f"a worker process of the save ended unexpectedly ({why})")

    async def prepare(self, paths: list[bytes]) -> list[SmallFile]:
        """The files read, cut and sealed by a worker; the chunks already known
        to the repository are referred to, not stored again. Every prepared
        file must go to Uploader.store_small()."""
        await self._spawned.wait()
        worker = min(self._workers, key=lambda w: len(w.waiting))
        reply = _Reply()
        assert worker.process.stdin is not None
        async with worker.lock:
            worker.waiting.append(reply)
            await worker.process.stdin.send_all(frame(paths))
        await reply.done.wait()
        assert reply.files is not None
        files = reply.files
        try:
            await self._drop_known(files)
        except BaseException:
            for item in files:
                if item.prepared is not None:
                    self.repo.discard([data for _, _, data in item.prepared if isinstance(data, Sealed)])
            raise
        return files

    async def _drop_known(self, files: list[SmallFile]) -> None:
        """The worker sealed every chunk (it cannot know which are stored):
        those the repository knows are referred to where they are."""
        ids = [blob_id for item in files if item.prepared for blob_id, _, data in item.prepared if data is not None]
        known = await trio.to_thread.run_sync(self.repo.known_many, ids)
        if not known:
            return
        for item in files:
            if item.prepared is None:
                continue
            for index, (blob_id, size, data) in enumerate(item.prepared):
                found: KnownBlob | None = known.get(blob_id)
                if found is not None and isinstance(data, Sealed):
                    self.repo.discard([data])
                    item.prepared[index] = (blob_id, size, found)

    async def close(self) -> None:
        """No more batches: the workers end once they answered the last."""
        for worker in self._workers:
            worker.closing = True
            assert worker.process.stdin is not None
            async with worker.lock:
                await worker.process.stdin.aclose()


def _environment() -> dict[str, str]:
    """The worker imports this copy of rekkordfs, whatever the current folder."""
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
