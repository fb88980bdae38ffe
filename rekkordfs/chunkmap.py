"""A file as its chunks: where each begins, and reading any byte range of it.
Shared by the mount's snapshot files and the staging area's stored files."""

from __future__ import annotations

import bisect
import os
from collections.abc import Awaitable, Callable

from .format import ChunkRef


class ChunkMap:
    __slots__ = ("chunks", "offsets", "size")

    def __init__(self, chunks: list[ChunkRef]) -> None:
        self.chunks = chunks
        self.offsets: list[int] = []  # where each chunk begins
        total = 0
        for chunk in chunks:
            self.offsets.append(total)
            total += chunk.size
        self.size = total

    def index_of(self, offset: int) -> int:
        """The chunk holding byte `offset` (the first one for offset 0 of an empty file)."""
        return max(bisect.bisect_right(self.offsets, offset) - 1, 0)

    async def read(self, fetch: Callable[[ChunkRef], Awaitable[bytes | bytearray]], offset: int, size: int,
                   end_of_file: int | None = None) -> bytes:
        """Bytes [offset, offset + size) (fewer at the end), fetching the chunks they span."""
        end = min(offset + size, self.size if end_of_file is None else end_of_file)
        parts = []
        index = self.index_of(offset)
        while index < len(self.chunks) and self.offsets[index] < end:
            chunk = self.chunks[index]
            data = await fetch(chunk)
            start = max(offset, self.offsets[index]) - self.offsets[index]
            stop = min(end, self.offsets[index] + chunk.size) - self.offsets[index]
            parts.append(memoryview(data)[start:stop])
            index += 1
        return b"".join(parts)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of data at offset (pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
