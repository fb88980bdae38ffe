"""`commit`: turn a staging tree into a new snapshot.

The tree is captured in one step (no await in between), so the snapshot is
exactly what staging held when the commit began, whatever writes arrive while
it runs. Files uploaded by write-behind are reused; the others are uploaded
from their frozen content (small ones many per thread hop); untouched
directories keep their stored record.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .errors import RekkordError, StorageError
from .format import (
    BlobKind,
    BlobRef,
    Entry,
    EntryKind,
    Location,
    Snapshot,
    Tag,
    chunk_fields,
    encode_chunks,
    encode_directory,
)
from .prepprocs import PrepPool
from .repository import KnownBlob, Repository
from .staging import ROOT, Capture, StagingTree
from .tasks import task_group
from .testhooks import stop_point
from .tuning import BATCH_FILES, SAVE_PROCESS_FILES, record_writers, save_processes
from .upload import TransferStats, Uploader

# Inline files a commit must upload before it starts a worker process for
# them (as a save does for small files)
COMMIT_PROCESS_FILES = SAVE_PROCESS_FILES
# Directory records encoded and sealed per thread hop (a commit of 100,000
# small files writes 1,000 of them)
DIRS_PER_HOP = 16
HOP_ENTRIES = 4096  # or fewer, once their entries reach this many


@dataclass
class CommitResult:
    tag: Tag
    snapshot: Snapshot
    files: int
    size: int
    bytes_new: int
    bytes_stored: int
    duration: float


def durable_files(repo: Repository, contents: dict[int, bytes], batch: int = 4096) -> set[int]:
    """The files (of ino -> encoded chunk list) whose every chunk is stored
    where the reference says (a failed pack is forgotten): one known_many()
    a batch of files (a capture checks 100,000 write-behind uploads; one
    look-up each cost 0.25 ms a file)."""
    durable: set[int] = set()
    items = list(contents.items())
    for start in range(0, len(items), batch):
        part = [(ino, [(blob_id, Location(pack, offset, length))
                       for blob_id, _, pack, offset, length in chunk_fields(raw)])
                for ino, raw in items[start:start + batch]]
        known = repo.known_many([blob_id for _, refs in part for blob_id, _ in refs])
        durable.update(ino for ino, refs in part if _stored_where_said(known, refs))
    return durable


def _stored_where_said(known: dict[bytes, KnownBlob], refs: list[tuple[bytes, Location]]) -> bool:
    return all((found := known.get(blob_id)) is not None and found.location == location for blob_id, location in refs)


class Committer:
    def __init__(self, repo: Repository, tree: StagingTree, uploader: Uploader) -> None:
        self.repo = repo
        self.tree = tree
        self.uploader = uploader
        self.files = 0  # totals of the snapshot, like save's: one per file name
        self.size = 0
        self.bytes_stored = 0
        self.garbage: list[str] = []  # data files of committed files, to delete
        self.uses: set[bytes] = set()  # packs the snapshot refers to (checked before it is published)
        self.inherited: list[BlobRef] = []  # records of directories never expanded, used as they are

    async def run(self) -> CommitResult:
        """Commit; the uploader's statistics (write-behind included) are this commit's."""
        started = time.monotonic()
        time_ns = time.time_ns()
        capture = self.tree.capture(lambda done: durable_files(self.repo, done))
        self.files, self.size = capture.stored_files, capture.stored_size  # the directories walked add theirs
        try:
            contents = capture.uploaded  # and the rest as they are uploaded (one dict: 100,000 files fill it)
            await self._upload_frozen(capture, contents)
            link_ids, max_link_id = _link_ids(capture)
            root_ref = await self._directories(capture, contents, link_ids)
            # Write-behind chunks may sit in packs other tasks are uploading: wait
            # for them, and make sure none the snapshot uses failed (self.uses:
            # every pack its records and files refer to; checking each file's
            # chunks instead cost a 100,000-file commit a second).
            self.uses.add(root_ref.location.pack)
            await self.repo.flush_packs()
            if self.repo.lost_packs(self.uses):
                raise StorageError("some staged data failed to upload; commit again")
            root = capture.node(ROOT).entry(b"")
            snapshot = Snapshot(self.tree.channel, time_ns, root_ref, self.size, 0, self.files,
                                max_link_id=max_link_id, root=root)
            snapshot.stored = self.bytes_stored + self.uploader.stats.bytes_stored
            await self._check_inherited()
            stop_point("commit-publish")
            tag = await self.repo.publish_snapshot(snapshot, self.uses)
        except BaseException:
            self.tree.release_capture(capture)
            raise
        self.garbage = self.tree.committed(capture, tag.snapshot_id, snapshot, contents, link_ids)
        await trio.to_thread.run_sync(self.repo.remember_session)
        result = CommitResult(tag, snapshot, self.files, self.size, self.uploader.stats.bytes_new,
                              snapshot.stored, time.monotonic() - started)
        self.uploader.stats = TransferStats()
        return result

    async def _check_inherited(self) -> None:
        """Directories never expanded keep the records of the base snapshot, and
        with them what those records use. While the base snapshot is listed, a
        prune keeps all of it; once it was forgotten, the commit must know which
        packs those trees use, so they are checked like the rest."""
        if not self.inherited or self.tree.base is None:
            return
        listing = await self.repo.list_snapshots()
        if any(tag.snapshot_id == self.tree.base for tag in listing.tags):
            return
        try:
            self.uses |= await _packs_below(self.repo, self.inherited)
        except RekkordError as exc:
            raise StorageError(f"the base snapshot of staging/{self.tree.channel} was forgotten and its data "
                               f"pruned; the staged tree cannot be committed as it is ({exc.message})") from None

    async def _upload_frozen(self, capture: Capture, contents: dict[int, bytes]) -> None:
        """Upload what the capture froze: data files one by one, inline files
        in batches, prepared by a worker process (as a save's small files) when
        there are many of them, else in a thread hop."""
        processes = save_processes(self.repo.threads)
        if processes == 0 or len(capture.inline) < COMMIT_PROCESS_FILES:
            await self._upload(capture, contents, None)
            return
        pool = PrepPool(self.repo, processes, self.uploader.stats)
        async with task_group() as nursery:
            pool_scope = trio.CancelScope()

            async def run_pool() -> None:
                with pool_scope:
                    await pool.run()

            nursery.start_soon(run_pool)
            self.repo.row_writer = pool.write_rows  # the worker writes the cache's blob rows
            try:
                await self._upload(capture, contents, pool)
            finally:
                self.repo.row_writer = None
                if pool.spawned:
                    with trio.CancelScope(shield=True):
                        await pool.close()  # it ends once it wrote the rows it was sent
                else:
                    pool_scope.cancel()  # still starting (or failed): nothing of it is needed

    async def _upload(self, capture: Capture, contents: dict[int, bytes], pool: PrepPool | None) -> None:
        slots = trio.Semaphore(record_writers(self.repo.threads))

        async def behind(ino: int) -> bool:
            """Write-behind may be at it: its result may do."""
            if not await self.tree.uploads.wait(ino):
                return False
            chunks = self.tree.uploads.result(ino, capture.versions[ino])
            if chunks is None:
                return False
            contents[ino] = chunks  # durability is checked with all others
            return True

        async def upload(ino: int) -> None:
            try:
                if not await behind(ino):
                    contents[ino] = encode_chunks(await self.uploader.upload_path(capture.frozen[ino]))
            finally:
                slots.release()

        async def upload_inline(batch: list[int]) -> None:
            try:
                left = [ino for ino in batch if not await behind(ino)]
                datas = self.tree.captured_contents(left)
                if pool is not None and pool.ready:
                    prepared, _ = await pool.prepare_contents(datas)
                    await self.repo.upload_ready()
                    for ino, item in zip(left, prepared):
                        assert not isinstance(item, OSError)  # contents sent are never read
                        contents[ino] = item.chunks_raw
                    return
                for ino, chunks in zip(left, await self.uploader.upload_many(datas)):
                    contents[ino] = encode_chunks(chunks)
            finally:
                slots.release()

        async with task_group() as nursery:
            for ino in capture.frozen:
                await slots.acquire()
                nursery.start_soon(upload, ino)
            for batch in _batches(capture.inline):
                await slots.acquire()
                nursery.start_soon(upload_inline, batch)

    async def _directories(self, capture: Capture, contents: dict[int, bytes],
                           link_ids: dict[int, int]) -> BlobRef:
        """Write the records of the expanded directories, deepest level first (the
        directories of one level in groups of DIRS_PER_HOP, several groups at
        once, each read from the capture when its turn comes: at most
        record_writers groups' entries are held at once); returns the root's record."""
        levels = capture.levels()
        dir_refs: dict[int, BlobRef] = {}  # of the level below, until their parents are written
        slots = trio.Semaphore(record_writers(self.repo.threads))

        async def write(group: list[int]) -> None:
            try:
                refs = await self._write_group(capture, group, contents, link_ids, dir_refs)
                dir_refs.update(zip(group, refs))
            finally:
                slots.release()

        for level in reversed(levels):
            below = list(dir_refs)
            async with task_group() as nursery:
                for group in _batches(level, DIRS_PER_HOP):
                    await slots.acquire()
                    nursery.start_soon(write, group)
            for ino in below:
                del dir_refs[ino]
        return dir_refs[ROOT]

    async def _write_group(self, capture: Capture, group: list[int], contents: dict[int, bytes],
                           link_ids: dict[int, int], dir_refs: dict[int, BlobRef]) -> list[BlobRef]:
        """The records of some directories of one level, written in one thread hop
        (a hop each cost a 1,000-folder commit more than encoding them), or
        more when they hold many entries; those of their subdirectories are in
        dir_refs."""
        refs: dict[int, BlobRef] = {}
        makers: list[tuple[int, Callable[[], bytes]]] = []
        held = 0  # entries in makers

        async def write() -> None:
            written = await self.repo.write_blobs(BlobKind.DIRECTORY, [maker for _, maker in makers])
            for (ino, _), (ref, stored) in zip(makers, written):
                self.bytes_stored += stored
                refs[ino] = ref
            makers.clear()

        for ino in group:
            node = capture.node(ino)
            if node.dir_ref is not None:
                self.inherited.append(node.dir_ref)
                refs[ino] = node.dir_ref  # never expanded: the stored record is still exact
                continue
            entries = self._entries(capture, ino, contents, link_ids, dir_refs)
            # encoded in the thread hop that hashes and seals it
            makers.append((ino, functools.partial(encode_directory, entries)))
            held += len(entries)
            if held >= HOP_ENTRIES:  # large folders: no more entries held than before
                await write()
                held = 0
        if makers:
            await write()
        return [refs[ino] for ino in group]

    def _entries(self, capture: Capture, ino: int, contents: dict[int, bytes],
                 link_ids: dict[int, int], dir_refs: dict[int, BlobRef]) -> list[Entry]:
        """The entries of one expanded directory's record."""
        entries: list[Entry] = []
        for name, child_node in capture.children(ino):
            child = child_node.ino
            entry = child_node.entry(name)
            if child_node.kind == EntryKind.DIRECTORY:
                entry.dir_ref = dir_refs[child]
                self.uses.add(entry.dir_ref.location.pack)
                entry.nlink = 1
            elif child_node.kind == EntryKind.FILE:
                entry.chunks_raw = contents[child] if child_node.local else child_node.chunks or b""
                entry.size = 0
                for _, size, pack, _, _ in chunk_fields(entry.chunks_raw):
                    entry.size += size
                    self.uses.add(pack)
                entry.link_id = link_ids.get(child, 0)
                entry.nlink = child_node.nlink if entry.link_id else 1
                self.files += 1
                self.size += entry.size
            else:
                entry.nlink = 1
            entries.append(entry)
        return entries


async def _packs_below(repo: Repository, tops: list[BlobRef]) -> set[bytes]:
    """Every pack the trees under these records use (records and file chunks)."""
    packs: set[bytes] = set()
    seen: set[bytes] = set()
    stack = list(tops)
    while stack:
        ref = stack.pop()
        if ref.id in seen:
            continue
        seen.add(ref.id)
        packs.add(ref.location.pack)
        for entry in await repo.read_directory(ref):
            if entry.kind == EntryKind.DIRECTORY and entry.dir_ref is not None:
                stack.append(entry.dir_ref)
            elif entry.kind == EntryKind.FILE:
                packs.update(chunk.location.pack for chunk in entry.chunks)
    return packs


def _batches(inos: list[int], size: int = BATCH_FILES) -> list[list[int]]:
    return [inos[start:start + size] for start in range(0, len(inos), size)]


def _link_ids(capture: Capture) -> tuple[dict[int, int], int]:
    """Hardlink group IDs: those of the base snapshot are kept (untouched
    directories still use them); new groups number on from the base's highest."""
    link_ids: dict[int, int] = {}
    next_id = capture.max_link_id + 1
    for ino, link_id, names in capture.link_counts():
        if link_id:
            link_ids[ino] = link_id
        elif names > 1:
            link_ids[ino] = next_id
            next_id += 1
    return link_ids, next_id - 1
