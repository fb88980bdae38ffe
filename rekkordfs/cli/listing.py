"""`snapshots`, `channels` and `list`: what the repository holds."""

from __future__ import annotations

import argparse
import os

from rekkordfs.format import BlobRef, Entry, EntryKind, Tag
from rekkordfs.keys import Capability
from rekkordfs.repository import Repository, walk_path
from rekkordfs.treebudget import refuse_hostile_tree

from .common import ConfigMaker, load_keys, split_spec, warn
from .interrupt import run_trio
from .output import human_size, iso_time, local_time, mode_string, print_json, print_table


def _list_tags(args: argparse.Namespace, make_config: ConfigMaker) -> tuple[list[Tag], int]:
    """The snapshots that verify, and the exit status: 3 when some tag did not
    verify (each is named on stderr and left out)."""
    config = make_config(args)
    keys = load_keys(config)
    keys.require(Capability.LIST)

    async def run():
        async with Repository.connect(config, keys) as repo:
            return await repo.list_snapshots()

    listing = run_trio(run)
    for line in listing.rejected:
        warn(line)
    return listing.tags, 3 if listing.rejected else 0


def snapshots(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    tags, status = _list_tags(args, make_config)
    if args.channel:
        tags = [t for t in tags if t.channel in args.channel]
    if args.format == "json":
        print_json([
            {"id": t.id_hex, "channel": t.channel, "time": iso_time(t.time_ns), "size": t.size, "stored": t.stored,
             "files": t.files, "key": {"id": t.signer.key_id.hex(), "type": t.signer.kind.label}}
            for t in tags
        ])
    else:
        rows = [("ID", "Channel", "Time", "Size", "Stored")]
        rows += [(t.id_hex, t.channel, local_time(t.time_ns), human_size(t.size), human_size(t.stored)) for t in tags]
        print_table(rows, right_align={3, 4})
    return status


def channels(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    config = make_config(args)
    keys = load_keys(config)
    keys.require(Capability.LIST)
    problems: list[str] = []

    async def run() -> list[tuple[str, Tag | None, int]]:
        async with Repository.connect(config, keys) as repo:
            listing = await repo.list_snapshots()
            problems.extend(listing.rejected)
            by_channel: dict[str, list[Tag]] = {}
            for tag in listing.tags:
                by_channel.setdefault(tag.channel, []).append(tag)
            # keys that can read take the newest snapshot whose record matches its tag
            return [(name, await repo.newest_usable(tags, warn=problems.append), len(tags))
                    for name, tags in sorted(by_channel.items())]

    items = [(name, tag, count) for name, tag, count in run_trio(run) if tag is not None]
    for line in problems:
        warn(line)
    if args.format == "json":
        print_json([
            {"channel": name, "latest": tag.id_hex, "time": iso_time(tag.time_ns), "size": tag.size, "count": count}
            for name, tag, count in items
        ])
    else:
        rows = [("Channel", "Latest", "Time", "Size", "Snapshots")]
        rows += [(name, tag.id_hex, local_time(tag.time_ns), human_size(tag.size), str(count))
                 for name, tag, count in items]
        print_table(rows, right_align={3, 4})
    return 3 if problems else 0


def entry_json(path: str | None, entry: Entry) -> dict:
    """An entry as `list -f json` shows it (without "path" when path is None)."""
    doc: dict = {} if path is None else {"path": path}
    doc.update({
        "type": entry.kind.name.lower(), "mode": f"{entry.mode:04o}", "uid": entry.uid,
        "gid": entry.gid, "size": entry.size, "mtime": iso_time(entry.mtime_ns),
    })
    if entry.kind == EntryKind.SYMLINK and entry.target is not None:
        doc["target"] = os.fsdecode(entry.target)
    if entry.link_id:
        doc["hardlink_group"] = entry.link_id
    return doc


def list_tree(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    config = make_config(args)
    keys = load_keys(config)
    keys.require(Capability.READ)
    name, path = split_spec(args.spec)
    rows: list[tuple[str, Entry]] = []

    async def walk(repo: Repository, top: BlobRef) -> None:
        """Depth first, each folder's content right after it (as find prints),
        without recursion: trees may be deeper than Python's stack."""
        stack = [(iter(await repo.read_directory(top)), "")]
        while stack:
            entries, prefix = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            child = f"{prefix}/{os.fsdecode(entry.name)}" if prefix else os.fsdecode(entry.name)
            rows.append((child, entry))
            if args.recursive and entry.kind == EntryKind.DIRECTORY and entry.dir_ref:
                stack.append((iter(await repo.read_directory(entry.dir_ref)), child))

    async def run() -> None:
        async with Repository.connect(config, keys) as repo:
            tag = await repo.resolve(name)
            snapshot = await repo.load_snapshot(tag)
            top, _ = await walk_path(repo, snapshot, path)
            if top.kind == EntryKind.DIRECTORY:
                assert top.dir_ref is not None
                if args.recursive:
                    await refuse_hostile_tree(repo, top.dir_ref, f"snapshot {tag.id_hex}")
                await walk(repo, top.dir_ref)
            else:
                rows.append((os.fsdecode(top.name), top))

    run_trio(run)
    if args.format == "json":
        print_json([entry_json(p, e) for p, e in rows])
        return 0
    for child, entry in rows:
        suffix = f" -> {os.fsdecode(entry.target)}" if entry.kind == EntryKind.SYMLINK and entry.target else ""
        size = human_size(entry.size) if entry.kind == EntryKind.FILE else ""
        print(f"{mode_string(entry.kind, entry.mode)} {entry.uid:>5} {entry.gid:>5} {size:>10}  "
              f"{local_time(entry.mtime_ns)}  {child}{'/' if entry.kind == EntryKind.DIRECTORY else ''}{suffix}")
    return 0
