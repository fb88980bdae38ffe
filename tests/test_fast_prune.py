"""The fast tier: how a prune copies the used blobs of a sparse pack (its
repack), in-process over an in-memory storage.

A repack reads a pack's used parts with a few ranged requests and seals each
blob again for a new pack without decompressing and compressing it: the copy
must keep the blob's ID, kind and compression flag, and a short read (a blob
at the very end of a truncated pack) must keep the old pack rather than lose a
blob.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import astuple
from pathlib import Path

import pytest
import trio

from rekkordfs import crypto
from rekkordfs import keys as keymod
from rekkordfs.codec import BLOB_VERSION, COMPRESS_NONE, COMPRESS_ZSTD, BlobCodec, pack_key
from rekkordfs.errors import CorruptedData
from rekkordfs.forget import forget, plan_by_ids
from rekkordfs.format import (
    BlobKind,
    BlobRef,
    ChunkRef,
    Entry,
    EntryKind,
    Location,
    decode_directory,
    directory_refs,
    directory_shape,
    encode_chunks,
    encode_directory,
)
from rekkordfs.prune import PruneOptions, Pruner
from rekkordfs.repository import Repository
from rekkordfs.retention import Duration
from rekkordfs.storage.memory import MemoryStorage
from tests.fsutil import rsync_diff
from tests.test_fast_core import check, history, make_tree, master, opened, private_cache, restore  # noqa: F401  (fixtures)

pytestmark = pytest.mark.fast


TEXT = b"the quick brown fox jumps over the lazy dog " * 200  # zstd shrinks it


@pytest.mark.parametrize(("data", "compression"), [(TEXT, COMPRESS_ZSTD), (os.urandom(5000), COMPRESS_NONE)])
def test_a_resealed_blob_keeps_its_compression_and_its_id(master: keymod.Keyset, data: bytes,
                                                          compression: int) -> None:
    codec = BlobCodec(master, os.urandom(16))
    kind = BlobKind.CHUNK
    blob_id = codec.blob_id(kind, data)
    old = codec.new_sealer()
    assert codec.compress(data)[0] == compression  # the premise: both kinds of payload are covered
    stored = codec.seal(old, kind, *codec.compress(data))
    new = codec.new_sealer()
    again = codec.reseal(new, kind, blob_id, old.pack_id, stored)
    assert len(again) == len(stored)  # the writer claimed exactly this much room
    assert codec.unpack(kind, blob_id, new.pack_id, again) == data
    opened = crypto.PackOpener(master.data_secret).open(new.pack_id, again)
    assert opened[-3:] == bytes((BLOB_VERSION, kind, compression))
    with pytest.raises(CorruptedData):  # checked against its ID first
        codec.reseal(new, kind, codec.blob_id(kind, b"other"), old.pack_id, stored)
    with pytest.raises(CorruptedData):  # and its kind
        codec.reseal(new, BlobKind.DIRECTORY, blob_id, old.pack_id, stored)
    with pytest.raises(CorruptedData):  # and that it belongs to the pack it is said to come from
        codec.reseal(new, kind, blob_id, new.pack_id, stored)


class CountingStorage(MemoryStorage):
    """Counts ranged reads; `remote` picks the repack's coalescing (reads over gaps, or not)."""

    def __init__(self, remote: bool) -> None:
        super().__init__()
        self.remote = remote
        self.ranges = 0

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        self.ranges += 1
        return await super().get_range(key, offset, length)


async def one_pack(repo: Repository, count: int) -> tuple[bytes, list[tuple[bytes, Location]]]:
    """count chunks, alternately compressible and not, stored into one pack."""
    blobs = []
    for index in range(count):
        data = TEXT + os.urandom(8) if index % 2 else os.urandom(3000)
        ref, _ = await repo.write_blob(BlobKind.CHUNK, data)
        blobs.append((ref.id, ref.location))
    await repo.flush_packs()
    packs = {location.pack for _, location in blobs}
    assert len(packs) == 1
    return packs.pop(), blobs


