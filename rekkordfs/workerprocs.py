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

Workers may be started ahead (workers_ahead()): before the operation knows
what they will work on, e.g. while a restore connects to the repository
(Python takes 0.1-0.3 s to start, a server's connection about as long). The
descriptors they need, opened only later, are then handed over through a
socket pair (fdhandover.py), whose worker end the start frame names.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import trio

from .errors import RekkordError
from .fdhandover import handover_pair, send_fds
from .frames import receive_frame
from .tasks import task_group

PIPE_SIZE = 1 << 20  # a batch goes through in few writes (the default pipe holds 64 KiB)


class WorkerFailed(RekkordError):
    """A worker process died or failed."""


class Worker:
    """One worker process and the batches sent to it, answered in order."""

    def __init__(self, process: trio.Process, handover: socket.socket | None = None, handover_fileno: int = -1) -> None:
        self.process = process
        self.handover = handover  # our end of the socket pair, until the descriptors went through
        self.handover_fileno = handover_fileno  # the worker's end, as numbered in the worker
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

    def __init__(self, processes: int, handover_fds: tuple[int, ...] = (),
                 ahead: WorkersAhead | None = None) -> None:
        """handover_fds: descriptors each worker gets after its start frame
        (fdhandover.py); ahead: workers already started to use first."""
        self.processes = processes
        self.handover_fds = handover_fds
        self.ahead = ahead
        self.workers: list[Worker] = []
        self._spawned = trio.Event()
        self._closed = False  # close() was called: a worker started later is closed at once

    @property
    def spawned(self) -> bool:
        """Every worker started: close() reaches them all."""
        return self._spawned.is_set()

    def start_frame(self, worker: Worker) -> bytes:
        raise NotImplementedError

    async def serve(self, worker: Worker) -> None:
        """Deliver the worker's answers (see answer()) until it ends."""
        raise NotImplementedError

    async def run(self) -> None:
        """Start the workers, then serve their answers until close(); fails
        with WorkerFailed if one dies. Cancelled, it kills them."""
        started: list[Worker] = []  # taken from ahead: ours to end even before they join self.workers
        try:
            async with trio.open_nursery() as nursery:
                started = await self.ahead.take(self.processes) if self.ahead is not None else []
                for index in range(self.processes):
                    worker = started[index] if index < len(started) else await self.spawn()
                    process = worker.process
                    async with worker.lock:  # close() waits for the start frame
                        self.workers.append(worker)
                        _widen_pipe(process.stdin)
                        await self.send(worker, self.start_frame(worker))
                        await self._hand_over(worker)
                        if self._closed:  # close() came while it started (a small restore): it ends too
                            worker.closing = True
                            assert process.stdin is not None
                            await process.stdin.aclose()
                    nursery.start_soon(self.serve, worker)
                self._spawned.set()
            for worker in self.workers:
                await worker.process.wait()  # each ends once its stdin is closed
        finally:
            await end_workers(self.workers + [worker for worker in started if worker not in self.workers])

    async def spawn(self) -> Worker:
        return await spawn_worker(self.module, handover=bool(self.handover_fds))

    async def _hand_over(self, worker: Worker) -> None:
        """The descriptors the worker waits for after its start frame, if it has a handover socket."""
        if worker.handover is None:
            return
        end, worker.handover = worker.handover, None
        try:
            send_fds(end, self.handover_fds)
        except OSError:
            await self.failed(worker)

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


async def spawn_worker(module: str, handover: bool) -> Worker:
    """A worker process running rekkordfs.MODULE, waiting for its start frame
    (with handover, for descriptors too after it)."""
    ours, theirs = handover_pair() if handover else (None, None)
    fileno = theirs.fileno() if theirs is not None else -1
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-P", "-m", f"rekkordfs.{module}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, process_group=0, env=worker_environment(),
            pass_fds=(fileno,) if fileno >= 0 else ())
    except BaseException:
        if ours is not None:
            ours.close()
        raise
    finally:
        if theirs is not None:
            theirs.close()  # the worker has its copy, numbered the same
    return Worker(process, ours, fileno)


async def end_workers(workers: list[Worker]) -> None:
    """Kill those of these workers still running (their handover sockets
    closed) and wait for each, even when cancelled."""
    for worker in workers:
        if worker.handover is not None:
            worker.handover.close()
        if worker.process.returncode is None:
            worker.process.kill()
    with trio.CancelScope(shield=True):
        for worker in workers:
            await worker.process.wait()


class WorkersAhead:
    """Worker processes started before the pool that uses them exists (see
    workers_ahead()). The pool take()s them; the rest are killed at the end."""

    def __init__(self, module: str, processes: int, handover: bool) -> None:
        self.module = module
        self.processes = processes
        self.handover = handover
        self._started: list[Worker] = []
        self._done = trio.Event()

    async def start(self) -> None:
        try:
            for _ in range(self.processes):
                self._started.append(await spawn_worker(self.module, self.handover))
        finally:
            self._done.set()

    async def take(self, count: int) -> list[Worker]:
        """Up to count started workers, now the caller's to end."""
        await self._done.wait()
        taken, self._started = self._started[:count], self._started[count:]
        return taken

    async def end(self) -> None:
        """Kill those nobody took (they wait for a start frame that will not come)."""
        left, self._started = self._started, []
        await end_workers(left)


@asynccontextmanager
async def workers_ahead(module: str, processes: int, handover: bool) -> AsyncIterator[WorkersAhead | None]:
    """Start processes workers of rekkordfs.MODULE now, in the background,
    for a pool made later (WorkerPool(..., ahead=)); None for no process."""
    if not processes:
        yield None
        return
    ahead = WorkersAhead(module, processes, handover)
    try:
        async with task_group() as nursery:  # the body's errors come out as they are
            nursery.start_soon(ahead.start)
            yield ahead
    finally:
        await ahead.end()


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
