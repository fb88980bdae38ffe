"""Repository in an S3 bucket (any S3-compatible server).

Requests are signed and sent by s3http.py (http.client, one connection per
worker thread); every call runs in a worker thread under this backend's own
CapacityLimiter. Nothing is retried there: each failure (raised as botocore's
exceptions) is classified here as transient or not, and storage/retry.py
retries the transient ones (its backoff sleeps on the trio loop, holding no
thread).

Writes never overwrite: put() sends `If-None-Match: *`. Whether the host
honours it is probed at connect/create (see _probe_conditional_writes); where
it does not, conditional_writes is False and put() looks for the object first
(docs/backends.md).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from ..config import S3Location, S3Settings, prompt_secret
from ..errors import ConfigError, ObjectMissing, StorageError, TransientStorageError
from ..tuning import s3_requests
from .base import ObjectInfo, Storage

T = TypeVar("T")

# Object used to learn whether the host refuses overwrites; never deleted, so
# after the first probe a single refused PUT answers the question.
PROBE_KEY = "rekkord.probe"

TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests",
    "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestLimitExceeded",
    # A concurrent conditional write is in progress: AWS asks to retry, and the
    # retry gets 412 if the other writer succeeded (returning False now could
    # lose the blob if that other writer then failed).
    "ConditionalRequestConflict",
}
# Status codes whose response may lack a body (HEAD): the code is the number.
BAD_SECRET_CODES = {"SignatureDoesNotMatch", "InvalidSignature"}
UNKNOWN_KEY_CODES = {"InvalidAccessKeyId", "InvalidClientTokenId", "UnrecognizedClientException"}
DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "Forbidden", "403"}


# one page of a listing (spelled here: inside the class, `list` is the method)
_Page = list[tuple[str, ObjectInfo]]


class S3Storage(Storage):
    def __init__(self, location: S3Location, settings: S3Settings, threads: int = 4) -> None:
        self.location = location
        self.settings = settings
        self.region = location.region or settings.region or "us-east-1"
        self._prefix = f"{location.prefix}/" if location.prefix else ""
        self._limiter = trio.CapacityLimiter(s3_requests(threads))
        self._client: Any = None
        self._client_lock = trio.Lock()
        self._connected = False
        self._listed = False  # connect()'s first request passed
        # Some hosts reject the If-None-Match header itself (501): stop sending it.
        self._send_if_none_match = True
        self.conditional_writes = True

    @property
    def description(self) -> str:
        return self.location.describe()

    # --- setup ---------------------------------------------------------------

    async def connect(self) -> None:
        if not self._connected:
            await self._make_client()
            if not self._listed:
                # The first request tells apart a bad secret, a missing bucket and a dead endpoint.
                await self._call("list", "", self._list_page_sync, self._prefix, None, 1)
                # A connect() retried after a failure resumes after the steps that passed:
                # each attempt needing all of them to pass in a row multiplies the odds
                # against it on a server that fails some requests.
                self._listed = True
            await self._probe_conditional_writes()
            self._connected = True

    async def create(self) -> None:
        await self._make_client()
        keys, _ = await self._call("list", "", self._list_page_sync, self._prefix, None, 10)
        others = [k for k in keys if k not in (self._prefix + "rekkord", self._prefix + PROBE_KEY)]
        if others:
            raise StorageError(f"{self.description} is not empty")
        await self._probe_conditional_writes()

    async def _make_client(self) -> None:
        async with self._client_lock:  # one client, one prompt, whoever asks first
            if self._client is None:
                await self._make_client_locked()

    async def _make_client_locked(self) -> None:
        key_id = self.settings.key_id
        if not key_id:
            raise ConfigError(
                "S3 access key ID is not set: set AccessKeyID in the [S3] section or AWS_ACCESS_KEY_ID"
            )
        secret = self.settings.secret_key
        if not secret:
            secret = await trio.to_thread.run_sync(prompt_secret, f"S3 secret key for key ID '{key_id}'")
        self._client = await trio.to_thread.run_sync(self._build_client, key_id, secret)

    def _build_client(self, key_id: str, secret: str) -> Any:
        from .s3http import S3Client

        return S3Client(self.location.endpoint, self.location.bucket, self.region, key_id, secret,
                        path_style=self.location.path_style)

    async def _probe_conditional_writes(self) -> None:
        """Put the probe object twice with If-None-Match: a host that honours it
        refuses one of the two (the first, when an earlier probe left it)."""
        try:
            for _ in range(2):
                if not await self._put_once(PROBE_KEY, [b""]):
                    self.conditional_writes = True
                    return
        except StorageError as exc:
            if "denied" in exc.message:
                return  # read-only credentials: nothing will be written anyway
            raise
        self.conditional_writes = False

    async def aclose(self) -> None:
        client, self._client = self._client, None
        self._connected = False
        if client is not None:
            await trio.to_thread.run_sync(client.close)

    # --- operations ------------------------------------------------------------

    async def put(self, key: str, data: bytes | bytearray) -> bool:
        return await self.put_pieces(key, [data])

    async def put_pieces(self, key: str, pieces: list[bytes | bytearray]) -> bool:
        # the pieces go out one after another, never joined into one more copy
        if not self.conditional_writes and await self.exists(key):
            # Without server-side refusal, at least never replace an object we can
            # see (the repository's names are random: only a race could still).
            return False
        return await self._put_once(key, pieces)

    async def _put_once(self, key: str, pieces: list[bytes | bytearray]) -> bool:
        return await self._call("write", key, self._put_sync, self._prefix + key, pieces)

    def _put_sync(self, full_key: str, pieces: list[bytes | bytearray]) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.put_object(full_key, pieces, if_none_match=self._send_if_none_match)
        except ClientError as exc:
            code, status = _code_status(exc)
            if code == "PreconditionFailed" or status == 412:
                return False
            if status == 501 and self._send_if_none_match:
                self._send_if_none_match = False
                self.conditional_writes = False
                self._client.put_object(full_key, pieces, if_none_match=False)
                return True
            raise
        return True

    async def get(self, key: str) -> bytes:
        return await self._call("read", key, self._get_sync, self._prefix + key)

    def _get_sync(self, full_key: str) -> bytes:
        data: bytes = self._client.get_object(full_key)
        return data

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        return await self._call("read", key, self._get_range_sync, self._prefix + key, offset, length)

    def _get_range_sync(self, full_key: str, offset: int, length: int) -> bytes:
        from botocore.exceptions import ClientError

        byte_range = f"bytes={offset}-{offset + length - 1}"
        try:
            data: bytes = self._client.get_object(full_key, byte_range)
        except ClientError as exc:
            if _code_status(exc)[0] == "InvalidRange":
                return b""  # 416: the range starts at or past the end, like reading past EOF
            raise
        return data

    async def exists(self, key: str) -> bool:
        return await self._call("check", key, self._exists_sync, self._prefix + key)

    def _exists_sync(self, full_key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(full_key)
        except ClientError as exc:
            if _code_status(exc)[1] == 404:
                return False
            raise
        return True

    async def object_size(self, key: str) -> int:
        return await self._call("check", key, self._size_sync, self._prefix + key)

    def _size_sync(self, full_key: str) -> int:
        return int(self._client.head_object(full_key))

    async def list(self, prefix: str) -> list[str]:
        return list(await self.list_details(prefix))

    async def list_details(self, prefix: str) -> dict[str, ObjectInfo]:
        found: dict[str, ObjectInfo] = {}
        token: str | None = None
        skip = len(self._prefix)
        while True:
            page, token = await self._call("list", prefix, self._list_page_sync, self._prefix + prefix, token, 1000)
            found.update((key[skip:], info) for key, info in page)
            if token is None:
                return found

    def _list_page_sync(self, full_prefix: str, token: str | None,
                        limit: int) -> tuple[_Page, str | None]:
        listed, more = self._client.list_objects(full_prefix, token, limit)
        return [(item.key, ObjectInfo(item.size, item.mtime_ns)) for item in listed], more

    async def delete(self, key: str) -> None:
        await self._call("delete", key, self._delete_sync, self._prefix + key)

    def _delete_sync(self, full_key: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.delete_object(full_key)
        except ClientError as exc:
            if _code_status(exc)[0] != "NoSuchKey":
                raise

    # flush(): an acknowledged PUT is durable on S3; nothing to do.

    # --- plumbing --------------------------------------------------------------

    async def _call(self, action: str, key: str, fn: Callable[..., T], *args: Any) -> T:
        """Run fn in a thread (once: retrying is storage/retry.py's job)."""
        if self._client is None:
            await self._make_client()
        return await trio.to_thread.run_sync(self._translated, action, key, fn, *args, limiter=self._limiter)

    def _translated(self, action: str, key: str, fn: Callable[..., T], *args: Any) -> T:
        """Call fn; turn every failure into a StorageError (TransientStorageError
        when trying again may succeed)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args)
        except ClientError as exc:
            raise self._client_error(exc, action, key) from None
        except (BotoCoreError, OSError) as exc:
            raise self._transport_error(exc) from None

    def _where(self, key: str) -> str:
        bucket = f"bucket '{self.location.bucket}'"
        return f"'{self._prefix}{key}' in {bucket}" if key else bucket

    def _client_error(self, exc: Any, action: str, key: str) -> StorageError:
        code, status = _code_status(exc)
        endpoint = self.location.endpoint
        key_id = self.settings.key_id
        if code in ("NoSuchKey", "404") and action in ("read", "check"):
            return ObjectMissing(f"object '{self._prefix}{key}' is missing from {self.description}")
        if code == "NoSuchBucket" or (code == "404" and action == "list"):
            return StorageError(f"bucket '{self.location.bucket}' does not exist at {endpoint}")
        if code in BAD_SECRET_CODES:
            return StorageError(
                f"S3 refused the secret key for key ID '{key_id}' at {endpoint} (signature does not match)"
            )
        if code in UNKNOWN_KEY_CODES:
            return StorageError(f"S3 at {endpoint} does not know the access key ID '{key_id}'")
        if code in DENIED_CODES:
            return StorageError(
                f"S3 access denied: cannot {action} {self._where(key)} with key ID '{key_id}'"
            )
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
            return StorageError(
                f"bucket '{self.location.bucket}' is in another region than '{self.region}' "
                f"(set Region in the [S3] section)"
            )
        message = _one_line(exc.response.get("Error", {}).get("Message") or "")
        detail = f"{code}: {message}" if message and message != code else (code or f"HTTP {status}")
        message = f"S3 could not {action} {self._where(key)}: {detail}"
        if code in TRANSIENT_CODES or status == 429 or status >= 500:
            return TransientStorageError(message, answered=True)  # the server is up, only busy
        return StorageError(message)

    def _transport_error(self, exc: BaseException) -> StorageError:
        from botocore.exceptions import (
            ConnectionError,
            ConnectTimeoutError,
            EndpointConnectionError,
            HTTPClientError,
            IncompleteReadError,
            ProxyConnectionError,
            ReadTimeoutError,
            SSLError,
        )

        endpoint = self.location.endpoint
        if isinstance(exc, SSLError):
            return StorageError(f"TLS error with S3 endpoint {endpoint}: {_root_cause(exc)}")
        if isinstance(exc, ConnectTimeoutError):
            return TransientStorageError(f"S3 endpoint {endpoint} timed out")
        if isinstance(exc, (ReadTimeoutError, TimeoutError, socket.timeout)):
            # connected, then no answer in time: the server is there, only slow
            return TransientStorageError(f"S3 endpoint {endpoint} timed out", answered=True)
        cause = _root_cause(exc)
        if isinstance(exc, ProxyConnectionError):
            # not answered: a wrong proxy fails at once, a proxy gone mid-run is waited for
            return TransientStorageError(f"cannot connect to proxy {exc.kwargs['proxy_url']} "
                                         f"for S3 endpoint {endpoint}: {_proxy_cause(exc)}")
        if _is_dns_failure(exc):
            return StorageError(f"cannot resolve the host name of S3 endpoint {endpoint}")
        link = (ConnectionError, HTTPClientError, IncompleteReadError, OSError)
        if not isinstance(exc, link):
            return StorageError(f"S3 request to {endpoint} failed: {cause}")  # not the network's doing
        if "refused" in cause.lower():
            return TransientStorageError(f"cannot connect to S3 endpoint {endpoint}: connection refused")
        # A connection that was made and then closed or reset (before the answer
        # or in the middle of its body) reached a server: retried even on a
        # command's first request. A failed connect, or an answer that is not
        # HTTP (a wrong port), is not: a wrong address fails at once.
        reached = not isinstance(exc, EndpointConnectionError) and not _not_http(exc)
        return TransientStorageError(f"lost connection to S3 endpoint {endpoint}: {cause}", answered=reached)


def _code_status(exc: Any) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code") or "")
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return code, status


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, its causes and botocore's wrapped 'error' keyword."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or any(item is s for s in seen):
            continue
        seen.append(item)
        todo += [item.__cause__, item.__context__]
        wrapped = getattr(item, "kwargs", {}).get("error") if isinstance(getattr(item, "kwargs", None), dict) else None
        if isinstance(wrapped, BaseException):
            todo.append(wrapped)
        reason = getattr(item, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
    return seen


def _is_dns_failure(exc: BaseException) -> bool:
    for item in _chain(exc):
        if isinstance(item, socket.gaierror) or type(item).__name__ == "NameResolutionError":
            return True
    return False


def _not_http(exc: BaseException) -> bool:
    """True when what answered did not speak HTTP (a status line that is not one)."""
    import http.client

    return any(isinstance(item, http.client.BadStatusLine) and not isinstance(item, http.client.RemoteDisconnected)
               for item in _chain(exc))


def _proxy_cause(exc: BaseException) -> str:
    """What went wrong reaching the proxy: the socket's error, or the proxy's
    answer to CONNECT ("Tunnel connection failed: 407 Proxy Authentication Required")."""
    if _is_dns_failure(exc):
        return "cannot resolve its host name"
    wrapped = getattr(exc, "kwargs", {}).get("error")
    if isinstance(wrapped, OSError) and wrapped.strerror:
        return _one_line(wrapped.strerror)
    return _one_line(str(wrapped)) if wrapped is not None else _root_cause(exc)


def _root_cause(exc: BaseException) -> str:
    for item in reversed(_chain(exc)):
        if isinstance(item, OSError) and item.strerror:
            return _one_line(item.strerror)
    text = _one_line(str(exc))
    return text or type(exc).__name__
