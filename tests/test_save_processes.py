"""A save's worker processes for small files (rekkordfs/prepprocs.py): the
snapshot they make is the one the main process alone makes; a worker that
dies fails the save with one line, at once; Ctrl-C leaves no process behind.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import trio

from rekkordfs import keys as keymod
from rekkordfs import prepprocs, tuning
from rekkordfs.check import Checker
from rekkordfs.format import BlobKind, BlobRef, Entry, EntryKind
from rekkordfs.keys import KeyType
from rekkordfs.prepprocs import WorkerFailed
from rekkordfs.repository import Repository
from rekkordfs.save import SaveSession
from rekkordfs.storage.memory import MemoryStorage
from tests.conftest import ROOT, Rekkord
from tests.stops import process_state
from tests.test_interrupt import _interrupt_at, _outcome


@pytest.fixture(autouse=True)
def private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REKKORD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def eager_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process saves use their workers from the first batch on, without
    waiting for them to say they are ready (a loaded machine starts them
    slower than the main process saves a few thousand files)."""
    monkeypatch.setattr(tuning, "SAVE_PROCESS_FILES", 0)
    real = prepprocs.PrepPool.__init__

    def eager(pool: prepprocs.PrepPool, *args: object) -> None:
        real(pool, *args)  # type: ignore[arg-type]
        pool.ready = True

    monkeypatch.setattr(prepprocs.PrepPool, "__init__", eager)


def small_tree(root: Path, files: int, seed: int = 3) -> Path:
    """Many small files in folders of various sizes, some of them twins (within
    a batch and across batches), a few empty, a few large, a hardlink."""
    rng = random.Random(seed)
    shared = [rng.randbytes(rng.randrange(1, 3000)) for _ in range(20)]
    folder = root
    for index in range(files):
        if index % 37 == 0:
            folder = root / f"d{index:05d}"
            folder.mkdir(parents=True)
        kind = rng.random()
        data = (b"" if kind < 0.02 else rng.choice(shared) if kind < 0.1
                else rng.randbytes(4 << 20) if index in (5, 1500) else rng.randbytes(rng.randrange(1, 2048)))
        (folder / f"f{index:05d}").write_bytes(data)
        if index % 50 == 7:  # read with the content, in the batch (savewalk.py leaves them)
            os.setxattr(folder / f"f{index:05d}", "user.note", b"n%d" % index)
    os.link(root / "d00000" / "f00001", root / "hard")
    os.setxattr(root / "hard", "user.linked", b"both names")
    return root


async def tree_of(repo: Repository, ref: BlobRef) -> dict[bytes, object]:
    """Every entry below ref by path, its chunks as (ID, size) (where they are
    stored differs between repositories), directories by their content; not
    access times (the first save's listing moved those of the folders)."""
    out: dict[bytes, object] = {}
    for entry in await repo.read_directory(ref):
        chunks = [(c.id, c.size) for c in entry.chunks] if entry.kind == EntryKind.FILE else None
        out[entry.name] = (dataclasses.replace(entry, chunks_raw=b"", dir_ref=None, atime_ns=0), chunks)
        if entry.kind == EntryKind.DIRECTORY:
            assert entry.dir_ref is not None
            for name, value in (await tree_of(repo, entry.dir_ref)).items():
                out[entry.name + b"/" + name] = value
    return out


async def save_into(storage: MemoryStorage, keys: keymod.Keyset, src: Path, processes: int
                    ) -> tuple[str, int]:
    """A save and the number of batches its worker processes prepared."""
    repo = await Repository.open(storage, keys)
    try:
        session = SaveSession(repo, "c", [str(src)], warn=lambda _m: None, processes=processes)
        result = await session.run()
        return result.snapshot_id, session._pool.batches if session._pool is not None else 0
    finally:
        await repo.aclose()


