"""Command handlers: turn parsed arguments into library calls and print results."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Callable

import trio

from rekkordfs import keys as keymod
from rekkordfs.check import Checker
from rekkordfs.config import Config
from rekkordfs.errors import KeyFileError, UsageError
from rekkordfs.format import Entry, EntryKind
from rekkordfs.keys import Capability, Keyset, KeyType
from rekkordfs.repository import Repository, walk_path
from rekkordfs.restore import RestoreOptions, RestoreSession
from rekkordfs.save import SaveSession
from rekkordfs.storage import open_storage

from .output import human_size, iso_time, local_time, mode_string, print_json, print_table
from .progress import progress_bar

ConfigMaker = Callable[[argparse.Namespace], Config]


_warn_lock = threading.Lock()


def warn(message: str) -> None:
    """One line on stderr; callable from worker threads (restore warns from them):
    print() writes the text and the newline separately, so two threads could
    interleave them on one line."""
    with _warn_lock:
        sys.stderr.write(f"rekkord: warning: {message}\n")
        sys.stderr.flush()


def _load_keys(config: Config) -> Keyset:
    return keymod.load_keyfile(config.require_key_file())


def split_spec(spec: str) -> tuple[str, str]:
    name, _, path = spec.partition(":")
    if not name:
        raise UsageError(f"'{spec}' names no snapshot or channel")
    return name, path


# --- keys ---------------------------------------------------------------------


def init(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    config = make_config(args)
    key_path = getattr(args, "key_file", None) or "master.key"
    config.require_location()
    master = keymod.new_master()
    keymod.write_keyfile(key_path, master)  # first, so a repository never exists without its key

    async def create() -> Repository:
        storage = open_storage(config)
        try:
            return await Repository.create(storage, master, threads=config.threads)
        finally:
            await storage.aclose()

    try:
        repo = trio.run(create)
    except BaseException:
        os.unlink(key_path)  # the repository was not created: this key opens nothing
        raise
    print(f"Repository created at {repo.storage.description}")
    print(f"Master key written to {key_path} (ID {master.id_hex}); keep it safe, it cannot be recreated.")
    return 0


def derive(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    config = make_config(args)
    master = _load_keys(config)
    kind = KeyType.from_label(args.type)
    if kind == KeyType.MASTER:
        raise KeyFileError("derive creates ReadWrite, WriteOnly or LogOnly keys, not Master keys")
    master.require(Capability.DERIVE)
    derived = keymod.derive(master, kind)
    keymod.write_keyfile(args.output, derived)
    print(f"{kind.label} key written to {args.output} (ID {derived.id_hex})")
    return 0


def identify(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    keys = _load_keys(make_config(args))
    if args.format == "json":
        print_json({"id": keys.id_hex, "type": keys.kind.label, "master": keys.master_public.hex()})
    else:
        print(f"Key ID: {keys.id_hex}")
        print(f"Type:   {keys.kind.label}")
    return 0


# --- save -----------------------------------------------------------------------


def save(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    config = make_config(args)
    keys = _load_keys(config)
    keys.require(Capability.WRITE)

    async def run():
        async with Repository.connect(config, keys) as repo:
            session = SaveSession(repo, args.channel, args.paths, warn)
            stats = session.stats

            def poll() -> tuple[float, float, str]:
                return (stats.bytes_read, stats.scanned_bytes,
                        f"{human_size(stats.bytes_read)} read, {human_size(stats.bytes_new)} new")

            async with progress_bar("Saving", poll):
                return await session.run()

    result = trio.run(run)
    stats = result.stats
    if args.format == "json":
        print_json({
            "id": result.snapshot_id, "channel": result.channel, "time": iso_time(result.time_ns),
            "files": stats.files, "directories": stats.dirs, "size": stats.size,
            "bytes_read": stats.bytes_read, "bytes_new": stats.bytes_new, "bytes_stored": stats.bytes_stored,
            "skipped": stats.skipped, "duration": round(result.duration, 3),
        })
    else:
        print(f"Files:        {stats.files} ({human_size(stats.size)}), {stats.dirs} directories")
        print(f"Read:         {human_size(stats.bytes_read)}")
        print(f"New:          {human_size(stats.bytes_new)}")
        print(f"Stored:       {human_size(stats.bytes_stored)}")
        print(f"Time:         {result.duration:.2f} s")
        if stats.skipped:
            print(f"Skipped:      {stats.skipped} unreadable entries")
        print(result.snapshot_id)
    if stats.skipped:
        warn(f"{stats.skipped} files or folders could not be read and are missing from the snapshot")
        return 3
    return 0


# --- listing --------------------------------------------------------------------


def _list_tags(args: argparse.Namespace, make_config: ConfigMaker) -> list:
    config = make_config(args)
    keys = _load_keys(config)
    keys.require(Capability.LIST)

    async def run():
        async with Repository.connect(config, keys) as repo:
            return await repo.list_tags(warn=warn)

    return trio.run(run)


def snapshots(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    tags = _list_tags(args, make_config)
    if args.channel:
        tags = [t for t in tags if t.channel in args.channel]
    if args.format == "json":
        print_json([
            {"id": t.id_hex, "channel": t.channel, "time": iso_time(t.time_ns), "size": t.size, "stored": t.stored}
            for t in tags
        ])
    else:
        rows = [("ID", "Channel", "Time", "Size", "Stored")]
        rows += [(t.id_hex, t.channel, local_time(t.time_ns), human_size(t.size), human_size(t.stored)) for t in tags]
        print_table(rows, right_align={3, 4})
    return 0


def channels(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    latest: dict[str, tuple] = {}
    for tag in _list_tags(args, make_config):
        count = latest.get(tag.channel, (None, 0))[1]
        latest[tag.channel] = (tag, count + 1)
    items = sorted(latest.items())
    if args.format == "json":
        print_json([
            {"channel": name, "latest": tag.id_hex, "time": iso_time(tag.time_ns), "size": tag.size, "count": count}
            for name, (tag, count) in items
        ])
    else:
        rows = [("Channel", "Latest", "Time", "Size", "Snapshots")]
        rows += [(name, tag.id_hex, local_time(tag.time_ns), human_size(tag.size), str(count))
                 for name, (tag, count) in items]
        print_table(rows, right_align={3, 4})
    return 0


def _entry_json(path: str, entry: Entry) -> dict:
    doc = {
        "path": path, "type": entry.kind.name.lower(), "mode": f"{entry.mode:04o}", "uid": entry.uid,
        "gid": entry.gid, "size": entry.size, "mtime": iso_time(entry.mtime_ns),
    }
    if entry.kind == EntryKind.SYMLINK and entry.target is not None:
        doc["target"] = os.fsdecode(entry.target)
    if entry.link_id:
        doc["hardlink_group"] = entry.link_id
    return doc


def list_tree(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    config = make_config(args)
    keys = _load_keys(config)
    keys.require(Capability.READ)
    name, path = split_spec(args.spec)
    rows: list[tuple[str, Entry]] = []

    async def walk(repo: Repository, dir_id: bytes, prefix: str) -> None:
        for entry in await repo.read_directory(dir_id):
            child = f"{prefix}/{os.fsdecode(entry.name)}" if prefix else os.fsdecode(entry.name)
            rows.append((child, entry))
            if args.recursive and entry.kind == EntryKind.DIRECTORY and entry.dir_id:
                await walk(repo, entry.dir_id, child)

    async def run() -> None:
        async with Repository.connect(config, keys) as repo:
            tag = await repo.resolve(name)
            snapshot = await repo.load_snapshot(tag.snapshot_id)
            top, _ = await walk_path(repo, snapshot, path)
            if top.kind == EntryKind.DIRECTORY:
                assert top.dir_id is not None
                await walk(repo, top.dir_id, "")
            else:
                rows.append((os.fsdecode(top.name), top))

    trio.run(run)
    if args.format == "json":
        print_json([_entry_json(p, e) for p, e in rows])
        return 0
    for child, entry in rows:
        suffix = f" -> {os.fsdecode(entry.target)}" if entry.kind == EntryKind.SYMLINK and entry.target else ""
        size = human_size(entry.size) if entry.kind == EntryKind.FILE else ""
        print(f"{mode_string(entry.kind, entry.mode)} {entry.uid:>5} {entry.gid:>5} {size:>10}  "
              f"{local_time(entry.mtime_ns)}  {child}{'/' if entry.kind == EntryKind.DIRECTORY else ''}{suffix}")
    return 0


# --- restore and check ----------------------------------------------------------


def restore(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    config = make_config(args)
    keys = _load_keys(config)
    keys.require(Capability.READ)
    name, path = split_spec(args.spec)
    options = RestoreOptions(force=args.force, delete=args.delete, dry_run=args.dry_run)

    async def run():
        async with Repository.connect(config, keys) as repo:
            tag = await repo.resolve(name)
            snapshot = await repo.load_snapshot(tag.snapshot_id)
            target, has_metadata = await walk_path(repo, snapshot, path)
            report = print if (args.dry_run or args.verbose) else None
            session = RestoreSession(repo, target, args.dest, options, warn, report, has_metadata)
            stats = session.stats

            def poll() -> tuple[float, float, str]:
                return stats.bytes_written, stats.total_bytes, f"{stats.files} files"

            async with progress_bar("Restoring", poll):
                await session.run()
            return session

    session = trio.run(run)
    stats = session.stats
    verb = "Would restore" if args.dry_run else "Restored"
    print(f"{verb} {stats.files} files ({human_size(stats.total_bytes)}), {stats.dirs} directories, "
          f"{stats.links} symlinks" + (f"; deleted {stats.deleted} entries" if stats.deleted else ""))
    return 0


def check(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    config = make_config(args)
    keys = _load_keys(config)
    keys.require(Capability.READ)

    async def run():
        async with Repository.connect(config, keys) as repo:
            checker = Checker(repo, args.read_data, progress=lambda m: print(m, file=sys.stderr))
            return await checker.run()

    report = trio.run(run)
    what = f", {report.chunks_read} chunks read ({human_size(report.bytes_read)})" if args.read_data else ""
    print(f"Checked {report.snapshots} snapshots, {report.directories} directories, "
          f"{report.files} files, {report.chunks} chunks{what}")
    if report.problems:
        print(f"{len(report.problems)} problems found", file=sys.stderr)
        return 1
    print("No problems found")
    return 0


# --- mount ------------------------------------------------------------------------


def mount(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    from rekkordfs.mount import MountOptions, check_mountpoint, daemonize, parse_size, run_foreground

    if len(args.args) > 2:
        raise UsageError("mount takes [ID|CHANNEL[:path]] MNT")
    spec = args.args[0] if len(args.args) == 2 else None
    config = make_config(args)
    keys = _load_keys(config)
    config.require_location()
    options = MountOptions(mountpoint=check_mountpoint(args.args[-1]), spec=spec, foreground=args.foreground,
                           channels=args.channel or [], refresh_interval=args.refresh,
                           state_dir=args.state_dir, debug=args.debug)
    if args.cache_size:
        options.cache_size = parse_size(args.cache_size)
    if spec is not None:
        keys.require(Capability.READ)
    if args.foreground:
        return run_foreground(config, keys, options)
    return daemonize(config, keys, options)
