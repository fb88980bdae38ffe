"""A Storage wrapper that misbehaves on purpose, on a seeded schedule.

    storage = FaultyStorage(MemoryStorage(), Schedule(seed=3, rate=0.05))
    storage = FaultyStorage(inner, Schedule.at("put", 7, "fail"))  # the 7th put fails

Actions: fail (a StorageError), enospc (a full disk), truncate (a read
returns fewer bytes), duplicate (a put is sent twice, as a retry would),
delay (an operation waits, so concurrent ones finish out of order). Every
action taken is recorded in `storage.taken`, so a test can assert that the
fault it meant really happened.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import trio

from rekkordfs.errors import StorageError
from rekkordfs.storage.base import ObjectInfo, Storage

OPERATIONS = ("put", "get", "get_range", "list", "delete")
ACTIONS = ("fail", "enospc", "truncate", "duplicate", "delay")


@dataclass
class Schedule:
    """Which call of which operation misbehaves, and how."""

    seed: int = 0
    rate: float = 0.0  # chance that a call misbehaves
    actions: tuple[str, ...] = ACTIONS
    operations: tuple[str, ...] = OPERATIONS
    prefix: str = ""  # only keys starting with this
    fixed: dict[tuple[str, int], str] = field(default_factory=dict)  # (operation, nth call) -> action
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @classmethod
    def at(cls, operation: str, nth: int, action: str, prefix: str = "") -> Schedule:
        return cls(fixed={(operation, nth): action}, prefix=prefix)

    def decide(self, operation: str, key: str) -> str | None:
        if not key.startswith(self.prefix):
            return None
        self.counts[operation] = nth = self.counts.get(operation, 0) + 1
        if (operation, nth) in self.fixed:
            return self.fixed[(operation, nth)]
        if self.rate and operation in self.operations and self.rng.random() < self.rate:
            usable = [a for a in self.actions if _applies(a, operation)]
            return self.rng.choice(usable) if usable else None
        return None


def _applies(action: str, operation: str) -> bool:
    if action == "truncate":
        return operation in ("get", "get_range")
    if action == "duplicate":
        return operation == "put"
    return True


class FaultyStorage(Storage):
    def __init__(self, inner: Storage, schedule: Schedule) -> None:
        self.inner = inner
        self.schedule = schedule
        self.taken: list[tuple[str, str, str]] = []  # (operation, key, action)
        self.conditional_writes = inner.conditional_writes
        self.remote = inner.remote
        self.read_blocking = None  # every read goes through the schedule

    @property
    def description(self) -> str:
        return self.inner.description

    async def _before(self, operation: str, key: str) -> str | None:
        action = self.schedule.decide(operation, key)
        if action is None:
            return None
        self.taken.append((operation, key, action))
        if action == "fail":
            raise StorageError(f"cannot {operation} '{key}': injected failure")
        if action == "enospc":
            raise StorageError(f"cannot {operation} '{key}': no space left on device")
        if action == "delay":
            await trio.sleep(self.schedule.rng.random() / 50)
        return action

    async def connect(self) -> None:
        await self.inner.connect()

    async def create(self) -> None:
        await self.inner.create()

    async def put(self, key: str, data: bytes | bytearray) -> bool:
        action = await self._before("put", key)
        written = await self.inner.put(key, data)
        if action == "duplicate":
            assert not await self.inner.put(key, data)  # the contract: never an overwrite
        return written

    async def get(self, key: str) -> bytes:
        action = await self._before("get", key)
        data = await self.inner.get(key)
        return data[:len(data) // 2] if action == "truncate" else data

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        action = await self._before("get_range", key)
        data = await self.inner.get_range(key, offset, length)
        return data[:len(data) // 2] if action == "truncate" else data

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    async def list(self, prefix: str) -> list[str]:
        await self._before("list", prefix)
        return await self.inner.list(prefix)

    async def list_details(self, prefix: str) -> dict[str, ObjectInfo]:
        await self._before("list", prefix)
        return await self.inner.list_details(prefix)

    async def delete(self, key: str) -> None:
        await self._before("delete", key)
        await self.inner.delete(key)

    async def flush(self) -> None:
        await self.inner.flush()

    async def aclose(self) -> None:
        await self.inner.aclose()
