"""Batches of small files written by worker processes (restoreworker.py) in a
restore: opening, checking and writing a small file costs about as much CPU
as fetching it and walking the tree, and under the GIL both ran on one core,
beside the S3 request threads or asyncssh.

From a server, the main process fetches each batch's stored bytes and hands
them over with the files' paths and metadata; from a local disk it sends
only those, and the worker reads the packs itself. A worker writes the files
below DEST through the descriptor the main process opened, and answers with
the bytes written. DEST's descriptor reaches each worker through a socket
pair (fdhandover.py): the workers may be started before the restore connects
to the repository (workerprocs.workers_ahead()). A batch goes to a worker
only once that worker said it is ready (until then the main process writes
it: a small restore never waits for a process to start). How workers are
started, fed and ended: workerprocs.py.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from .errors import CorruptedData
from .format import Raw
from .frames import frame
from .restorewrite import FileJob
from .workerprocs import Worker, WorkerFailed, WorkerPool, WorkersAhead

QUEUED = 2  # batches a worker holds (the one it writes, the next), so it never waits for the main process


class _Reply:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: tuple | None = None


class RestorePool(WorkerPool):
    """Worker processes writing a restore's small files. run() it in a nursery
    (start_soon); write() batches; close() when no batch is left."""

    module = "restoreworker"
    operation = "restore"
    kill_unready = True

    def __init__(self, data_secret: bytes, id_key: bytes, dest_fd: int, dest: str, processes: int,
                 warn: Callable[[str], None], repository: str | None = None,
                 ahead: WorkersAhead | None = None) -> None:
        """repository: the local repository's folder, whose packs the workers
        read themselves; ahead: workers started before DEST was opened (it is
        handed to every worker through its socket pair)."""
        super().__init__(processes, handover_fds=(dest_fd,), ahead=ahead)
        self._start = (data_secret, id_key, dest, repository)
        self.warn = warn
        self.batches = 0  # written by the workers so far

    @property
    def ready(self) -> bool:
        """A worker can take a batch now: it is started and has at most one
        other batch to write before it (with more, the batch waits for the worker
        while the main process, idle once the last requests are answered, could
        write it: the end of a restore waited for one worker's queue)."""
        return any(w.ready and not w.closing and len(w.waiting) < QUEUED for w in self.workers)

    def start_frame(self, worker: Worker) -> bytes:
        data_secret, id_key, dest, repository = self._start
        return frame((data_secret, id_key, worker.handover_fileno, dest, repository))

    async def serve(self, worker: Worker) -> None:
        if not await self.wait_ready(worker):
            return
        while (message := await self.answer(worker)) is not None:
            reply: _Reply = worker.waiting.popleft()
            reply.result = message
            reply.done.set()
            if message[0] not in ("done", "unread"):
                return  # the worker exits; its writer raises the error

    async def write(self, batch: list[FileJob], raws: dict[bytes, Raw] | None) -> int | None:
        """Write the batch's files in a worker (raws: their chunks' stored
        bytes by ID, as SmallWriter.write_batch takes them; None: the worker
        reads them from the local repository); the bytes written, or None if
        it could not read them (nothing was written)."""
        message = []
        for job in batch:
            entry = job.entry
            found: tuple | bool | None = True
            if raws is not None:
                raw = raws.get(job.chunks[0].id) if job.chunks else None
                found = None if raw is None else (raw[0], raw[1].pack)
            message.append((job.parts, entry.mode, entry.uid, entry.gid, entry.atime_ns, entry.mtime_ns, entry.size,
                            entry.xattrs, entry.chunks_raw, found))
        # any worker not closing: one not ready yet answers once it is (write() is called when ready says so)
        worker = min((w for w in self.workers if not w.closing), key=lambda w: len(w.waiting))
        reply = _Reply()
        async with worker.lock:
            worker.waiting.append(reply)
            await self.send(worker, frame(message))
        await reply.done.wait()
        assert reply.result is not None
        if reply.result[0] == "unread":
            return None
        if reply.result[0] == "done":
            _, written, warnings = reply.result
            self.batches += 1
            for line in warnings:
                self.warn(line)
            return int(written)
        _, kind, text, errno, filename = reply.result
        if kind == "corrupt":
            raise CorruptedData(text)
        if kind == "os":
            raise OSError(errno, text, filename) if filename is not None else OSError(errno, text)
        raise WorkerFailed(f"a worker process of the restore failed: {text}")
