"""SFTP reads of a range (rekkordfs/storage/sftp_reads.py read_span): split at the
server's read limit, all in flight at once, put back in order; a server that
answers short is asked again for the rest; the end of the file ends the data.
The handle is a stand-in with a server's answers; the real server's path is
covered by tests/test_storage_conformance.py."""

from __future__ import annotations

import asyncio
import random

from rekkordfs.storage.sftp_reads import read_span


class Handle:
    """A file on a server that answers at most `most` bytes per read, in any order."""

    def __init__(self, data: bytes, most: int) -> None:
        self.data = data
        self.most = most
        self.reads: list[tuple[int, int]] = []

    async def read(self, size: int, offset: int) -> bytes:
        self.reads.append((offset, size))
        await asyncio.sleep(random.random() / 1000)  # answers come back out of order
        return self.data[offset:offset + min(size, self.most)]


def test_pieces_short_answers_and_the_end_of_the_file() -> None:
    data = random.randbytes(100_000)
    for piece, most in ((4096, 4096), (4096, 1000), (65536, 65536), (1 << 20, 30_000)):
        for offset, length in ((0, 100_000), (1, 99_999), (5000, 12_345), (90_000, 50_000), (0, 0), (100_000, 10)):
            handle = Handle(data, most)
            got = asyncio.run(read_span(handle, offset, length, piece))
            assert got == data[offset:offset + length], (piece, most, offset, length)
            assert all(size <= piece for _, size in handle.reads)
    one = Handle(data, 65536)
    assert asyncio.run(read_span(one, 10, 5000, 65536)) == data[10:5010]
    assert one.reads == [(10, 5000)]  # one request, its answer returned as is
