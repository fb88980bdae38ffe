"""The main process's side of a restore's fetch process (fetchworker.py):
the requests of a restore from a server, made on another CPU.

It is started first thing (fetch_process()), so that its start (Python,
imports, the connection) runs on another CPU beside the main process's. A
request goes to it only once it said it is connected (ready);
until then, or if it could not connect (a secret only a prompt gives, a host
key only a prompt accepts), the main process fetches in-process as before.
How the process is started, fed and ended: workerprocs.py.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from .config import Config, SFTPLocation
from .errors import ObjectMissing, StorageError
from .frames import frame
from .tasks import task_group
from .tuning import restore_processes
from .workerprocs import Worker, WorkerPool

log = logging.getLogger(__name__)


class _Reply:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: tuple = ()


class FetchPool(WorkerPool):
    """One fetch process. run() it in a nursery (start_soon); get_ranges()
    once ready; close() when nothing is left to fetch."""

    module = "fetchworker"
    operation = "restore (fetching)"

    def __init__(self, config: Config) -> None:
        super().__init__(1)
        self._config = frame(pickle.dumps(config))
        self._replies: dict[int, _Reply] = {}
        self._requests = 0

    @property
    def ready(self) -> bool:
        """The process is connected and takes requests."""
        return any(w.ready and not w.closing for w in self.workers)

    def start_frame(self) -> bytes:
        return self._config

    async def serve(self, worker: Worker) -> None:
        first = await worker.receive()
        if first != ("ready",):
            if isinstance(first, tuple) and len(first) > 2:
                log.debug("the fetch process could not connect: %s", first[2])
            return  # it exits; the restore fetches in-process
        worker.ready = True
        while (message := await worker.receive()) is not None:
            assert isinstance(message, tuple)
            request, kind, body = message
            reply = self._replies.pop(request)
            reply.result = (kind, body)
            reply.done.set()
        if not (worker.closing and not self._replies):
            await self.failed(worker)

    async def get_ranges(self, ranges: list[tuple[str, int, int]]) -> list[bytes]:
        """Storage.get_ranges(ranges), in the fetch process (call only when ready)."""
        worker = next(w for w in self.workers if w.ready)
        reply = _Reply()
        request = self._requests
        self._requests += 1
        self._replies[request] = reply
        async with worker.lock:
            await self.send(worker, frame((request, ranges)))
        await reply.done.wait()
        kind, body = reply.result
        if kind == "ok":
            return list(body)
        if kind == "missing":
            raise ObjectMissing(body)
        raise StorageError(body)


@asynccontextmanager
async def fetch_process(config: Config) -> AsyncIterator[FetchPool | None]:
    """A fetch process for a restore from an SFTP server, started now; None
    for other locations or a single CPU. Only SFTP gains: there every SSH
    packet (32 KiB) costs Python time under the main process's GIL; botocore
    reads an S3 answer in C code that lets go of the GIL, and there the
    process's start and the copies through its pipe cost more CPU than it
    saved (S3 tree restore: 0.6-1.4 s more CPU, slower)."""
    if isinstance(config.location, SFTPLocation) and restore_processes(config.threads):
        pool = FetchPool(config)
        async with task_group() as nursery:
            nursery.start_soon(pool.run)
            yield pool
            await pool.close()
    else:
        yield None
