"""The fast tier: the cores (repository, save, restore, check, forget, prune)
in-process over an in-memory storage, with storage faults on a seeded
schedule. No servers, no mounts, no subprocesses (`scripts/test --fast`).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from rekkordfs import keys as keymod
from rekkordfs.check import Checker
from rekkordfs.codec import PACKS_PREFIX
from rekkordfs.errors import RekkordError, RepositoryError, StorageError
from rekkordfs.forget import forget, plan_by_ids, plan_by_policy
from rekkordfs.keys import KeyType
from rekkordfs.prune import PruneOptions, Pruner
from rekkordfs.repository import Repository, walk_path
from rekkordfs.restore import RestoreOptions, RestoreSession
from rekkordfs.retention import Duration, Policy
from rekkordfs.save import SaveSession
from rekkordfs.storage.base import Storage
from rekkordfs.storage.memory import MemoryStorage
from tests.faults import FaultyStorage, Schedule
from tests.fsutil import rsync_diff

pytestmark = pytest.mark.fast
NO_GRACE = PruneOptions(grace=Duration())


@pytest.fixture(autouse=True)
def private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REKKORD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def master() -> keymod.Keyset:
    return keymod.new_master()


def make_tree(root: Path, seed: int, files: int = 60) -> Path:
    """Small and large files, nested folders, a symlink, a hardlink and an empty folder."""
    rng = random.Random(seed)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    for index in range(files):
        folder = root if index % 3 == 0 else root / "sub" if index % 3 == 1 else root / "sub" / "deeper"
        (folder / f"f{index:03d}").write_bytes(rng.randbytes(rng.choice((0, 100, 3000, 40_000))))
    (root / "large.bin").write_bytes(rng.randbytes(3 << 20))
    os.symlink("sub/f001", root / "link")
    os.link(root / "f000", root / "sub" / "hard")
    return root


def change(root: Path, seed: int, count: int = 5) -> None:
    rng = random.Random(seed)
    for path in rng.sample(sorted(p for p in root.rglob("f*") if p.is_file()), count):
        path.write_bytes(rng.randbytes(rng.randrange(1, 50_000)))


@asynccontextmanager
async def opened(storage: Storage, keys: keymod.Keyset) -> AsyncIterator[Repository]:
    repo = await Repository.open(storage, keys)
    try:
        yield repo
    finally:
        await repo.aclose()


async def new_repository(master: keymod.Keyset) -> MemoryStorage:
    storage = MemoryStorage()
    await Repository.create(storage, master)
    return storage


async def save(storage: Storage, keys: keymod.Keyset, channel: str, path: Path) -> str:
    async with opened(storage, keys) as repo:
        return (await SaveSession(repo, channel, [str(path)], warn=lambda _m: None).run()).snapshot_id


async def restore(storage: Storage, keys: keymod.Keyset, snapshot: str, path: Path, dest: Path) -> None:
    async with opened(storage, keys) as repo:
        tag = await repo.resolve(snapshot)
        target, has_metadata = await walk_path(repo, await repo.load_snapshot(tag), str(path))
        await RestoreSession(repo, target, str(dest), RestoreOptions(), lambda _m: None,
                             has_metadata=has_metadata).run()


async def check(storage: Storage, keys: keymod.Keyset) -> list[str]:
    async with opened(storage, keys) as repo:
        return (await Checker(repo, read_data=True).run()).problems


def test_save_restore_check_round_trip(master: keymod.Keyset, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=1)

    async def main() -> None:
        storage = await new_repository(master)
        snapshot = await save(storage, master, "c", src)
        await restore(storage, master, snapshot, src, tmp_path / "out")
        assert rsync_diff(src, tmp_path / "out") == ""
        assert await check(storage, master) == []

    trio.run(main)


@pytest.mark.parametrize("seed", range(8))
def test_storage_faults_during_save_lose_nothing(master: keymod.Keyset, tmp_path: Path, seed: int) -> None:
    """Random failures, full disks, duplicated puts, truncated reads and delays
    while saving: the save either succeeds and restores exactly, or fails with a
    StorageError and leaves a repository that checks clean; either way the next
    save (without faults) restores exactly."""
    src = make_tree(tmp_path / "src", seed=seed)

    async def main() -> None:
        storage = await new_repository(master)
        first = await save(storage, master, "c", src)
        change(src, seed)
        faulty = FaultyStorage(storage, Schedule(seed=seed, rate=0.4, operations=("put", "get_range", "list")))
        try:
            snapshot = await save(faulty, master, "c", src)
        except (StorageError, RekkordError):
            snapshot = None
        assert faulty.taken, "the schedule injected nothing: the test proves nothing"
        assert await check(storage, master) == []
        if snapshot is not None:
            await restore(storage, master, snapshot, src, tmp_path / "out")
            assert rsync_diff(src, tmp_path / "out") == ""
        again = await save(storage, master, "c", src)
        await restore(storage, master, again, src, tmp_path / "again")
        assert rsync_diff(src, tmp_path / "again") == ""
        await restore(storage, master, first, src, tmp_path / "first")  # the older one too

    trio.run(main)


def test_a_failed_pack_upload_leaves_nothing_referring_to_it(master: keymod.Keyset, tmp_path: Path) -> None:
    """PackWriter forgets the blobs of a pack whose upload failed: the next
    save of the same data stores them again instead of referring to nothing."""
    src = make_tree(tmp_path / "src", seed=5)

    async def main() -> None:
        storage = await new_repository(master)
        faulty = FaultyStorage(storage, Schedule.at("put", 1, "fail", prefix=PACKS_PREFIX))
        with pytest.raises(StorageError):
            await save(faulty, master, "c", src)
        assert faulty.taken == [("put", faulty.taken[0][1], "fail")]
        snapshot = await save(storage, master, "c", src)
        await restore(storage, master, snapshot, src, tmp_path / "out")
        assert rsync_diff(src, tmp_path / "out") == ""
        assert await check(storage, master) == []

    trio.run(main)


def test_truncated_reads_are_reported_not_trusted(master: keymod.Keyset, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=6)

    async def main() -> None:
        storage = await new_repository(master)
        snapshot = await save(storage, master, "c", src)
        faulty = FaultyStorage(storage, Schedule(seed=1, rate=1.0, actions=("truncate",), operations=("get_range",)))
        with pytest.raises(RekkordError):
            await restore(faulty, master, snapshot, src, tmp_path / "out")
        assert faulty.taken

    trio.run(main)


# --- forget and prune -------------------------------------------------------------------------------


async def history(storage: Storage, keys: keymod.Keyset, src: Path, count: int) -> list[str]:
    snapshots = []
    for index in range(count):
        if index:
            change(src, index)
        snapshots.append(await save(storage, keys, "c", src))
    return snapshots


def test_forget_and_prune_free_space_and_keep_the_rest_exact(master: keymod.Keyset, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=2)

    async def main() -> None:
        storage = await new_repository(master)
        snapshots = await history(storage, master, src, 6)
        kept_tree = tmp_path / "kept"
        await restore(storage, master, snapshots[-1], src, kept_tree)
        before = sum(len(data) for key, (data, _) in storage.objects.items() if key.startswith("packs/"))
        async with opened(storage, master) as repo:
            removed = await forget(repo, await plan_by_policy(repo, Policy(last=2), None))
            assert len(removed) == 4
            report = await Pruner(repo, NO_GRACE).run()
        assert report.packs_deleted > 0 and report.bytes_deleted > 0
        after = sum(len(data) for key, (data, _) in storage.objects.items() if key.startswith("packs/"))
        assert after < before and report.bytes_stored == after
        assert await check(storage, master) == []
        await restore(storage, master, snapshots[-1], src, tmp_path / "again")
        assert rsync_diff(kept_tree, tmp_path / "again") == ""
        async with opened(storage, master) as repo:  # a second prune finds nothing more to do
            report = await Pruner(repo, NO_GRACE).run()
        assert report.packs_deleted == 0 and report.packs_repacked == 0

    trio.run(main)


def test_prune_with_a_grace_condemns_first_and_deletes_later(master: keymod.Keyset, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=3)

    async def main() -> None:
        storage = await new_repository(master)
        storage.clock = lambda: 0  # everything stored is old
        snapshots = await history(storage, master, src, 3)
        hour = Duration(hours=1)
        async with opened(storage, master) as repo:
            await forget(repo, await plan_by_ids(repo, snapshots[:2]))
            early = await Pruner(repo, PruneOptions(grace=hour)).run()
        assert early.packs_deleted == 0 and early.packs_condemned > 0
        async with opened(storage, master) as repo:
            too_soon = await Pruner(repo, PruneOptions(grace=hour)).run()
        assert too_soon.packs_deleted == 0 and too_soon.packs_waiting == early.packs_condemned
        # two hours later, by the pruning machine's clock
        async with opened(storage, master) as repo:
            later = Pruner(repo, PruneOptions(grace=hour), clock=lambda: time.time_ns() + 2 * 3600 * 10**9)
            late = await later.run()
        assert late.packs_deleted == early.packs_condemned
        assert await check(storage, master) == []
        await restore(storage, master, snapshots[-1], src, tmp_path / "out")
        assert rsync_diff(src, tmp_path / "out") == ""

    trio.run(main)


async def start_save(storage: Storage, keys: keymod.Keyset, channel: str, src: Path):
    """A save stopped just before it publishes: what a SIGSTOP at that point
    does to a real one. Returns (repo, session, finish)."""
    repo = await Repository.open(storage, keys)
    session = SaveSession(repo, channel, [str(src)], warn=lambda _m: None)
    published = trio.Event()
    proceed = trio.Event()
    real = repo.publish_snapshot

    async def held(snapshot, uses):
        published.set()
        await proceed.wait()
        return await real(snapshot, uses)

    repo.publish_snapshot = held  # type: ignore[method-assign]
    return repo, session, published, proceed


@pytest.mark.parametrize("grace", ["0", "1d"])
def test_a_save_running_during_a_prune_publishes_whole_or_fails_cleanly(master: keymod.Keyset, tmp_path: Path,
                                                                          grace: str) -> None:
    """A save that reused the data of an old snapshot (warm stat cache) is held
    before publishing while another machine forgets that snapshot and prunes.
    With --grace 0 (the user said nothing was running) the data is gone and the
    save must refuse to publish; with a grace, the prune only condemns and the
    save publishes a snapshot that restores exactly, and a later prune keeps
    what it uses."""
    src = make_tree(tmp_path / "src", seed=4)
    rw = keymod.derive(master, KeyType.READ_WRITE)

    async def main() -> None:
        storage = await new_repository(master)
        old = await save(storage, master, "c", src)
        storage.clock = lambda: 0  # old enough to be condemned
        async with trio.open_nursery() as nursery:
            repo, session, published, proceed = await start_save(storage, master, "c", src)
            outcome: dict[str, object] = {}

            async def run() -> None:
                try:
                    outcome["result"] = await session.run()
                except RepositoryError as exc:
                    outcome["error"] = exc.message

            nursery.start_soon(run)
            await published.wait()
            async with opened(storage, rw) as other:  # the other machine
                await forget(other, await plan_by_ids(other, [old]))
                await Pruner(other, PruneOptions(grace=Duration.parse(grace))).run()
            proceed.set()
        await repo.aclose()
        if grace == "0":
            assert "prune" in str(outcome.get("error")), outcome
        else:
            snapshot = outcome["result"].snapshot_id  # type: ignore[attr-defined]
            await restore(storage, master, snapshot, src, tmp_path / "out")
            assert rsync_diff(src, tmp_path / "out") == ""
            async with opened(storage, rw) as other:  # days later: the sweep of that prune's record
                sweep = Pruner(other, PruneOptions(grace=Duration.parse(grace)),
                               clock=lambda: time.time_ns() + 3 * 86400 * 10**9)
                swept = await sweep.run()
            assert swept.problems == []
            await restore(storage, master, snapshot, src, tmp_path / "after-sweep")
            assert rsync_diff(src, tmp_path / "after-sweep") == ""
        assert await check(storage, master) == []

    trio.run(main)


def test_warm_caches_never_refer_to_pruned_data(master: keymod.Keyset, tmp_path: Path) -> None:
    """Machine A saves (its cache knows every blob); machine B forgets and prunes
    everything; A saves again from its warm cache: every blob of the new
    snapshot exists (its cache notices the vanished indexes)."""
    src = make_tree(tmp_path / "src", seed=7)
    rw = keymod.derive(master, KeyType.READ_WRITE)

    async def main() -> None:
        storage = await new_repository(master)
        first = await save(storage, master, "c", src)
        async with opened(storage, rw) as other:
            await forget(other, await plan_by_ids(other, [first]))
            report = await Pruner(other, NO_GRACE).run()
            assert report.packs_deleted > 0
        again = await save(storage, master, "c", src)
        await restore(storage, master, again, src, tmp_path / "out")
        assert rsync_diff(src, tmp_path / "out") == ""
        assert await check(storage, master) == []

    trio.run(main)


@pytest.mark.parametrize("kill_at", range(12))
def test_prune_interrupted_anywhere_leaves_a_repository_that_restores(master: keymod.Keyset, tmp_path: Path,
                                                                        kill_at: int) -> None:
    """The prune's storage fails for good at its kill_at-th put or delete (as a
    kill -9 there would leave it); the repository checks clean, every snapshot
    left restores, and a second prune finishes the work."""
    src = make_tree(tmp_path / "src", seed=8)

    async def main() -> None:
        storage = await new_repository(master)
        snapshots = await history(storage, master, src, 4)
        await restore(storage, master, snapshots[-1], src, tmp_path / "expected")
        async with opened(storage, master) as repo:
            await forget(repo, await plan_by_policy(repo, Policy(last=1), None))
        schedule = Schedule(fixed={})
        mutations = {"n": 0}

        def decide(operation: str, key: str) -> str | None:
            if operation in ("put", "delete"):
                mutations["n"] += 1
                if mutations["n"] >= kill_at + 1:
                    return "fail"
            return None

        schedule.decide = decide  # type: ignore[method-assign]
        faulty = FaultyStorage(storage, schedule)
        async with opened(faulty, master) as repo:
            try:
                await Pruner(repo, PruneOptions(grace=Duration(), repack_below=0.99)).run()
                finished = True
            except RekkordError:
                finished = False
        assert finished or faulty.taken
        assert await check(storage, master) == []
        await restore(storage, master, snapshots[-1], src, tmp_path / "out")
        assert rsync_diff(tmp_path / "expected", tmp_path / "out") == ""
        async with opened(storage, master) as repo:
            second = await Pruner(repo, PruneOptions(grace=Duration(), repack_below=0.99)).run()
        assert second.problems == []
        assert await check(storage, master) == []

    trio.run(main)


def test_a_publish_interrupted_between_record_and_tag_is_finished_by_the_next_save(
        master: keymod.Keyset, tmp_path: Path) -> None:
    """The one window a kill can leave half done: the record written, not its
    tag. check names it; the next save of the same key lists it."""
    src = make_tree(tmp_path / "src", seed=9)

    async def main() -> None:
        storage = await new_repository(master)
        faulty = FaultyStorage(storage, Schedule.at("put", 1, "fail", prefix="tags/"))
        with pytest.raises(StorageError):
            await save(faulty, master, "c", src)
        assert [action for _, _, action in faulty.taken] == ["fail"]
        problems = await check(storage, master)
        assert len(problems) == 1 and "has no valid tag" in problems[0]
        second = await save(storage, master, "c", src)
        async with opened(storage, master) as repo:
            listed = [tag.id_hex for tag in await repo.list_tags()]
        assert len(listed) == 2 and second in listed
        assert await check(storage, master) == []
        for snapshot in listed:
            await restore(storage, master, snapshot, src, tmp_path / snapshot)
            assert rsync_diff(src, tmp_path / snapshot) == ""

    trio.run(main)


def test_an_unlisted_record_can_be_forgotten_by_its_full_id(master: keymod.Keyset, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=10)

    async def main() -> None:
        storage = await new_repository(master)
        snapshot = await save(storage, master, "c", src)
        for key in [k for k in storage.objects if k.startswith("tags/")]:
            del storage.objects[key]  # deleted behind the repository's back
        assert "has no valid tag" in (await check(storage, master))[0]
        async with opened(storage, master) as repo:
            with pytest.raises(RekkordError):
                await plan_by_ids(repo, [snapshot[:16]])  # prefixes name listed snapshots only
            await forget(repo, await plan_by_ids(repo, [snapshot]))
        assert await check(storage, master) == []
        async with opened(storage, master) as repo:
            report = await Pruner(repo, NO_GRACE).run()
        assert report.records_deleted == 1 and report.packs_deleted > 0
        assert not [k for k in storage.objects if k.startswith(("packs/", "snapshots/", "forgotten/"))]

    trio.run(main)


def test_blobs_of_a_save_that_did_not_publish_are_not_known(master: keymod.Keyset, tmp_path: Path) -> None:
    """A save stores its packs' blob rows in the cache as it uploads them; they
    count only once the snapshot is published. A save that failed after some
    packs, whose packs and indexes were then lost, leaves rows that the next
    save must not refer to: it stores the data again."""
    src = make_tree(tmp_path / "src", seed=12)

    async def main() -> None:
        storage = await new_repository(master)
        faulty = FaultyStorage(storage, Schedule.at("put", 1, "fail", prefix="snapshots/"))
        with pytest.raises(StorageError):
            await save(faulty, master, "c", src)
        async with opened(storage, master) as repo:
            written = list(await storage.list(PACKS_PREFIX))
            assert written and repo.cache.known_indexes() == set()
            for name in written + await storage.list("index/"):
                await storage.delete(name)  # lost: never made durable
        snapshot = await save(storage, master, "c", src)
        await restore(storage, master, snapshot, src, tmp_path / "out")
        assert rsync_diff(src, tmp_path / "out") == ""
        assert await check(storage, master) == []

    trio.run(main)
