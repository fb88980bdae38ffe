"""Worker processes as the main process sees them (prepprocs.py for a save's
or a commit's small files, restoreprocs.py for a restore's): the part they
share.

A worker is started with subprocess (fork and exec at once: the main process
runs threads and trio, which a bare fork would copy in whatever state they
were) in its own process group (Ctrl-C is the main process's), as `python -P
-m rekkordfs.MODULE` of this copy of rekkordfs. It gets what it needs to know
as the first frame on its stdin (secrets never go through argv, the
environment or a file), answers ("ready",), then answers the batches it is
sent in order, and ends when its stdin closes or the main process dies. One
that dies fails the operation with one line (WorkerFailed); one still running
when the operation stops early is killed.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections import deque
from typing import Any, NoReturn

import trio

from .errors import RekkordError
from .frames import receive_frame

PIPE_SIZE = 1 << 20  # a batch goes through in few writes (the default pipe holds 64 KiB)


class WorkerFailed(RekkordError):
    """A worker process died or failed."""


class Worker:
    """One worker process and the batches sent to it, answered in order."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lock = trio.Lock()  # one sender at a time; batches queue in send order
        self.waiting: deque[Any] = deque()  # the pool's reply objects, oldest first
        self.buffer = bytearray()  # received past the last message
        self.ready = False
        self.closing = False

    async def receive(self) -> object | None:
        """The next message, or None once the worker closed its stdout."""
        assert self.process.stdout is not None
        return await receive_frame(self.process.stdout, self.buffer)


class WorkerPool:
    """The worker processes of one operation. Subclasses name the module
    and the operation, give the first frame (start_frame) and serve the
    answers (serve)."""

    module = ""  # rekkordfs.MODULE is what the workers run
    operation = ""  # for messages: "a worker process of the save ..."
    kill_unready = False  # close() kills a worker still starting that was sent nothing (only batches, answered)

    def __init__(self, processes: int, pass_fds: tuple[int, ...] = ()) -> None:
        self.processes = processes
        self.pass_fds = pass_fds
        self.workers: list[Worker] = []
        self._spawned = trio.Event()
        self._closed = False  # close() was called: a worker started later is closed at once

    @property
    def spawned(self) -> bool:
        """Every worker started: close() reaches them all."""
        return self._spawned.is_set()

    def start_frame(self) -> bytes:
        raise NotImplementedError

    async def serve(self, worker: Worker) -> None:
        """Deliver the worker's answers (see answer()) until it ends."""
        raise NotImplementedError

    async def run(self) -> None:
        """Start the workers, then serve their answers until close(); fails
        with WorkerFailed if one dies. Cancelled, it kills them."""
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.processes):
                    process = await self.spawn()
                    worker = Worker(process)
                    async with worker.lock:  # close() waits for the start frame
                        self.workers.append(worker)
                        _widen_pipe(process.stdin)
                        await self.send(worker, self.start_frame())
                        if self._closed:  # close() came while it started (a small restore): it ends too
                            worker.closing = True
                            assert process.stdin is not None
                            await process.stdin.aclose()
                    nursery.start_soon(self.serve, worker)
                self._spawned.set()
            for worker in self.workers:
                await worker.process.wait()  # each ends once its stdin is closed
        finally:
            for worker in self.workers:
                if worker.process.returncode is None:
                    worker.process.kill()
            with trio.CancelScope(shield=True):
                for worker in self.workers:
                    await worker.process.wait()

    async def spawn(self) -> trio.Process:
        return await trio.lowlevel.open_process(
            [sys.executable, "-P", "-m", f"rekkordfs.{self.module}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, process_group=0, env=worker_environment(), pass_fds=self.pass_fds)

    async def send(self, worker: Worker, message: bytes) -> None:
        assert worker.process.stdin is not None
        try:
            await worker.process.stdin.send_all(message)
        except trio.BrokenResourceError:
            await self.failed(worker)

    async def wait_ready(self, worker: Worker) -> bool:
        """Whether the worker started; False when close() ended it first."""
        message = await worker.receive()
        if message is None and worker.closing and not worker.waiting:
            return False
        if message != ("ready",):
            await self.failed(worker)
        worker.ready = True
        return True

    async def answer(self, worker: Worker) -> tuple | None:
        """The worker's next answer; None once it ended after close()."""
        message = await worker.receive()
        if message is None:
            if worker.closing and not worker.waiting:
                return None
            await self.failed(worker)
        assert isinstance(message, tuple) and worker.waiting
        return message

    async def failed(self, worker: Worker, why: str | None = None) -> NoReturn:
        if why is None:
            code = await worker.process.wait()
            why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        raise WorkerFailed(f"a worker process of the {self.operation} ended unexpectedly ({why})")

    async def close(self) -> None:
        """No more batches: the workers end once they answered the last (and
        handled what else they were sent). With kill_unready, one still
        starting with no batch sent is killed: waiting for Python to start
        for nothing made small restores slower."""
        self._closed = True
        for worker in self.workers:
            worker.closing = True
            assert worker.process.stdin is not None
            async with worker.lock:
                if self.kill_unready and not worker.ready and not worker.waiting:
                    worker.process.kill()
                await worker.process.stdin.aclose()


def worker_environment() -> dict[str, str]:
    """The worker imports this copy of rekkordfs, whatever the current folder."""
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _widen_pipe(stream: trio.abc.SendStream | None) -> None:
    if not isinstance(stream, trio.lowlevel.FdStream):
        return
    try:
        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # above the system's limit (fs.pipe-max-size) for an unprivileged user: the default works too
