"""Failure paths of writing, each with a test that fails without its handling
(fast tier: in-process, in-memory storage, faults injected where they matter).

- PackWriter._upload: a pack that failed to upload has its blobs forgotten,
  so the same session stores them again instead of referring to nothing;
- Committer.run: staged data uploaded by write-behind into a pack whose
  upload then failed makes the commit fail ("some staged data failed to
  upload; commit again") rather than publish a snapshot referring to nothing;
- WriteBehind._upload_behind: a write-behind upload that fails is logged and
  left to the commit, which uploads the file itself; the mount goes on;
- WriteBehind._upload_stream: a streaming upload that fails hands the closed
  file to write-behind, whole.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from rekkordfs import keys as keymod
from rekkordfs.blobcache import BlobCache
from rekkordfs.check import Checker
from rekkordfs.codec import PACKS_PREFIX
from rekkordfs.commit import Committer, durable_files
from rekkordfs.errors import StorageError
from rekkordfs.format import BlobKind, ChunkRef, Entry, EntryKind, Location, encode_chunks, encode_directory
from rekkordfs.nodes import IDS_INO, STAGING_INO
from rekkordfs.repository import Repository
from rekkordfs.staging import ROOT, StagingTree
from rekkordfs.stagingarea import StagingArea
from rekkordfs.storage.base import Storage
from rekkordfs.storage.memory import MemoryStorage
from rekkordfs.upload import Uploader
from rekkordfs.vfs import SnapshotView
from tests.core_helpers import area_over
from tests.faults import FaultyStorage, Schedule
from tests.test_fast_core import master, private_cache  # noqa: F401  (fixtures)

pytestmark = pytest.mark.fast
DEADLINE = 60  # seconds: generous, only a hang reaches it


async def new_repository(master: keymod.Keyset) -> MemoryStorage:
    storage = MemoryStorage()
    await Repository.create(storage, master)
    return storage


@asynccontextmanager
async def opened(storage: Storage, keys: keymod.Keyset) -> AsyncIterator[Repository]:
    repo = await Repository.open(storage, keys)
    try:
        await repo.prepare_write()
        yield repo
    finally:
        await repo.aclose()


def tags(storage: MemoryStorage) -> list[str]:
    return [key for key in storage.objects if key.startswith("tags/")]


async def check_clean(storage: Storage, keys: keymod.Keyset) -> None:
    async with opened(storage, keys) as repo:
        assert (await Checker(repo, read_data=True).run()).problems == []


async def snapshot_file(repo: Repository, snapshot_hex: str, name: bytes) -> bytes:
    """The content of a file at the root of a snapshot, read as the mount reads it."""
    view = SnapshotView(repo, BlobCache(repo))
    await view.refresh(force=True)
    snap = await view.lookup(IDS_INO, snapshot_hex.encode())
    node = await view.lookup(snap.ino, name)
    return await view.read(view.open(node.ino), 0, 1 << 30)


# --- PackWriter ---------------------------------------------------------------------------


def test_a_failed_pack_is_forgotten_within_the_session(master: keymod.Keyset) -> None:
    """The same Repository (as a mount keeps one for its life) stores a blob again
    after the pack holding it failed: without the cleanup it would find the
    blob 'known' at a location that was never written."""
    entries = [Entry(EntryKind.FILE, b"f", mtime_ns=1)]
    record = encode_directory(entries)

    async def main() -> None:
        memory = await new_repository(master)
        faulty = FaultyStorage(memory, Schedule.at("put", 1, "fail", prefix=PACKS_PREFIX))
        async with opened(faulty, master) as repo:
            first, stored = await repo.write_blob(BlobKind.DIRECTORY, record)
            assert stored > 0
            with pytest.raises(StorageError):
                await repo.flush_packs()
            assert [action for _, _, action in faulty.taken] == ["fail"]
            assert not repo.stored_now(first.id) and repo.known(first.id) is None
            again, stored = await repo.write_blob(BlobKind.DIRECTORY, record)
            assert stored > 0 and again.location.pack != first.location.pack
            await repo.flush_packs()
            assert [e.name for e in await repo.read_directory(again)] == [b"f"]

    trio.run(main)


# --- Committer: write-behind data lost with its pack ----------------------------------------


class GatedStorage(MemoryStorage):
    """The first pack upload waits until a second one starts, then fails: a
    write-behind pack in flight when a commit begins, failing while the commit
    stores its directory records."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.first_started = trio.Event()
        self.second_started = trio.Event()
        self.failed: list[str] = []

    async def put(self, key: str, data: bytes | bytearray) -> bool:
        if self.armed and key.startswith(PACKS_PREFIX):
            if not self.first_started.is_set():
                self.first_started.set()
                await self.second_started.wait()
                self.failed.append(key)
                raise StorageError(f"cannot write '{key}': injected failure")
            self.second_started.set()
        return await super().put(key, data)