@pytest.mark.parametrize("kind", [KeyType.MASTER, KeyType.WRITE_ONLY])
def test_worker_processes_make_the_snapshot_the_main_process_makes(tmp_path: Path, kind: KeyType,
                                                                   eager_workers: None) -> None:
    master = keymod.new_master()
    writer = master if kind == KeyType.MASTER else keymod.derive(master, kind)
    src = small_tree(tmp_path / "src", 3000)

    async def main() -> None:
        trees = []
        for processes in (0, 1):
            storage = MemoryStorage()
            await Repository.create(storage, master)
            snapshot, batches = await save_into(storage, writer, src, processes)
            # the worker did all of the work (batches grow once it is ready)
            assert (batches >= 3000 // tuning.PROCESS_BATCH_FILES) == (processes > 0), batches
            repo = await Repository.open(storage, master)
            try:
                tag = await repo.resolve(snapshot)
                tree = await tree_of(repo, (await repo.load_snapshot(tag)).root_ref)
                inside = os.fsencode(src).lstrip(b"/") + b"/"  # the folders above it are not the test's
                trees.append({path: value for path, value in tree.items() if path.startswith(inside)})
                assert (await Checker(repo, read_data=True).run()).problems == []
            finally:
                await repo.aclose()
        assert len(trees[0]) > 3000
        assert trees[0] == trees[1]
        for path, (entry, _) in trees[1].items():  # every file's extended attributes, as on disk
            assert isinstance(entry, Entry)
            if entry.kind == EntryKind.FILE:
                on_disk = {os.fsencode(name): os.getxattr(b"/" + path, name) for name in os.listxattr(b"/" + path)}
                assert dict(entry.xattrs) == on_disk, path
        assert sum(1 for entry, _ in trees[1].values() if isinstance(entry, Entry) and entry.xattrs) >= 60

    trio.run(main)


def test_a_re_save_reads_a_changed_small_files_xattrs_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walker of a re-save reads every file's extended attributes; the
    batch that reads a changed small file's content must not read them again
    (nor drop them); a first save leaves them to the batch."""
    from rekkordfs import fsmeta, savewalk, upload

    master = keymod.new_master()
    src = small_tree(tmp_path / "src", 300)
    reads: list[bytes] = []

    def counted(path: bytes | int) -> list[tuple[bytes, bytes]]:
        # the walker reads through its open folder (/proc/self/fd/N/name), a batch through the open file
        where = os.readlink(f"/proc/self/fd/{path}") if isinstance(path, int) else os.fsdecode(path)
        if where.startswith("/proc/self/fd/"):
            folder, name = where[len("/proc/self/fd/"):].split("/", 1)
            where = os.path.join(os.readlink(f"/proc/self/fd/{folder}"), name)
        reads.append(os.fsencode(where))
        return fsmeta.read_xattrs(path)

    monkeypatch.setattr(savewalk, "read_xattrs", counted)
    monkeypatch.setattr(upload, "read_xattrs", counted)
    changed = sorted((src / "d00037").iterdir())
    storage = MemoryStorage()

    async def main() -> dict[bytes, object]:
        await Repository.create(storage, master)
        await save_into(storage, master, src, 0)
        first = [path for path in reads if b"/d00037/" in path]
        assert sorted(first) == sorted(os.fsencode(path) for path in changed)  # once each, by the batch
        reads.clear()
        for index, path in enumerate(changed):
            path.write_bytes(b"changed %d" % index)
            os.setxattr(path, "user.note", b"again %d" % index)
        snapshot, _ = await save_into(storage, master, src, 0)
        repo = await Repository.open(storage, master)
        try:
            tag = await repo.resolve(snapshot)
            return await tree_of(repo, (await repo.load_snapshot(tag)).root_ref)
        finally:
            await repo.aclose()

    tree = trio.run(main)
    assert sorted(reads) == sorted(set(reads))  # no file's read twice
    for path in changed:
        assert reads.count(os.fsencode(path)) == 1
        entry, _ = tree[os.fsencode(path).lstrip(b"/")]
        assert isinstance(entry, Entry)
        assert dict(entry.xattrs) == {b"user.note": os.getxattr(path, "user.note")}


def test_a_worker_that_dies_fails_the_save_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          eager_workers: None) -> None:
    master = keymod.new_master()
    src = small_tree(tmp_path / "src", 3000)
    real = prepprocs.PrepPool._store
    killed: list[int] = []

    async def kill_first(pool: prepprocs.PrepPool, files: list[tuple], packs: set[bytes]) -> list:
        if not killed:  # once its first batch is answered: mid-way through the save
            pid = pool.workers[0].process.pid
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return await real(pool, files, packs)

    monkeypatch.setattr(prepprocs.PrepPool, "_store", kill_first)

    async def main() -> None:
        storage = MemoryStorage()
        await Repository.create(storage, master)
        with trio.fail_after(120):  # never a hang
            with pytest.raises(WorkerFailed) as failed:
                await save_into(storage, master, src, 1)
        assert str(failed.value) == "a worker process of the save ended unexpectedly (killed by signal 9)"
        assert killed
        with pytest.raises(ProcessLookupError):  # reaped, not left a zombie
            os.kill(killed[0], 0)
        monkeypatch.setattr(prepprocs.PrepPool, "_store", real)
        await save_into(storage, master, src, 1)  # nothing in the way of the next save
        repo = await Repository.open(storage, master)
        try:
            assert (await Checker(repo, read_data=True).run()).problems == []
        finally:
            await repo.aclose()

    trio.run(main)


def _workers(pid: int) -> list[int]:
    """The worker processes of rekkord process pid, once they run their code
    (children of any of its threads: trio starts processes from its threads;
    not others, such as the `ldconfig -p` ctypes may run)."""
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                if b"rekkordfs.prepworker" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(int(child))
    except OSError:
        pass
    return found


def _marked(mark: str) -> list[int]:
    """Processes whose environment carries mark (those a test started, however orphaned)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_rekkord_save_whose_worker_is_killed_exits_1(local_repo: Rekkord, tmp_path: Path) -> None:
    src = small_tree(tmp_path / "src", 20_000)
    argv = [sys.executable, "-m", "rekkordfs.cli.main", "-R", str(local_repo.repository),
            "-K", str(local_repo.key_file), "save", "c", str(src)]
    env = {**os.environ, "REKKORD_CACHE_DIR": str(local_repo.cache_dir), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (workers := _workers(process.pid)) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert workers, "the save started no worker process"
        os.kill(workers[0], signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1, stderr
    assert stderr.splitlines() == ["rekkord: error: a worker process of the save ended unexpectedly "
                                   "(killed by signal 9)"]
    assert "No problems found" in local_repo("check").stdout
    local_repo.save("c", str(src))


def test_ctrl_c_during_a_save_with_workers_leaves_no_process(local_repo: Rekkord, tmp_path: Path) -> None:
    src = small_tree(tmp_path / "src", 8000)
    token = uuid.uuid4().hex
    mark = f"REKKORD_TEST_MARK={token}"
    outcomes = []
    workers_seen: list[bool] = []  # whether a worker process ran as each signal went out

    def at_moment(pid: int) -> None:
        workers_seen.append(bool(_workers(pid)))

    def once_a_worker_runs(pid: int) -> None:  # the one case a loaded machine cannot make miss
        deadline = time.monotonic() + 60
        while not _workers(pid) and process_state(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.005)
        at_moment(pid)

    for moment, before_signal in [(m, at_moment) for m in (0.4, 0.8, 1.6, 3.0)] + [(0.0, once_a_worker_runs)]:
        result = _interrupt_at(local_repo, ["save", "c", str(src)], moment,
                               extra_env={"REKKORD_TEST_MARK": token}, before_signal=before_signal)
        outcomes.append((_outcome(result, moment), workers_seen[-1]))
        deadline = time.monotonic() + 10
        while _marked(mark) and time.monotonic() < deadline:  # the kernel may take a moment to reap
            time.sleep(0.05)
        assert _marked(mark) == [], f"processes left after Ctrl-C at {moment} s"
    assert ("interrupted", True) in outcomes, outcomes  # at least one landed while a worker ran
    assert "No problems found" in local_repo("check").stdout


def test_directory_records_are_written_many_per_hop_and_all_land(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 eager_workers: None) -> None:
    """A batch of small files finishes about one folder; the records of such
    folders wait for RECORD_BATCH of them (save.py: one thread hop per record
    cost the loop more than the record) and the rest are written once every
    file is done: none may be lost, nested or not."""
    src = tmp_path / "src"
    for top in range(6):
        for sub in range(40):
            folder = src / f"t{top}" / f"s{sub:02d}"
            folder.mkdir(parents=True)
            for index in range(3):
                (folder / f"f{index}").write_bytes(b"%d %d %d " % (top, sub, index) * 50)
    (src / "t0" / "empty").mkdir()
    below = 6 + 6 * 40 + 1  # folders below src
    hops: list[int] = []
    real = Repository.write_blobs

    async def counted(repo: Repository, kind: object, datas: list) -> list:
        hops.append(len(datas))
        return await real(repo, kind, datas)  # type: ignore[arg-type]

    monkeypatch.setattr(Repository, "write_blobs", counted)
    master = keymod.new_master()

    async def main() -> None:
        storage = MemoryStorage()
        await Repository.create(storage, master)
        snapshot, batches = await save_into(storage, master, src, 1)
        assert batches > 0
        assert sum(hops) > below + 1  # src and the folders above it too
        assert len(hops) <= below // 8, hops
        repo = await Repository.open(storage, master)
        try:
            tag = await repo.resolve(snapshot)
            tree = await tree_of(repo, (await repo.load_snapshot(tag)).root_ref)
            inside = os.fsencode(src).lstrip(b"/") + b"/"
            mine = {path[len(inside):]: value for path, value in tree.items() if path.startswith(inside)}
            assert sum(1 for entry, _ in mine.values() if isinstance(entry, Entry)
                       and entry.kind == EntryKind.DIRECTORY) == below
            assert sum(1 for entry, _ in mine.values() if isinstance(entry, Entry)
                       and entry.kind == EntryKind.FILE) == 6 * 40 * 3
            assert mine[b"t5/s39/f2"][1] == [(repo.codec.blob_id(BlobKind.CHUNK, b"5 39 2 " * 50), 350)]
            assert (await Checker(repo, read_data=True).run()).problems == []
        finally:
            await repo.aclose()

    trio.run(main)


def test_the_worker_writes_every_cache_row_and_a_re_save_reads_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       eager_workers: None) -> None:
    """With a worker process, the save's cache rows are all its to write, the
    last ones (stat rows, the packs flushed at publication) included: the
    main process writes none; a re-save then finds every file in the cache."""
    from rekkordfs.cache import LocalCache

    master = keymod.new_master()
    src = small_tree(tmp_path / "src", 1200)
    written_here: list[str] = []
    for name in ("add_blobs", "store_stats"):
        real = getattr(LocalCache, name)

        def spy(cache: LocalCache, rows: object, _real: object = real, _name: str = name) -> None:
            written_here.append(_name)
            _real(cache, rows)  # type: ignore[operator]

        monkeypatch.setattr(LocalCache, name, spy)

    async def main() -> None:
        storage = MemoryStorage()
        await Repository.create(storage, master)
        _, batches = await save_into(storage, master, src, 1)
        assert batches > 0
        assert written_here == []
        repo = await Repository.open(storage, master)
        try:
            session = SaveSession(repo, "c", [str(src)], warn=lambda _m: None, processes=0)
            result = await session.run()
            assert result.stats.bytes_read == 0 and result.stats.files > 1200
        finally:
            await repo.aclose()

    trio.run(main)
