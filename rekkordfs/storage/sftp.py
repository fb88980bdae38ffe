"""Repository on an SFTP server, over asyncssh.

asyncssh runs on its own asyncio loop in one dedicated thread (asyncbridge.py),
so many requests are in flight at once over one SSH connection.

Writes never overwrite: data goes to tmp/<random> first, then gets its final
name with hardlink@openssh.com (or a plain SFTP rename, which the protocol
defines as failing when the target exists), so a crash never leaves a partial
object under a real name.

Host keys are verified like ssh does, and logins refused are explained (sftp_hosts.py).
"""

from __future__ import annotations

import asyncio
import errno
import getpass
import logging
import posixpath
import secrets
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import trio

from ..config import SFTPLocation, SFTPSettings
from ..errors import ObjectMissing, RekkordError, StorageError, TransientStorageError
from ..tuning import sftp_requests
from .asyncbridge import AsyncioThread
from .base import ObjectInfo, Storage
from .sftp_hosts import DEFAULT_PORT, HostClient, load_client_key
from .sftp_reads import read_piece, read_span
from .sftp_transport import DirectTCP

T = TypeVar("T")
log = logging.getLogger(__name__)

# SFTP channels on the one SSH connection: OpenSSH serves each channel with one
# sequential sftp-server, which blocks on every disk write and fsync; a few
# channels keep the server side busy in parallel.
SESSIONS = 4
# Ciphers with hardware (AES-NI) support first: the transport is the bottleneck.
CIPHERS = [
    "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
    "aes128-ctr", "aes192-ctr", "aes256-ctr",
]
class SFTPStorage(Storage):
    conditional_writes = True

    def __init__(self, location: SFTPLocation, settings: SFTPSettings, threads: int = 4) -> None:
        self.location = location
        self.settings = settings
        self.port = location.port or settings.port or DEFAULT_PORT
        self.user = location.user or getpass.getuser()
        root = location.path.rstrip("/") or "/"
        self.root = root
        self._requests = trio.Semaphore(sftp_requests(threads))
        self._thread: AsyncioThread | None = None
        self._conn: Any = None
        self._sessions: list[Any] = []  # SFTP clients, one per channel
        self._busy: list[int] = []  # operations running on each
        self._connecting: asyncio.Lock | None = None
        self._fsync = True  # until the server says it lacks fsync@openssh.com
        self._closing: set[asyncio.Future[Any]] = set()
        # Has a TCP connection to the server ever been made in this process? Then a
        # connection lost later (even mid-handshake: sshd's MaxStartups drops them)
        # is the server's doing, not a wrong address: retried from the first request.
        self._reached = False

    @property
    def description(self) -> str:
        return self.location.describe()

    @property
    def host_port(self) -> str:
        return f"{self.location.host}:{self.port}"

    @property
    def login(self) -> str:
        return f"{self.user}@{self.host_port}"

    def _path(self, key: str) -> str:
        return posixpath.join(self.root, key) if key else self.root

    # --- lifecycle -------------------------------------------------------------

    async def connect(self) -> None:
        await self._run("connect to", "", self._noop)
        if not await self._run("open", "", self._isdir, self.root):
            raise ObjectMissing(f"no repository at {self.description}: folder does not exist")

    async def create(self) -> None:
        await self._run("create", "", self._create)

    async def aclose(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            with trio.move_on_after(5):
                await thread.run(self._close())
        finally:
            await trio.to_thread.run_sync(thread.stop)

    async def _close(self) -> None:
        conn, self._conn, self._sessions = self._conn, None, []
        if conn is not None:
            conn.close()
            await conn.wait_closed()

    # --- operations --------------------------------------------------------------

    async def put(self, key: str, data: bytes | bytearray) -> bool:
        return await self._run("write", key, self._put, key, bytes(data))

    async def get(self, key: str) -> bytes:
        return await self._run("read", key, self._get, key)

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        return await self._run("read", key, self._get_range, key, offset, length)

    async def exists(self, key: str) -> bool:
        return await self._run("check", key, self._exists, key)

    async def object_size(self, key: str) -> int:
        return await self._run("check", key, self._size, key)

    async def list(self, prefix: str) -> list[str]:
        return list(await self.list_details(prefix))

    async def list_details(self, prefix: str) -> dict[str, ObjectInfo]:
        return await self._run("list", prefix, self._list, prefix)

    async def delete(self, key: str) -> None:
        await self._run("delete", key, self._delete, key)

    # flush(): each put() fsyncs its file before naming it (fsync@openssh.com,
    # where the server offers it), so everything put so far is already durable.

    # --- the trio side -----------------------------------------------------------

    async def _run(self, action: str, key: str, op: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run op(*args) on the asyncio thread, once: storage/retry.py retries
        what _error() calls transient, and the next attempt connects again."""
        if self._thread is None:
            self._thread = AsyncioThread(f"sftp {self.location.host}")
        async with self._requests:
            try:
                return await self._thread.run(self._on_session(op, args))
            except RekkordError:
                raise
            except Exception as exc:
                raise self._error(exc, action, key) from None

    async def _on_session(self, op: Callable[..., Coroutine[Any, Any, T]], args: tuple[Any, ...]) -> T:
        """op(sftp, *args) on the least busy SFTP channel; a connection that broke
        under it is dropped, so that the next operation opens a new one."""
        await self._ensure_connected()
        conn, sessions, busy = self._conn, self._sessions, self._busy
        index = min(range(len(sessions)), key=busy.__getitem__)
        busy[index] += 1
        try:
            return await op(sessions[index], *args)
        except Exception as exc:
            if _link_failure(exc):
                self._drop(conn)
            raise
        finally:
            busy[index] -= 1

    # --- the asyncio side (runs on the SFTP thread) ---------------------------------

    async def _ensure_connected(self) -> None:
        if self._sessions:
            return
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if not self._sessions:
                await self._open_connection()

    async def _open_connection(self) -> None:
        import asyncssh

        settings = self.settings
        client = HostClient(self)
        options: dict[str, Any] = {
            "port": self.port,
            "username": self.user,
            "known_hosts": client.known_hosts,
            "client_factory": client.factory,
            "encryption_algs": CIPHERS,
            "compression_algs": None,  # blobs are compressed and encrypted already
            "connect_timeout": 15,
            "keepalive_interval": 30,
            # fewer, larger SSH packets: per-packet work is Python here
            "max_pktsize": 128 << 10,
            "window": 8 << 20,
            "tunnel": DirectTCP(on_connected=self._mark_reached),
        }
        if settings.key_file:
            options["client_keys"] = [load_client_key(settings.key_file)]
            options["agent_path"] = None
        elif settings.password:
            options["client_keys"] = None
            options["agent_path"] = None
        if settings.password:
            options["password"] = settings.password
        try:
            conn = await asyncssh.connect(self.location.host, **options)
        except asyncssh.HostKeyNotVerifiable:
            raise client.host_key_error() from None
        except asyncssh.PermissionDenied:
            raise StorageError(client.login_refused()) from None
        try:
            sessions = [await conn.start_sftp_client() for _ in range(SESSIONS)]
        except asyncssh.ChannelOpenError as exc:
            lost = conn.is_closed() or (exc.code == asyncssh.OPEN_CONNECT_FAILED and "closed" in exc.reason)
            conn.close()
            if lost:
                # the connection went away while the channels were opening (asyncssh
                # says ChannelOpenError 'SSH connection closed'): lost, not refused
                raise asyncssh.ConnectionLost(exc.reason) from None
            raise
        except BaseException:
            conn.close()
            raise
        self._conn, self._sessions, self._busy = conn, sessions, [0] * len(sessions)

    def _mark_reached(self) -> None:
        self._reached = True

    def _drop(self, conn: Any) -> None:
        """Forget a broken connection (unless another operation replaced it already)."""
        if conn is not self._conn:
            return
        conn.abort()
        self._conn, self._sessions = None, []

    async def _create(self, sftp: Any) -> None:
        if await sftp.exists(self.root):
            if not await sftp.isdir(self.root):
                raise StorageError(f"{self.description} exists and is not a folder")
            existing = set(await sftp.listdir(self.root)) - {".", ".."}
            if existing and "rekkord" not in existing:
                raise StorageError(f"folder {self.description} is not empty")
        await sftp.makedirs(self._path("tmp"), exist_ok=True)  # other folders are made on demand

    async def _noop(self, sftp: Any) -> None:
        pass

    async def _isdir(self, sftp: Any, path: str) -> bool:
        return bool(await sftp.isdir(path))

    async def _put(self, sftp: Any, key: str, data: bytes) -> bool:
        """Four round trips: open, writes, fsync+close, rename."""
        import asyncssh

        final = self._path(key)
        tmp = self._path(f"tmp/{secrets.token_hex(12)}")
        await self._retry_missing_folder(sftp, tmp, lambda: self._write_file(sftp, tmp, data))
        try:
            # SFTP v3 rename fails when the target exists (OpenSSH links then
            # unlinks), unlike posix-rename@openssh.com which would replace it.
            await self._retry_missing_folder(sftp, final, lambda: sftp.rename(tmp, final))
        except asyncssh.SFTPFailure:
            self._forget(sftp, tmp)
            if await sftp.exists(final):  # OpenSSH answers a generic failure for EEXIST
                return False
            raise
        except BaseException:
            self._forget(sftp, tmp)
            raise
        return True

    async def _write_file(self, sftp: Any, path: str, data: bytes) -> None:
        import asyncssh

        handle = await sftp.open(path, "wb")
        try:
            await handle.write(data)
        except BaseException:
            self._background(handle.close())
            raise
        # One round trip for both: the server handles a channel's requests in order.
        steps = [handle.fsync()] if self._fsync else []
        for result in await asyncio.gather(*steps, handle.close(), return_exceptions=True):
            if isinstance(result, asyncssh.SFTPOpUnsupported):
                self._fsync = False  # a server without fsync@openssh.com
            elif isinstance(result, BaseException):
                raise result

    def _forget(self, sftp: Any, path: str) -> None:
        """Remove a temporary file in the background (best effort)."""
        self._background(sftp.remove(path))

    def _background(self, awaitable: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._closing.add(task)

        def done(finished: asyncio.Future[Any]) -> None:
            self._closing.discard(finished)
            if not finished.cancelled():
                finished.exception()  # retrieved: a failed cleanup is not worth an error

        task.add_done_callback(done)

    async def _retry_missing_folder(self, sftp: Any, path: str, action: Callable[[], Awaitable[None]]) -> None:
        import asyncssh

        try:
            await action()
        except asyncssh.SFTPNoSuchFile:
            await sftp.makedirs(posixpath.dirname(path), exist_ok=True)
            await action()

    async def _get(self, sftp: Any, key: str) -> bytes:
        """Two round trips: stat and open together, then all reads in parallel."""
        path = self._path(key)
        attrs: Any
        handle: Any
        attrs, handle = await asyncio.gather(sftp.stat(path), sftp.open(path, "rb", block_size=0),
                                             return_exceptions=True)
        if isinstance(handle, BaseException):
            raise handle
        try:
            if isinstance(attrs, BaseException):
                raise attrs
            return await read_span(handle, 0, attrs.size, read_piece(sftp))
        finally:
            self._background(handle.close())  # nothing waits for the close

    async def _get_range(self, sftp: Any, key: str, offset: int, length: int) -> bytes:
        handle = await sftp.open(self._path(key), "rb", block_size=0)
        try:
            return await read_span(handle, offset, length, read_piece(sftp))
        finally:
            self._background(handle.close())

    async def _size(self, sftp: Any, key: str) -> int:
        return int((await sftp.stat(self._path(key))).size)

    async def _exists(self, sftp: Any, key: str) -> bool:
        return bool(await sftp.exists(self._path(key)))

    async def _delete(self, sftp: Any, key: str) -> None:
        import asyncssh

        try:
            await sftp.remove(self._path(key))
        except asyncssh.SFTPNoSuchFile:
            pass
        folder = posixpath.dirname(key)
        if "/" in folder:  # a folder made for this object alone (a tag's) goes with it
            try:
                await sftp.rmdir(self._path(folder))
            except asyncssh.SFTPError:
                pass  # not empty, or gone: either is fine

    async def _list(self, sftp: Any, prefix: str) -> dict[str, ObjectInfo]:
        import asyncssh

        found: dict[str, ObjectInfo] = {}
        start = prefix.rstrip("/")

        async def walk(rel: str) -> None:
            try:
                names = await sftp.readdir(self._path(rel))
            except asyncssh.SFTPNoSuchFile:
                return
            subdirs: list[str] = []
            for item in names:
                name = item.filename
                if name in (".", ".."):
                    continue
                child = f"{rel}/{name}" if rel else name
                if item.attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY:
                    subdirs.append(child)
                else:
                    found[child] = ObjectInfo(item.attrs.size or 0, int((item.attrs.mtime or 0) * 1e9))
            await _gather_limited([walk(d) for d in subdirs], 32)

        await walk(start)
        return found

    # --- errors ------------------------------------------------------------------

    def _error(self, exc: BaseException, action: str, key: str) -> StorageError:
        import asyncssh

        where = f"'{self._path(key)}' on {self.login}"
        if _link_failure(exc):
            return TransientStorageError(self._link_message(exc), answered=self._reached)
        if isinstance(exc, asyncssh.SFTPNoSuchFile):
            if action in ("read", "check"):
                return ObjectMissing(f"object '{key}' is missing from {self.description}")
            return StorageError(f"cannot {action} {where}: no such file or folder")
        if isinstance(exc, asyncssh.SFTPPermissionDenied):
            return StorageError(f"cannot {action} {where}: permission denied")
        if isinstance(exc, asyncssh.SFTPNoSpaceOnFilesystem):
            return StorageError(f"cannot {action} {where}: no space left on the server")
        if isinstance(exc, asyncssh.SFTPError):
            return StorageError(f"cannot {action} {where}: {_one_line(exc.reason) or 'failure'}")
        if isinstance(exc, socket.gaierror):
            return StorageError(f"cannot resolve SFTP host name '{self.location.host}'")
        if isinstance(exc, asyncssh.DisconnectError):
            return StorageError(f"SFTP server {self.host_port} closed the connection: {_one_line(exc.reason)}")
        if isinstance(exc, OSError):
            return StorageError(f"cannot connect to SFTP server {self.host_port}: {exc.strerror or exc}")
        if isinstance(exc, asyncssh.Error):
            return StorageError(f"SSH error with {self.host_port}: {_one_line(exc.reason)}")
        raise exc

    def _link_message(self, exc: BaseException) -> str:
        import asyncssh

        if isinstance(exc, ConnectionRefusedError):
            return f"cannot connect to SFTP server {self.host_port}: connection refused"
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return f"SFTP server {self.host_port} timed out"
        if type(exc) is asyncssh.DisconnectError:
            return f"SFTP server {self.host_port} closed the connection: {_one_line(exc.reason)}"
        if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
            return f"cannot connect to SFTP server {self.host_port}: {exc.strerror or exc}"
        return f"lost connection to SFTP server {self.host_port}"


# Network errors that a new connection may not meet (not DNS: gaierror is apart).
_NETWORK_ERRNOS = {errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}


def _link_failure(exc: BaseException) -> bool:
    """True when the connection (not the request) failed: worth a new connection
    and another try. Refusals of the login or of the host key are final."""
    import asyncssh

    if isinstance(exc, (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection, asyncssh.ConnectionLost,
                        asyncssh.MACError, ConnectionError, asyncio.TimeoutError, TimeoutError)):
        return True
    if type(exc) is asyncssh.DisconnectError:  # the server closing (shutdown, too many connections)
        return True
    return isinstance(exc, OSError) and not isinstance(exc, socket.gaierror) and exc.errno in _NETWORK_ERRNOS


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


async def _gather_limited(coros: list[Coroutine[Any, Any, Any]], limit: int) -> None:
    """Run coroutines concurrently, at most limit at a time; first error wins."""
    sem = asyncio.Semaphore(limit)

    async def one(coro: Coroutine[Any, Any, Any]) -> None:
        async with sem:
            await coro

    tasks = [asyncio.ensure_future(one(c)) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
