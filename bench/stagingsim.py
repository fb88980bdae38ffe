"""rsync's requests for each file, straight on a StagingTree (no FUSE, no mount):
the staging code's own CPU a file, its SQL statements and COMMITs.

    python -m bench.stagingsim [FILES] [--statements]   (3000 by default;
        --statements: how many of each SQL statement a file, numbers masked)
    PYTHONPATH=OTHER python bench/stagingsim.py    (the staging code of another checkout)

Per file: two lookups of missing names (the file, rsync's temporary name),
create, one 1,000-byte write, close, chown to the same owner, chmod, utime,
rename onto the real name, three getattr. Batching is on as in a mount.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import trio

from rekkordfs.format import EntryKind
from rekkordfs.staging import ROOT, StagingTree


async def simulate(files: int, folder: Path, statements: Counter[str] | None = None) -> str:
    tree = StagingTree(folder, "sim", None)
    tree.journal.batching = True
    counts = {"all": 0, "commit": 0}

    def trace(sql: str) -> None:
        counts["all"] += 1
        counts["commit"] += sql.startswith("COMMIT")
        if statements is not None:
            statements[re.sub(r"x'[0-9a-f]*'|\d+", "?", sql)[:120]] += 1

    try:
        dirs = [(await tree.create(ROOT, b"d%d" % d, EntryKind.DIRECTORY, 0o755, 0, 0)).ino
                for d in range(max(1, files // 100))]
        data = os.urandom(1000)
        tree.journal.db.set_trace_callback(trace)
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(files):
            parent, name, tmp = dirs[i % len(dirs)], b"f%d" % i, b".f%d.XXXX" % i
            for missing in (name, tmp):
                try:
                    await tree.lookup(parent, missing)
                except FileNotFoundError:
                    pass
            node = await tree.create(parent, tmp, EntryKind.FILE, 0o600, 0, 0)
            tree.opened(node.ino)
            await tree.write(node.ino, 0, data)
            tree.flush(node.ino)
            tree.released(node.ino)
            await tree.setattr(node.ino, uid=0, gid=0)
            await tree.setattr(node.ino, mode=0o644)
            await tree.setattr(node.ino, atime_ns=10**18, mtime_ns=10**18)
            await tree.rename(parent, tmp, parent, name)
            for _ in range(3):
                tree.get(node.ino)
        getattr(tree.journal, "flush", lambda: None)()  # (code from before batching has none)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        tree.close()
    return (f"{files} files: {cpu / files * 1e6:.0f} us CPU a file, {wall / files * 1e6:.0f} us wall a file, "
            f"{counts['all'] / files:.1f} SQL statements a file, {counts['commit'] / files:.2f} COMMITs a file")


def main() -> None:
    args = [arg for arg in sys.argv[1:] if arg != "--statements"]
    files = int(args[0]) if args else 3000
    statements: Counter[str] | None = Counter() if "--statements" in sys.argv else None
    with tempfile.TemporaryDirectory() as folder:
        print(trio.run(simulate, files, Path(folder) / "sim", statements))
    for sql, count in (statements or Counter()).most_common():
        print(f"{count / files:6.2f}  {sql}")


if __name__ == "__main__":
    main()
