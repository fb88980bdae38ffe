"""A restore's worker processes for small files (rekkordfs/restoreprocs.py,
restoreworker.py): the tree they write is the one the main process alone
writes, to the nanosecond and the extended attribute; a blob altered in
storage is refused before its file exists; a worker that dies fails the
restore with one line, at once.

The server here is a MemoryStorage that says it is remote and offers no
blocking reads (so the restore takes the path it takes on S3 and SFTP), or
a repository in a local folder, whose packs the workers read themselves;
the worker processes, the files and the checks are real.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from rekkordfs import keys as keymod
from rekkordfs import restore as restoremod
from rekkordfs import restoreprocs, tuning, workerprocs
from rekkordfs.codec import pack_key
from rekkordfs.errors import CorruptedData
from rekkordfs.format import EntryKind
from rekkordfs.frames import frame
from rekkordfs.prepprocs import WorkerFailed
from rekkordfs.repository import Repository, walk_path
from rekkordfs.restore import RestoreOptions, RestoreSession, restore_workers_ahead
from rekkordfs.save import SaveSession
from rekkordfs.storage.base import Storage
from rekkordfs.storage.local import LocalStorage
from rekkordfs.storage.memory import MemoryStorage
from tests.fsutil import rsync_diff
from tests.test_save_processes import small_tree


class ServerLike(MemoryStorage):
    """Reads as a server's do: no blocking reads in the caller's thread."""

    remote = True
    read_blocking = None


@pytest.fixture(autouse=True)
def private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REKKORD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def eager_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches go to the workers from the first on, without waiting for them
    to say they are ready (they answer once they are), and batches are small
    so that a tree of a few thousand files makes many."""
    monkeypatch.setattr(restoreprocs.RestorePool, "ready", property(lambda pool: bool(pool.workers)))
    monkeypatch.setattr(restoremod, "REMOTE_BATCH_FILES", 64)


def saved_tree(tmp_path: Path, master: keymod.Keyset, files: int = 2000,
               storage: Storage | None = None) -> tuple[Storage, Path, str]:
    """A tree of small files saved into storage (by default a ServerLike)."""
    src = small_tree(tmp_path / "src", files)
    os.setxattr(src / "d00000" / "f00002", "user.note", b"kept")
    for index in range(6):  # small files above tuning.WORKER_FILE: written in a thread meanwhile
        (src / "d00037" / f"mid{index}").write_bytes(os.urandom(tuning.WORKER_FILE + 1000 * index))
    storage = storage or ServerLike()

    async def main() -> str:
        await Repository.create(storage, master)
        repo = await Repository.open(storage, master)
        try:
            result = await SaveSession(repo, "c", [str(src)], warn=lambda _m: None, processes=0).run()
            return result.snapshot_id
        finally:
            await repo.aclose()

    return storage, src, trio.run(main)


async def restore_into(storage: Storage, keys: keymod.Keyset, snapshot: str, src: Path, dest: Path,
                       processes: int, ahead: workerprocs.WorkersAhead | None = None,
                       pids: list[int] | None = None) -> int:
    """Restore src's folder of the snapshot into dest; the batches the workers
    wrote (pids: gets the workers' process IDs)."""
    repo = await Repository.open(storage, keys)
    try:
        snap = await repo.load_snapshot(await repo.resolve(snapshot))
        target, has_metadata = await walk_path(repo, snap, str(src))
        assert target.kind == EntryKind.DIRECTORY
        session = RestoreSession(repo, target, str(dest), RestoreOptions(), lambda _m: None,
                                 has_metadata=has_metadata, ahead=ahead)
        pools: list[restoreprocs.RestorePool] = []
        real = session._pool

        def pool() -> restoreprocs.RestorePool | None:
            made = real() if processes else None
            pools.extend([made] if made is not None else [])
            return made

        session._pool = pool  # type: ignore[method-assign]
        with trio.fail_after(120):  # never a hang
            await session.run()
        if pids is not None:
            pids.extend(worker.process.pid for pool in pools for worker in pool.workers)
        return pools[0].batches if pools else 0
    finally:
        await repo.aclose()


