"""One conformance suite for every Storage backend (local, S3, SFTP), on real servers.

The S3 cases run on SeaweedFS, the SFTP cases on OpenSSH's sshd, both started
by the session fixtures in tests/servers.py. A small re-signing HTTP proxy in
front of SeaweedFS plays an S3 host that ignores If-None-Match (or fails on
command), and counts the requests it forwards.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from rekkordfs.config import S3Settings, SFTPSettings, parse_url
from rekkordfs.errors import ObjectMissing, StorageError, TransientStorageError
from rekkordfs.storage.base import Storage
from rekkordfs.storage.local import LocalStorage
from rekkordfs.storage.retry import RetryingStorage, RetryPolicy
from rekkordfs.storage.s3 import PROBE_KEY, S3Storage
from rekkordfs.storage.sftp import SFTPStorage
from tests.servers import BACKENDS, BUCKET, OpenSSHServer, SeaweedFS, write_config

DENIED = re.compile(r"denied|not permitted", re.IGNORECASE)


@dataclass
class Backend:
    """Makes Storage objects for fresh locations on one backend."""

    name: str
    tmp: Path
    s3: SeaweedFS | None = None
    ssh: OpenSSHServer | None = None
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def storage(self, where: str | None = None, *, reader: bool = False, make: bool = True) -> Storage:
        """A Storage object for location `where` (a fresh one when None)."""
        where = where or f"repo-{secrets.token_hex(5)}"
        if self.name == "local":
            return LocalStorage(str(self.tmp / where))
        if self.name == "s3":
            assert self.s3 is not None
            key, secret = (self.s3.reader_key, self.s3.reader_secret) if reader else (self.s3.access_key,
                                                                                         self.s3.secret_key)
            return S3Storage(parse_url(self.s3.url(BUCKET, where)), S3Settings(key, secret))
        assert self.ssh is not None
        path = self.ssh.data / where
        if make and not path.exists():
            self.ssh.new_dir(where)
        return SFTPStorage(parse_url(self.ssh.url(path)),
                           SFTPSettings(key_file=str(self.ssh.client_key), fingerprint=self.ssh.fingerprint))

    def read_only_location(self) -> tuple[str, bytes]:
        """A location holding blobs/00/ro that this backend's credentials cannot write."""
        where = f"ro-{secrets.token_hex(5)}"
        data = b"read only object"
        if self.name == "s3":
            assert self.s3 is not None
            self.s3.client().put_object(Bucket=BUCKET, Key=f"{where}/blobs/00/ro", Body=data)
            return where, data
        root = self.tmp / where if self.name == "local" else self.ssh.data / where  # type: ignore[union-attr]
        for folder in ("tmp", "tags", "blobs/00"):
            (root / folder).mkdir(parents=True, mode=0o755)
        (root / "blobs/00/ro").write_bytes(data)
        os.chmod(root / "blobs/00/ro", 0o644)
        if self.name == "local":
            # The tests run as root, which ignores modes: make the tree immutable.
            subprocess.run(["chattr", "-R", "+i", str(root)], check=True)
            self.cleanups.append(lambda: subprocess.run(["chattr", "-R", "-i", str(root)], check=True))
        # sftp: root owns the tree; the SFTP test user may read but not write.
        return where, data


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path: Path) -> Iterator[Backend]:
    name = request.param
    s3 = request.getfixturevalue("seaweedfs_server") if name == "s3" else None
    ssh = request.getfixturevalue("sshd_server") if name == "sftp" else None
    made = Backend(name, tmp_path, s3, ssh)
    yield made
    for cleanup in made.cleanups:
        cleanup()


def run(fn: Callable[..., Awaitable[object]], *args: object) -> object:
    return trio.run(fn, *args)


async def fresh(backend: Backend, where: str | None = None) -> Storage:
    storage = backend.storage(where)
    await storage.create()
    return storage


# --- the contract -------------------------------------------------------------------


