"""What a `find` over the mount costs the daemon, without FUSE or a kernel:
the snapshot's folders opened and read through the FUSE adapter
(Operations.opendir/readdir/releasedir, as the kernel asks for them), for
measuring and profiling the per-entry work alone (the mount row's wall time
also holds the kernel's and find's, and varies more between runs).

    python -m bench.listsim [FILES] [--repeat N] [--read] [--profile OUT]
        FILES small files in folders of 100 (100,000 by default), committed
        once; then N walks (3 by default), each with a fresh view and cache;
        --read: after each walk, every file opened, read and closed as `cat`
        does; --profile: cProfile the last walk (and reads) into OUT, for pstats

pyfuse3.readdir_reply, which needs a kernel request, is replaced by a list
append: the time of that C call is not counted. Read-ahead runs as in the
mount, except that nothing is handed to the kernel's page cache.
"""

from __future__ import annotations

import cProfile
import os
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from bench.commitsim import stage
from rekkordfs import keys
from rekkordfs.blobcache import BlobCache
from rekkordfs.commit import Committer
from rekkordfs.fuse import Operations
from rekkordfs.gcquiet import quiet_gc
from rekkordfs.nodes import IDS_INO
from rekkordfs.repository import Repository
from rekkordfs.staging import StagingTree
from rekkordfs.storage.local import LocalStorage
from rekkordfs.tuning import MOUNT_GC_THRESHOLDS
from rekkordfs.upload import Uploader
from rekkordfs.vfs import SnapshotView

READ_SIZE = 128 << 10  # what a kernel asks for at once for `cat`


def _reply(token: list[tuple[bytes, pyfuse3.EntryAttributes]], name: bytes, attr: pyfuse3.EntryAttributes,
           next_id: int) -> bool:
    token.append((name, attr))
    return True


async def _walk(operations: Operations, ino: int, files: list[int]) -> int:
    """Every entry below the folder ino, listed as the kernel lists for find:
    opendir, readdir until empty, releasedir. Returns how many; the files'
    inodes go to files."""
    handle = await operations.opendir(ino, None)
    entries: list[tuple[bytes, Any]] = []
    while True:
        before = len(entries)
        await operations.readdir(handle, before, entries)
        if len(entries) == before:
            break
    await operations.releasedir(handle)
    seen = len(entries)
    for _, attr in entries:
        if stat.S_ISDIR(attr.st_mode):
            seen += await _walk(operations, attr.st_ino, files)
        elif stat.S_ISREG(attr.st_mode):
            files.append(attr.st_ino)
    return seen


async def _read_files(operations: Operations, files: list[int]) -> int:
    """Each file opened, read to its end in 128 KiB requests and closed; the bytes read."""
    total = 0
    for ino in files:
        handle = (await operations.open(ino, os.O_RDONLY, None)).fh
        offset = 0
        while True:
            data = await operations.read(handle, offset, READ_SIZE)
            offset += len(data)
            if len(data) < READ_SIZE:
                break
        await operations.release(handle)
        total += offset
    return total


async def _list_once(repo: Repository, snapshot_hex: str, read: bool, profile: str | None) -> list[str]:
    """One walk (and the reads) with a fresh view; a line of figures for each."""
    view = SnapshotView(repo, BlobCache(repo))
    await view.refresh(force=True)
    operations = Operations(view, None)
    root = await operations.lookup(IDS_INO, snapshot_hex.encode())
    profiler = cProfile.Profile()
    lines = []
    async with trio.open_nursery() as nursery:
        view.start(nursery)  # read-ahead, as in the mount
        with quiet_gc(MOUNT_GC_THRESHOLDS):  # as the daemon serves
            if profile is not None:
                profiler.enable()
            files: list[int] = []
            cpu, wall = time.process_time(), time.perf_counter()
            seen = await _walk(operations, root.st_ino, files)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            lines.append(f"{seen} entries listed, {wall:.2f} s, {cpu:.2f} s CPU ({cpu / seen * 1e6:.1f} us an entry)")
            if read:
                cpu, wall = time.process_time(), time.perf_counter()
                size = await _read_files(operations, files)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                lines.append(f"{len(files)} files read ({size} bytes), {wall:.2f} s, {cpu:.2f} s CPU "
                             f"({cpu / max(1, len(files)) * 1e6:.0f} us a file)")
            if profile is not None:
                profiler.disable()
                profiler.dump_stats(profile)
        nursery.cancel_scope.cancel()
    return lines


async def simulate(files: int, repeat: int, read: bool, folder: Path, profile: str | None) -> str:
    os.environ["REKKORD_CACHE_DIR"] = str(folder / "cache")
    master = keys.new_master()
    await Repository.create(LocalStorage(str(folder / "repo")), master)
    repo = await Repository.open(LocalStorage(str(folder / "repo")), master)
    tree = StagingTree(folder / "staging", "sim", None)
    tree.journal.batching = True
    try:
        await stage(tree, files)
        await repo.prepare_write()
        result = await Committer(repo, tree, Uploader(repo)).run()
        lines: list[str] = []
        for walk in range(repeat):
            done = await _list_once(repo, result.tag.snapshot_id.hex(), read, profile if walk == repeat - 1 else None)
            lines.extend(f"walk {walk + 1}: {line}" for line in done)
    finally:
        tree.close()
        await repo.aclose()
    return "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    options: dict[str, str] = {}
    for flag in ("--profile", "--repeat"):
        if flag in args:
            at = args.index(flag)
            options[flag] = args[at + 1]
            del args[at:at + 2]
    read = "--read" in args
    if read:
        args.remove("--read")
    files = int(args[0]) if args else 100_000
    pyfuse3.readdir_reply = _reply  # type: ignore[assignment]
    with tempfile.TemporaryDirectory(dir="/var/tmp") as folder:
        print(trio.run(simulate, files, int(options.get("--repeat", "3")), read, Path(folder),
                       options.get("--profile")))


if __name__ == "__main__":
    main()
