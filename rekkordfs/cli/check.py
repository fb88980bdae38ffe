"""`check`: verify the repository."""

from __future__ import annotations

import argparse
import sys

from rekkordfs.check import Checker, CheckReport, parse_subset
from rekkordfs.keys import Capability
from rekkordfs.repository import Repository

from .common import ConfigMaker, load_keys, quiet, write_line
from .interrupt import run_trio
from .output import human_size, plural, print_json


def _report_json(report: CheckReport, read: str | None) -> dict:
    return {"snapshots": report.snapshots, "directories": report.directories, "files": report.files,
            "chunks": report.chunks, "read_data": read, "packs": report.packs,
            "packs_read": report.packs_read if read else 0, "chunks_read": report.chunks_read,
            "bytes_read": report.bytes_read, "problems": report.problems}


def check(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    subset = parse_subset(args.read_data_subset) if args.read_data_subset is not None else None
    config = make_config(args)
    keys = load_keys(config)
    keys.require(Capability.READ)
    silent = quiet(args) or args.format == "json"
    read = "all" if args.read_data else subset.text if subset is not None else None

    async def run():
        async with Repository.connect(config, keys) as repo:
            # the checker reports each problem as it finds it (even with -q: they are the result)
            return await Checker(repo, args.read_data, progress=lambda m: write_line(sys.stderr, m),
                                 subset=subset).run()

    report = run_trio(run)
    if args.format == "json":
        print_json(_report_json(report, read))
    if not silent:
        what = ""
        if read:
            packs = (f" from {report.packs_read} of {plural(report.packs, 'pack')}" if subset is not None else "")
            what = f", {plural(report.chunks_read, 'chunk')} read ({human_size(report.bytes_read)}){packs}"
        print(f"Checked {plural(report.snapshots, 'snapshot')}, {plural(report.directories, 'directory')}, "
              f"{plural(report.files, 'file')}, {plural(report.chunks, 'chunk')}{what}")
    if report.problems:
        print(f"{plural(len(report.problems), 'problem')} found", file=sys.stderr)
        return 1
    if not silent:
        print("No problems found")
    return 0