def test_put_if_absent_never_overwrites(backend: Backend) -> None:
    async def body() -> None:
        storage = await fresh(backend)
        try:
            assert storage.conditional_writes is True
            assert await storage.put("blobs/ab/first", b"one") is True
            assert await storage.put("blobs/ab/first", b"two") is False
            assert await storage.get("blobs/ab/first") == b"one"
            assert await storage.exists("blobs/ab/first")
            # a second writer (another connection) is refused too
            other = backend.storage(_where(storage, backend))
            await other.connect()
            try:
                assert await other.put("blobs/ab/first", b"three") is False
            finally:
                await other.aclose()
            assert await storage.get("blobs/ab/first") == b"one"
        finally:
            await storage.aclose()

    run(body)


def _where(storage: Storage, backend: Backend) -> str:
    if isinstance(storage, LocalStorage):
        return os.path.basename(storage.root)
    if isinstance(storage, S3Storage):
        return storage.location.prefix
    assert isinstance(storage, SFTPStorage)
    return os.path.basename(storage.root)


def test_roundtrip_sizes_and_long_names(backend: Backend) -> None:
    big = os.urandom(9 << 20)  # several SFTP write requests, a large S3 body
    tag = "tags/" + "A" * 230  # tag objects carry their data in a ~230-character name

    async def body() -> None:
        storage = await fresh(backend)
        try:
            assert await storage.put("blobs/00/empty", b"")
            assert await storage.put("blobs/01/big", big)
            assert await storage.put(tag, b"")
            assert await storage.put("rekkord", bytearray(b"identity"))
            assert await storage.get("blobs/00/empty") == b""
            assert await storage.get("blobs/01/big") == big
            assert await storage.get(tag) == b""
            assert await storage.get("rekkord") == b"identity"
            assert await storage.list("tags/") == [tag]
        finally:
            await storage.aclose()

    run(body)


def test_put_pieces(backend: Backend) -> None:
    """A pack's blobs stored as one object: more pieces than one writev() takes
    (local), empty ones, a large one; put-if-absent as put()."""
    pieces: list[bytes | bytearray] = [os.urandom(i % 700) for i in range(2500)]
    pieces += [b"", bytearray(os.urandom(5 << 20)), b"end"]

    async def body() -> None:
        storage = RetryingStorage(await fresh(backend), RetryPolicy(budget=5))
        try:
            assert await storage.put_pieces("packs/00/p", pieces)
            assert await storage.get("packs/00/p") == b"".join(pieces)
            assert not await storage.put_pieces("packs/00/p", [b"other"])
            assert await storage.get("packs/00/p") == b"".join(pieces)
        finally:
            await storage.aclose()

    run(body)


def test_local_pieces_written_whole_after_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """writev() may write less than asked, ending inside a piece: the rest follows."""
    from rekkordfs.storage import local

    real_writev = os.writev

    def short_writev(fd: int, buffers: list[memoryview]) -> int:
        return real_writev(fd, [bytes(memoryview(b"".join(bytes(b) for b in buffers[:3]))[:1000])])

    monkeypatch.setattr(local.os, "writev", short_writev)
    pieces: list[bytes | bytearray] = [os.urandom(n) for n in (0, 1, 999, 1000, 1001, 4096, 3, 0, 2500)]
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        local._write_all(fd, pieces)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(pieces)


def test_get_range(backend: Backend) -> None:
    data = os.urandom(3 << 20)

    async def body() -> None:
        storage = await fresh(backend)
        try:
            await storage.put("blobs/0a/ranged", data)
            assert await storage.get_range("blobs/0a/ranged", 0, 10) == data[:10]
            assert await storage.get_range("blobs/0a/ranged", 1_000_001, 1_500_000) == data[1_000_001:2_500_001]
            assert await storage.get_range("blobs/0a/ranged", len(data) - 5, 100) == data[-5:]  # short at the end
            assert await storage.get_range("blobs/0a/ranged", len(data) + 10, 100) == b""
            with pytest.raises(ObjectMissing):
                await storage.get_range("blobs/0a/absent", 0, 10)
        finally:
            await storage.aclose()

    run(body)


