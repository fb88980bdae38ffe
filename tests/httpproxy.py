"""Test servers in front of SeaweedFS: a small forwarding HTTP proxy and a TLS front.

HttpProxy is what https_proxy/http_proxy point at: CONNECT opens a tunnel
(https endpoints), a request with a full URL is forwarded (http endpoints).
It records what it was asked and can demand Basic credentials. TlsFront
terminates TLS with a self-signed certificate and passes the bytes on, so an
https:// endpoint exists to tunnel to. Both are threads on 127.0.0.1.
"""

from __future__ import annotations

import base64
import http.client
import select
import socket
import socketserver
import ssl
import subprocess
import threading
from pathlib import Path
from urllib.parse import urlsplit


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    poller = select.poll()
    peers = {a.fileno(): b, b.fileno(): a}
    sources = {a.fileno(): a, b.fileno(): b}
    for fd in peers:
        poller.register(fd, select.POLLIN)
    while True:
        for fd, _ in poller.poll(30_000) or [(None, None)]:
            if fd is None:
                return  # idle for half a minute: the client is gone
            try:
                data = sources[fd].recv(65536)
                if not data:
                    return
                peers[fd].sendall(data)
            except OSError:
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Running:
    server: _Server

    def _serve(self, handler: type[socketserver.BaseRequestHandler]) -> None:
        self.server = _Server(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class HttpProxy(_Running):
    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self.requests: list[tuple[str, str]] = []  # (method, target) of everything asked
        self.refused = 0  # requests without the right credentials
        self._lock = threading.Lock()
        expected = None
        if credentials:
            expected = "Basic " + base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                upstream: http.client.HTTPConnection | None = None
                while True:
                    line = self.rfile.readline(65537).decode("latin-1")
                    if not line.strip():
                        return
                    method, target, _ = line.split(" ", 2)
                    headers = http.client.parse_headers(self.rfile)
                    body = self.rfile.read(int(headers.get("Content-Length") or 0))
                    with proxy._lock:
                        proxy.requests.append((method, target))
                    if expected and headers.get("Proxy-Authorization") != expected:
                        with proxy._lock:
                            proxy.refused += 1
                        self.wfile.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                                         b"Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n")
                        continue
                    if method == "CONNECT":
                        host, _, port = target.rpartition(":")
                        with socket.create_connection((host, int(port)), timeout=10) as far:
                            self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                            _relay(self.connection, far)
                        return
                    url = urlsplit(target)
                    if upstream is None:
                        upstream = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=60)
                    forwarded = {k: v for k, v in headers.items()
                                 if k.lower() not in ("proxy-authorization", "proxy-connection", "content-length")}
                    path = url.path + (f"?{url.query}" if url.query else "")
                    upstream.request(method, path, body=body or None, headers=forwarded)
                    response = upstream.getresponse()
                    payload = response.read()
                    out = [f"HTTP/1.1 {response.status} {response.reason}"]
                    out += [f"{k}: {v}" for k, v in response.getheaders()
                            if k.lower() not in ("transfer-encoding", "connection", "content-length")]
                    length = response.getheader("Content-Length") if method == "HEAD" else None
                    out.append(f"Content-Length: {length or len(payload)}")
                    self.wfile.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
                    if method != "HEAD":
                        self.wfile.write(payload)

        self._serve(Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def seen(self, method: str) -> list[str]:
        with self._lock:
            return [target for m, target in self.requests if m == method]


class TlsFront(_Running):
    """https://127.0.0.1:port in front of a plain TCP port; `certificate` is the CA file to trust."""

    def __init__(self, upstream_port: int, folder: Path) -> None:
        self.certificate = folder / "front-cert.pem"
        key = folder / "front-key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(self.certificate)], check=True, capture_output=True)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certificate, key)

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    near = context.wrap_socket(self.request, server_side=True)
                except (ssl.SSLError, OSError):
                    return  # a client that does not trust us
                with near, socket.create_connection(("127.0.0.1", upstream_port), timeout=10) as far:
                    _relay_tls(near, far)

        self._serve(Handler)

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def _relay_tls(near: ssl.SSLSocket, far: socket.socket) -> None:
    """_relay, minding bytes TLS already decrypted that poll cannot see."""
    poller = select.poll()
    poller.register(near.fileno(), select.POLLIN)
    poller.register(far.fileno(), select.POLLIN)
    while True:
        ready = [fd for fd, _ in poller.poll(0 if near.pending() else 30_000)]
        if near.pending() and near.fileno() not in ready:
            ready.append(near.fileno())
        if not ready:
            return
        for fd in ready:
            source, sink = (near, far) if fd == near.fileno() else (far, near)
            try:
                data = source.recv(65536)
                if not data:
                    return
                sink.sendall(data)
            except ssl.SSLWantReadError:
                continue
            except OSError:
                return
