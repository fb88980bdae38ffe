"""Batch reads of chunks: which ranges of packs they ask for
(repository._coalesce), packs shared by waiters, chunks stored alone."""

from __future__ import annotations

from rekkordfs.format import Location
from rekkordfs.rawruns import coalesce as _coalesce

A, B = b"a" * 16, b"b" * 16


def test_neighbours_in_one_pack_share_a_read() -> None:
    locations = [Location(A, 100, 10), Location(B, 0, 5), Location(A, 0, 50), Location(A, 5000, 10),
                 Location(A, 50, 50)]
    assert _coalesce(locations, 0) == [(A, 0, 110, [2, 4, 0]), (A, 5000, 10, [3]), (B, 0, 5, [1])]
    assert _coalesce(locations, 1 << 20) == [(A, 0, 5010, [2, 4, 0, 3]), (B, 0, 5, [1])]


def test_a_large_gap_splits_and_duplicates_stay_covered() -> None:
    locations = [Location(A, 0, 10), Location(A, 0, 10), Location(A, 10_000, 20)]
    assert _coalesce(locations, 100) == [(A, 0, 10, [0, 1]), (A, 10_000, 20, [2])]
    assert _coalesce([], 100) == []


def test_waiters_get_their_pack_even_when_the_cache_evicts_it(tmp_path) -> None:
    """Chunk reads of several packs at once, with room for one pack: each pack
    is still fetched once (readers waiting for a load take it from the load)."""
    import trio

    from rekkordfs.codec import pack_key
    from rekkordfs.packs import PackReader
    from rekkordfs.storage.local import LocalStorage

    storage = LocalStorage(str(tmp_path))
    packs = {bytes([n]) * 16: bytes([n]) * 4000 for n in range(1, 6)}
    fetches: list[str] = []

    async def main() -> None:
        await storage.create()
        for pack_id, data in packs.items():
            await storage.put(pack_key(pack_id), data)
        original = storage.get

        async def counting_get(key: str) -> bytes:
            fetches.append(key)
            await trio.sleep(0.01)  # every reader of the pack queues up meanwhile
            return await original(key)

        storage.get = counting_get  # type: ignore[method-assign]
        reader = PackReader(storage, limit=4000)
        results: dict[tuple[bytes, int], bytes] = {}

        async def read(pack_id: bytes, offset: int) -> None:
            results[(pack_id, offset)] = await reader.read(Location(pack_id, offset, 100))

        async with trio.open_nursery() as nursery:
            for pack_id in packs:
                for offset in range(0, 4000, 500):
                    nursery.start_soon(read, pack_id, offset)
        assert all(results[(p, o)] == packs[p][o:o + 100] for p, o in results) and len(results) == 40
        assert sorted(fetches) == sorted(pack_key(p) for p in packs)

    trio.run(main)
