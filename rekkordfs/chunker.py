"""Keyed content-defined chunking.

FastCDC with its gear table perturbed by a seed derived from the master key,
so chunk boundaries (and thus stored sizes) depend on a secret, not only on the
content. The Cython core releases the GIL while it scans.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import pyfastcdc


class ReadsInto(Protocol):
    """What a chunker reads from: an open file, or a staged file still growing."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


@dataclass(frozen=True)
class ChunkParams:
    """Chunk sizes, fixed for a repository by its identity record."""

    min_size: int = 256 << 10
    avg_size: int = 1 << 20
    max_size: int = 4 << 20


class Chunker:
    def __init__(self, seed: int, params: ChunkParams) -> None:
        self.params = params
        self._seed = seed

    def _cdc(self) -> pyfastcdc.FastCDC:
        p = self.params
        return pyfastcdc.FastCDC(p.avg_size, min_size=p.min_size, max_size=p.max_size, seed=self._seed)

    def split(self, data: bytes) -> list[memoryview]:
        """Cut an in-memory buffer; views point into data."""
        if len(data) <= self.params.min_size:
            return [memoryview(data)]
        return [chunk.data for chunk in self._cdc().cut_buf(data)]

    def stream(self, source: ReadsInto) -> Iterator[memoryview]:
        """Cut a file object, reading it in large blocks.

        Chunks are views into the block they were cut from; the tail of a block
        is carried into the next one, since its end is not a real boundary.
        """
        cdc = self._cdc()
        carry = b""
        while True:
            block = bytearray(len(carry) + READ_BLOCK)
            block[:len(carry)] = carry
            filled = len(carry) + _read_into(source, memoryview(block)[len(carry):])
            data = memoryview(block)[:filled]
            if filled < len(block):  # end of file
                if filled:
                    yield from (chunk.data for chunk in cdc.cut_buf(data))
                return
            chunks = list(cdc.cut_buf(data))
            carry = bytes(chunks[-1].data)
            for chunk in chunks[:-1]:
                yield chunk.data


READ_BLOCK = 16 << 20


def _read_into(source: ReadsInto, view: memoryview) -> int:
    total = 0
    while total < len(view):
        got = source.readinto(view[total:])
        if not got:
            break
        total += got
    return total
