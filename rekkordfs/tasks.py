"""Concurrent tasks whose errors read like sequential code's.

trio wraps every error of a nursery's tasks in an ExceptionGroup; code that
wants to catch OSError or StorageError from concurrent work (a file that
vanished, a backend that went away) would miss it. task_group() raises the
most telling error of the group instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import trio

from .errors import find_user_error, first_leaf

T = TypeVar("T")


def primary_error(exc: BaseException) -> BaseException:
    """A user-facing error if there is one, else the first that is not a
    cancellation, else the first (a cancellation must keep propagating)."""
    user = find_user_error(exc)
    if user is not None:
        return user
    if isinstance(exc, BaseExceptionGroup):
        other, _ = exc.split(lambda e: not isinstance(e, trio.Cancelled))
        return first_leaf(other if other is not None else exc)
    return exc


@asynccontextmanager
async def task_group() -> AsyncIterator[trio.Nursery]:
    """trio.open_nursery(), failing with primary_error() of what its tasks raised."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        raise primary_error(group) from None


class ReceiverGone(Exception):
    """Raised in a producer thread once the loop side stopped receiving."""


class ThreadFeed(Generic[T]):
    """Hands items from a worker thread to a trio memory channel without waiting.

    When the receiving task has gone (its pipeline failed and closed the
    channel), the delivery on the loop must not raise: an error inside a
    run_sync_soon callback is fatal to trio (TrioInternalError). It is noted
    instead, and the producer's next put() raises ReceiverGone, so it stops
    early and the pipeline's own error is what the user sees.
    """

    def __init__(self, send: trio.MemorySendChannel[T]) -> None:
        self._send = send
        self._token = trio.lowlevel.current_trio_token()
        self._gone = False

    def put(self, item: T) -> None:
        """Thread side: queue item for the channel."""
        if self._gone:
            raise ReceiverGone()
        self._token.run_sync_soon(self._deliver, item)

    def _deliver(self, item: T) -> None:
        try:
            self._send.send_nowait(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._gone = True
