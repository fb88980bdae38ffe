"""A fault-injecting TCP proxy on 127.0.0.1, for tests against real servers.

    with FaultProxy(upstream_port, "http", Schedule(("503", "reset"), probability=0.2, seed=7)) as proxy:
        ... point rekkord at 127.0.0.1:proxy.port ...
        assert proxy.count() > 0

Two modes:

- "http" (in front of SeaweedFS's S3 port): requests are parsed one by one.
  A request chosen by the schedule is answered by the proxy itself with
  "500" (500 InternalError) or "503" (503 SlowDown, S3's XML error body), or
  is forwarded and its answer cut: "reset" forwards the response headers and
  half the body, then resets the connection (RST); for a response without a
  body (a PUT's 200) the reset comes before any of it, so the request landed
  and its answer is lost (put-if-absent's hard case).
- "ssh" (in front of sshd): bytes are opaque. A connection chosen by the
  schedule is cut once N bytes (both directions, handshake included) have
  passed: "drop" closes both sides (FIN), "reset" resets them (RST).

Which request or connection gets which fault depends only on the schedule's
seed and its number (0, 1, 2... in arrival order), so a failing run is
replayed with the same seed (concurrent requests may arrive in another order).
Every fault injected is recorded (proxy.faults), so a test can assert that
faults really happened and print them when it fails.
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from typing import BinaryIO

HTTP_KINDS = ("500", "503", "reset")
SSH_KINDS = ("drop", "reset")

_ERRORS = {
    "500": ("500 Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "503": ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
}


@dataclass(frozen=True)
class Schedule:
    """Which requests (http) or connections (ssh) get a fault, and which one."""

    kinds: tuple[str, ...] = ()  # faults to choose from (seeded); empty: none
    every: int = 0  # every Nth one (N-1, 2N-1... counting from 0) gets a fault, kinds in turn
    probability: float = 0.0  # and each other one with this probability, of a kind chosen at random
    seed: int = 0
    after: int = 0  # numbers below this are never faulted
    limit: int | None = None  # at most this many faults, then healthy
    cut_bytes: tuple[int, int] = (64 << 10, 1 << 20)  # ssh: cut after between lo and hi bytes
    only: str = ""  # http: only requests whose "METHOD /path" starts with this are numbered and faulted

    def matches(self, what: str) -> bool:
        return what.startswith(self.only)

    def decide(self, index: int, injected: int) -> tuple[str, int] | None:
        """(kind, bytes before the cut) for number index, or None: leave it alone."""
        if not self.kinds or index < self.after or (self.limit is not None and injected >= self.limit):
            return None
        rng = random.Random(f"{self.seed}:{index}")  # depends on seed and number only: replayable
        cut = rng.randint(*self.cut_bytes)
        if self.every and (index + 1) % self.every == 0:
            # the kinds in turn: every kind is met once there are enough requests
            return self.kinds[((index + 1) // self.every - 1) % len(self.kinds)], cut
        if rng.random() < self.probability:
            return rng.choice(self.kinds), cut
        return None


HEALTHY = Schedule()


@dataclass(frozen=True)
class Fault:
    index: int  # request or connection number
    kind: str
    what: str  # "GET /bucket/key" or "connection after 81234 bytes"


class FaultProxy:
    """A threaded TCP proxy from 127.0.0.1:port to 127.0.0.1:upstream_port."""

    def __init__(self, upstream_port: int, mode: str, schedule: Schedule = HEALTHY) -> None:
        assert mode in ("http", "ssh")
        self.upstream_port = upstream_port
        self.mode = mode
        self.schedule = schedule
        self.faults: list[Fault] = []
        self.handled = 0  # requests (http) or connections (ssh) seen, in all
        self.requests: list[str] = []  # http: "METHOD /path?query" of every request, in order
        self._index = 0  # numbering under the current schedule
        self._injected_now = 0  # faults under the current schedule (for its limit)
        self._seed = schedule.seed
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"faultproxy-{self.port}", daemon=True)

    # --- control -------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.cut_all()
        self._thread.join(5)

    def set_schedule(self, schedule: Schedule) -> None:
        """Use schedule from now on, numbering from 0 again."""
        with self._lock:
            self.schedule = schedule
            if schedule.kinds:
                self._seed = schedule.seed  # the one a replay needs
            self._index = 0
            self._injected_now = 0

    def cut_all(self) -> None:
        """Close every connection through the proxy now (they were established
        under the old schedule)."""
        with self._lock:
            live = list(self._live)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def count(self, *kinds: str) -> int:
        with self._lock:
            return sum(1 for f in self.faults if not kinds or f.kind in kinds)

    def summary(self) -> str:
        """'503: 4, reset-mid-body: 2 (of 57 requests; seed 7)' for assertion messages."""
        with self._lock:
            counts = Counter(f.kind for f in self.faults)
            unit = "requests" if self.mode == "http" else "connections"
            listed = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) or "no faults"
            return f"{listed} (of {self.handled} {unit}; seed {self._seed})"

    # --- plumbing --------------------------------------------------------------

    def _decide(self, what: str = "") -> tuple[int, tuple[str, int] | None]:
        with self._lock:
            self.handled += 1
            if what:
                self.requests.append(what)
            if not self.schedule.matches(what):
                return -1, None
            index = self._index
            self._index += 1
            decision = self.schedule.decide(index, self._injected_now)
            if decision is not None:
                self._injected_now += 1
            return index, decision

    def _record(self, index: int, kind: str, what: str) -> None:
        with self._lock:
            self.faults.append(Fault(index, kind, what))

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._live.add(sock)

    def _untrack(self, *socks: socket.socket | None) -> None:
        for sock in socks:
            if sock is None:
                continue
            with self._lock:
                self._live.discard(sock)
            with contextlib.suppress(OSError):
                sock.close()

    def _upstream(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=30)
        sock.settimeout(None)
        self._track(sock)
        return sock

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._track(client)
            target = self._serve_http if self.mode == "http" else self._serve_ssh
            threading.Thread(target=self._guarded, args=(target, client), daemon=True).start()

    def _guarded(self, target, client: socket.socket) -> None:  # noqa: ANN001
        try:
            target(client)
        except OSError:
            pass  # a side went away: its peer sees the connection end, as it would without us
        finally:
            self._untrack(client)

    # --- ssh: opaque bytes -------------------------------------------------------

    def _serve_ssh(self, client: socket.socket) -> None:
        index, decision = self._decide()
        upstream = self._upstream()
        left = decision[1] if decision else -1  # bytes still allowed through before the cut
        passed = 0
        try:
            while not self._stopped.is_set():
                ready, _, _ = select.select([client, upstream], [], [], 0.5)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    other = upstream if sock is client else client
                    if decision and len(data) >= left:
                        other.sendall(data[:left])
                        kind = decision[0]
                        self._record(index, kind, f"connection after {passed + left} bytes")
                        if kind == "reset":
                            _reset(client)
                            _reset(upstream)
                        return
                    other.sendall(data)
                    passed += len(data)
                    if decision:
                        left -= len(data)
        finally:
            self._untrack(upstream)

    # --- http: one request at a time ---------------------------------------------

    def _serve_http(self, client: socket.socket) -> None:
        rfile = client.makefile("rb")
        upstream: socket.socket | None = None
        ufile: BinaryIO | None = None
        try:
            while not self._stopped.is_set():
                head = _read_head(rfile)
                if head is None:
                    return
                request_line, headers = _parse_head(head)
                method, target = request_line.split(" ")[:2]
                expect = headers.get("expect", "").lower() == "100-continue"
                index, decision = self._decide(f"{method} {target}")
                kind = decision[0] if decision else None
                if kind in _ERRORS:
                    if not expect:
                        _read_body(rfile, headers)  # the client sends it before reading the answer
                    client.sendall(_error_response(kind, target, index, head_only=method == "HEAD"))
                    self._record(index, kind, f"{method} {target}")
                    return  # Connection: close
                if expect:
                    # answer 100 ourselves and drop the header (never signed in SigV4): the
                    # request then goes upstream whole, in one piece
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = _without_header(head, b"expect")
                body = _read_body(rfile, headers)
                response = None
                for fresh in (upstream is None, True):
                    if upstream is None:
                        upstream = self._upstream()
                        ufile = upstream.makefile("rb")
                    assert ufile is not None
                    upstream.sendall(head + body)
                    response = _read_response(ufile, method)
                    if response is not None or fresh:
                        break
                    self._untrack(upstream)  # a kept-alive connection the server had closed: once more
                    upstream = None
                if response is None:
                    return
                resp_head, resp_body, close = response
                if kind == "reset":
                    if len(resp_body) >= 2:
                        client.sendall(resp_head + resp_body[: len(resp_body) // 2])
                        self._record(index, "reset-mid-body", f"{method} {target}")
                    else:
                        self._record(index, "reset-before-answer", f"{method} {target}")
                    _reset(client)
                    return
                client.sendall(resp_head + resp_body)
                if close:
                    return
        finally:
            self._untrack(upstream)


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN: the peer gets ECONNRESET."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def _read_head(rfile: BinaryIO) -> bytes | None:
    """Start line and headers up to the blank line; None at a clean end."""
    lines: list[bytes] = []
    while True:
        line = rfile.readline(65537)
        if not line:
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    first, *rest = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in rest:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return first, headers


def _without_header(head: bytes, name: bytes) -> bytes:
    lines = head.split(b"\r\n")
    return b"\r\n".join(line for line in lines if not line.lower().startswith(name + b":"))


def _read_body(rfile: BinaryIO, headers: dict[str, str]) -> bytes:
    """The raw body as sent (Content-Length or chunked)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        while True:
            size_line = rfile.readline()
            parts.append(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers up to the blank line
                    trailer = rfile.readline()
                    parts.append(trailer)
                    if trailer in (b"\r\n", b"\n", b""):
                        return b"".join(parts)
            parts.append(_read_exact(rfile, size + 2))
    return _read_exact(rfile, int(headers.get("content-length", "0") or 0))


def _read_exact(rfile: BinaryIO, size: int) -> bytes:
    data = rfile.read(size) if size else b""
    if len(data) != size:
        raise ConnectionError("peer closed mid-body")
    return data


def _read_response(ufile: BinaryIO, method: str) -> tuple[bytes, bytes, bool] | None:
    """(head, raw body, close afterwards) of the upstream's answer; None if it
    closed before answering."""
    head = _read_head(ufile)
    while head is not None and head.split(b" ", 2)[1].startswith(b"1"):  # 1xx: informational
        head = _read_head(ufile)
    if head is None:
        return None
    status_line, headers = _parse_head(head)
    status = int(status_line.split(" ")[1])
    close = headers.get("connection", "").lower() == "close"
    if method == "HEAD" or status in (204, 304):
        return head, b"", close
    if "chunked" in headers.get("transfer-encoding", "").lower() or "content-length" in headers:
        return head, _read_body(ufile, headers), close
    return head, ufile.read(), True  # delimited by the end of the connection


def _error_response(kind: str, target: str, index: int, head_only: bool) -> bytes:
    status, code, message = _ERRORS[kind]
    resource = target.split("?")[0]
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Resource>{resource}</Resource><RequestId>faultproxy-{index}</RequestId></Error>").encode()
    head = (f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    return head if head_only else head + body
