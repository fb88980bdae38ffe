"""Batches of small files written by worker processes (restoreworker.py) in a
restore from a server: opening, checking and writing a small file costs about
as much CPU as fetching it and walking the tree, and under the GIL both ran
on one core, beside the threads of boto3 or asyncssh.

The main process fetches each batch's stored bytes and hands them over with
the files' paths and metadata; a worker writes them below DEST through the
descriptor the main process opened, and answers with the bytes written. A
batch goes to a worker only once that worker said it is ready (until then
the main process writes it: a small restore never waits for a process to
start). A worker is started with subprocess in its own process group and
ends when its stdin closes or the main process dies; one that dies or fails
fails the restore with one line.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from typing import NoReturn

import trio

from .errors import CorruptedData
from .format import Location
from .frames import frame, receive_frame
from .prepprocs import WorkerFailed, worker_environment
from .restorewrite import FileJob


class _Worker:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lock = trio.Lock()  # one sender at a time; batches queue in send order
        self.waiting: deque[_Reply] = deque()
        self.buffer = bytearray()
        self.ready = False
        self.closing = False


class _Reply:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: tuple | None = None


class RestorePool:
    """Worker processes writing a restore's small files. run() it in a nursery
    (start_soon); write() batches; close() when no batch is left."""

    def __init__(self, data_secret: bytes, id_key: bytes, dest_fd: int, dest: str, processes: int,
                 warn: Callable[[str], None]) -> None:
        self._secrets = frame((data_secret, id_key, dest_fd, dest))
        self.dest_fd = dest_fd
        self.processes = processes
        self.warn = warn
        self._workers: list[_Worker] = []
        self.batches = 0  # written by the workers so far

    @property
    def ready(self) -> bool:
        """A worker can take a batch now."""
        return any(w.ready and not w.closing for w in self._workers)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the workers, then deliver their answers until close(); fails
        with WorkerFailed if one dies. Cancelled, it kills them."""
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.processes):
                    worker = _Worker(await trio.lowlevel.open_process(
                        [sys.executable, "-P", "-m", "rekkordfs.restoreworker"], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, process_group=0,
                        env=worker_environment(), pass_fds=(self.dest_fd,)))
                    self._workers.append(worker)
                    _widen_pipe(worker.process.stdin)
                    await self._send(worker, self._secrets)
                    nursery.start_soon(self._serve, worker)
                task_status.started()
            for worker in self._workers:
                await worker.process.wait()  # each ends once its stdin is closed
        finally:
            for worker in self._workers:
                if worker.process.returncode is None:
                    worker.process.kill()
            with trio.CancelScope(shield=True):
                for worker in self._workers:
                    await worker.process.wait()

    async def _send(self, worker: _Worker, message: bytes) -> None:
        assert worker.process.stdin is not None
        try:
            await worker.process.stdin.send_all(message)
        except trio.BrokenResourceError:
            await self._failed(worker)

    async def _serve(self, worker: _Worker) -> None:
        assert worker.process.stdout is not None
        if await receive_frame(worker.process.stdout, worker.buffer) != ("ready",):
            await self._failed(worker)
        worker.ready = True
        while True:
            message = await receive_frame(worker.process.stdout, worker.buffer)
            if message is None:
                if worker.closing and not worker.waiting:
                    return
                await self._failed(worker)
            assert isinstance(message, tuple) and worker.waiting
            reply = worker.waiting.popleft()
            reply.result = message
            reply.done.set()
            if message[0] != "done":
                return  # the worker exits; its writer raises the error

    async def _failed(self, worker: _Worker) -> NoReturn:
        code = await worker.process.wait()
        why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        raise WorkerFailed(f"a worker process of the restore ended unexpectedly ({why})")

    async def write(self, batch: list[FileJob], raws: dict[bytes, tuple[bytes, Location]]) -> int:
        """Write the batch's files (raws: their chunks' stored bytes by ID, as
        SmallWriter.write_batch takes them) in a worker; the bytes written."""
        message = []
        for job in batch:
            entry = job.entry
            raw = raws.get(job.chunks[0].id) if job.chunks else None
            message.append((job.parts, entry.mode, entry.uid, entry.gid, entry.atime_ns, entry.mtime_ns, entry.size,
                            entry.xattrs, entry.chunks_raw, None if raw is None else (raw[0], raw[1].pack)))
        # any worker not closing: one not ready yet answers once it is (write() is called when ready says so)
        worker = min((w for w in self._workers if not w.closing), key=lambda w: len(w.waiting))
        reply = _Reply()
        async with worker.lock:
            worker.waiting.append(reply)
            await self._send(worker, frame(message))
        await reply.done.wait()
        assert reply.result is not None
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

    async def close(self) -> None:
        """No more batches: the workers end once they answered the last."""
        for worker in self._workers:
            worker.closing = True
            assert worker.process.stdin is not None
            async with worker.lock:
                await worker.process.stdin.aclose()


PIPE_SIZE = 1 << 20  # a batch goes through in few writes (the default pipe holds 64 KiB)


def _widen_pipe(stream: trio.abc.SendStream | None) -> None:
    if not isinstance(stream, trio.lowlevel.FdStream):
        return
    try:
        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # above the system's limit (fs.pipe-max-size) for an unprivileged user: the default works too
