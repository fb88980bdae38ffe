"""The one retry policy (rekkordfs/storage/retry.py), in-process, on trio's
MockClock: sleeps take no real time and elapsed time is exact."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from rekkordfs.config import DEFAULT_RETRY_TIME, load_config
from rekkordfs.errors import ConfigError, ObjectMissing, StorageError, TransientStorageError
from rekkordfs.storage import open_storage
from rekkordfs.storage.base import Storage
from rekkordfs.storage.retry import RetryingStorage, RetryPolicy, describe_duration

pytestmark = pytest.mark.fast  # pure: part of the fast tier


class ScriptedStorage(Storage):
    """In-memory objects; each call first takes the next failure from `failures`
    (None: succeed). `land_then_fail` stores a put, then loses its answer."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.failures: list[StorageError | None] = []
        self.calls: list[str] = []
        self.land_then_fail = 0

    @property
    def description(self) -> str:
        return "scripted"

    def _next(self, name: str) -> None:
        self.calls.append(name)
        if self.failures:
            failure = self.failures.pop(0)
            if failure is not None:
                raise failure

    async def connect(self) -> None:
        self._next("connect")

    async def put(self, key: str, data: bytes | bytearray) -> bool:
        self._next("put")
        if key in self.objects:
            return False
        self.objects[key] = bytes(data)
        if self.land_then_fail:
            self.land_then_fail -= 1
            raise lost()
        return True

    async def get(self, key: str) -> bytes:
        self._next("get")
        if key not in self.objects:
            raise ObjectMissing(f"object '{key}' is missing")
        return self.objects[key]

    async def exists(self, key: str) -> bool:
        self._next("exists")
        return key in self.objects

    async def list(self, prefix: str) -> list[str]:
        self._next("list")
        return [k for k in self.objects if k.startswith(prefix)]

    async def delete(self, key: str) -> None:
        self._next("delete")
        self.objects.pop(key, None)


def lost() -> TransientStorageError:
    return TransientStorageError("lost connection to the server")


def busy() -> TransientStorageError:
    return TransientStorageError("server says SlowDown", answered=True)


def on_mock_clock(body: Callable[[], Awaitable[None]]) -> None:
    trio.run(body, clock=trio.testing.MockClock(autojump_threshold=0))


def wrapped(budget: float = DEFAULT_RETRY_TIME) -> tuple[RetryingStorage, ScriptedStorage]:
    inner = ScriptedStorage()
    return RetryingStorage(inner, RetryPolicy(budget=budget), rng=random.Random(1)), inner


def test_transient_failures_after_a_first_success_are_retried_until_it_works() -> None:
    async def body() -> None:
        storage, inner = wrapped()
        await storage.connect()
        inner.objects["blobs/a"] = b"A"
        inner.failures = [lost()] * 5
        start = trio.current_time()
        assert await storage.get("blobs/a") == b"A"
        assert inner.calls == ["connect"] + ["get"] * 6
        assert 0 < trio.current_time() - start < DEFAULT_RETRY_TIME

    on_mock_clock(body)


def test_gives_up_when_the_budget_is_spent_with_one_line_naming_operation_object_and_cause() -> None:
    async def body() -> None:
        storage, inner = wrapped()
        await storage.connect()
        inner.failures = [lost()] * 10_000
        start = trio.current_time()
        with pytest.raises(StorageError) as caught:
            await storage.put("packs/ab/cd", b"data")
        assert not isinstance(caught.value, TransientStorageError)  # final: nothing above retries it again
        assert caught.value.message == ("gave up after 2 min of retries to write 'packs/ab/cd': "
                                        "lost connection to the server")
        assert trio.current_time() - start == pytest.approx(DEFAULT_RETRY_TIME)
        # backoff: far fewer attempts than the budget has seconds, more than a handful
        assert 10 < inner.calls.count("put") < 40

    on_mock_clock(body)


def test_the_first_connection_fails_at_once_when_nothing_answers() -> None:
    async def body() -> None:
        storage, inner = wrapped()
        inner.failures = [TransientStorageError("cannot connect to S3 endpoint x: connection refused")]
        start = trio.current_time()
        with pytest.raises(TransientStorageError, match="connection refused"):
            await storage.connect()
        assert inner.calls == ["connect"]
        assert trio.current_time() == start

    on_mock_clock(body)


def test_a_busy_server_is_retried_even_before_anything_succeeded() -> None:
    async def body() -> None:
        storage, inner = wrapped()
        inner.failures = [busy(), busy(), busy()]
        await storage.connect()
        assert inner.calls == ["connect"] * 4

    on_mock_clock(body)


def test_final_errors_are_not_retried() -> None:
    async def body() -> None:
        storage, inner = wrapped()
        await storage.connect()
        inner.failures = [StorageError("access denied")]
        with pytest.raises(StorageError, match="^access denied$"):
            await storage.delete("blobs/a")
        with pytest.raises(ObjectMissing):
            await storage.get("blobs/none")
        assert inner.calls == ["connect", "delete", "get"]

    on_mock_clock(body)