def test_object_size(backend: Backend) -> None:
    """What RetryingStorage asks when a retried put finds the object already there."""
    async def body() -> None:
        storage = await fresh(backend)
        try:
            await storage.put("blobs/0b/sized", os.urandom(123_457))
            await storage.put("blobs/0b/empty", b"")
            assert await storage.object_size("blobs/0b/sized") == 123_457
            assert await storage.object_size("blobs/0b/empty") == 0
            with pytest.raises(ObjectMissing):
                await storage.object_size("blobs/0b/absent")
        finally:
            await storage.aclose()

    run(body)


def test_list_details_and_nested_deletes(backend: Backend) -> None:
    """Sizes and times for prune; a tag's two-level name leaves no folder behind."""
    async def body() -> None:
        storage = await fresh(backend)
        try:
            before = time.time_ns() - 5 * 10**9  # servers' clocks: second resolution
            await storage.put("tags/abc/def", b"")
            await storage.put("packs/0c/pack", os.urandom(4321))
            details = await storage.list_details("")
            assert details["packs/0c/pack"].size == 4321 and details["tags/abc/def"].size == 0
            assert all(before <= info.mtime_ns <= time.time_ns() + 5 * 10**9 for info in details.values())
            assert set(await storage.list_details("tags/")) == {"tags/abc/def"}
            await storage.delete("tags/abc/def")
            assert await storage.list("tags/") == []
            assert await storage.put("tags/abc/def", b"")  # the folder comes back on demand
            await storage.delete("packs/0c/pack")
            assert await storage.put("packs/0c/other", b"x")
        finally:
            await storage.aclose()

    run(body)


def test_missing_object(backend: Backend) -> None:
    async def body() -> None:
        storage = await fresh(backend)
        try:
            assert not await storage.exists("blobs/ff/nothing")
            with pytest.raises(ObjectMissing):
                await storage.get("blobs/ff/nothing")
            with pytest.raises(ObjectMissing):
                await storage.get("blobs/zz/no-such-folder")
            assert await storage.list("nothing/") == []
        finally:
            await storage.aclose()

    run(body)


def test_missing_location_is_object_missing(backend: Backend) -> None:
    async def body() -> None:
        where = f"absent-{secrets.token_hex(4)}"
        storage = backend.storage(where, make=False)
        try:
            with pytest.raises(ObjectMissing):
                await storage.connect()
                await storage.get("rekkord")
        finally:
            await storage.aclose()

    run(body)


def test_list_many_objects(backend: Backend) -> None:
    count = 1100  # more than one ListObjectsV2 page

    async def body() -> None:
        storage = await fresh(backend)
        try:
            expected = {f"blobs/{i % 256:02x}/{i:064x}" for i in range(count)}
            async with trio.open_nursery() as nursery:
                for key in expected:
                    nursery.start_soon(storage.put, key, key.encode())
            await storage.put("tags/one", b"")
            await storage.put("rekkord", b"x")
            await storage.flush()
            listed = await storage.list("blobs/")
            assert len(listed) == count
            assert set(listed) == expected
            assert await storage.list("tags/") == ["tags/one"]
        finally:
            await storage.aclose()

    run(body)


def test_delete(backend: Backend) -> None:
    async def body() -> None:
        storage = await fresh(backend)
        try:
            await storage.put("blobs/aa/gone", b"x")
            await storage.put("blobs/aa/kept", b"y")
            await storage.delete("blobs/aa/gone")
            await storage.delete("blobs/aa/gone")  # absent: not an error
            assert not await storage.exists("blobs/aa/gone")
            assert await storage.list("blobs/") == ["blobs/aa/kept"]
            assert await storage.put("blobs/aa/gone", b"again") is True
            assert await storage.get("blobs/aa/gone") == b"again"
        finally:
            await storage.aclose()

    run(body)


