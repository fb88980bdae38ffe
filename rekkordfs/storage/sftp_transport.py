"""The TCP transport under asyncssh, tuned for bulk transfers (packets
coalesced, large socket buffers): asyncssh handles every packet in Python."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class CoalescingTransport(asyncio.Transport):
    """Gathers what the SSH layer writes during one event-loop turn into one send().

    asyncssh writes every SSH packet (32 KiB at most, plus an empty IGNORE
    packet before each) straight to the socket; on loopback and in VMs each
    send() costs a wakeup of the peer, which made system calls most of the
    SFTP cost. Writes here are queued and flushed once per loop turn.
    """

    def __init__(self, real: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._real = real
        self._loop = loop
        self._pending: list[bytes] = []
        self._size = 0
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._pending.append(bytes(data))
        self._size += len(data)
        if self._size >= 1 << 20:
            self._flush()  # bound the queue under a long burst
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        self._scheduled = False
        if self._pending and not self._real.is_closing():
            self._real.write(b"".join(self._pending))
        self._pending.clear()
        self._size = 0

    def close(self) -> None:
        self._flush()
        self._real.close()

    def abort(self) -> None:
        self._pending.clear()
        self._size = 0
        self._real.abort()

    def write_eof(self) -> None:
        self._flush()
        self._real.write_eof()

    def can_write_eof(self) -> bool:
        return self._real.can_write_eof()

    def is_closing(self) -> bool:
        return self._real.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._real.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size() + self._size

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._real.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        self._real.pause_reading()

    def resume_reading(self) -> None:
        self._real.resume_reading()

    def is_reading(self) -> bool:
        return self._real.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._real.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._real.get_protocol()


class CoalescingProtocol(asyncio.Protocol):
    """Hands the SSH connection a CoalescingTransport instead of the socket's own."""

    def __init__(self, session: asyncio.Protocol, loop: asyncio.AbstractEventLoop) -> None:
        self.session = session
        self._loop = loop
        self.transport: CoalescingTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = CoalescingTransport(transport, self._loop)  # type: ignore[arg-type]
        self.session.connection_made(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.session.data_received(data)

    def eof_received(self) -> bool | None:
        return self.session.eof_received()

    def pause_writing(self) -> None:
        self.session.pause_writing()

    def resume_writing(self) -> None:
        self.session.resume_writing()


class DirectTCP:
    """An asyncssh `tunnel` that is a plain TCP connection with coalesced writes.

    on_connected() is called once the TCP connection is made (something
    listens there), before the SSH handshake."""

    def __init__(self, on_connected: Callable[[], None] | None = None) -> None:
        self._on_connected = on_connected

    async def create_connection(self, session_factory: Callable[[], Any], host: str, port: int) -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(
            lambda: CoalescingProtocol(session_factory(), loop), host, port)
        if self._on_connected is not None:
            self._on_connected()
        return protocol.transport, protocol.session

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass
