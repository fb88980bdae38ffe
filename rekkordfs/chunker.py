"""Keyed content-defined chunking.

FastCDC with its gear table perturbed by a seed derived from the master key,
so chunk boundaries (and thus stored sizes) depend on a secret, not only on the
content. The Cython core releases the GIL while it scans.
"""

from __future__ import annotations

from typing import BinaryIO, Iterator

import pyfastcdc

from .repository import ChunkParams


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

    def stream(self, source: BinaryIO) -> Iterator[bytes]:
        """Cut a file object; each chunk is an independent bytes copy."""
        for chunk in self._cdc().cut_stream(source):
            yield bytes(chunk.data)
