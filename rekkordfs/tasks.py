"""Concurrent tasks whose errors read like sequential code's.

trio wraps every error of a nursery's tasks in an ExceptionGroup; code that
wants to catch OSError or StorageError from concurrent work (a file that
vanished, a backend that went away) would miss it. task_group() raises the
most telling error of the group instead.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio

from .errors import find_user_error


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def primary_error(exc: BaseException) -> BaseException:
    """A user-facing error if there is one, else the first that is not a
    cancellation, else the first (a cancellation must keep propagating)."""
    user = find_user_error(exc)
    if user is not None:
        return user
    leaves = _leaves(exc)
    return next((leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)), leaves[0])


@asynccontextmanager
async def task_group() -> AsyncIterator[trio.Nursery]:
    """trio.open_nursery(), failing with primary_error() of what its tasks raised."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        raise primary_error(group) from None