def test_worker_processes_write_the_tree_the_main_process_writes(tmp_path: Path, eager_workers: None) -> None:
    master = keymod.new_master()
    reader = keymod.derive(master, keymod.KeyType.READ_WRITE)
    storage, src, snapshot = saved_tree(tmp_path, master)
    alone, helped = tmp_path / "alone", tmp_path / "helped"

    async def main() -> None:
        assert await restore_into(storage, reader, snapshot, src, alone, 0) == 0
        batches = await restore_into(storage, reader, snapshot, src, helped, 1)
        assert batches > 20  # the worker wrote (nearly) every small file
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        assert not [p for p in pids if _is_worker(p)]  # every worker ended with the restore

    trio.run(main)
    assert rsync_diff(src, helped) == ""
    assert rsync_diff(alone, helped) == ""
    assert os.getxattr(helped / "d00000" / "f00002", "user.note") == b"kept"
    assert os.stat(helped / "hard").st_ino == os.stat(helped / "d00000" / "f00001").st_ino


def test_an_altered_blob_is_refused_by_the_worker_before_its_file_exists(tmp_path: Path,
                                                                         eager_workers: None) -> None:
    master = keymod.new_master()
    storage, src, snapshot = saved_tree(tmp_path, master, files=300)
    victim = src / "d00037" / "f00040"
    assert 0 < victim.stat().st_size <= 2048

    async def find_chunk() -> tuple[str, int]:
        repo = await Repository.open(storage, master)
        try:
            snap = await repo.load_snapshot(await repo.resolve(snapshot))
            entry, _ = await walk_path(repo, snap, str(victim))
            location = entry.chunks[0].location
            return pack_key(location.pack), location.offset + location.length // 2
        finally:
            await repo.aclose()

    key, at = trio.run(find_chunk)
    data, mtime = storage.objects[key]
    storage.objects[key] = (data[:at] + bytes([data[at] ^ 1]) + data[at + 1:], mtime)
    dest = tmp_path / "dest"
    with pytest.raises(CorruptedData) as refused:
        trio.run(restore_into, storage, master, snapshot, src, dest, 1)
    assert "failed authentication" in str(refused.value)
    assert str(victim.relative_to(src)) in str(refused.value)  # names the file (or its batch's first)
    assert not (dest / victim.relative_to(src)).exists()


def test_a_worker_that_dies_fails_the_restore_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           eager_workers: None) -> None:
    master = keymod.new_master()
    storage, src, snapshot = saved_tree(tmp_path, master)
    real = restoreprocs.RestorePool.write
    killed: list[int] = []

    async def kill_first(pool: restoreprocs.RestorePool, *args: object) -> int:
        written = await real(pool, *args)  # type: ignore[arg-type]
        if not killed:  # once its first batch is answered: mid-way through the restore
            pid = pool.workers[0].process.pid
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return written

    monkeypatch.setattr(restoreprocs.RestorePool, "write", kill_first)
    with pytest.raises(WorkerFailed) as failed:
        trio.run(restore_into, storage, master, snapshot, src, tmp_path / "dest", 1)
    assert str(failed.value) == "a worker process of the restore ended unexpectedly (killed by signal 9)"
    assert killed
    with pytest.raises(ProcessLookupError):  # reaped, not left a zombie
        os.kill(killed[0], 0)
    monkeypatch.setattr(restoreprocs.RestorePool, "write", real)
    trio.run(restore_into, storage, master, snapshot, src, tmp_path / "again", 1)  # nothing in the way
    assert rsync_diff(src, tmp_path / "again") == ""