def test_concurrent_puts_and_gets(backend: Backend) -> None:
    blobs = {f"blobs/{i % 256:02x}/c{i}": os.urandom(1000 + 97 * i) for i in range(200)}

    async def body() -> None:
        storage = await fresh(backend)
        results: list[bool] = []
        read: dict[str, bytes] = {}
        try:
            async with trio.open_nursery() as nursery:
                for key, data in blobs.items():
                    nursery.start_soon(storage.put, key, data)

                async def racer(i: int) -> None:
                    results.append(await storage.put("blobs/ee/race", b"racer %d" % i))

                for i in range(24):
                    nursery.start_soon(racer, i)
            assert results.count(True) == 1
            winner = await storage.get("blobs/ee/race")
            assert winner.startswith(b"racer ")

            async def reader(key: str) -> None:
                read[key] = await storage.get(key)

            async with trio.open_nursery() as nursery:
                for key in blobs:
                    nursery.start_soon(reader, key)
            assert read == blobs
        finally:
            await storage.aclose()

    run(body)


def test_permission_denied(backend: Backend) -> None:
    where, data = backend.read_only_location()

    async def body() -> None:
        storage = backend.storage(where, reader=True)
        try:
            await storage.connect()
            assert await storage.get("blobs/00/ro") == data
            with pytest.raises(StorageError) as caught:
                await storage.put("blobs/00/new", b"x")
            assert not isinstance(caught.value, ObjectMissing)
            assert DENIED.search(caught.value.message), caught.value.message
            assert "\n" not in caught.value.message
        finally:
            await storage.aclose()

    run(body)


def test_flush_then_visible_from_a_new_connection(backend: Backend) -> None:
    async def body() -> None:
        storage = await fresh(backend)
        where = _where(storage, backend)
        try:
            for i in range(20):
                await storage.put(f"blobs/{i:02x}/f", b"%d" % i)
            await storage.flush()
        finally:
            await storage.aclose()
        again = backend.storage(where)
        try:
            await again.connect()
            assert sorted(await again.list("blobs/")) == [f"blobs/{i:02x}/f" for i in range(20)]
            assert await again.get("blobs/13/f") == b"19"
        finally:
            await again.aclose()

    run(body)


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch, below: Path) -> list[str]:
    """The paths below `below` fsynced from now on, by flush() or in the
    background, in order (earlier tests' storages may still sync theirs)."""
    import rekkordfs.storage.local as local
    import rekkordfs.storage.localsync as localsync

    synced: list[str] = []
    real = localsync.fsync_path

    def record(path: str) -> None:
        real(path)
        if path.startswith(f"{below}/"):
            synced.append(path)

    monkeypatch.setattr(local, "fsync_path", record)
    monkeypatch.setattr(localsync, "fsync_path", record)
    return synced


def _wait_idle(storage: LocalStorage) -> None:
    deadline = time.monotonic() + 30
    while not storage._unsynced.idle():
        assert time.monotonic() < deadline, "the background fsyncs never ended"
        time.sleep(0.01)


def test_local_flush_syncs_what_was_written_and_nothing_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each object written since the last flush and its folder are fsynced
    (by flush(), or in the background before it), each object before its
    folder; a staged file elsewhere on the same disk is not synced with them."""
    synced = _record_fsyncs(monkeypatch, tmp_path)

    async def body() -> None:
        storage = LocalStorage(str(tmp_path / "repo"))
        await storage.create()
        keys = ["index/first", "packs/1f/pack", "index/second"]
        for key in keys:
            assert await storage.put(key, os.urandom(2 << 20 if key.startswith("packs") else 100))
        assert not await storage.put(keys[0], b"again")  # taken: nothing new to sync
        (tmp_path / "other-file").write_bytes(b"not the repository's")
        await storage.flush()
        _wait_idle(storage)
        root = str(tmp_path / "repo")
        objects = {os.path.join(root, key) for key in keys}
        # folders are made on demand: each one up to the root holds a new name
        folders = {os.path.join(root, folder) for folder in ("index", "packs/1f", "packs")} | {root}
        assert set(synced) == objects | folders
        pack = os.path.join(root, "packs/1f/pack")
        last = len(synced) - 1 - synced[::-1].index(os.path.join(root, "packs/1f"))
        assert synced.index(pack) < last
        synced.clear()
        await storage.flush()
        assert synced == []
        await storage.aclose()

    run(body)


def test_local_objects_are_synced_in_the_background(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects and their folders are fsynced as they are written: a flush after
    the background caught up syncs only the folders above them."""
    synced = _record_fsyncs(monkeypatch, tmp_path)

    async def body() -> None:
        storage = LocalStorage(str(tmp_path / "repo"))
        await storage.create()
        root = str(tmp_path / "repo")
        keys = ["packs/1f/pack", "index/first", "index/second"]
        for key in keys:
            assert await storage.put(key, os.urandom(2 << 20 if key.startswith("packs") else 100))
        _wait_idle(storage)
        assert {os.path.join(root, key) for key in keys} | {os.path.join(root, "packs/1f"),
                                                              os.path.join(root, "index")} == set(synced)
        synced.clear()
        await storage.flush()
        assert sorted(synced) == sorted([root, os.path.join(root, "packs")])
        await storage.aclose()

    run(body)


