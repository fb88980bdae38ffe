"""An asyncio event loop in a thread of its own, driven from trio: for
libraries built on asyncio (asyncssh). Each call submits a coroutine to that
loop; the trio side waits on an Event set from the future's done-callback, so
no thread is held per request and many are in flight at once."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")
log = logging.getLogger(__name__)


async def captured(coro: Coroutine[Any, Any, T]) -> outcome.Outcome[T]:
    """The coroutine's result or error as a value: a task whose waiter went away
    (cancelled on the trio side) then never dies with an unretrieved error."""
    try:
        return outcome.Value(await coro)
    except Exception as exc:  # noqa: BLE001 - handed to the waiter as is
        return outcome.Error(exc)


class AsyncioThread:
    """One asyncio event loop running in a daemon thread, callable from trio."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        # asyncio would print stray task errors on stderr: they belong in the log.
        self.loop.set_exception_handler(lambda _loop, context: log.debug("asyncio: %s", context.get("message")))
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run coro on the asyncio loop; wait for it without blocking trio."""
        future: Future[outcome.Outcome[T]] = asyncio.run_coroutine_threadsafe(captured(coro), self.loop)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: object) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()  # cancels the asyncio task too
            raise
        return future.result().unwrap()

    def stop(self) -> None:
        def shutdown() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.stop()

        if self.loop.is_running():
            self.loop.call_soon_threadsafe(shutdown)
            self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()
