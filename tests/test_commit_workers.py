"""A commit of many staged small files prepares them in a worker process, as
a save does (rekkordfs/commit.py, prepprocs.PrepPool.prepare_contents): the
snapshot holds exactly what was staged, twins and empty files included, a
file written while the commit runs keeps the content the commit captured, and
no worker process outlives the commit."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from rekkordfs import commit as commitmod
from rekkordfs import prepprocs
from rekkordfs.blobcache import BlobCache
from rekkordfs.commit import Committer
from rekkordfs.format import EntryKind
from rekkordfs.nodes import IDS_INO
from rekkordfs.staging import INLINE_MAX, ROOT, StagingTree
from rekkordfs.upload import Uploader
from rekkordfs.workerprocs import Worker

from .conftest import Rekkord
from .core_helpers import open_repo, open_view, put_file, run

FOLDERS = 4
FILES = 150  # in each: several batches (tuning.BATCH_FILES)


@pytest.fixture
def repo_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Rekkord:
    monkeypatch.setenv("REKKORD_CACHE_DIR", str(tmp_path / "cache"))
    cli = Rekkord(cache_dir=tmp_path / "cli-cache", repository=str(tmp_path / "repo"),
                  key_file=str(tmp_path / "master.key"))
    cli.cache_dir.mkdir()
    cli("init", "-K", cli.key_file)
    return cli


@pytest.fixture
def pool_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every commit uses a worker process, ready from the first batch on (a
    loaded machine starts it slower than a thread hop prepares a few hundred
    files); returns the number of contents of each batch the workers answered."""
    monkeypatch.setattr(commitmod, "COMMIT_PROCESS_FILES", 0)
    monkeypatch.setattr(commitmod, "save_processes", lambda threads: 1)
    sizes: list[int] = []
    real_init, real_prepare = prepprocs.PrepPool.__init__, prepprocs.PrepPool.prepare_contents

    def eager(pool: prepprocs.PrepPool, *args: object) -> None:
        real_init(pool, *args)  # type: ignore[arg-type]
        pool.ready = True

    async def counting(pool: prepprocs.PrepPool, datas: list[bytes]):
        answer = await real_prepare(pool, datas)
        sizes.append(len(answer[0]))
        return answer

    monkeypatch.setattr(prepprocs.PrepPool, "__init__", eager)
    monkeypatch.setattr(prepprocs.PrepPool, "prepare_contents", counting)
    return sizes


def staged_contents(seed: int = 5) -> dict[tuple[bytes, bytes], bytes]:
    rng = random.Random(seed)
    shared = [rng.randbytes(rng.randrange(1, 4000)) for _ in range(10)]
    files: dict[tuple[bytes, bytes], bytes] = {}
    for d in range(FOLDERS):
        for f in range(FILES):
            pick = rng.random()
            data = (b"" if pick < 0.05 else rng.choice(shared) if pick < 0.25
                    else rng.randbytes(rng.randrange(1, 20000)))
            files[(b"d%d" % d, b"f%03d" % f)] = data
    files[(b"d0", b"large")] = rng.randbytes(INLINE_MAX + 5000)  # a data file: uploaded beside the batches
    return files


def test_a_commit_of_many_small_files_uses_a_worker_process(repo_dir: Rekkord, tmp_path: Path,
                                                           pool_batches: list[int]) -> None:
    expected = staged_contents()
    changed = (b"d1", b"f007")
    processes: list[trio.Process] = []
    spawn = prepprocs.PrepPool.spawn

    async def recording_spawn(pool: prepprocs.PrepPool) -> Worker:
        worker = await spawn(pool)
        processes.append(worker.process)
        return worker

    async def main() -> str:
        async with open_repo(repo_dir.repository, repo_dir.key_file) as repo:
            tree = StagingTree(tmp_path / "state", "many", BlobCache(repo))
            folders = {}
            for d in range(FOLDERS):
                folders[b"d%d" % d] = (await tree.create(ROOT, b"d%d" % d, EntryKind.DIRECTORY, 0o755, 0, 0)).ino
            for (folder, name), data in expected.items():
                await put_file(tree, folders[folder], name, data)
            committer = Committer(repo, tree, Uploader(repo))
            target = (await tree.lookup(folders[changed[0]], changed[1])).ino
            async with trio.open_nursery() as nursery:
                async def write_meanwhile() -> None:
                    await trio.sleep(0)  # once the commit captured the tree
                    await tree.write(target, 0, b"written during the commit")

                nursery.start_soon(write_meanwhile)
                result = await committer.run()
            assert result.files == len(expected)
            tree.close()
            return result.tag.id_hex

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prepprocs.PrepPool, "spawn", recording_spawn)
        snapshot = run(main)
    assert sum(pool_batches) == FOLDERS * FILES and len(pool_batches) > FOLDERS
    assert processes and all(process.returncode is not None for process in processes)

    async def check() -> None:
        async with open_view(repo_dir.repository, repo_dir.key_file) as view:
            snap = await view.lookup(IDS_INO, snapshot.encode())
            for (folder, name), data in expected.items():
                node = await view.lookup((await view.lookup(snap.ino, folder)).ino, name)
                assert await view.read(view.open(node.ino), 0, len(data) + 1) == data, (folder, name)

    run(check)
