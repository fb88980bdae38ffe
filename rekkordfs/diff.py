"""`diff`: what was added, removed and changed between two snapshot trees.

Directory records are content-addressed: two folders with the same record ID
hold exactly the same tree, so the walk skips them without reading inside.
Comparing two nearly equal snapshots therefore reads only the records on the
paths to what changed. The walk goes level by level, reading the records of a
whole level in batches (treeread.py).

Change kinds of an entry present on both sides:
- type: a file became a folder, a symlink...;
- content: a file's chunk list (its content), a symlink's target, a device's
  number;
- metadata: mode, owner, group, modification time, extended attributes.
Access and change times are left out: every restore and save changes them.
A folder's own changes are reported like a file's; what changed inside it is
reported path by path. Everything inside an added or removed folder is
listed too.

Hostile trees: each side's walk counts what it expands (treebudget.TreeBudget)
and stops past the limits every other walk enforces.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import CorruptedData, RekkordError
from .format import BlobRef, Entry, EntryKind
from .treebudget import TreeBudget
from .treeread import read_records

if TYPE_CHECKING:
    from .repository import Repository


class Status(str, enum.Enum):
    ADDED = "added"
    REMOVED = "removed"
    CHANGED = "changed"


@dataclass
class Change:
    path: bytes  # relative to the compared folders; b"" for those folders themselves
    status: Status
    old: Entry | None
    new: Entry | None
    kinds: tuple[str, ...] = ()  # for CHANGED: "type", "content", "metadata"
    fields: tuple[str, ...] = ()  # the metadata that differs: "mode", "uid", "gid", "mtime", "xattrs"

    @property
    def entry(self) -> Entry:
        """The entry as it is now (or was, when removed)."""
        found = self.new if self.new is not None else self.old
        assert found is not None
        return found


@dataclass
class DiffResult:
    changes: list[Change] = field(default_factory=list)
    directories_read: int = 0  # records read to compare
    directories_skipped: int = 0  # folders found equal by record ID, not read


def metadata_fields(old: Entry, new: Entry) -> tuple[str, ...]:
    fields = []
    if old.mode != new.mode:
        fields.append("mode")
    if old.uid != new.uid:
        fields.append("uid")
    if old.gid != new.gid:
        fields.append("gid")
    if old.mtime_ns != new.mtime_ns:
        fields.append("mtime")
    if sorted(old.xattrs) != sorted(new.xattrs):
        fields.append("xattrs")
    return tuple(fields)


def content_differs(old: Entry, new: Entry) -> bool:
    """Same kind on both sides; folders compare their content path by path."""
    if old.kind == EntryKind.FILE:
        if old.size != new.size:
            return True
        if old.chunks_raw == new.chunks_raw:
            return False
        # the same chunks may be stored at other places (a repack, another writer)
        return [(c.id, c.size) for c in old.chunks] != [(c.id, c.size) for c in new.chunks]
    if old.kind == EntryKind.SYMLINK:
        return old.target != new.target
    if old.kind in (EntryKind.CHAR_DEVICE, EntryKind.BLOCK_DEVICE):
        return old.rdev != new.rdev
    return False


def compare_entries(path: bytes, old: Entry, new: Entry) -> Change | None:
    """The change between two entries at one path, or None when equal."""
    if old.kind != new.kind:
        return Change(path, Status.CHANGED, old, new, ("type",))
    kinds: list[str] = []
    if content_differs(old, new):
        kinds.append("content")
    fields = metadata_fields(old, new)
    if fields:
        kinds.append("metadata")
    return Change(path, Status.CHANGED, old, new, tuple(kinds), fields) if kinds else None


def _join(path: bytes, name: bytes) -> bytes:
    return path + b"/" + name if path else name


# one folder to compare: its path, its record on each side (None: absent), its depth
_Pair = tuple[bytes, BlobRef | None, BlobRef | None, int]


class Differ:
    def __init__(self, repo: Repository, old_name: str, new_name: str) -> None:
        self.repo = repo
        self.budgets = (TreeBudget(old_name), TreeBudget(new_name))
        self.names = (old_name, new_name)
        self.result = DiffResult()

    async def run(self, old: Entry, new: Entry, compare_top: bool) -> DiffResult:
        """Compare two entries (the tops of the compared paths). compare_top:
        whether their own metadata counts (a snapshot's root may have none)."""
        if old.kind != EntryKind.DIRECTORY or new.kind != EntryKind.DIRECTORY:
            top = compare_entries(new.name or old.name, old, new)
            if top is not None:
                self.result.changes.append(top)
            pairs: list[_Pair] = []
            if old.kind != new.kind:  # a folder that became something else: its content went (or came)
                pairs.append((new.name or old.name, old.dir_ref, new.dir_ref, 1))
            await self._walk([p for p in pairs if p[1] is not None or p[2] is not None])
        else:
            if compare_top:
                top = compare_entries(b"", old, new)
                if top is not None:
                    self.result.changes.append(top)
            await self._walk([(b"", old.dir_ref, new.dir_ref, 1)])
        self.result.changes.sort(key=lambda c: c.path.split(b"/"))
        return self.result

    async def _walk(self, pairs: list[_Pair]) -> None:
        while pairs:
            pairs = [p for p in pairs if not self._same(p)]
            wanted = [ref for _, old, new, _ in pairs for ref in (old, new) if ref is not None]
            records = await read_records(self.repo, wanted)
            self.result.directories_read += len(records)
            following: list[_Pair] = []
            for path, old, new, depth in pairs:
                olds = self._entries(records, old, path, depth, 0)
                news = self._entries(records, new, path, depth, 1)
                following += self._compare(path, olds, news, depth)
            pairs = following

    def _same(self, pair: _Pair) -> bool:
        _, old, new, _ = pair
        if old is not None and new is not None and old.id == new.id:
            self.result.directories_skipped += 1
            return True
        return False

    def _entries(self, records: Mapping[bytes, list[Entry] | RekkordError], ref: BlobRef | None, path: bytes,
                 depth: int, side: int) -> list[Entry]:
        if ref is None:
            return []
        found = records[ref.id]
        where = path.decode(errors="backslashreplace") or "/"
        if isinstance(found, RekkordError):
            raise type(found)(f"{self.names[side]}: folder '{where}' cannot be read: {found.message}")
        self.budgets[side].visit(ref.id, len(found), depth, where)
        return found

    def _compare(self, path: bytes, olds: list[Entry], news: list[Entry], depth: int) -> list[_Pair]:
        """Changes between two folders' entries (sorted by name); the subfolders to compare next."""
        following: list[_Pair] = []
        changes = self.result.changes
        i = j = 0
        while i < len(olds) or j < len(news):
            old = olds[i] if i < len(olds) else None
            new = news[j] if j < len(news) else None
            if new is None or (old is not None and old.name < new.name):
                assert old is not None
                child = _join(path, old.name)
                changes.append(Change(child, Status.REMOVED, old, None))
                if old.dir_ref is not None:
                    following.append((child, old.dir_ref, None, depth + 1))
                i += 1
            elif old is None or new.name < old.name:
                child = _join(path, new.name)
                changes.append(Change(child, Status.ADDED, None, new))
                if new.dir_ref is not None:
                    following.append((child, None, new.dir_ref, depth + 1))
                j += 1
            else:
                child = _join(path, new.name)
                change = compare_entries(child, old, new)
                if change is not None:
                    changes.append(change)
                if old.dir_ref is not None or new.dir_ref is not None:
                    following.append((child, old.dir_ref, new.dir_ref, depth + 1))
                i += 1
                j += 1
        return following


async def diff_entries(repo: Repository, old: Entry, new: Entry, compare_top: bool,
                       old_name: str = "old snapshot", new_name: str = "new snapshot") -> DiffResult:
    """What changed from old to new (two entries from walk_path)."""
    if old.kind == EntryKind.DIRECTORY and old.dir_ref is None or \
            new.kind == EntryKind.DIRECTORY and new.dir_ref is None:
        raise CorruptedData("a compared folder has no record")
    return await Differ(repo, old_name, new_name).run(old, new, compare_top)
