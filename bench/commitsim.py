"""A commit of many staged small files, without FUSE or a mount: the
commit's own cost (capture, uploads, folder records, publishing) on a
repository in a local folder, for profiling.

    python -m bench.commitsim [FILES] [--profile OUT]   (10,000 by default;
        --profile: cProfile the commit alone into OUT, for pstats)

Files of 0-2 KiB in folders of 100, staged through the StagingTree calls the
daemon makes for rsync (create, write, chmod, utime), then committed.
"""

from __future__ import annotations

import cProfile
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import trio

from rekkordfs import keys
from rekkordfs.commit import Committer
from rekkordfs.format import EntryKind
from rekkordfs.repository import Repository
from rekkordfs.staging import ROOT, StagingTree
from rekkordfs.storage.local import LocalStorage
from rekkordfs.upload import Uploader


async def stage(tree: StagingTree, files: int) -> None:
    rng = random.Random(1)
    folders = [(await tree.create(ROOT, b"d%04d" % d, EntryKind.DIRECTORY, 0o755, 0, 0)).ino
               for d in range(max(1, files // 100))]
    for index in range(files):
        node = await tree.create(folders[index % len(folders)], b"f%06d" % index, EntryKind.FILE, 0o600, 0, 0)
        tree.opened(node.ino)
        await tree.write(node.ino, 0, rng.randbytes(rng.randrange(0, 2048)))
        tree.flush(node.ino)
        tree.released(node.ino)
        await tree.setattr(node.ino, mode=0o644)
        await tree.setattr(node.ino, atime_ns=10**18, mtime_ns=10**18)
    tree.journal.flush()


async def simulate(files: int, folder: Path, profile: str | None) -> str:
    os.environ["REKKORD_CACHE_DIR"] = str(folder / "cache")
    storage = LocalStorage(str(folder / "repo"))
    master = keys.new_master()
    await Repository.create(storage, master)
    repo = await Repository.open(LocalStorage(str(folder / "repo")), master)
    tree = StagingTree(folder / "staging", "sim", None)
    tree.journal.batching = True
    try:
        started = time.perf_counter()
        await stage(tree, files)
        staged = time.perf_counter() - started
        await repo.prepare_write()
        committer = Committer(repo, tree, Uploader(repo))
        profiler = cProfile.Profile() if profile else None
        cpu, wall = time.process_time(), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        result = await committer.run()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        tree.close()
        await repo.aclose()
    return (f"{result.files} files staged in {staged:.2f} s; commit {wall:.2f} s, {cpu:.2f} s CPU in this process "
            f"({wall / files * 1e6:.0f} us a file)")


def main() -> None:
    args = sys.argv[1:]
    profile = None
    if "--profile" in args:
        at = args.index("--profile")
        profile = args[at + 1]
        del args[at:at + 2]
    files = int(args[0]) if args else 10_000
    with tempfile.TemporaryDirectory(dir="/var/tmp") as folder:
        print(trio.run(simulate, files, Path(folder), profile))


if __name__ == "__main__":
    main()
