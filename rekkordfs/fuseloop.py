"""pyfuse3's request loop with fewer trio scheduler rounds per request.

pyfuse3 reads each request in a task that first takes a trio.Lock (one task
waits on the FUSE device at a time) and then parks in trio's wait_readable:
two or three passes of trio's scheduler per request, each an epoll_wait, plus
an epoll_ctl, whatever was already queued on the device. Serving 100,000
small files that loop cost more CPU than the handlers themselves.

pyfuse3 reaches trio only through its module attribute `pyfuse3.trio` (how
its own asyncio mode swaps the event loop, pyfuse3/asyncio.py). `install()`
puts a stand-in there that is trio except for two things:

- the read lock is taken at once when it is free (trio.Lock yields even then),
  and goes to whoever asks first, not to the task woken at release (_ReadLock);
- waiting for the device returns at once when a request is already queued
  (a zero-timeout poll), except every YIELD_EVERY requests, when it waits in
  trio: then the scheduler runs everything else that is ready (worker-thread
  results, read-ahead, signals) and the loop cannot starve them.

Everything else (nurseries, cancellation, closing the device) is trio's own.
"""

from __future__ import annotations

import select
import types
from typing import Any

import pyfuse3
import trio

YIELD_EVERY = 16  # requests served from a busy device between two full trio waits


class _ReadLock:
    """The device's read lock, without hand-over: a release wakes one waiter,
    but whoever comes first takes the lock, and a woken waiter that finds it
    taken waits again.

    pyfuse3 runs a second reader task next to the one serving a request. With
    trio.Lock, the release after the device became readable hands the lock to
    that second task, so a request answered without yielding (most of them:
    readlink, open, release, a read from memory) still costs two task switches
    and a full trio wait in the other task before the next one is read. Here
    the task that answered takes the lock straight back; the other only takes
    over when a handler yields (a blob fetched in a thread).
    """

    def __init__(self) -> None:
        self._held = False
        self._waiters = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        while self._held:
            await self._waiters.park()
        self._held = True

    async def __aexit__(self, *exc: object) -> None:
        self._held = False
        if self._waiters:
            self._waiters.unpark()


class _Readiness:
    """wait_readable for the FUSE device: at once when a request is queued."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._fd: int | None = None
        self._served = 0  # requests taken without a full wait since the last one

    def _queued(self, fd: int) -> bool:
        if fd != self._fd:
            if self._fd is not None:
                self._poll.unregister(self._fd)
            self._poll.register(fd, select.POLLIN)
            self._fd = fd
        # an error or hang-up is news too (receiving then reports it); a
        # closed descriptor is left to trio, which knows it is closing
        ready = self._poll.poll(0)  # one descriptor: at most one event
        return bool(ready) and not ready[0][1] & select.POLLNVAL

    async def wait_readable(self, fd: Any) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        if self._served < YIELD_EVERY and self._queued(fd):
            self._served += 1
            return
        self._served = 0
        await trio.lowlevel.wait_readable(fd)


def _stand_in() -> types.SimpleNamespace:
    readiness = _Readiness()
    lowlevel = types.SimpleNamespace(**{name: getattr(trio.lowlevel, name) for name in dir(trio.lowlevel)
                                        if not name.startswith("__")})
    lowlevel.wait_readable = readiness.wait_readable
    fake = types.SimpleNamespace(**{name: getattr(trio, name) for name in dir(trio) if not name.startswith("__")})
    fake.lowlevel = lowlevel
    fake.Lock = _ReadLock
    return fake


def install() -> None:
    """From now on pyfuse3's loop uses the stand-in (call before pyfuse3.main)."""
    if not isinstance(pyfuse3.trio, types.SimpleNamespace):  # type: ignore[attr-defined]
        pyfuse3.trio = _stand_in()  # type: ignore[attr-defined]
