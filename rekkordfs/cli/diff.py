"""`diff A B`: what was added, removed and changed from snapshot A to B."""

from __future__ import annotations

import argparse
import os

from rekkordfs.diff import Change, DiffResult, Status, diff_entries
from rekkordfs.format import EntryKind
from rekkordfs.keys import Capability
from rekkordfs.repository import Repository, Tag, walk_path

from .common import ConfigMaker, load_keys, quiet, split_spec
from .interrupt import run_trio
from .listing import entry_json
from .output import human_size, iso_time, plural, print_json

# one letter per change, as restic prints them
_CODES = {"added": "+", "removed": "-", "type": "T", "content": "M", "metadata": "U"}


def _code(change: Change) -> str:
    if change.status != Status.CHANGED:
        return _CODES[change.status.value]
    return _CODES[change.kinds[0]]


def _shown_path(change: Change) -> str:
    path = os.fsdecode(change.path) or "."
    return path + "/" if change.entry.kind == EntryKind.DIRECTORY and path != "." else path


def _size(change: Change) -> str:
    """File sizes: the size added or removed, or before -> after."""
    old, new = change.old, change.new
    if change.status == Status.CHANGED:
        if old is not None and new is not None and old.kind == new.kind == EntryKind.FILE and "content" in change.kinds:
            return f"{human_size(old.size)} -> {human_size(new.size)}"
        if new is not None and new.kind == EntryKind.FILE:
            return human_size(new.size)
        return ""
    return human_size(change.entry.size) if change.entry.kind == EntryKind.FILE else ""


def _note(change: Change) -> str:
    if change.status != Status.CHANGED:
        return ""
    if "type" in change.kinds:
        assert change.old is not None and change.new is not None
        return f"  ({change.old.kind.name.lower()} -> {change.new.kind.name.lower()})"
    return f"  ({', '.join(change.fields)})" if change.fields else ""


def summarize(result: DiffResult) -> dict:
    """Counts per status; sizes are bytes of file data."""
    def side() -> dict:
        return {"files": 0, "directories": 0, "other": 0, "size": 0}

    added, removed = side(), side()
    changed = {"type": 0, "content": 0, "metadata": 0, "size_before": 0, "size_after": 0}
    for change in result.changes:
        if change.status == Status.CHANGED:
            for kind in change.kinds:
                changed[kind] += 1
            if change.old is not None and change.old.kind == EntryKind.FILE:
                changed["size_before"] += change.old.size
            if change.new is not None and change.new.kind == EntryKind.FILE:
                changed["size_after"] += change.new.size
            continue
        counts = added if change.status == Status.ADDED else removed
        entry_kind = change.entry.kind
        counts["files" if entry_kind == EntryKind.FILE else "directories" if entry_kind == EntryKind.DIRECTORY
               else "other"] += 1
        if entry_kind == EntryKind.FILE:
            counts["size"] += change.entry.size
    return {"added": added, "removed": removed, "changed": changed}


def _side_line(label: str, counts: dict) -> str:
    parts = [plural(counts["files"], "file") + f" ({human_size(counts['size'])})",
             plural(counts["directories"], "directory")]
    if counts["other"]:
        parts.append(f"{counts['other']} other")
    return f"{label:<9}{', '.join(parts)}"


def _snapshot_json(tag: Tag, path: str) -> dict:
    return {"id": tag.id_hex, "channel": tag.channel, "time": iso_time(tag.time_ns), "path": path or "/"}


def _change_json(change: Change) -> dict:
    doc: dict = {"path": os.fsdecode(change.path) or ".", "change": change.status.value,
                 "type": change.entry.kind.name.lower()}
    if change.status == Status.CHANGED:
        doc["kinds"] = list(change.kinds)
        doc["fields"] = list(change.fields)
    doc["old"] = entry_json(None, change.old) if change.old is not None else None
    doc["new"] = entry_json(None, change.new) if change.new is not None else None
    return doc


def diff(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    config = make_config(args)
    keys = load_keys(config)
    keys.require(Capability.READ)
    old_name, old_path = split_spec(args.old)
    new_name, new_path = split_spec(args.new)

    async def run() -> tuple[Tag, Tag, DiffResult]:
        async with Repository.connect(config, keys) as repo:
            old_tag = await repo.resolve(old_name)
            new_tag = await repo.resolve(new_name)
            old_top, old_meta = await walk_path(repo, await repo.load_snapshot(old_tag), old_path)
            new_top, new_meta = await walk_path(repo, await repo.load_snapshot(new_tag), new_path)
            result = await diff_entries(repo, old_top, new_top, old_meta and new_meta,
                                        f"snapshot {old_tag.id_hex}", f"snapshot {new_tag.id_hex}")
            return old_tag, new_tag, result

    old_tag, new_tag, result = run_trio(run)
    summary = summarize(result)
    if args.format == "json":
        print_json({"old": _snapshot_json(old_tag, old_path), "new": _snapshot_json(new_tag, new_path),
                    "changes": [_change_json(c) for c in result.changes], "summary": summary,
                    "directories_read": result.directories_read,
                    "directories_skipped": result.directories_skipped})
        return 0
    for change in result.changes:
        size = _size(change)
        print(f"{_code(change)} {size:>24}  {_shown_path(change)}{_note(change)}")  # sizes: up to 24 characters
    if not quiet(args):
        changed = summary["changed"]
        if result.changes:
            print()
        print(_side_line("Added:", summary["added"]))
        print(_side_line("Removed:", summary["removed"]))
        print(f"{'Changed:':<9}{plural(changed['content'], 'content change')}, "
              f"{plural(changed['metadata'], 'metadata change')}, {plural(changed['type'], 'type change')}")
    return 0
