"""Open descriptors handed to a worker process after it started, over a Unix
socket pair (SCM_RIGHTS): a restore starts its workers before it connects to
the repository, and DEST is opened only once the snapshot is found. Light to
import (no trio): the workers use it."""

from __future__ import annotations

import socket


def handover_pair() -> tuple[socket.socket, socket.socket]:
    """(the main process's end, the worker's end); both close on exec, the
    worker's end is passed on explicitly (pass_fds)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def send_fds(end: socket.socket, fds: tuple[int, ...]) -> None:
    """Hand fds over (the receiver gets duplicates), then close this end."""
    try:
        socket.send_fds(end, [b"\0"], list(fds))
    finally:
        end.close()


def receive_fds(fileno: int, count: int) -> list[int]:
    """The count descriptors handed over through the socket at fileno (closed
    after); OSError if the other end sent something else or closed first."""
    with socket.socket(fileno=fileno) as end:
        _, fds, flags, _ = socket.recv_fds(end, 1, count)
    if len(fds) != count or flags & socket.MSG_CTRUNC:
        for fd in fds:
            socket.close(fd)
        raise OSError(f"expected {count} descriptors from the main process, got {len(fds)}")
    return fds