def test_create_refuses_a_non_empty_location(backend: Backend) -> None:
    async def body() -> None:
        storage = await fresh(backend)
        where = _where(storage, backend)
        await storage.put("stranger.txt", b"not ours")
        await storage.aclose()
        again = backend.storage(where)
        try:
            with pytest.raises(StorageError, match="not empty"):
                await again.create()
        finally:
            await again.aclose()

    run(body)


# --- S3 specifics -----------------------------------------------------------------------


class S3Proxy:
    """A re-signing HTTP proxy in front of SeaweedFS: can drop If-None-Match (a host
    without conditional writes), fail the next requests with 503 or 400, and counts
    what it forwards. Re-signing is needed because the client signs If-None-Match."""

    def __init__(self, upstream: SeaweedFS) -> None:
        self.upstream = upstream
        self.ignore_if_none_match = False
        self.fail_next: list[int] = []  # statuses to answer instead of forwarding
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy.forward(self)

            do_PUT = do_HEAD = do_DELETE = do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def puts(self, prefix: str) -> list[str]:
        """Paths of every PUT forwarded so far under prefix, in order."""
        with self._lock:
            return [path for method, path in self.requests if method == "PUT" and path.startswith(prefix)]

    def forward(self, handler: BaseHTTPRequestHandler) -> None:
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self._lock:
            self.requests.append((handler.command, urlsplit(handler.path).path))
            status = self.fail_next.pop(0) if self.fail_next else None
        if status is not None:
            payload = (f"<?xml version=\"1.0\"?><Error><Code>{'SlowDown' if status == 503 else 'BadRequest'}"
                       f"</Code><Message>injected</Message></Error>").encode()
            self._reply(handler, status, [("Content-Type", "application/xml")], payload)
            return
        dropped = {"host", "authorization", "x-amz-date", "x-amz-content-sha256", "content-length",
                   "connection", "expect", "accept-encoding"}
        if self.ignore_if_none_match:
            dropped.add("if-none-match")
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in dropped}
        request = AWSRequest(method=handler.command, url=self.upstream.endpoint + handler.path,
                             data=body, headers=headers)
        S3SigV4Auth(Credentials(self.upstream.access_key, self.upstream.secret_key), "s3",
                    "us-east-1").add_auth(request)
        prepared = request.prepare()
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream.s3_port, timeout=60)
        try:
            conn.request(handler.command, handler.path, body=body or None, headers=dict(prepared.headers))
            response = conn.getresponse()
            payload = response.read()
            kept = [(k, v) for k, v in response.getheaders()
                    if k.lower() not in ("transfer-encoding", "connection", "content-length")]
            self._reply(handler, response.status, kept, payload, head=handler.command == "HEAD",
                        length=response.getheader("Content-Length"))
        finally:
            conn.close()

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]], payload: bytes,
               head: bool = False, length: str | None = None) -> None:
        handler.send_response(status)
        for key, value in headers:
            handler.send_header(key, value)
        handler.send_header("Content-Length", length if head and length else str(len(payload)))
        handler.end_headers()
        if not head:
            handler.wfile.write(payload)


@contextmanager
def s3_proxy(server: SeaweedFS) -> Iterator[S3Proxy]:
    proxy = S3Proxy(server)
    try:
        yield proxy
    finally:
        proxy.close()


