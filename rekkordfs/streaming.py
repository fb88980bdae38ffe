"""Uploading a staged file while it is being written, front to back.

Write-behind normally starts when a file is closed; for a large file written
sequentially (rsync, cp) that leaves the whole upload for after the last byte.
A GrowingFile lets the chunker read the staged data file as it grows: its
readinto() blocks (in the chunker's worker thread) until the writer appends
more or closes. Any other change (a write elsewhere, a truncate, a copy made
for a running commit) aborts the stream, and the file is uploaded the usual
way when closed.
"""

from __future__ import annotations

import os
import threading


class StreamAborted(Exception):
    """The file changed other than by appending: the upload must start over."""


class GrowingFile:
    """A reader of a data file that waits for the writer (see module doc)."""

    def __init__(self, path: str, written: int) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._changed = threading.Condition()
        self._end = written  # bytes appended so far
        self._position = 0
        # where the waiting reader's buffer would be full: a write wakes it only
        # once that much is there (one wake-up per chunker block, not per write;
        # each wake-up takes the GIL from the thread serving the FUSE requests)
        self._wanted = 0
        self._closed = False
        self._aborted = False
        self.version = -1  # the file's content version when it was closed

    # writer side (the event loop)

    def appended(self, end: int) -> None:
        with self._changed:
            self._end = end
            if end >= self._wanted:
                self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def abort(self) -> None:
        with self._changed:
            self._aborted = True
            self._changed.notify_all()

    @property
    def aborted(self) -> bool:
        return self._aborted

    # reader side (a worker thread)

    def readinto(self, view: memoryview) -> int:
        """Fills view, unless the file is closed first (then what is left)."""
        with self._changed:
            self._wanted = self._position + len(view)
            while self._end < self._wanted and not self._closed and not self._aborted:
                self._changed.wait()
            if self._aborted:
                raise StreamAborted()
            available = min(len(view), self._end - self._position)
        if available == 0:
            return 0  # closed: the end of the file
        got = os.preadv(self._fd, [view[:available]], self._position)
        if got == 0:
            raise StreamAborted()  # shorter than appended: replaced under us
        self._position += got
        return got

    def release(self) -> None:
        os.close(self._fd)
