"""One least-recently-used cache for every cache of rekkordfs, bounded by a
total weight (bytes, entries, or a count), on lru-dict's C implementation."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import lru

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _count(_value: object) -> int:
    return 1


class WeightedLRU(Generic[K, V]):
    """Keeps the most recently used values whose weights add up to at most
    `limit`. A value heavier than the limit is not kept, unless keep_heavy:
    then it is kept alone (a huge directory is worth keeping decoded). Not
    thread-safe: callers from several threads hold their own lock."""

    def __init__(self, limit: int, weigh: Callable[[V], int] = _count,
                 on_evict: Callable[[K, V], None] | None = None, keep_heavy: bool = False) -> None:
        self.limit = limit
        self.used = 0
        self.keep_heavy = keep_heavy
        self._weigh = weigh
        self._on_evict = on_evict
        self._items: lru.LRU = lru.LRU(1 << 30)  # bounded by weight below, not by count

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        """The value (now the most recently used), or None."""
        return self._items.get(key)

    def put(self, key: K, value: V) -> None:
        weight = self._weigh(value)
        if weight > self.limit and not self.keep_heavy:
            self.pop(key)
            return
        old = self._items.get(key)
        if old is not None:
            self.used -= self._weigh(old)
        self._items[key] = value
        self.used += weight
        while self.used > self.limit and len(self._items) > 1:
            self._evict_oldest()

    def pop(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            del self._items[key]
            self.used -= self._weigh(value)
        return value

    def keys(self) -> list[K]:
        return list(self._items.keys())

    def clear(self) -> None:
        """Forget everything (on_evict is not called)."""
        self._items.clear()
        self.used = 0

    def _evict_oldest(self) -> None:
        # lru-dict 1.4's popitem() keeps a reference to what it returns (a leak
        # of every evicted value): peek at the oldest and delete it instead
        oldest = self._items.peek_last_item()
        assert oldest is not None  # only called while over weight, so not empty
        key, value = oldest
        del self._items[key]
        self.used -= self._weigh(value)
        if self._on_evict is not None:
            self._on_evict(key, value)