def test_a_commit_whose_write_behind_pack_failed_publishes_nothing(master: keymod.Keyset, tmp_path: Path) -> None:
    content = os.urandom(50_000)

    async def main() -> None:
        storage = GatedStorage()
        await Repository.create(storage, master)
        async with opened(storage, master) as repo:
            tree = StagingTree(tmp_path / "state", "c", BlobCache(repo))
            node = await tree.create(ROOT, b"f", EntryKind.FILE, 0o644, 0, 0)
            await tree.write(node.ino, 0, content)
            tree.flush(node.ino)
            # write-behind: the file's chunks go into a pack, recorded as its upload...
            uploader = Uploader(repo)
            chunks = (await uploader.upload_many([content]))[0]
            tree.uploads.record(node.ino, tree.uploads.version(node.ino), chunks)
            storage.armed = True
            failures: list[BaseException] = []

            async def upload_in_background() -> None:  # ...and that pack is on its way
                try:
                    await repo.flush_packs()
                except StorageError as exc:
                    failures.append(exc)

            with trio.fail_after(DEADLINE):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(upload_in_background)
                    await storage.first_started.wait()
                    with pytest.raises(StorageError, match="some staged data failed to upload; commit again"):
                        await Committer(repo, tree, uploader).run()
            assert storage.failed and failures  # the fault this test is about did happen
            assert tags(storage) == []
            assert tree.dirty and tree.get(node.ino).local  # staging keeps it all
            # once the storage works, committing again stores the file itself
            storage.armed = False
            result = await Committer(repo, tree, uploader).run()
            assert await snapshot_file(repo, result.tag.id_hex, b"f") == content
            tree.close()
        await check_clean(storage, master)

    trio.run(main)


def test_durable_files_keeps_only_uploads_stored_where_they_say(master: keymod.Keyset) -> None:
    """A commit's capture checks write-behind's uploads in batches: a file counts
    only when every chunk is known at exactly the place its list says."""
    async def main() -> None:
        async with opened(await new_repository(master), master) as repo:
            uploader = Uploader(repo)
            parts = [os.urandom(3000) for _ in range(3)]
            stored = [(await uploader.upload_many([part]))[0] for part in parts]
            await repo.flush_packs()
            good, two = stored[0], stored[1] + stored[2]
            moved = [ChunkRef(c.id, c.size, Location(c.location.pack, c.location.offset + 1, c.location.length))
                     for c in stored[1]]
            unknown = [ChunkRef(b"\7" * 32, 10, stored[2][0].location)]
            contents = {1: encode_chunks(good), 2: encode_chunks(two), 3: encode_chunks(moved),
                        4: encode_chunks(stored[0] + unknown), 5: b""}
            assert durable_files(repo, contents) == {1, 2, 5}
            assert durable_files(repo, contents, batch=2) == {1, 2, 5}  # across batches alike

    trio.run(main)


# --- StagingArea: write-behind failing -------------------------------------------------------


@asynccontextmanager
async def staging_area(storage: Storage, keys: keymod.Keyset, state: Path) -> AsyncIterator[StagingArea]:
    async with opened(storage, keys) as repo, area_over(repo, state) as area:
        yield area