def test_from_a_local_disk_the_workers_read_the_packs_themselves(tmp_path: Path, eager_workers: None) -> None:
    master = keymod.new_master()
    storage, src, snapshot = saved_tree(tmp_path, master, storage=LocalStorage(str(tmp_path / "repo")))
    alone, helped = tmp_path / "alone", tmp_path / "helped"

    async def main() -> None:
        assert await restore_into(storage, master, snapshot, src, alone, 0) == 0
        assert await restore_into(storage, master, snapshot, src, helped, 1) > 20
        assert not [p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if _is_worker(p)]

    trio.run(main)
    assert rsync_diff(src, helped) == ""
    assert rsync_diff(alone, helped) == ""
    assert os.getxattr(helped / "d00000" / "f00002", "user.note") == b"kept"


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_a_local_pack_the_worker_cannot_use_fails_as_without_it(tmp_path: Path, eager_workers: None,
                                                               damage: str) -> None:
    """A truncated pack (the worker cannot read it: the main process restores
    the batch its usual way) or an altered blob (the worker refuses it): a
    one-line error as without workers, and no file for it."""
    master = keymod.new_master()
    storage, src, snapshot = saved_tree(tmp_path, master, files=300, storage=LocalStorage(str(tmp_path / "repo")))
    victim = src / "d00037" / "f00040"

    async def find_chunk() -> tuple[str, int, int]:
        repo = await Repository.open(storage, master)
        try:
            snap = await repo.load_snapshot(await repo.resolve(snapshot))
            entry, _ = await walk_path(repo, snap, str(victim))
            location = entry.chunks[0].location
            return pack_key(location.pack), location.offset, location.length
        finally:
            await repo.aclose()

    key, offset, length = trio.run(find_chunk)
    pack = tmp_path / "repo" / key
    data = bytearray(pack.read_bytes())
    if damage == "truncated":
        del data[offset + length // 2:]
    else:
        data[offset + length // 2] ^= 1
    pack.chmod(0o644)
    pack.write_bytes(bytes(data))
    errors = []
    for processes in (0, 1):
        dest = tmp_path / f"dest{processes}"
        with pytest.raises(CorruptedData) as refused:
            trio.run(restore_into, storage, master, snapshot, src, dest, processes)
        errors.append(str(refused.value))
        assert not (dest / victim.relative_to(src)).exists()
    word = "truncated" if damage == "truncated" else "failed authentication"
    for error in errors:  # the same kind of line (which file meets the damage first may differ)
        assert word in error and "\n" not in error, error
        assert error.startswith(("'", "restoring '")), error


def test_workers_started_ahead_get_dest_later_and_write_the_tree(tmp_path: Path, eager_workers: None) -> None:
    """The workers start before the repository is opened and DEST exists;
    DEST's descriptor reaches them through their socket pair, and they (not
    workers started later) write the small files."""
    master = keymod.new_master()
    storage, src, snapshot = saved_tree(tmp_path, master, storage=LocalStorage(str(tmp_path / "repo")))
    dest = tmp_path / "dest"

    async def main() -> None:
        async with restore_workers_ahead(2, RestoreOptions()) as ahead:
            assert ahead is not None
            early = await _our_workers(ahead.processes)
            assert not dest.exists()
            used: list[int] = []
            assert await restore_into(storage, master, snapshot, src, dest, ahead.processes, ahead, used) > 20
            assert sorted(used) == sorted(early)
        assert not _our_workers_now()

    trio.run(main)
    assert rsync_diff(src, dest) == ""
    assert os.getxattr(dest / "d00000" / "f00002", "user.note") == b"kept"


def test_workers_started_ahead_and_not_used_are_ended(tmp_path: Path) -> None:
    """A restore that fails before it needs them (no such snapshot, say)
    leaves no worker behind; a dry run starts none."""

    async def main() -> None:
        with pytest.raises(LookupError):
            async with restore_workers_ahead(2, RestoreOptions()) as ahead:
                assert ahead is not None
                await _our_workers(ahead.processes)
                raise LookupError("no such snapshot")
        assert not _our_workers_now()
        async with restore_workers_ahead(2, RestoreOptions(dry_run=True)) as none:
            assert none is None

    trio.run(main)


def test_a_worker_whose_handover_closes_unused_ends_without_writing(tmp_path: Path) -> None:
    """The main process ended (or failed) between the start frame and DEST's
    descriptor: the worker ends quietly, with nothing written or said."""

    async def main() -> None:
        worker = await workerprocs.spawn_worker("restoreworker", handover=True)
        assert worker.handover is not None and worker.handover_fileno >= 0
        assert worker.process.stdin is not None and worker.process.stdout is not None
        await worker.process.stdin.send_all(frame((bytes(32), bytes(32), worker.handover_fileno,
                                                   str(tmp_path / "dest"), None)))
        worker.handover.close()
        with trio.fail_after(60):
            assert await worker.process.wait() == 0
        assert await worker.process.stdout.receive_some() == b""

    trio.run(main)
    assert not (tmp_path / "dest").exists()


def test_no_worker_without_a_second_cpu() -> None:
    assert tuning.restore_processes(1) == 0
    assert tuning.restore_processes(2) == (1 if (os.cpu_count() or 1) >= 2 else 0)


async def _our_workers(count: int) -> list[int]:
    """The IDs of this process's count restore workers, once they are all started."""
    with trio.fail_after(60):
        while len(found := _our_workers_now()) < count:
            await trio.sleep(0.01)
    return found


def _our_workers_now() -> list[int]:
    return [p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if _is_worker(p)]


def _is_worker(pid: int) -> bool:
    """A restore worker started by this test process (other restores may run on the machine)."""
    try:
        if b"rekkordfs.restoreworker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return any(line.split() == ["PPid:", str(os.getpid())] for line in status.splitlines())
