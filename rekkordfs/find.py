"""`find`: which snapshots hold paths matching a pattern.

Patterns have the syntax of save's --exclude (exclude.py): without '/' they
match a name at any depth; with '/' (leading or not) the path from the
snapshot's root; a trailing '/' matches folders only.

Snapshots of one channel share most of their folders, and equal folders
have equal records, so each record is read once for the whole search
(Search.records) and only what it holds that could match is kept: the
entries whose name matches the pattern's last part (the candidates) and the
subfolders. A pattern anchored at the root (`home/*/notes.txt`) is walked
only through folders its leading parts match.

Each snapshot is searched in two steps: read the records it reaches that
were not read yet, level by level; then expand its matches path by path,
only into folders below which some candidate lies (a memo per record and
depth), counting what it expands against the limits on trees
(treebudget.TreeBudget): a tree built to multiply work is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import RekkordError
from .exclude import Excluder, Pattern, Scope, compile_pattern, component_regex, components
from .format import BlobRef, Entry, EntryKind, Tag
from .treebudget import TreeBudget
from .treeread import read_records

if TYPE_CHECKING:
    from .repository import Repository

Warn = Callable[[str], None]


class Matcher:
    """The patterns, and what they allow the walk to skip."""

    def __init__(self, texts: list[str]) -> None:
        patterns = [compile_pattern(text, what="pattern") for text in texts]
        self.excluder = Excluder(patterns)
        self._last: list[tuple[re.Pattern[bytes] | None, bool]] = []  # per pattern: last part, folders only
        self._paths: list[tuple[list[re.Pattern[bytes]], int | None]] = []  # anchored: fixed leading parts, length
        self.any_depth = False  # some pattern matches at any depth: nothing is skipped on the way
        for pattern in patterns:
            self._prepare(pattern)
        # beyond this depth, what may_descend() answers no longer depends on depth
        self.depth_cap = 0 if self.any_depth else max(
            (len(fixed) if total is None else total) + 1 for fixed, total in self._paths)

    def _prepare(self, pattern: Pattern) -> None:
        if pattern.scope == Scope.NAME:
            self._last.append((re.compile(pattern.regex, re.DOTALL), pattern.dirs_only))
            self.any_depth = True
            return
        parts = [p for p in components(pattern.glob) if p]  # a leading '/' anchors at the root too
        last = parts[-1] if parts else b""
        self._last.append((None if b"**" in last else re.compile(component_regex(last), re.DOTALL),
                           pattern.dirs_only))
        fixed: list[re.Pattern[bytes]] = []
        for part in parts:
            if b"**" in part:
                break
            fixed.append(re.compile(component_regex(part), re.DOTALL))
        self._paths.append((fixed, None if len(fixed) < len(parts) else len(parts)))

    def candidate(self, name: bytes, is_dir: bool) -> bool:
        """Whether an entry's name could end a matching path (a quick test)."""
        return any((last is None or last.fullmatch(name) is not None) and (is_dir or not dirs_only)
                   for last, dirs_only in self._last)

    def matches(self, path: bytes, name: bytes, is_dir: bool) -> bool:
        """path: from the snapshot's root, without a leading '/'."""
        return self.excluder.excluded(name, b"/" + path, path, is_dir)

    def may_descend(self, depth: int, name: bytes) -> bool:
        """Whether a folder at depth (1: at the root) named name may hold a match
        (its ancestors were allowed)."""
        if self.any_depth:
            return True
        for fixed, total in self._paths:
            if total is not None and depth >= total:
                continue  # the pattern's path is not that deep
            if depth <= len(fixed) and fixed[depth - 1].fullmatch(name) is None:
                continue
            return True
        return False

    def depth_key(self, depth: int) -> int:
        return min(depth, self.depth_cap)


@dataclass(frozen=True, slots=True)
class Found:
    """What a match shows of its entry (whole entries would weigh ten times more)."""

    name: bytes
    kind: EntryKind
    size: int
    mtime_ns: int


@dataclass
class Record:
    """What the search keeps of a directory record."""

    entries: int
    candidates: list[Found]
    subdirs: list[tuple[bytes, BlobRef]]


@dataclass(slots=True)
class Match:
    tag: Tag
    path: bytes  # from the snapshot's root, without a leading '/'
    entry: Found


@dataclass
class SearchResult:
    matches: list[Match] = field(default_factory=list)
    searched: list[Tag] = field(default_factory=list)
    problems: int = 0  # snapshots or folders that could not be searched
    records_read: int = 0