def _proxied_storage(proxy: S3Proxy, server: SeaweedFS, prefix: str) -> S3Storage:
    location = parse_url(f"{proxy.endpoint}/{BUCKET}/{prefix}")
    return S3Storage(location, S3Settings(server.access_key, server.secret_key))


def test_s3_host_ignoring_if_none_match_is_detected(seaweedfs_server: SeaweedFS) -> None:
    with s3_proxy(seaweedfs_server) as proxy:
        proxy.ignore_if_none_match = True

        async def body() -> None:
            storage = _proxied_storage(proxy, seaweedfs_server, f"nocond-{secrets.token_hex(4)}")
            try:
                await storage.create()
                assert storage.conditional_writes is False
                # the identity object is still never replaced (checked before writing)
                assert await storage.put("rekkord", b"first") is True
                assert await storage.put("rekkord", b"second") is False
                assert await storage.get("rekkord") == b"first"
            finally:
                await storage.aclose()

        run(body)


def test_s3_without_conditional_writes_save_twice_rewrites_no_blob(seaweedfs_server: SeaweedFS,
                                                                   tmp_path: Path, rekkord) -> None:
    """On a host that would overwrite, nothing is ever written twice under one
    name, and a second save from an empty local cache learns the stored chunks
    from the pack indexes and uploads none of them again."""
    source = tmp_path / "src"
    source.mkdir()
    for i in range(12):
        (source / f"file{i}").write_bytes(os.urandom(300_000 + i))
    (source / "sub").mkdir()
    (source / "sub" / "small").write_text("hello")
    prefix = f"nocond-cli-{secrets.token_hex(4)}"
    with s3_proxy(seaweedfs_server) as proxy:
        proxy.ignore_if_none_match = True
        config = write_config(tmp_path / "s3.ini", f"{proxy.endpoint}/{BUCKET}/{prefix}",
                              seaweedfs_server.config_sections())
        master = tmp_path / "master.key"
        rekkord("-C", str(config), "init", "-K", str(master))
        everything, packs = f"/{BUCKET}/{prefix}/", f"/{BUCKET}/{prefix}/packs/"
        first = json.loads(rekkord("-C", str(config), "-K", str(master), "save", "docs", str(source),
                                   "-f", "json").stdout)
        assert first["bytes_new"] == 3_600_066 + 5 and len(proxy.puts(packs)) >= 2  # data and records

        rekkord.cache_dir = tmp_path / "other-cache"  # forget what this machine wrote
        rekkord.cache_dir.mkdir()
        second = json.loads(rekkord("-C", str(config), "-K", str(master), "save", "docs", str(source),
                                    "-f", "json").stdout)
        assert second["bytes_new"] == 0  # every chunk known from the pack indexes
        # no name was written twice (but the probe object, written twice to learn the host)
        puts = [path for path in proxy.puts(everything) if not path.endswith(PROBE_KEY)]
        assert len(puts) == len(set(puts))
        with pytest.raises(AssertionError):
            rekkord("-C", str(config), "init", "-K", str(tmp_path / "again.key"))
        assert rekkord("-C", str(config), "-K", str(master), "check").returncode == 0


def _keys(server: SeaweedFS, prefix: str) -> list[str]:
    paginator = server.client().get_paginator("list_objects_v2")
    return [item["Key"] for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix)
            for item in page.get("Contents", ())]