@pytest.mark.parametrize("remote", [False, True])
def test_a_repack_reads_the_used_parts_by_ranges_up_to_the_last_blob(master: keymod.Keyset, remote: bool) -> None:
    """Blobs 0, 1, 3 and 5 of 6 are used (5 ends the pack): one ranged read per
    run of neighbours on a local disk, one for the whole used part on a remote
    one; every copy opens under its new pack with the same ID and content."""
    storage = CountingStorage(remote)

    async def run() -> None:
        await Repository.create(storage, master)
        writer = await Repository.open(storage, master)
        pack, blobs = await one_pack(writer, 6)
        await writer.aclose()
        repo = await Repository.open(storage, master)  # a prune's session: it stored nothing yet
        try:
            used = {blobs[i][1].offset: (blobs[i][0], BlobKind.CHUNK, blobs[i][1].length) for i in (0, 1, 3, 5)}
            assert blobs[5][1].offset + blobs[5][1].length == len(storage.objects[pack_key(pack)][0])
            pruner = Pruner(repo, PruneOptions(grace=Duration()))
            storage.ranges = 0
            with trio.fail_after(30):
                assert await pruner._repack([pack], {pack: used}) == [pack]
            assert storage.ranges == (1 if remote else 3)
            for blob_id, _, _ in used.values():
                moved = repo.known(blob_id)
                assert moved is not None and moved.location.pack != pack
                raw = storage.objects[pack_key(moved.location.pack)][0]
                location = moved.location
                data = repo.codec.unpack(BlobKind.CHUNK, blob_id, location.pack,
                                         raw[location.offset:location.offset + location.length])
                original = next(loc for i, loc in blobs if i == blob_id)
                assert location.length == original.length  # stored as compressed as it was
                assert repo.codec.blob_id(BlobKind.CHUNK, data) == blob_id
        finally:
            await repo.aclose()

    trio.run(run)


@pytest.mark.parametrize("remote", [False, True])
def test_a_pack_that_ends_early_is_kept_and_the_others_are_repacked(master: keymod.Keyset, remote: bool) -> None:
    """The pack's last blob is cut short: that pack is reported and kept as it
    is (nothing of it counts as copied, its claimed room is given back, so the
    flush completes), while a sound pack repacked beside it is copied."""
    storage = CountingStorage(remote)

    async def run() -> None:
        await Repository.create(storage, master)
        repo = await Repository.open(storage, master)
        try:
            bad, bad_blobs = await one_pack(repo, 4)
            good, good_blobs = await one_pack(repo, 4)
            data, mtime = storage.objects[pack_key(bad)]
            storage.objects[pack_key(bad)] = (data[:-10], mtime)
            uses = {pack: {location.offset: (blob_id, BlobKind.CHUNK, location.length)
                           for blob_id, location in blobs[1:]}
                    for pack, blobs in ((bad, bad_blobs), (good, good_blobs))}
            repo2 = await Repository.open(storage, master)  # a prune's session: it stored nothing yet
            try:
                pruner = Pruner(repo2, PruneOptions(grace=Duration()))
                with trio.fail_after(30):
                    assert await pruner._repack([bad, good], uses) == [good]
                assert len(pruner.report.problems) == 1 and "truncated" in pruner.report.problems[0]
                assert bad.hex() in pruner.report.problems[0]
                assert not any(repo2.stored_now(blob_id) for blob_id, _ in bad_blobs)
                assert all(repo2.stored_now(blob_id) for blob_id, _ in good_blobs[1:])
            finally:
                await repo2.aclose()
        finally:
            await repo.aclose()

    trio.run(run)


