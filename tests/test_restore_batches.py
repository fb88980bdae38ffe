"""A restore's small files in batches (restorebatches.Batcher): from a server
grouped by the pack that stores them, a group sent once it makes a batch, what
waits bounded, the rest sent at the end in pack order; from a local disk in
walk order. Every file goes out exactly once."""

from __future__ import annotations

import random

import pytest

from rekkordfs.format import ChunkRef, Entry, EntryKind, Location, encode_chunks
from rekkordfs.restorebatches import Batcher
from rekkordfs.restorewrite import FileJob

pytestmark = pytest.mark.fast


def _job(index: int, pack: bytes | None, size: int = 100) -> FileJob:
    chunks = [] if pack is None else [ChunkRef(index.to_bytes(32, "big"), size, Location(pack, index * 1000, size))]
    name = b"f%d" % index
    return FileJob((name,), Entry(EntryKind.FILE, name, size=size if chunks else 0, chunks_raw=encode_chunks(chunks)))


def _packs(batch: list[FileJob]) -> set[bytes]:
    return {job.chunks[0].location.pack for job in batch if job.chunks}


def _run(batcher: Batcher, jobs: list[FileJob]) -> tuple[list[list[FileJob]], list[list[FileJob]]]:
    during = [batch for job in jobs for batch in batcher.add(job)]
    return during, batcher.flush()


def test_by_pack_a_full_group_goes_at_once_and_holds_one_pack() -> None:
    rng = random.Random(1)
    packs = [bytes([n]) * 32 for n in range(6)]
    jobs = [_job(i, rng.choice(packs)) for i in range(600)] + [_job(600 + i, None) for i in range(5)]
    during, rest = _run(Batcher(files=50, size=1 << 30, by_pack=True, hold_files=400), jobs)
    assert during, "full groups are sent while the walk goes on"
    assert all(len(batch) == 50 and len(_packs(batch)) == 1 for batch in during)
    sent = [job for batch in during + rest for job in batch]
    assert sorted(job.parts for job in sent) == sorted(job.parts for job in jobs)  # each file once
    assert all(len(batch) <= 50 for batch in rest)
    keys = [job.chunks[0].location.pack if job.chunks else b"" for batch in rest for job in batch]
    assert keys == sorted(keys)  # the rest in pack order (empty files first)


def test_by_pack_a_batch_closes_at_its_size_in_bytes() -> None:
    pack = b"p" * 32
    during, rest = _run(Batcher(files=1000, size=1000, by_pack=True), [_job(i, pack, 300) for i in range(10)])
    assert [len(batch) for batch in during] == [4, 4]  # 1,200 bytes reach the size
    assert [len(batch) for batch in rest] == [2]


def test_what_waits_is_bounded() -> None:
    # every file in a pack of its own: no group ever fills, the bound sends them
    batcher = Batcher(files=10, size=1 << 30, by_pack=True, hold_files=30)
    held = 0
    for i in range(200):
        held += 1 - sum(len(batch) for batch in batcher.add(_job(i, i.to_bytes(32, "big"))))
        assert held <= 30
    assert sum(len(batch) for batch in batcher.flush()) == held


def test_from_a_local_disk_batches_keep_the_walk_order() -> None:
    rng = random.Random(2)
    jobs = [_job(i, bytes([rng.randrange(4)]) * 32) for i in range(130)]
    during, rest = _run(Batcher(files=64, size=1 << 30, by_pack=False), jobs)
    assert [job.parts for batch in during + rest for job in batch] == [job.parts for job in jobs]
    assert [len(batch) for batch in during + rest] == [64, 64, 2]