def test_s3_retries_server_errors_but_not_client_errors(seaweedfs_server: SeaweedFS) -> None:
    """S3 answers 503 SlowDown: transient (retried by RetryingStorage, within its
    budget); 400: final at once."""
    with s3_proxy(seaweedfs_server) as proxy:

        async def body() -> None:
            raw = _proxied_storage(proxy, seaweedfs_server, f"retry-{secrets.token_hex(4)}")
            storage = RetryingStorage(raw, RetryPolicy(budget=1.0, first_delay=0.01))
            try:
                await storage.create()
                proxy.fail_next = [503]
                with pytest.raises(TransientStorageError, match="SlowDown"):
                    await raw.get("rekkord.probe")  # the backend itself only classifies
                proxy.fail_next = [503, 503]
                count = len(proxy.requests)
                assert await storage.put("blobs/00/a", b"data") is True
                assert len(proxy.requests) - count == 3  # two failures, then success
                proxy.fail_next = [400]
                count = len(proxy.requests)
                with pytest.raises(StorageError, match="BadRequest"):
                    await storage.get("blobs/00/a")
                assert len(proxy.requests) - count == 1
                proxy.fail_next = [503] * 100_000
                with pytest.raises(StorageError, match=r"^gave up after 1 s of retries to read 'blobs/00/a': "
                                                       r"S3 could not read .*SlowDown"):
                    await storage.get("blobs/00/a")
                proxy.fail_next = []
            finally:
                await storage.aclose()

        run(body)


@contextmanager
def _resolve_localhost_subdomains() -> Iterator[None]:
    """Resolve <bucket>.localhost to 127.0.0.1 in this process (as systemd-resolved
    would), so virtual-host addressing reaches SeaweedFS (-s3.domainName=localhost)."""
    original = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(host, str) and host.endswith(".localhost"):
            host = "127.0.0.1"
        return original(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
    try:
        yield
    finally:
        socket.getaddrinfo = original  # type: ignore[assignment]


def test_s3_virtual_host_addressing(seaweedfs_server: SeaweedFS) -> None:
    from rekkordfs.config import S3Location

    prefix = f"vhost-{secrets.token_hex(4)}"
    location = S3Location(f"http://localhost:{seaweedfs_server.s3_port}", BUCKET, prefix, None, path_style=False)

    async def body() -> None:
        storage = S3Storage(location, S3Settings(seaweedfs_server.access_key, seaweedfs_server.secret_key))
        try:
            await storage.create()
            assert await storage.put("blobs/00/v", b"virtual")
            assert await storage.get("blobs/00/v") == b"virtual"
        finally:
            await storage.aclose()

    with _resolve_localhost_subdomains():
        run(body)
    # the object really is in BUCKET under the prefix
    got = seaweedfs_server.client().get_object(Bucket=BUCKET, Key=f"{prefix}/blobs/00/v")["Body"].read()
    assert got == b"virtual"


def test_s3_region_and_prefix_from_url(seaweedfs_server: SeaweedFS) -> None:
    location = parse_url(f"{seaweedfs_server.endpoint}/{BUCKET}/deep/er/prefix")
    storage = S3Storage(location, S3Settings("k", "s", region="eu-west-3"))
    assert storage.region == "eu-west-3"
    assert location.prefix == "deep/er/prefix"
    aws = S3Storage(parse_url("https://mybucket.s3.eu-central-1.amazonaws.com/x"), S3Settings("k", "s", "us-west-2"))
    assert aws.region == "eu-central-1"  # the URL wins over the settings
    assert aws.location.path_style is False


# --- long-lived connections (the mount) survive a server restart ---------------------------


def test_storages_reconnect_after_a_server_restart(tmp_path: Path) -> None:
    from tests.servers import openssh_server, seaweedfs

    with seaweedfs(buckets=(BUCKET,)) as s3, openssh_server() as ssh:
        backends = [Backend("s3", tmp_path, s3=s3), Backend("sftp", tmp_path, ssh=ssh)]

        async def body() -> None:
            storages = [b.storage() for b in backends]
            for storage in storages:
                await storage.create()
            try:
                for storage in storages:
                    assert await storage.put("blobs/00/before", b"1")
                s3.stop()
                ssh.stop()
                for storage in storages:  # down: a clear error, not a hang, that a retry may cure
                    with pytest.raises(TransientStorageError, match="connection refused|lost connection"):
                        await storage.get("blobs/00/before")
                s3.start()
                ssh.start()
                for storage in storages:  # back: the same objects work again
                    assert await storage.get("blobs/00/before") == b"1"
                    assert await storage.put("blobs/00/after", b"2")
            finally:
                for storage in storages:
                    await storage.aclose()

        run(body)
