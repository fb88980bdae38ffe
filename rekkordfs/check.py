"""`check`: verify signatures, structure and (optionally) every stored byte."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import trio

from .codec import blob_id_from_key, pack_id_from_key
from .errors import CorruptedData, ObjectMissing
from .format import ChunkRef, EntryKind
from .keys import Capability
from .repository import BLOBS_PREFIX, INDEX_PREFIX, PACKS_PREFIX, Repository
from .tasks import task_group


@dataclass
class CheckReport:
    snapshots: int = 0
    directories: int = 0
    files: int = 0
    chunks: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class Checker:
    def __init__(self, repo: Repository, read_data: bool, progress: Callable[[str], None] | None = None) -> None:
        repo.keys.require(Capability.READ)
        self.repo = repo
        self.read_data = read_data
        self.progress = progress or (lambda _m: None)
        self.report = CheckReport()
        self._stored: set[bytes] = set()
        self._dirs_seen: set[bytes] = set()
        self._packs: set[bytes] = set()
        # each distinct chunk reference -> a place that uses it, for messages
        self._chunk_users: dict[ChunkRef, str] = {}

    def problem(self, message: str) -> None:
        self.report.problems.append(message)
        self.progress(f"problem: {message}")

    async def run(self) -> CheckReport:
        keys = await self.repo.storage.list(BLOBS_PREFIX)
        self._stored = {i for i in (blob_id_from_key(k) for k in keys) if i is not None}
        packs = await self.repo.storage.list(PACKS_PREFIX)
        self._packs = {p for p in (pack_id_from_key(k) for k in packs) if p is not None}
        await self._check_indexes()
        tags = await self.repo.list_tags(warn=self.problem)
        for tag in tags:
            self.report.snapshots += 1
            await self._check_snapshot(tag.snapshot_id, tag.channel, tag.time_ns, tag.size)
        self.report.chunks = len(self._chunk_users)
        if self.read_data:
            await self._read_all_chunks()
        return self.report

    async def _check_snapshot(self, snapshot_id: bytes, channel: str, time_ns: int, size: int) -> None:
        name = f"snapshot {snapshot_id.hex()} ({channel})"
        if snapshot_id not in self._stored:
            self.problem(f"{name}: its record is missing")
            return
        try:
            snapshot = await self.repo.load_snapshot(snapshot_id, verify=False)
        except CorruptedData as exc:
            self.problem(f"{name}: {exc.message}")
            return
        signature_problem = self.repo.signature_problem(snapshot)
        if signature_problem:
            self.problem(f"{name} {signature_problem}")
            return
        if (snapshot.channel, snapshot.time_ns, snapshot.size) != (channel, time_ns, size):
            self.problem(f"{name}: its tag does not match its signed record")
        await self._check_tree(snapshot.root_id, f"{snapshot_id.hex()[:12]}:", name)

    async def _check_tree(self, dir_id: bytes, path: str, owner: str) -> None:
        if dir_id in self._dirs_seen:
            return
        self._dirs_seen.add(dir_id)
        if dir_id not in self._stored:
            self.problem(f"{owner}: directory '{path or '/'}' (blob {dir_id.hex()}) is missing")
            return
        try:
            entries = await self.repo.read_directory(dir_id)
        except (CorruptedData, ObjectMissing) as exc:
            self.problem(f"{owner}: directory '{path or '/'}' is damaged: {exc.message}")
            return
        self.report.directories += 1
        for entry in entries:
            child = f"{path}/{os.fsdecode(entry.name)}"
            if entry.kind == EntryKind.DIRECTORY:
                assert entry.dir_id is not None
                await self._check_tree(entry.dir_id, child, owner)
            elif entry.kind == EntryKind.FILE:
                self.report.files += 1
                try:
                    chunks = entry.chunks
                except CorruptedData as exc:
                    self.problem(f"{owner}: '{child}': {exc.message}")
                    continue
                if sum(c.size for c in chunks) != entry.size:
                    self.problem(f"{owner}: '{child}': chunk sizes do not add up to the file size")
                for chunk in chunks:
                    if chunk not in self._chunk_users:
                        self._chunk_users[chunk] = child
                        if not self._present(chunk):
                            self.problem(f"chunk {chunk.id.hex()} used by '{child}' is missing")

    async def _check_indexes(self) -> None:
        """Every pack index opens and names a stored pack.

        Readers do not need indexes (file entries carry their chunks'
        locations), but savers do: a damaged index silently makes every later
        save store that pack's chunks again, and means stored bytes changed.
        """
        names = await self.repo.storage.list(INDEX_PREFIX)
        slots = trio.Semaphore(16)

        async def verify(name: str, pack_id: bytes) -> None:
            async with slots:
                try:
                    raw = await self.repo.storage.get(name)
                    await self.repo.run_cpu(self.repo.codec.open_index, pack_id, raw)
                except (CorruptedData, ObjectMissing) as exc:
                    self.problem(f"pack index '{name}' is damaged: {exc.message}")
                    return
            if pack_id not in self._packs:
                self.problem(f"pack index '{name}' names a pack that is missing")

        async with task_group() as nursery:
            for name in names:
                pack_id = pack_id_from_key(name)
                if pack_id is None:
                    self.problem(f"unexpected object '{name}' among the pack indexes")
                else:
                    nursery.start_soon(verify, name, pack_id)

    def _present(self, chunk: ChunkRef) -> bool:
        if chunk.location is None:
            return chunk.id in self._stored
        return chunk.location.pack in self._packs

    async def _read_all_chunks(self) -> None:
        slots = trio.Semaphore(max(4, self.repo.threads * 4))

        async def verify(chunk: ChunkRef, user: str) -> None:
            try:
                data = await self.repo.read_chunk(chunk)
                self.report.bytes_read += len(data)
            except (CorruptedData, ObjectMissing) as exc:
                self.problem(f"'{user}' is damaged: {exc.message}")
            finally:
                self.report.chunks_read += 1
                slots.release()

        async with task_group() as nursery:
            for chunk, user in self._chunk_users.items():
                if self._present(chunk):
                    await slots.acquire()
                    nursery.start_soon(verify, chunk, user)
