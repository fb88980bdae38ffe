"""The journals' batches: consecutive requests share one SQLite transaction
(staging/journal.py), committed here as soon as the daemon is idle."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import trio
import trio.testing

from ..staging import StagingTree
from ..staging.journal import BATCH_SECONDS

log = logging.getLogger(__name__)

# An open journal batch is committed once every task has waited this long
# (the writer paused: nothing more is coming soon).
IDLE_SECONDS = 0.001


class BatchFlusher:
    def __init__(self, trees: Callable[[], Iterable[StagingTree]]) -> None:
        self._trees = trees  # the open trees, at each flush
        self._open = trio.Event()  # some tree's journal holds uncommitted requests

    def batch(self, tree: StagingTree) -> None:
        """The tree's journal commits requests in batches, flushed here."""
        tree.journal.batching = True
        tree.journal.on_batch = self._opened

    def _opened(self) -> None:
        self._open.set()  # the event of now: run() makes a new one each time

    async def run(self) -> None:
        """Commit open journal batches as soon as the daemon is idle (or after
        BATCH_SECONDS): what a kill -9 can lose is the last moment's requests."""
        try:
            while True:
                await self._open.wait()
                self._open = trio.Event()
                with trio.move_on_after(BATCH_SECONDS):
                    # trio's own "every other task is blocked" wait: cheap, and
                    # exactly "the writer paused"
                    await trio.testing.wait_all_tasks_blocked(IDLE_SECONDS)
                self.flush_all()
        finally:
            self.flush_all()

    def flush_all(self) -> None:
        for tree in list(self._trees()):
            try:
                tree.journal.flush()
            except OSError as exc:
                log.error("staging/%s: the journal lost its last requests: %s", tree.channel, exc.strerror)
            tree.journal.tidy()
