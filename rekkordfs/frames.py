"""Messages between a main process and its worker processes (prepworker.py,
restoreworker.py) over their stdin and stdout: a little-endian u32 length,
then a marshal-encoded value (marshal: both ends are this code)."""

from __future__ import annotations

import marshal
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import trio

HEADER = struct.Struct("<I")


def frame(message: Any) -> bytes:  # noqa: ANN401 - what marshal takes
    body = marshal.dumps(message)
    return HEADER.pack(len(body)) + body


def write_frame(stream: BinaryIO, message: Any) -> None:  # noqa: ANN401 - what marshal takes
    """frame() written and flushed, header and body apart: no copy of a large
    body (a batch's sealed chunks)."""
    body = marshal.dumps(message)
    stream.write(HEADER.pack(len(body)))
    stream.write(body)
    stream.flush()


def read_frame(stream: BinaryIO) -> Any:  # noqa: ANN401 - what marshal gives
    """The next message (worker side, blocking), or None at the end of the stream."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    body = stream.read(size)
    if len(body) < size:
        return None
    return marshal.loads(body)


async def receive_frame(stream: trio.abc.ReceiveStream, buffer: bytearray) -> object | None:
    """The next message from a worker's stdout (main side; buffer holds what
    was received past the last message), or None once the worker closed it."""
    while True:
        if len(buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer)
            if len(buffer) >= HEADER.size + size:
                with memoryview(buffer) as view:  # no copy of the body (sealed chunks, file contents)
                    message = marshal.loads(view[HEADER.size:HEADER.size + size])
                del buffer[:HEADER.size + size]
                return message
        data = await stream.receive_some(1 << 20)
        if not data:
            return None
        buffer += data


def serve_messages(stdin: BinaryIO, stdout: BinaryIO, handle: Callable[[Any], tuple | None]) -> int:
    """A worker's loop, once it is set up: ("ready",), then each message
    handled and its answer written (None: it has none) until stdin closes.
    The exit status: 1 once an answer said "failed" (the worker stops there)."""
    try:
        write_frame(stdout, ("ready",))
        while (message := read_frame(stdin)) is not None:
            reply = handle(message)
            if reply is None:
                continue
            write_frame(stdout, reply)
            if reply[0] == "failed":
                return 1
    except BrokenPipeError:
        pass  # the main process is gone or stopped listening
    return 0
