"""Ctrl-C: one line, status 130, whenever it comes.

Three regimes (see main.py for when each applies):

- no command running yet, or done: end at once (`exit_now`), after putting
  the terminal back as it was (a prompt may have turned echo off);
- inside `run_trio`: the first SIGINT cancels everything the command runs,
  so every task unwinds through its cleanup and the command then reports the
  interruption; a second one ends at once. (Letting trio raise
  KeyboardInterrupt instead can land it inside trio's own bookkeeping, such
  as a nursery being closed, and corrupt it);
- elsewhere in a command: KeyboardInterrupt, which main._report turns into
  the same line.

This module is loaded before anything else: it imports only modules the
interpreter has already loaded.
"""

from __future__ import annotations

import _signal as signal  # the C module: 'signal' would import enum and more first
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import TypeVar

    T = TypeVar("T")

STATUS = 130
_LINE = b"rekkord: interrupted\n"
_terminal: list | None = None  # tcgetattr() of stdin when it is a terminal


def remember_terminal() -> None:
    global _terminal
    if os.isatty(0):
        import termios

        try:
            _terminal = termios.tcgetattr(0)
        except termios.error:
            _terminal = None


def exit_now(_signum: int = signal.SIGINT, _frame: object = None) -> None:
    """Say so and leave now: no Python code (and no traceback) runs after this."""
    try:
        if _terminal is not None:
            import termios

            termios.tcsetattr(0, termios.TCSANOW, _terminal)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except Exception:  # noqa: BLE001 - a closed terminal or stream: nothing more to restore or say there
        pass
    try:
        os.write(2, _LINE)
    finally:
        os._exit(STATUS)


def exit_at_once() -> None:
    signal.signal(signal.SIGINT, exit_now)


def raise_keyboard_interrupt() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_trio(async_fn: Callable[..., Awaitable[T]], *args: object) -> T:
    """trio.run(async_fn, *args), where Ctrl-C cancels the run and then raises
    KeyboardInterrupt."""
    import trio

    interrupted = False

    async def watch(scope: trio.CancelScope, task_status=trio.TASK_STATUS_IGNORED) -> None:  # noqa: ANN001
        nonlocal interrupted
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            task_status.started()
            async for _ in signals:
                interrupted = True
                scope.cancel()
                return  # the receiver is gone: a second Ctrl-C ends at once

    async def guarded() -> T:
        result = None
        async with trio.open_nursery() as nursery:
            await nursery.start(watch, nursery.cancel_scope)
            result = await async_fn(*args)
            nursery.cancel_scope.cancel()  # stops the watcher
        return result  # None only when interrupted, then unused

    previous = signal.getsignal(signal.SIGINT)
    exit_at_once()  # until the watcher listens (and so trio does not install its own handler)
    try:
        result = trio.run(guarded)
    except BaseException:
        if interrupted:  # whatever the cancellation turned into, it was Ctrl-C
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
    return result
