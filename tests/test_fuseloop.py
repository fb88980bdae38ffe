"""The stand-in for trio that pyfuse3's request loop uses (fuseloop.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pyfuse3
import pytest
import trio

from rekkordfs import fuseloop


def test_install_keeps_trio_but_the_read_lock_and_the_wait() -> None:
    before = pyfuse3.trio  # type: ignore[attr-defined]
    try:
        pyfuse3.trio = trio  # type: ignore[attr-defined]
        fuseloop.install()
        fake = pyfuse3.trio  # type: ignore[attr-defined]
        assert fake is not trio
        assert fake.open_nursery is trio.open_nursery
        assert fake.ClosedResourceError is trio.ClosedResourceError
        assert fake.lowlevel.current_trio_token is trio.lowlevel.current_trio_token
        assert fake.lowlevel.notify_closing is trio.lowlevel.notify_closing
        assert fake.Lock is fuseloop._ReadLock
        fuseloop.install()  # twice: the same stand-in
        assert pyfuse3.trio is fake  # type: ignore[attr-defined]
    finally:
        pyfuse3.trio = before  # type: ignore[attr-defined]


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A pipe's (read end, write end): a device that is readable once written to."""
    read_end, write_end = os.pipe()
    yield read_end, write_end
    os.close(read_end)
    os.close(write_end)


def test_wait_returns_at_once_when_readable_and_yields_every_few(pipe: tuple[int, int]) -> None:
    """Inside a cancelled scope, a wait that goes through trio's scheduler raises
    Cancelled (it is a checkpoint) and one that returns at once does not: that
    tells the two apart whatever order trio runs its tasks in."""
    readiness = fuseloop._Readiness()
    read_end, write_end = pipe
    os.write(write_end, b"x")

    async def went_through_trio() -> bool:
        with trio.CancelScope() as scope:
            scope.cancel()
            await readiness.wait_readable(read_end)
        return scope.cancelled_caught

    async def main() -> None:
        # queued: no scheduler round for YIELD_EVERY requests, then one through trio
        assert [await went_through_trio() for _ in range(fuseloop.YIELD_EVERY)] == [False] * fuseloop.YIELD_EVERY
        assert await went_through_trio()
        assert not await went_through_trio()  # and the count starts over

    trio.run(main)


def test_wait_parks_until_readable(pipe: tuple[int, int]) -> None:
    readiness = fuseloop._Readiness()
    read_end, write_end = pipe
    woke: list[float] = []

    async def waiter() -> None:
        await readiness.wait_readable(read_end)
        woke.append(trio.current_time())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.sleep(0.05)
            assert not woke  # nothing queued: it waits in trio
            os.write(write_end, b"x")
        assert woke

    trio.run(main)


def test_read_lock_excludes_and_hands_over() -> None:
    lock = fuseloop._ReadLock()
    order: list[str] = []

    async def holder(name: str, hold: float) -> None:
        async with lock:
            order.append(f"{name} in")
            await trio.sleep(hold)
            order.append(f"{name} out")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder, "a", 0.05)
            await trio.sleep(0.01)
            nursery.start_soon(holder, "b", 0)

    trio.run(main)
    assert order == ["a in", "a out", "b in", "b out"]


def test_read_lock_goes_back_to_a_task_that_did_not_yield() -> None:
    """A request answered without yielding: its task reads the next one itself
    (trio.Lock would have handed the lock to the waiter at release)."""
    lock = fuseloop._ReadLock()
    order: list[str] = []

    async def waiter() -> None:
        async with lock:
            order.append("waiter")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await lock.__aenter__()
            nursery.start_soon(waiter)
            await trio.sleep(0.01)  # the waiter is parked on the lock
            await lock.__aexit__(None, None, None)
            await lock.__aenter__()  # no yield since the release
            order.append("holder again")
            await lock.__aexit__(None, None, None)

    trio.run(main)
    assert order == ["holder again", "waiter"]