def test_a_retried_put_whose_first_attempt_landed_counts_as_written() -> None:
    async def body() -> None:
        storage, inner = wrapped()
        await storage.connect()
        inner.land_then_fail = 1
        assert await storage.put("packs/00/p", b"pack data") is True
        assert inner.objects["packs/00/p"] == b"pack data"

    on_mock_clock(body)


def test_a_retried_put_that_found_its_object_asks_only_its_size_again() -> None:
    """After a lost answer, the retry finds the object; when asking its size
    fails, the next retry asks only that (not a PUT the server refuses first)."""
    async def body() -> None:
        storage, inner = wrapped()
        await storage.connect()
        inner.land_then_fail = 1
        inner.failures = [None, None, busy(), None]  # put (lands, answer lost), put: exists, size: busy, size
        assert await storage.put("packs/00/p", b"pack data") is True
        assert inner.calls == ["connect", "put", "put", "get", "get"]  # object_size() reads it here

    on_mock_clock(body)


def test_a_retried_put_finding_another_object_is_not_written() -> None:
    async def body() -> None:
        storage, inner = wrapped()
        await storage.connect()
        inner.objects["blobs/00/b"] = b"someone else's, longer"
        inner.failures = [lost()]  # the first attempt failed before writing anything
        assert await storage.put("blobs/00/b", b"ours") is False
        # and with no failure before, "exists" is believed as it is
        inner.objects["blobs/00/c"] = b"ours"
        assert await storage.put("blobs/00/c", b"ours") is False

    on_mock_clock(body)


def test_a_zero_budget_turns_retries_off() -> None:
    async def body() -> None:
        storage, inner = wrapped(budget=0)
        await storage.connect()
        inner.failures = [lost()]
        with pytest.raises(TransientStorageError):
            await storage.list("tags/")
        assert inner.calls == ["connect", "list"]

    on_mock_clock(body)


def test_delays_double_up_to_the_cap_with_jitter() -> None:
    policy = RetryPolicy(first_delay=0.25, max_delay=10.0)
    rng = random.Random(5)
    for retry in range(1, 200):
        base = min(10.0, 0.25 * 2 ** min(retry - 1, 60))
        assert base / 2 <= policy.delay(retry, rng) <= base
    delays = [policy.delay(1, rng) for _ in range(50)]
    assert len(set(delays)) == 50  # jittered: clients hit by one outage spread out


def test_describe_duration() -> None:
    assert [describe_duration(s) for s in (3, 2.5, 60, 90, 120)] == ["3 s", "2.5 s", "1 min", "1 min 30 s", "2 min"]


def test_retry_time_from_the_environment_and_the_config_file(tmp_path: Path) -> None:
    ini = tmp_path / "rekkord.ini"
    ini.write_text("[Repository]\nURL = /srv/repo\nRetryTime = 30\n")
    assert load_config(config_file=str(ini), env={}).retry_time == 30
    assert load_config(config_file=str(ini), env={"REKKORD_RETRY_TIME": "2.5"}).retry_time == 2.5
    assert load_config(repository="/srv/repo", env={}).retry_time == DEFAULT_RETRY_TIME == 120
    for bad in ("soon", "-1", "nan", "inf"):
        with pytest.raises(ConfigError, match="REKKORD_RETRY_TIME: retry time .* is not a number of seconds"):
            load_config(repository="/srv/repo", env={"REKKORD_RETRY_TIME": bad})
    ini.write_text("[Repository]\nRetryTime = 2m\n")
    with pytest.raises(ConfigError, match="rekkord.ini.*retry time '2m'"):
        load_config(config_file=str(ini), env={})
    # every backend the commands open is wrapped in the policy, with the configured budget
    storage = open_storage(load_config(repository="/srv/repo", env={"REKKORD_RETRY_TIME": "7"}))
    assert isinstance(storage, RetryingStorage) and storage.policy.budget == 7


def test_s3_a_connection_cut_after_it_was_made_counts_as_an_answer() -> None:
    """A reset mid-body or before the answer reached a server: retried even on
    a command's first request. A failed connect or a non-HTTP answer did not."""
    import http.client

    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    from rekkordfs.config import S3Location, S3Settings
    from rekkordfs.storage.s3 import S3Storage

    s3 = S3Storage(S3Location("http://127.0.0.1:9", "b", "", None, True), S3Settings("k", "s"))
    url = "http://127.0.0.1:9/b"

    def classify(exc: Exception) -> TransientStorageError:
        error = s3._transport_error(exc)
        assert isinstance(error, TransientStorageError), error
        return error

    reset = ConnectionResetError(104, "Connection reset by peer")
    assert classify(ResponseStreamingError(error=reset)).answered
    assert classify(ConnectionClosedError(endpoint_url=url, error=reset)).answered
    assert classify(ReadTimeoutError(endpoint_url=url, error="read timed out")).answered
    refused = ConnectionRefusedError(111, "Connection refused")
    assert not classify(EndpointConnectionError(endpoint_url=url, error=refused)).answered
    assert not classify(ConnectTimeoutError(endpoint_url=url, error="timed out")).answered
    garbage = ConnectionClosedError(endpoint_url=url, error=http.client.BadStatusLine("SSH-2.0-OpenSSH_9.2"))
    assert not classify(garbage).answered