class Search:
    def __init__(self, repo: Repository, matcher: Matcher, warn: Warn) -> None:
        self.repo = repo
        self.matcher = matcher
        self.warn = warn
        self.records: dict[bytes, Record | RekkordError] = {}  # by record ID, for every snapshot searched
        self._reached: set[tuple[bytes, int]] = set()  # (record, depth key) whose allowed subfolders are read
        self._below: dict[tuple[bytes, int], bool] = {}  # (record, depth key): a candidate lies below
        self.result = SearchResult()

    async def snapshot(self, tag: Tag) -> None:
        """Add the matches of one snapshot (a problem is warned about and counted)."""
        try:
            snapshot = await self.repo.load_snapshot(tag)
            await self._read(snapshot.root_ref)
            found = self._expand(tag, snapshot.root_ref)
        except RekkordError as exc:
            self.warn(f"{exc.message}; snapshot {tag.id_hex} not searched")
            self.result.problems += 1
            return
        self.result.searched.append(tag)
        self.result.matches.extend(found)

    def _keep(self, entries: list[Entry]) -> Record:
        """Worker-thread side: reduce a record to what the search needs."""
        candidate = self.matcher.candidate
        return Record(len(entries),
                      [Found(e.name, e.kind, e.size, e.mtime_ns) for e in entries
                       if candidate(e.name, e.kind == EntryKind.DIRECTORY)],
                      [(e.name, e.dir_ref) for e in entries if e.kind == EntryKind.DIRECTORY and e.dir_ref])

    async def _read(self, root: BlobRef) -> None:
        """Read every record this snapshot's allowed paths reach, level by level."""
        level = [(root, 0)]
        while level:
            wanted = [ref for ref, _ in level if ref.id not in self.records]
            if wanted:
                found = await read_records(self.repo, wanted, then=self._keep)
                self.result.records_read += len(found)
                self.records.update(found)
            following: list[tuple[BlobRef, int]] = []
            for ref, depth in level:
                key = (ref.id, self.matcher.depth_key(depth))
                record = self.records[ref.id]
                if key in self._reached or isinstance(record, RekkordError):
                    continue
                self._reached.add(key)
                following += [(child, depth + 1) for name, child in record.subdirs
                              if self.matcher.may_descend(depth + 1, name)]
            level = following

    def _has_below(self, record_id: bytes, depth: int) -> bool:
        """Whether a candidate lies in or below a record reached at depth
        (without recursion: trees may be deeper than Python's stack)."""
        key = (record_id, self.matcher.depth_key(depth))
        if key in self._below:
            return self._below[key]
        stack = [(record_id, depth, False)]
        while stack:
            current, at, children_done = stack.pop()
            current_key = (current, self.matcher.depth_key(at))
            if current_key in self._below:
                continue
            record = self.records.get(current)
            if not isinstance(record, Record):
                self._below[current_key] = isinstance(record, RekkordError)  # an error is reported on the way
                continue
            children = [(ref.id, at + 1) for name, ref in record.subdirs if self.matcher.may_descend(at + 1, name)]
            if not children_done:
                stack.append((current, at, True))
                stack += [(child, child_at, False) for child, child_at in children
                          if (child, self.matcher.depth_key(child_at)) not in self._below]
                continue
            self._below[current_key] = bool(record.candidates) or any(
                self._below.get((child, self.matcher.depth_key(child_at)), False) for child, child_at in children)
        return self._below[key]

    def _expand(self, tag: Tag, root: BlobRef) -> list[Match]:
        budget = TreeBudget(f"snapshot {tag.id_hex}")
        found: list[Match] = []
        stack: list[tuple[bytes, bytes, int]] = [(root.id, b"", 0)]  # record, its path, its depth
        while stack:
            record_id, path, depth = stack.pop()
            record = self.records.get(record_id)
            where = path.decode(errors="backslashreplace") or "/"
            if isinstance(record, RekkordError):  # the rest of the snapshot is still searched
                self.warn(f"snapshot {tag.id_hex}: folder '{where}' cannot be read, not searched: {record.message}")
                self.result.problems += 1
                continue
            if record is None or not self._has_below(record_id, depth):
                continue
            budget.visit(record_id, record.entries, depth + 1, where)
            for entry in record.candidates:
                child = path + b"/" + entry.name if path else entry.name
                if self.matcher.matches(child, entry.name, entry.kind == EntryKind.DIRECTORY):
                    found.append(Match(tag, child, entry))
            for name, ref in reversed(record.subdirs):
                if self.matcher.may_descend(depth + 1, name):
                    stack.append((ref.id, path + b"/" + name if path else name, depth + 1))
        found.sort(key=lambda m: m.path.split(b"/"))
        return found


async def find(repo: Repository, matcher: Matcher, tags: list[Tag], warn: Warn) -> SearchResult:
    """The matches in each snapshot of tags (oldest first)."""
    search = Search(repo, matcher, warn)
    for tag in tags:
        await search.snapshot(tag)
    return search.result