def test_the_walk_sees_every_reference_a_full_decode_sees() -> None:
    """directory_refs (what a prune's walk reads) and directory_shape (what the
    hostile-tree check reads) against decode_directory, on a record with files
    of several chunks, subdirectories, xattrs and the other kinds; every
    truncation of it is refused, never read short."""
    rng = random.Random(1)

    def location() -> Location:
        return Location(rng.randbytes(32), rng.randrange(1 << 30), rng.randrange(1, 1 << 20))

    entries = []
    for index in range(40):
        kind = (EntryKind.FILE, EntryKind.DIRECTORY, EntryKind.SYMLINK, EntryKind.FIFO)[index % 4]
        entry = Entry(kind, f"e{index:02d}".encode(), 0o644, 0, 0, 0, 0, 0, 0,
                      xattrs=[(b"user.x", rng.randbytes(index))] if index % 3 == 0 else [])
        if kind == EntryKind.FILE:
            entry.chunks_raw = encode_chunks(ChunkRef(rng.randbytes(32), 100, location())
                                             for _ in range(index % 5))
        elif kind == EntryKind.DIRECTORY:
            entry.dir_ref = BlobRef(rng.randbytes(32), location())
        elif kind == EntryKind.SYMLINK:
            entry.target = b"somewhere"
        entries.append(entry)
    raw = encode_directory(entries)
    decoded = decode_directory(raw)
    dirs, chunks = directory_refs(raw)
    assert dirs == [(e.dir_ref.id, *astuple(e.dir_ref.location)) for e in decoded if e.dir_ref is not None]
    assert chunks == [(c.id, *astuple(c.location)) for e in decoded if e.kind == EntryKind.FILE for c in e.chunks]
    assert len(dirs) == 10 and len(chunks) == sum(i % 5 for i in range(0, 40, 4))
    assert directory_shape(raw) == (40, dirs)
    for read in (directory_refs, directory_shape):
        for cut in range(len(raw)):
            with pytest.raises(CorruptedData):
                read(raw[:cut])
        with pytest.raises(CorruptedData):
            read(raw + b"\0")


class DeleteLog(MemoryStorage):
    """Records the order of deletes (a kill between any two must leave a repository that restores)."""

    def __init__(self) -> None:
        super().__init__()
        self.deleted: list[str] = []

    async def delete(self, key: str) -> None:
        self.deleted.append(key)
        await super().delete(key)


def test_concurrent_deletes_keep_their_order(master: keymod.Keyset, tmp_path: Path) -> None:
    """Deletes run many at once, but: each pack's indexes go before the pack,
    snapshot records before the forget record naming them, and a prune record
    only after the packs it condemned."""
    src = make_tree(tmp_path / "src", seed=11)
    storage = DeleteLog()

    async def main() -> None:
        await Repository.create(storage, master)
        storage.clock = lambda: 0  # everything stored is old enough to condemn
        snapshots = await history(storage, master, src, 4)
        hour = Duration(hours=1)
        async with opened(storage, master) as repo:
            await forget(repo, await plan_by_ids(repo, snapshots[:3]))
            first = await Pruner(repo, PruneOptions(grace=hour)).run()
        assert first.packs_condemned > 0 and first.records_deleted == 3
        record_deletes = [i for i, key in enumerate(storage.deleted) if key.startswith("snapshots/")]
        forget_deletes = [i for i, key in enumerate(storage.deleted) if key.startswith("forgotten/")]
        assert len(record_deletes) == 3 and len(forget_deletes) == 1 and max(record_deletes) < forget_deletes[0]
        async with opened(storage, master) as repo:
            index_packs = await trio.to_thread.run_sync(repo.cache.index_packs)
        storage.deleted.clear()
        async with opened(storage, master) as repo:  # three hours later: the sweep, and the record goes too
            later = Pruner(repo, PruneOptions(grace=hour), clock=lambda: time.time_ns() + 3 * 3600 * 10**9)
            swept = await later.run()
        assert swept.packs_deleted == first.packs_condemned and swept.problems == []
        order = {key: i for i, key in enumerate(storage.deleted)}
        packs = [key for key in order if key.startswith("packs/")]
        marks = [key for key in order if key.startswith("condemned/")]
        assert len(packs) == swept.packs_deleted and len(marks) == 1
        assert max(order[key] for key in packs) < order[marks[0]]
        paired = [(name, pack_key(pack)) for name, pack in index_packs.items() if pack_key(pack) in order]
        assert len(paired) >= len(packs)  # every deleted pack had its index
        assert all(order[name] < order[key] for name, key in paired)
        assert await check(storage, master) == []
        await restore(storage, master, snapshots[-1], src, tmp_path / "out")
        assert rsync_diff(src, tmp_path / "out") == ""

    trio.run(main)
