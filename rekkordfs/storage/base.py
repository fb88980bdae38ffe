"""The async storage interface every backend implements.

Keys are '/'-separated relative names such as 'packs/ab/ab12...'. The
contract, checked by tests/test_storage_conformance.py for every backend:

- put() never overwrites: it returns False when the key already exists;
- get() raises ObjectMissing for an absent key;
- list(prefix) returns every key under prefix (all pages, any count);
- flush() returns once everything put so far is durable;
- every failure is a StorageError with a one-line message naming the cause;
  a TransientStorageError when trying again may succeed (a lost or refused
  connection, a timeout, a busy server). Backends never retry by themselves:
  retry.RetryingStorage does, for all of them, under one policy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from ..tasks import task_group


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    mtime_ns: int  # when the object was written, by the storage's clock


class Storage(ABC):
    #: True when put() itself refuses to overwrite on the server (local link(),
    #: S3 If-None-Match, SFTP rename without replace). When False, put() looks
    #: for the object first (racy, but every name the repository writes is random).
    conditional_writes: bool = True
    #: False for backends where reading is as cheap as a local disk cache
    #: (the mount then keeps no on-disk copy of fetched blobs).
    remote: bool = True
    #: Backends whose reads are plain blocking syscalls offer them here as
    #: read_blocking(key, offset=None, length=None), to be called from a worker
    #: thread (the caller saves a thread hop); None for the others.
    read_blocking: Callable[[str, int | None, int | None], bytes] | None = None
    #: The folder of a repository on a local disk, whose objects other
    #: processes of ours may read themselves (a restore's workers); None for
    #: the others.
    local_root: str | None = None

    @property
    @abstractmethod
    def description(self) -> str:
        """Where the repository lives, for messages (never contains secrets)."""

    async def connect(self) -> None:
        """Open connections and check the location is reachable."""

    async def create(self) -> None:
        """Prepare an empty location for a new repository (folders, bucket check)."""
        await self.connect()

    @abstractmethod
    async def put(self, key: str, data: bytes | bytearray) -> bool:
        """Store data under key unless it exists; True if written."""

    async def put_pieces(self, key: str, pieces: list[bytes | bytearray]) -> bool:
        """put() of the pieces one after another (a pack's blobs). A backend that
        writes a file writes them as they are, in a worker thread: joining them
        first would copy every byte once more on the event loop's thread."""
        return await self.put(key, b"".join(pieces))

    @abstractmethod
    async def get(self, key: str) -> bytes:
        """Return the object's bytes or raise ObjectMissing."""

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        """length bytes of the object from offset (fewer at its end)."""
        data = await self.get(key)
        return data[offset:offset + length]

    async def get_ranges(self, ranges: list[tuple[str, int, int]]) -> list[bytes]:
        """get_range() of each (key, offset, length), concurrently; results in order."""
        results: list[bytes] = [b""] * len(ranges)

        async def one(index: int, key: str, offset: int, length: int) -> None:
            results[index] = await self.get_range(key, offset, length)

        async with task_group() as nursery:
            for index, (key, offset, length) in enumerate(ranges):
                nursery.start_soon(one, index, key, offset, length)
        return results

    @abstractmethod
    async def exists(self, key: str) -> bool:
        ...

    async def object_size(self, key: str) -> int:
        """Size of the stored object in bytes, or ObjectMissing."""
        return len(await self.get(key))

    @abstractmethod
    async def list(self, prefix: str) -> list[str]:
        """Every key starting with prefix (a folder-like prefix ending in '/')."""

    async def list_details(self, prefix: str) -> dict[str, ObjectInfo]:
        """Every key under prefix with its size and modification time (prune)."""
        raise NotImplementedError

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove key; absent keys are not an error."""

    async def flush(self) -> None:
        """Make everything put so far durable before a snapshot refers to it."""

    async def aclose(self) -> None:
        """Release connections; the object is unusable afterwards."""
