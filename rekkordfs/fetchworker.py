"""A restore's fetch process: the requests to the server (S3 or SFTP) made on
another CPU. In the main process, botocore's and asyncssh's Python (every
SSH packet is decrypted and parsed in Python) took the GIL from the walk,
the folders and the large files, on one core.

Started by fetchprocs.py as `python -m rekkordfs.fetchworker` in its own
process group, it opens the repository's storage from the configuration the
main process sends (pickled: the main process is this code; secrets never go
through argv, the environment or a file) and talks only through its stdin and
stdout, in frames (frames.py):

    main -> fetch  pickled Config                          once
    fetch -> main  ("ready",)                              connected
    fetch -> main  ("failed", "error", message, 0, None)   could not connect; it exits
    main -> fetch  (id, [(key, offset, length), ...])      any number, answered in any order
    fetch -> main  (id, "ok", [bytes, ...])                Storage.get_ranges()' answer
    fetch -> main  (id, "missing" | "error", message)      its failure (retried already)

It checks nothing it fetched: the main process and the restore's workers
check every blob before use, as they do what they fetch themselves. Its
stdin closing ends it.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from collections.abc import Awaitable, Callable

import trio

from .config import Config
from .errors import ObjectMissing, RekkordError, StorageError
from .frames import frame, receive_frame
from .storage import open_storage
from .storage.base import Storage


async def serve() -> int:
    out = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))
    source = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    sending = trio.Lock()

    async def answer(message: tuple) -> None:
        async with sending:
            await out.send_all(frame(message))

    buffer = bytearray()
    start = await receive_frame(source, buffer)
    if not isinstance(start, bytes):
        return 0
    config: Config = pickle.loads(start)
    del start
    storage = open_storage(config)
    try:
        await storage.connect()
    except RekkordError as exc:  # unreachable, or a secret only a prompt gives: the main process fetches
        await answer(("failed", "error", exc.message, 0, None))
        return 1
    await answer(("ready",))
    async with trio.open_nursery() as nursery:
        while (message := await receive_frame(source, buffer)) is not None:
            assert isinstance(message, tuple)
            nursery.start_soon(_fetch, storage, answer, *message)
    return 0  # every answer sent; the storage is not closed: main() ends the process at once


async def _fetch(storage: Storage, answer: Callable[[tuple], Awaitable[None]], request: int,
                 ranges: list[tuple[str, int, int]]) -> None:
    try:
        reply: tuple = (request, "ok", await storage.get_ranges(ranges))
    except ObjectMissing as exc:
        reply = (request, "missing", exc.message)
    except StorageError as exc:
        reply = (request, "error", exc.message)
    await answer(reply)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides what a Ctrl-C does
    try:
        status = trio.run(serve)
    except (BrokenPipeError, trio.BrokenResourceError, trio.ClosedResourceError):
        status = 0  # the main process is gone or stopped listening
    # at once: the storage's threads and connections end with the process, and
    # the main process waits for this exit at the end of the restore
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
