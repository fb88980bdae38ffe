"""`check`: verify signatures, structure and (optionally) every stored byte.

What it reports, each as one line (docs/operations.md):
- tags that do not verify (unreadable, unsigned, signed by a key the master
  did not certify or by a LogOnly key, dated in the future);
- snapshot records that no valid tag names (a tag deleted behind the
  repository's back, or a save killed just before publishing);
- records that do not match their tag, missing or damaged directories,
  missing packs, chunk lists that do not add up, trees built to multiply work;
- pack indexes that are damaged or not signed by a key of this repository;
- with --read-data: every chunk referred to, and every blob an index lists,
  read and verified (a junk pack announced by a hostile writer shows here).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .codec import (
    INDEX_PREFIX,
    PACKS_PREFIX,
    SNAPSHOTS_PREFIX,
    index_name_from_key,
    pack_id_from_key,
    snapshot_id_from_key,
)
from .errors import CorruptedData, ObjectMissing, UsageError
from .format import BlobKind, BlobRef, ChunkRef, EntryKind, Location, Tag, decode_chunks
from .keys import Capability
from .marks import CONDEMNED_PREFIX, FORGOTTEN_PREFIX, decode_condemned, decode_forgotten
from .repository import Repository
from .tasks import task_group
from .treebudget import TreeShape, shape_problem
from .tuning import check_reads


@dataclass(frozen=True)
class DataSubset:
    """Which packs `check --read-data-subset` reads: a share of them drawn at
    random (N%), or the N-th of M groups, a pack's group being its ID (as a
    number) modulo M, so that M runs with N = 1..M read every pack once."""

    text: str
    percent: float | None = None
    group: tuple[int, int] | None = None

    def choose(self, packs: set[bytes]) -> set[bytes]:
        if self.group is not None:
            n, m = self.group
            return {pack for pack in packs if int.from_bytes(pack[:8], "big") % m == n - 1}
        assert self.percent is not None
        count = min(len(packs), math.ceil(len(packs) * self.percent / 100))
        return set(random.sample(sorted(packs), count))


def parse_subset(text: str) -> DataSubset:
    """'N%' (0 < N <= 100, decimals allowed) or 'N/M' (1 <= N <= M)."""
    wrong = UsageError(f"--read-data-subset '{text}': use N% (a share of the packs, e.g. 10%) "
                       "or N/M (group N of M, e.g. 2/5)")
    spec = text.strip()
    try:
        if spec.endswith("%"):
            percent = float(spec[:-1])
            if not 0 < percent <= 100 or math.isnan(percent):
                raise wrong
            return DataSubset(text, percent=percent)
        n, slash, m = spec.partition("/")
        if slash and 1 <= int(n) <= int(m):
            return DataSubset(text, group=(int(n), int(m)))
    except ValueError:
        pass
    raise wrong


@dataclass
class CheckReport:
    snapshots: int = 0
    directories: int = 0
    files: int = 0
    chunks: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    packs: int = 0  # in the storage
    packs_read: int = 0  # chosen for reading (--read-data: all of them)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class Checker:
    def __init__(self, repo: Repository, read_data: bool, progress: Callable[[str], None] | None = None,
                 subset: DataSubset | None = None) -> None:
        """read_data: read every blob of the packs (or of the subset's packs only)."""
        repo.keys.require(Capability.READ)
        self.repo = repo
        self.read_data = read_data or subset is not None
        self.subset = subset
        self.progress = progress or (lambda _m: None)
        self.report = CheckReport()
        self._packs: set[bytes] = set()
        self._visited: set[bytes] = set()  # directory records walked (once for all snapshots)
        self._shape: TreeShape = {}  # those that could be read
        # each distinct chunk reference -> a place that uses it, for messages
        self._chunk_users: dict[ChunkRef, str] = {}
        self._elsewhere: list[tuple[ChunkRef, str]] = []  # chunks whose pack is gone: moved by a prune?
        # blobs the indexes list, per index: (name, signer label, entries)
        self._listed: list[tuple[str, str, list[tuple[bytes, BlobKind, Location]]]] = []

    def problem(self, message: str) -> None:
        self.report.problems.append(message)
        self.progress(f"problem: {message}")

    async def run(self) -> CheckReport:
        packs = await self.repo.storage.list(PACKS_PREFIX)
        self._packs = {p for p in (pack_id_from_key(k) for k in packs) if p is not None}
        self.report.packs = len(self._packs)
        await self._check_indexes()
        await self._check_marks()
        listing = await self.repo.list_snapshots()
        for line in listing.rejected:
            self.problem(line)
        records = {i for i in (snapshot_id_from_key(k) for k in await self.repo.storage.list(SNAPSHOTS_PREFIX))
                   if i is not None}
        for tag in listing.tags:
            self.report.snapshots += 1
            await self._check_snapshot(tag, tag.snapshot_id in records)
        for chunk, path in self._elsewhere:
            if await self.repo.relocate(chunk.id, chunk.location) is None:
                self.problem(f"chunk {chunk.id.hex()} used by '{path}' is missing (pack {chunk.location.pack.hex()})")
        forgotten = await self._forgotten()
        untagged = records - {tag.snapshot_id for tag in listing.tags} - forgotten
        for snapshot_id in sorted(untagged):
            self.problem(f"snapshot record {snapshot_id.hex()} has no valid tag: its tag was deleted or forged, "
                         "or a save was killed at its last step (the next save of that machine lists it); "
                         f"'rekkord forget {snapshot_id.hex()}' drops it")
        self.report.chunks = len(self._chunk_users)
        if self.read_data:
            await self._read_everything()
        return self.report

    async def _check_snapshot(self, tag: Tag, has_record: bool) -> None:
        name = f"snapshot {tag.id_hex} ({tag.channel})"
        if not has_record:
            self.problem(f"{name}: its record is missing")
            return
        try:
            snapshot = await self.repo.load_snapshot(tag)
        except (CorruptedData, ObjectMissing) as exc:
            self.problem(f"{name}: {exc.message}")
            return
        await self._check_tree(snapshot.root_ref, f"{tag.id_hex[:12]}:", name)
        self._check_shape(snapshot.root_ref.id, name)

    async def _check_tree(self, top: BlobRef, top_path: str, owner: str) -> None:
        """Every directory record reachable from top, each read once for all snapshots."""
        stack = [(top, top_path)]
        while stack:
            ref, path = stack.pop()
            if ref.id in self._visited:
                continue
            self._visited.add(ref.id)
            try:
                entries = await self.repo.read_directory(ref)
            except (CorruptedData, ObjectMissing) as exc:
                self.problem(f"{owner}: directory '{path or '/'}' is damaged: {exc.message}")
                continue
            self.report.directories += 1
            children: list[bytes] = []
            for entry in entries:
                child = f"{path}/{os.fsdecode(entry.name)}"
                if entry.kind == EntryKind.DIRECTORY:
                    assert entry.dir_ref is not None
                    children.append(entry.dir_ref.id)
                    stack.append((entry.dir_ref, child))
                elif entry.kind == EntryKind.FILE:
                    self.report.files += 1
                    self._check_file(entry.chunks_raw, entry.size, child, owner)
            self._shape[ref.id] = (len(entries), children)

    async def _forgotten(self) -> set[bytes]:
        """Snapshot IDs that forget records name; records that do not verify are problems."""
        ids: set[bytes] = set()
        for name in await self.repo.storage.list(FORGOTTEN_PREFIX):
            try:
                record = decode_forgotten(await self.repo.storage.get(name), self.repo.keys,
                                          self.repo.config.repo_id, name)
            except (CorruptedData, ObjectMissing) as exc:
                self.problem(exc.message)
                continue
            ids.update(record.snapshot_ids)
        return ids

    async def _check_marks(self) -> None:
        for name in await self.repo.storage.list(CONDEMNED_PREFIX):
            try:
                decode_condemned(await self.repo.storage.get(name), self.repo.keys, self.repo.config.repo_id, name)
            except (CorruptedData, ObjectMissing) as exc:
                self.problem(exc.message)

    def _check_file(self, chunks_raw: bytes, size: int, path: str, owner: str) -> None:
        try:
            chunks = decode_chunks(chunks_raw)
        except CorruptedData as exc:
            self.problem(f"{owner}: '{path}': {exc.message}")
            return
        if sum(c.size for c in chunks) != size:
            self.problem(f"{owner}: '{path}': chunk sizes do not add up to the file size")
        for chunk in chunks:
            if chunk not in self._chunk_users:
                self._chunk_users[chunk] = path
                if chunk.location.pack not in self._packs:
                    self._elsewhere.append((chunk, path))

    def _check_shape(self, root: bytes, owner: str) -> None:
        """The bounds restore and the mount enforce (treebudget.py), for the whole tree."""
        problem = shape_problem(self._shape, root)
        if problem:
            self.problem(f"{owner}: {problem}; restore and the mount refuse it")

    async def _check_indexes(self) -> None:
        """Every pack index opens, is signed by a key of this repository, and
        names a stored pack.

        Readers do not need indexes (entries carry their blobs' locations), but
        writers do: an index is what lets them refer to stored data instead of
        storing it again, so one that lies would make their snapshots refer to junk.
        """
        names = await self.repo.storage.list(INDEX_PREFIX)

        async def verify(name: str) -> None:
            try:
                index, signature_problem = await self.repo.read_index(name)
            except (CorruptedData, ObjectMissing) as exc:
                self.problem(f"pack index '{name}' is damaged: {exc.message}")
                return
            if signature_problem:
                self.problem(f"pack index '{name}' ({len(index.entries)} blobs) {signature_problem}: "
                             "no writer trusts it")
                return
            if index.pack not in self._packs:
                self.problem(f"pack index '{name}' names a pack that is missing")
                return
            self._listed.append((name, f"{index.signer.kind.label} key {index.signer.key_id.hex()}", index.entries))

        for name in names:
            if index_name_from_key(name) is None:
                self.problem(f"unexpected object '{name}' among the pack indexes")
        await self.repo.for_each([n for n in names if index_name_from_key(n) is not None], verify)

    async def _read_everything(self) -> None:
        """Read and verify every chunk a snapshot uses and every blob an index
        lists, once each (with a subset: those stored in the packs it chose)."""
        chosen = self.subset.choose(self._packs) if self.subset is not None else None
        self.report.packs_read = len(self._packs if chosen is None else chosen)
        users: dict[tuple[bytes, Location], tuple[BlobKind, str]] = {}
        for chunk, user in self._chunk_users.items():
            if chosen is None or chunk.location.pack in chosen:  # all: also those a prune moved
                users[(chunk.id, chunk.location)] = (BlobKind.CHUNK, f"'{user}'")
        for name, signer, entries in self._listed:
            for blob_id, kind, location in entries:
                if chosen is None or location.pack in chosen:
                    users.setdefault((blob_id, location), (kind, f"pack index '{name}' (by {signer})"))
        slots = trio.Semaphore(check_reads(self.repo.threads))

        async def verify(blob_id: bytes, location: Location, kind: BlobKind, user: str) -> None:
            try:
                result = (await self.repo.open_many(kind, [(blob_id, location)]))[0]
                if isinstance(result, Exception):
                    raise result
                self.report.bytes_read += len(result)
            except (CorruptedData, ObjectMissing) as exc:
                self.problem(f"{user} is damaged: {exc.message}")
            finally:
                self.report.chunks_read += 1
                slots.release()

        async with task_group() as nursery:
            for (blob_id, location), (kind, user) in users.items():
                await slots.acquire()
                nursery.start_soon(verify, blob_id, location, kind, user)