def test_a_failed_write_behind_upload_is_left_to_the_commit(master: keymod.Keyset, tmp_path: Path) -> None:
    """A 10 MiB file written out of order goes to write-behind when closed; its
    first pack fails to upload. The area logs it and keeps serving; the commit
    uploads the file again, whole and exact."""
    content = os.urandom(10 << 20)

    async def main() -> None:
        memory = await new_repository(master)
        faulty = FaultyStorage(memory, Schedule.at("put", 1, "fail", prefix=PACKS_PREFIX))
        with trio.fail_after(DEADLINE):
            async with staging_area(faulty, master, tmp_path / "state") as area:
                root = await area.make(STAGING_INO, b"wb", EntryKind.DIRECTORY, 0o755, 0, 0)
                handle, attr = await area.create(root.ino, b"big", 0o644, 0, 0)
                # the end first: not a sequential writer, so no streaming upload
                await area.write(handle, 1 << 20, content[1 << 20:])
                await area.write(handle, 0, content[:1 << 20])
                area.release(handle)
                tree = area.trees["wb"]
                while not faulty.taken or tree.uploads.running():  # write-behind met the fault and gave up
                    await trio.sleep(0.01)
                assert faulty.taken[0][2] == "fail" and tree.uploads.done_count() == 0
                result = await area.commit("wb")
                assert await snapshot_file(area.repo, result.tag.id_hex, b"big") == content
                assert not tree.dirty
        await check_clean(memory, master)

    trio.run(main)


def test_a_failed_streaming_upload_is_done_again_by_write_behind(master: keymod.Keyset, tmp_path: Path) -> None:
    """A file written front to back streams out as it grows; when that upload
    fails, the closed file goes to write-behind whole, which stores it."""
    content = os.urandom(12 << 20)

    async def main() -> None:
        memory = await new_repository(master)
        faulty = FaultyStorage(memory, Schedule.at("put", 1, "fail", prefix=PACKS_PREFIX))
        with trio.fail_after(DEADLINE):
            async with staging_area(faulty, master, tmp_path / "state") as area:
                root = await area.make(STAGING_INO, b"st", EntryKind.DIRECTORY, 0o755, 0, 0)
                handle, attr = await area.create(root.ino, b"big", 0o644, 0, 0)
                for start in range(0, len(content), 1 << 20):
                    await area.write(handle, start, content[start:start + (1 << 20)])
                assert handle.stream is not None  # streaming, as a sequential writer does
                area.release(handle)
                tree = area.trees["st"]
                local = attr.ino & ((1 << 40) - 1)
                while tree.uploads.result(local) is None:  # the stream failed; write-behind took it whole
                    await trio.sleep(0.01)
                assert faulty.taken[0][2] == "fail"
                result = await area.commit("st")
                assert await snapshot_file(area.repo, result.tag.id_hex, b"big") == content
        await check_clean(memory, master)

    trio.run(main)


# --- a publication that fails after its record -----------------------------------------------


def test_a_commit_that_failed_after_its_record_is_listed_by_the_next_commit(master: keymod.Keyset,
                                                                            tmp_path: Path) -> None:
    """Soak finding: a commit whose tag could not be written (full or read-only
    disk) left its record unlisted for the life of the mount; the next commit of
    the same mount now lists it, as a new process of the key would."""
    async def main() -> None:
        memory = await new_repository(master)
        faulty = FaultyStorage(memory, Schedule.at("put", 1, "fail", prefix="tags/"))
        with trio.fail_after(DEADLINE):
            async with staging_area(faulty, master, tmp_path / "state") as area:
                root = await area.make(STAGING_INO, b"pub", EntryKind.DIRECTORY, 0o755, 0, 0)
                handle, _ = await area.create(root.ino, b"f", 0o644, 0, 0)
                await area.write(handle, 0, b"first")
                area.release(handle)
                with pytest.raises(StorageError, match="injected failure"):
                    await area.commit("pub")
                assert tags(memory) == [] and len([k for k in memory.objects if k.startswith("snapshots/")]) == 1
                handle = await area.open((await area.lookup(root.ino, b"f")).ino, os.O_WRONLY)
                await area.write(handle, 0, b"FIRST, then second")
                area.release(handle)
                await area.commit("pub")
                assert len(tags(memory)) == 2  # the failed one is listed too
        await check_clean(memory, master)

    trio.run(main)
