"""`save`: paths (or standard input) as a new snapshot; `save -n` only walks."""

from __future__ import annotations

import argparse
import os
import sys

import trio

from rekkordfs.errors import UsageError
from rekkordfs.exclude import Excluder, compile_pattern, read_pattern_file
from rekkordfs.keys import Capability
from rekkordfs.repository import Repository
from rekkordfs.save import SaveResult, SaveSession, SaveStats
from rekkordfs.savestream import save_stream, validate_stream_name
from rekkordfs.savewalk import DirNode, Listing, Walker, normalize_paths
from rekkordfs.selection import Selection, split_missing

from .common import ConfigMaker, load_keys, quiet, verbose, warn, write_line
from .interrupt import run_trio
from .output import human_size, iso_time, plural, print_json
from .progress import progress_bar

STDIN = "-"


def _selection(args: argparse.Namespace) -> Selection:
    patterns = [compile_pattern(text) for text in args.exclude]
    for path in args.exclude_file:
        patterns += read_pattern_file(path)
    return Selection(Excluder(patterns), args.exclude_caches, args.one_file_system)


def _check_stdin_usage(args: argparse.Namespace) -> bool:
    """Whether standard input is what to save; usage errors for mixed forms."""
    if STDIN not in args.paths:
        if args.stdin_filename is not None:
            raise UsageError("--stdin-filename goes with the single PATH '-' (standard input)")
        return False
    if args.paths != [STDIN]:
        raise UsageError("'-' (standard input) must be the only PATH")
    if args.stdin_filename is None:
        raise UsageError("saving standard input ('-') needs --stdin-filename NAME")
    validate_stream_name(args.stdin_filename)
    if args.dry_run or args.exclude or args.exclude_file or args.exclude_caches or args.one_file_system:
        raise UsageError("--dry-run, --exclude*, and --one-file-system do not apply to standard input")
    if sys.stdin.isatty():
        raise UsageError("standard input is a terminal: pipe the data to save into 'rekkord save'")
    return True


def _path_reporter(args: argparse.Namespace):  # -> Callable[[bytes], None] | None
    """-v: each saved path, on stdout (stderr with -f json: stdout is the document)."""
    if not verbose(args):
        return None
    stream = sys.stderr if args.format == "json" else sys.stdout
    return lambda path: write_line(stream, os.fsdecode(path))


def save(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    from_stdin = _check_stdin_usage(args)
    selection = _selection(args)  # bad patterns are usage errors, before anything is opened
    missing: list[str] = []
    paths = args.paths
    if not from_stdin:
        paths, missing = split_missing(args.paths)
    config = make_config(args)
    keys = load_keys(config)
    keys.require(Capability.WRITE)
    for line in missing:
        warn(f"cannot save {line}; skipped")
    if args.dry_run:
        return _dry_run(args, config, keys, paths, selection, len(missing))
    silent = quiet(args)

    async def run() -> SaveResult:
        async with Repository.connect(config, keys) as repo:
            if from_stdin:
                return await save_stream(repo, args.channel, args.stdin_filename, sys.stdin.buffer)
            session = SaveSession(repo, args.channel, paths, warn, selection=selection,
                                  report=_path_reporter(args))
            stats = session.stats

            def poll() -> tuple[float, float, str]:
                return (stats.bytes_read, stats.scanned_bytes,
                        f"{human_size(stats.bytes_read)} read, {human_size(stats.bytes_new)} new")

            async with progress_bar("Saving", poll, enabled=not silent):
                return await session.run()

    result = run_trio(run)
    stats = result.stats
    skipped = stats.skipped + len(missing)
    if args.format == "json":
        print_json({
            "id": result.snapshot_id, "channel": result.channel, "time": iso_time(result.time_ns),
            "files": stats.files, "directories": stats.dirs, "size": stats.size,
            "bytes_read": stats.bytes_read, "bytes_new": stats.bytes_new, "bytes_stored": stats.bytes_stored,
            "skipped": skipped, "duration": round(result.duration, 3),
        })
    else:
        if not silent:
            print(f"Files:        {stats.files} ({human_size(stats.size)}), {plural(stats.dirs, 'directory')}")
            print(f"Read:         {human_size(stats.bytes_read)}")
            print(f"New:          {human_size(stats.bytes_new)}")
            print(f"Stored:       {human_size(stats.bytes_stored)}")
            print(f"Time:         {result.duration:.2f} s")
            if skipped:
                print(f"Skipped:      {plural(skipped, 'entry')} (unreadable or missing)")
        print(result.snapshot_id)
    return _skipped_status(skipped)


def _skipped_status(skipped: int, dry_run: bool = False) -> int:
    """3 when something asked for is missing from the snapshot."""
    if not skipped:
        return 0
    what = ("1 file or folder could not be read" if skipped == 1
            else f"{skipped} files or folders could not be read")
    verb = ("would be" if dry_run else "is") if skipped == 1 else ("would be" if dry_run else "are")
    warn(f"{what} and {verb} missing from the snapshot")
    return 3


def _dry_run(args: argparse.Namespace, config, keys, paths: list[str], selection: Selection,  # noqa: ANN001
             missing: int) -> int:
    """Walk as a save would, with the stat cache, and count; the repository is
    only opened for its local cache, and nothing is written to it."""
    stats = SaveStats()
    to_read = [0, 0]  # files whose content a save would read (not in the stat cache), bytes

    def emit(listing: Listing) -> None:
        for job in listing.jobs:
            if job.primary:
                to_read[0] += 1
                to_read[1] += job.key.size

    def skip(message: str) -> None:
        stats.skipped += 1
        warn(message)

    async def run() -> None:
        async with Repository.connect(config, keys) as repo:
            walker = Walker(normalize_paths(paths), repo, emit, skip, stats, set(), selection, _path_reporter(args))
            await trio.to_thread.run_sync(walker.run, DirNode(b"", None, None))

    run_trio(run)
    skipped = stats.skipped + missing
    if args.format == "json":
        print_json({"dry_run": True, "files": stats.scanned_files, "directories": stats.dirs,
                    "size": stats.scanned_bytes, "files_to_read": to_read[0], "bytes_to_read": to_read[1],
                    "skipped": skipped})
    elif not quiet(args):
        print(f"Would save:   {plural(stats.scanned_files, 'file')} ({human_size(stats.scanned_bytes)}), "
              f"{plural(stats.dirs, 'directory')}")
        print(f"Would read:   {plural(to_read[0], 'file')} ({human_size(to_read[1])}); "
              f"the others are unchanged since they were last saved")
    return _skipped_status(skipped, dry_run=True)
