"""One retry policy for every backend, as a Storage wrapped around another.

Backends only classify their failures: a TransientStorageError (a dropped or
refused connection, a timeout, S3 500/503/SlowDown) may pass if tried again;
any other StorageError is final. This wrapper retries transient failures with
exponential backoff and jitter for a time budget (RetryTime, 120 s by
default), so a server restart or a network blip does not end a backup that
has run for hours, then fails with one line naming the operation, the object
and the last cause.

Two rules keep it from hiding real problems:

- until the backend has answered once in this process, a connection failure
  is not retried: a wrong host or port fails at once (a server that answers
  "busy" is retried, it exists);
- put() is put-if-absent. An attempt that failed may still have stored the
  object (the answer was lost, not the request), and its retry then finds
  the object "already there". When the object there has the size of ours,
  the earlier attempt landed and put() reports it as written.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from ..config import DEFAULT_RETRY_TIME
from ..errors import ObjectMissing, StorageError, TransientStorageError
from ..testhooks import stop_point
from .base import ObjectInfo, Storage

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    budget: float = DEFAULT_RETRY_TIME  # seconds of retrying one operation before giving up
    first_delay: float = 0.25
    max_delay: float = 10.0

    def delay(self, retry: int, rng: random.Random) -> float:
        """Pause before retry number `retry` (1, 2...): doubling up to max_delay,
        then between half and all of it at random, so many clients hit by one
        outage do not come back in step."""
        base = min(self.max_delay, self.first_delay * 2.0 ** min(retry - 1, 60))
        return base / 2 + rng.random() * base / 2


def describe_duration(seconds: float) -> str:
    """'3 s', '2.5 s', '2 min', '1 min 30 s'."""
    if seconds < 60:
        return f"{seconds:g} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if rest else f"{minutes} min"


class RetryingStorage(Storage):
    """Any Storage, with transient failures retried under one RetryPolicy."""

    def __init__(self, inner: Storage, policy: RetryPolicy | None = None,
                 rng: random.Random | None = None) -> None:
        self.inner = inner
        self.policy = policy or RetryPolicy()
        self._rng = rng or random.Random()
        self._answered = False  # has the backend ever answered in this process?

    # --- what the backend says about itself -----------------------------------------

    @property
    def description(self) -> str:
        return self.inner.description

    @property
    def conditional_writes(self) -> bool:  # type: ignore[override]  # S3 learns it when connecting
        return self.inner.conditional_writes

    @property
    def remote(self) -> bool:  # type: ignore[override]
        return self.inner.remote

    @property
    def read_blocking(self) -> Callable[[str, int | None, int | None], bytes] | None:  # type: ignore[override]
        # Local reads from worker threads: plain syscalls, nothing transient to retry.
        return self.inner.read_blocking

    @property
    def local_root(self) -> str | None:  # type: ignore[override]
        return self.inner.local_root

    # --- operations --------------------------------------------------------------

    async def connect(self) -> None:
        await self._retry("connect to", "", self.inner.connect)

    async def create(self) -> None:
        await self._retry("create", "", self.inner.create)

    async def put(self, key: str, data: bytes | bytearray) -> bool:
        return await self._put(key, len(data), lambda: self.inner.put(key, data))

    async def put_pieces(self, key: str, pieces: list[bytes | bytearray]) -> bool:
        return await self._put(key, sum(len(piece) for piece in pieces), lambda: self.inner.put_pieces(key, pieces))

    async def _put(self, key: str, size: int, put: Callable[[], Awaitable[bool]]) -> bool:
        failed_before = False
        found = False  # "exists" after a failed attempt: only the object's size is still in question

        async def attempt() -> bool:
            nonlocal failed_before, found
            stop_point("storage-put")
            try:
                if not found:
                    if await put():
                        return True
                    if not failed_before:
                        return False  # there before we tried: not ours
                    found = True
                # "exists": ours, if an earlier attempt landed without its answer. Asked
                # again alone when the asking fails: a busy server gets one request per
                # retry, not a PUT it will refuse and then the question
                try:
                    return await self.inner.object_size(key) == size
                except ObjectMissing:
                    found = False  # gone since (never ours to lose): write it again
                    raise TransientStorageError(f"'{key}' vanished while it was being written",
                                                answered=True) from None
            except TransientStorageError:
                failed_before = True
                raise

        return await self._retry("write", key, attempt)

    async def get(self, key: str) -> bytes:
        return await self._retry("read", key, lambda: self.inner.get(key))

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        return await self._retry("read", key, lambda: self.inner.get_range(key, offset, length))

    async def get_ranges(self, ranges: list[tuple[str, int, int]]) -> list[bytes]:
        if type(self.inner).get_ranges is Storage.get_ranges:
            return await super().get_ranges(ranges)  # concurrent get_range()s, each retried alone
        # the backend reads them in one batch (local): retry the batch
        first = ranges[0][0] if ranges else ""
        return await self._retry("read", first, lambda: self.inner.get_ranges(ranges))

    async def object_size(self, key: str) -> int:
        return await self._retry("check", key, lambda: self.inner.object_size(key))

    async def exists(self, key: str) -> bool:
        return await self._retry("check", key, lambda: self.inner.exists(key))

    async def list(self, prefix: str) -> list[str]:
        return await self._retry("list", prefix, lambda: self.inner.list(prefix))

    async def list_details(self, prefix: str) -> dict[str, ObjectInfo]:
        return await self._retry("list", prefix, lambda: self.inner.list_details(prefix))

    async def delete(self, key: str) -> None:
        stop_point("storage-delete")
        await self._retry("delete", key, lambda: self.inner.delete(key))

    async def flush(self) -> None:
        await self._retry("sync", "", self.inner.flush)

    async def aclose(self) -> None:
        await self.inner.aclose()

    # --- the policy ------------------------------------------------------------

    async def _retry(self, action: str, key: str, call: Callable[[], Awaitable[T]]) -> T:
        """call(), again after each transient failure until the budget is spent."""
        started: float | None = None
        retries = 0
        while True:
            try:
                result = await call()
            except TransientStorageError as exc:
                if self.policy.budget <= 0 or not (self._answered or exc.answered):
                    raise  # retries off, or nothing ever answered: a wrong address fails at once
                now = trio.current_time()
                if started is None:
                    started = now
                    log.info("%s: %s; retrying for up to %s", self.description, exc.message,
                             describe_duration(self.policy.budget))
                left = started + self.policy.budget - now
                if left <= 0:
                    raise StorageError(self._gave_up(action, key, exc)) from None
                retries += 1
                await trio.sleep(min(self.policy.delay(retries, self._rng), left))
            else:
                self._answered = True
                if started is not None:
                    log.info("%s: %s '%s' succeeded after %d retries", self.description, action, key, retries)
                return result

    def _gave_up(self, action: str, key: str, cause: StorageError) -> str:
        what = f"'{key}'" if key else self.inner.description
        return (f"gave up after {describe_duration(self.policy.budget)} of retries "
                f"to {action} {what}: {cause.message}")
