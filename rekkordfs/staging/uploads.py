"""Which version of each written file's content is uploaded: the one owner of
write-behind's results (see writebehind.py, which runs the uploads, and
commit.py, which reuses them)."""

from __future__ import annotations

from collections.abc import Iterable

import trio

from ..format import ChunkRef, encode_chunks


class Uploads:
    """Per staging tree. A file's content version is bumped on every change of
    it; an upload counts only for the version it read."""

    def __init__(self) -> None:
        self._versions: dict[int, int] = {}  # in memory: versions start over with the process
        # ino -> (version, chunks encoded as in a directory record: a third of the
        # memory of ChunkRef objects, for every staged file until it is committed)
        self._done: dict[int, tuple[int, bytes]] = {}
        self._running: dict[int, trio.Event] = {}  # set when that upload ends, done or not

    # --- the content (the tree says when it changes) -------------------------------------

    def version(self, ino: int) -> int:
        return self._versions.get(ino, 0)

    def changed(self, ino: int) -> None:
        """The content changed: earlier uploads of it no longer count."""
        self._versions[ino] = self._versions.get(ino, 0) + 1
        self._done.pop(ino, None)

    def deleted(self, ino: int) -> None:
        self._versions.pop(ino, None)
        self._done.pop(ino, None)

    def reset(self) -> None:
        """The tree was seeded anew: no file of it is uploaded."""
        self._versions.clear()
        self._done.clear()

    # --- results -----------------------------------------------------------------------------

    def record(self, ino: int, version: int, chunks: list[ChunkRef] | bytes) -> None:
        """An upload of this version finished (its chunks, or their encoding);
        ignored if the content changed since."""
        if self._versions.get(ino, 0) == version:
            self._done[ino] = (version, chunks if isinstance(chunks, bytes) else encode_chunks(chunks))

    def result(self, ino: int, version: int | None = None) -> bytes | None:
        """The chunks (format.encode_chunks) of the upload of this version
        (default: the current one), if it is done."""
        done = self._done.get(ino)
        if done is None or done[0] != (self.version(ino) if version is None else version):
            return None
        return done[1]

    def committed(self, ino: int) -> None:
        """The content is stored as the base now: no upload result is needed."""
        self._done.pop(ino, None)

    def done_count(self) -> int:
        return len(self._done)

    # --- uploads in progress ------------------------------------------------------------------

    def begin(self, inos: Iterable[int]) -> trio.Event:
        """Uploads of these files start (one batch): a commit may wait for them
        instead of uploading again. Pass the event to finish()."""
        event = trio.Event()
        for ino in inos:
            self._running[ino] = event
        return event

    def finish(self, inos: Iterable[int], event: trio.Event) -> None:
        for ino in inos:
            if self._running.get(ino) is event:  # not taken over by a later upload
                del self._running[ino]
        event.set()

    async def wait(self, ino: int) -> bool:
        """Wait for a running upload of this file to end; False if none runs."""
        running = self._running.get(ino)
        if running is None:
            return False
        await running.wait()
        return True

    def running(self) -> bool:
        return bool(self._running)
