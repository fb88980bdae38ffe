"""SFTP reads of a byte range in requests the server answers whole, all in
flight at once (asyncssh's own splitting copied every byte twice more to put
the answers together)."""

from __future__ import annotations

import asyncio
from typing import Any


def read_piece(sftp: Any) -> int:
    """The largest read the server answers whole (OpenSSH: 255 KiB, announced
    with limits@openssh.com); 64 KiB for servers that do not say."""
    limits = getattr(sftp, "limits", None)  # asyncssh learned the extension in 2.x
    return int(getattr(limits, "max_read_len", 0) or 0) or 64 << 10


async def read_span(handle: Any, offset: int, length: int, piece: int) -> bytes:
    """length bytes from offset (fewer at the end of the file): reads of up to
    `piece` bytes, all in flight at once, on a handle opened with block_size=0
    (asyncssh then sends each read as one request). asyncssh's own splitting
    copied every byte twice more, in Python's thread, to put the answers together."""
    if length <= 0:
        return b""
    starts = range(offset, offset + length, piece)
    parts = await asyncio.gather(*(read_fully(handle, start, min(piece, offset + length - start))
                                   for start in starts))
    if len(parts) == 1:
        return parts[0]
    for index, part in enumerate(parts):
        if len(part) < piece:  # the end of the file: nothing after it counts
            del parts[index + 1:]
            break
    return b"".join(parts)


async def read_fully(handle: Any, offset: int, size: int) -> bytes:
    """size bytes from offset, in more requests if the server answers short;
    fewer only at the end of the file."""
    data = await handle.read(size, offset)
    if len(data) >= size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = await handle.read(size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
