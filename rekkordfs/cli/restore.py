"""`restore`: a snapshot, or a path inside it, back to a local folder."""

from __future__ import annotations

import argparse
import sys

from rekkordfs.keys import Capability
from rekkordfs.repository import Repository, walk_path
from rekkordfs.restore import RestoreOptions, RestoreSession, RestoreStats, restore_workers_ahead

from .common import ConfigMaker, load_keys, quiet, split_spec, verbose, warn, write_line
from .interrupt import run_trio
from .output import human_size, plural, print_json
from .progress import progress_bar

# RestoreSession reports "restore PATH" and "delete PATH"; what each line says
_DONE = {"restore": "restored", "delete": "deleted"}


def _path_reporter(args: argparse.Namespace):  # -> Callable[[str], None] | None
    """-v lists each path; -n always does (it is the answer to "what would change").
    With -f json the list goes to stderr, so stdout stays one JSON document."""
    if not (args.dry_run or verbose(args)):
        return None
    stream = sys.stderr if args.format == "json" else sys.stdout

    def report(line: str) -> None:
        action, _, path = line.partition(" ")
        said = f"would {action}" if args.dry_run else _DONE.get(action, action)
        write_line(stream, f"{said} {path}")

    return report


def summary(stats: RestoreStats, dry_run: bool) -> str:
    text = (f"{plural(stats.files, 'file')} ({human_size(stats.total_bytes)}), "
            f"{plural(stats.dirs, 'directory')}, {plural(stats.links, 'symlink')}")
    if dry_run:
        deleted = f"; would delete {plural(stats.deleted, 'entry')}" if stats.deleted else ""
        return f"Would restore {text}{deleted}"
    deleted = f"; deleted {plural(stats.deleted, 'entry')}" if stats.deleted else ""
    return f"Restored {text}{deleted}"


def restore(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    config = make_config(args)
    keys = load_keys(config)
    keys.require(Capability.READ)
    name, path = split_spec(args.spec)
    options = RestoreOptions(force=args.force, delete=args.delete, dry_run=args.dry_run)
    silent = quiet(args)

    async def run() -> RestoreSession:
        async with restore_workers_ahead(config.threads, options) as ahead, Repository.connect(config, keys) as repo:
            tag = await repo.resolve(name)
            snapshot = await repo.load_snapshot(tag)
            target, has_metadata = await walk_path(repo, snapshot, path)
            session = RestoreSession(repo, target, args.dest, options, warn, _path_reporter(args), has_metadata,
                                     label=f"snapshot {tag.id_hex}", ahead=ahead)
            stats = session.stats

            def poll() -> tuple[float, float, str]:
                return stats.bytes_written, stats.total_bytes, plural(stats.files, "file")

            async with progress_bar("Restoring", poll, enabled=not silent):
                await session.run()
            return session

    stats = run_trio(run).stats
    if args.format == "json":
        print_json({"dry_run": args.dry_run, "files": stats.files, "directories": stats.dirs,
                    "symlinks": stats.links, "other": stats.other, "size": stats.total_bytes,
                    "deleted": stats.deleted})
    elif not silent:
        print(summary(stats, args.dry_run))
    return 0
