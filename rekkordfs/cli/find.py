"""`find PATTERN...`: which snapshots hold a matching path."""

from __future__ import annotations

import argparse
import os

from rekkordfs.find import Matcher, SearchResult
from rekkordfs.find import find as find_in
from rekkordfs.format import EntryKind
from rekkordfs.keys import Capability
from rekkordfs.repository import Repository

from .common import ConfigMaker, load_keys, quiet, warn
from .interrupt import run_trio
from .output import human_size, iso_time, local_time, plural, print_json_list, print_table

SHORT_ID = 12  # hex digits of the ID in the plain table (8 or more name a snapshot)


def find(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    config = make_config(args)
    keys = load_keys(config)
    keys.require(Capability.READ)
    matcher = Matcher(args.patterns)
    rejected: list[str] = []

    async def run() -> tuple[SearchResult, int]:
        async with Repository.connect(config, keys) as repo:
            listing = await repo.list_snapshots()
            rejected.extend(listing.rejected)
            tags = [t for t in listing.tags if not args.channel or t.channel in args.channel]
            return await find_in(repo, matcher, tags, warn), len(tags)

    result, total = run_trio(run)
    for line in rejected:
        warn(line)
    status = 3 if rejected or result.problems else 0
    if args.format == "json":
        when_taken = {t.snapshot_id: iso_time(t.time_ns) for t in result.searched}
        print_json_list({"id": m.tag.id_hex, "channel": m.tag.channel, "time": when_taken[m.tag.snapshot_id],
                         "path": "/" + os.fsdecode(m.path), "type": m.entry.kind.name.lower(),
                         "size": m.entry.size, "mtime": iso_time(m.entry.mtime_ns)}
                        for m in result.matches)
        return status
    rows = [("ID", "Channel", "Time", "Type", "Size", "Path")] if result.matches else []
    times: dict[bytes, str] = {}  # per snapshot: formatting a time costs more than finding a match
    for m in result.matches:
        when = times.get(m.tag.snapshot_id)
        if when is None:
            when = times[m.tag.snapshot_id] = local_time(m.tag.time_ns)
        is_dir = m.entry.kind == EntryKind.DIRECTORY
        rows.append((m.tag.id_hex[:SHORT_ID], m.tag.channel, when, m.entry.kind.name.lower(),
                     human_size(m.entry.size) if m.entry.kind == EntryKind.FILE else "",
                     "/" + os.fsdecode(m.path) + ("/" if is_dir else "")))
    print_table(rows, right_align={4})
    if not quiet(args):
        holding = len({m.tag.snapshot_id for m in result.matches})
        print(f"{plural(len(result.matches), 'match')} in {holding} of {plural(total, 'snapshot')}")
    return status
