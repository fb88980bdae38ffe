"""`check`: verify the repository."""

from __future__ import annotations

import argparse
import sys


from rekkordfs.check import Checker
from rekkordfs.keys import Capability
from rekkordfs.repository import Repository

from .common import ConfigMaker, load_keys, quiet, write_line
from .interrupt import run_trio
from .output import human_size, plural


def check(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    config = make_config(args)
    keys = load_keys(config)
    keys.require(Capability.READ)
    silent = quiet(args)

    async def run():
        async with Repository.connect(config, keys) as repo:
            # the checker reports each problem as it finds it (even with -q: they are the result)
            return await Checker(repo, args.read_data, progress=lambda m: write_line(sys.stderr, m)).run()

    report = run_trio(run)
    if not silent:
        what = (f", {plural(report.chunks_read, 'chunk')} read ({human_size(report.bytes_read)})"
                if args.read_data else "")
        print(f"Checked {plural(report.snapshots, 'snapshot')}, {plural(report.directories, 'directory')}, "
              f"{plural(report.files, 'file')}, {plural(report.chunks, 'chunk')}{what}")
    if report.problems:
        print(f"{plural(len(report.problems), 'problem')} found", file=sys.stderr)
        return 1
    if not silent:
        print("No problems found")
    return 0
