"""`stats`: sizes, ratios and packs of the repository, and per channel."""

from __future__ import annotations

import argparse

from rekkordfs.keys import Capability
from rekkordfs.repository import Repository
from rekkordfs.stats import Stats, gather

from .common import ConfigMaker, load_keys, warn
from .interrupt import run_trio
from .output import human_size, iso_time, local_time, plural, print_json, print_table


def _ratio(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def stats(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    config = make_config(args)
    keys = load_keys(config)
    keys.require(Capability.LIST)

    async def run() -> Stats:
        async with Repository.connect(config, keys) as repo:
            return await gather(repo, warn)

    found = run_trio(run)
    status = 3 if found.problems else 0
    if args.format == "json":
        print_json({
            "snapshots": found.snapshots, "channels": len(found.channels), "files": found.files,
            "logical_size": found.logical_size, "distinct_size": found.distinct_size,
            "distinct_chunks": found.distinct_chunks, "directories": found.directories,
            "stored_size": found.stored_size, "packs": found.packs, "average_pack_size": found.average_pack_size,
            "dedup_ratio": _ratio(found.dedup_ratio), "stored_ratio": _ratio(found.stored_ratio),
            "per_channel": [
                {"channel": c.name, "snapshots": c.snapshots, "logical_size": c.logical_size,
                 "latest": c.latest.id_hex if c.latest else None,
                 "time": iso_time(c.latest.time_ns) if c.latest else None,
                 "latest_size": c.latest.size if c.latest else None}
                for c in found.channels],
        })
        return status
    lines = [
        ("Snapshots:", f"{found.snapshots} in {plural(len(found.channels), 'channel')} "
                       f"({plural(found.files, 'file')} in all)"),
        ("Logical size:", f"{human_size(found.logical_size)} (all snapshots)"),
    ]
    if found.distinct_size is not None:
        lines.append(("Distinct data:", f"{human_size(found.distinct_size)} in "
                                        f"{plural(found.distinct_chunks or 0, 'chunk')}, "
                                        f"{plural(found.directories or 0, 'directory')}"))
    lines.append(("Stored:", f"{human_size(found.stored_size)} in {plural(found.packs, 'pack')} "
                             f"(average {human_size(found.average_pack_size)})"))
    if found.dedup_ratio is not None:
        lines.append(("Dedup ratio:", f"{found.dedup_ratio:.2f}x (logical / distinct)"))
    lines.append(("Overall ratio:", f"{found.stored_ratio:.2f}x (logical / stored)"))
    width = max(len(label) for label, _ in lines) + 1
    for label, value in lines:
        print(f"{label:<{width}}{value}")
    if found.channels:
        print()
        rows = [("Channel", "Snapshots", "Latest", "Time", "Logical size")]
        rows += [(c.name, str(c.snapshots), c.latest.id_hex[:12] if c.latest else "-",
                  local_time(c.latest.time_ns) if c.latest else "-", human_size(c.logical_size))
                 for c in found.channels]
        print_table(rows, right_align={1, 4})
    return status
