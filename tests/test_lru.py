"""The one LRU every cache uses (rekkordfs/lru.py)."""

from __future__ import annotations

import pytest

from rekkordfs.lru import WeightedLRU

pytestmark = pytest.mark.fast


def test_bounded_by_weight_oldest_first() -> None:
    evicted: list[str] = []
    cache: WeightedLRU[str, bytes] = WeightedLRU(10, weigh=len, on_evict=lambda k, _v: evicted.append(k))
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # now the most recently used: b is the oldest
    cache.put("c", b"1234")
    assert evicted == ["b"] and cache.used == 8 and "b" not in cache
    cache.put("a", b"12")  # replacing a value reweighs it
    assert cache.used == 6 and len(cache) == 2


def test_a_value_heavier_than_the_limit_is_kept_alone_or_not_at_all() -> None:
    cache: WeightedLRU[str, bytes] = WeightedLRU(3, weigh=len)
    cache.put("small", b"1")
    cache.put("huge", b"123456")
    assert cache.keys() == ["small"] and cache.used == 1
    alone: WeightedLRU[str, bytes] = WeightedLRU(3, weigh=len, keep_heavy=True)
    alone.put("small", b"1")
    alone.put("huge", b"123456")
    assert alone.keys() == ["huge"] and alone.used == 6


def test_pop_and_counting_by_default() -> None:
    cache: WeightedLRU[int, str] = WeightedLRU(2)
    for key in range(5):
        cache.put(key, str(key))
    assert sorted(cache.keys()) == [3, 4]
    assert cache.pop(3) == "3" and cache.pop(3) is None and cache.used == 1
