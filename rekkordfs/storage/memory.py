"""A repository in memory: the fast test tier's storage (and a model of the
Storage contract: put-if-absent, ranges, listings with sizes and times).

Thread-safe, so the repository may read from worker threads (read_blocking) as
it does on a local disk.
"""

from __future__ import annotations

import threading
import time

from ..errors import ObjectMissing
from .base import ObjectInfo, Storage


class MemoryStorage(Storage):
    conditional_writes = True
    remote = False

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.objects: dict[str, tuple[bytes, int]] = {}  # key -> (data, mtime ns)
        self._lock = threading.Lock()
        self.clock = time.time_ns  # tests may move time

    @property
    def description(self) -> str:
        return f"memory:{self.name}"

    async def put(self, key: str, data: bytes | bytearray) -> bool:
        return self.put_sync(key, data)

    def put_sync(self, key: str, data: bytes | bytearray | memoryview) -> bool:
        with self._lock:
            if key in self.objects:
                return False
            self.objects[key] = (bytes(data), self.clock())
            return True

    def _data(self, key: str) -> bytes:
        with self._lock:
            found = self.objects.get(key)
        if found is None:
            raise ObjectMissing(f"object '{key}' is missing from {self.description}")
        return found[0]

    async def get(self, key: str) -> bytes:
        return self._data(key)

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._data(key)[offset:offset + length]

    def read_blocking(self, key: str, offset: int | None = None, length: int | None = None) -> bytes:
        data = self._data(key)
        return data if offset is None or length is None else data[offset:offset + length]

    async def exists(self, key: str) -> bool:
        with self._lock:
            return key in self.objects

    async def list(self, prefix: str) -> list[str]:
        with self._lock:
            return [key for key in self.objects if key.startswith(prefix)]

    async def list_details(self, prefix: str) -> dict[str, ObjectInfo]:
        with self._lock:
            return {key: ObjectInfo(len(data), mtime) for key, (data, mtime) in self.objects.items()
                    if key.startswith(prefix)}

    async def delete(self, key: str) -> None:
        with self._lock:
            self.objects.pop(key, None)
