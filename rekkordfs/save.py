"""`save`: turn local paths into a new snapshot.

Pipeline (docs/format.md, "Saving"): a walker thread lists directories and
reads metadata; worker tasks read files, chunk, hash, compress and seal them in
threads (bounded by the CPU limiter) and upload what the repository lacks;
a directory record is written as soon as all its children are done, bottom-up,
and the snapshot is published last. Memory is bounded by the number of chunks
in flight, whatever the size of the data.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import trio

from .cache import StatKey
from .errors import UsageError
from .format import (
    BlobKind,
    BlobRef,
    ChunkRef,
    Entry,
    EntryKind,
    Snapshot,
    encode_chunks,
    encode_directory,
    validate_channel,
)
from .fsmeta import entry_from_stat, read_xattrs
from .keys import Capability
from .repository import Repository
from .selection import CACHEDIR_TAG, Selection, is_cache_dir
from .tasks import ReceiverGone, ThreadFeed, task_group
from .tuning import BATCH_BYTES, BATCH_FILES, SMALL_FILE, save_lead, save_workers
from .upload import SmallFile, TransferStats, Uploader, open_regular


@dataclass
class SaveStats(TransferStats):
    files: int = 0
    dirs: int = 0
    size: int = 0  # logical bytes of all files in the snapshot
    scanned_files: int = 0
    scanned_bytes: int = 0
    skipped: int = 0


@dataclass
class SaveResult:
    snapshot_id: str
    channel: str
    time_ns: int
    stats: SaveStats
    duration: float


class DirNode:
    __slots__ = ("path", "entry", "parent", "children", "pending", "skipped")

    def __init__(self, path: bytes, entry: Entry | None, parent: DirNode | None) -> None:
        self.path = path
        self.entry = entry  # None for the snapshot root
        self.parent = parent
        self.children: list[Entry] = []
        self.pending = 0  # file jobs and subdirectories not finished yet
        self.skipped: set[bytes] = set()


@dataclass
class FileJob:
    node: DirNode
    entry: Entry
    path: bytes
    key: StatKey
    first: Entry | None = None  # set for a later hardlink of an inode another job reads

    @property
    def primary(self) -> bool:
        return self.first is None


@dataclass
class Listing:
    node: DirNode
    jobs: list[FileJob] = field(default_factory=list)


def normalize_paths(paths: list[str]) -> list[bytes]:
    """Absolute, normalized, existing paths with those inside another one dropped."""
    result: list[bytes] = []
    for raw in paths:
        path = os.path.normpath(os.path.abspath(os.fsencode(raw)))
        try:
            os.lstat(path)
        except OSError as exc:
            raise UsageError(f"cannot save '{raw}': {exc.strerror}") from None
        result.append(path)
    result = sorted(set(result))
    kept: list[bytes] = []
    for path in result:
        if not any(path == k or path.startswith(k.rstrip(b"/") + b"/") for k in kept):
            kept.append(path)
    return kept


_STAT_ROW = struct.Struct("<QqqQI")  # size, mtime, ctime, inode, path length


def _unpack_stat_row(row: bytes) -> tuple[bytes, StatKey, bytes]:
    size, mtime_ns, ctime_ns, ino, length = _STAT_ROW.unpack_from(row)
    start = _STAT_ROW.size
    return row[start:start + length], StatKey(size, mtime_ns, ctime_ns, ino), row[start + length:]


def _stat_key(st: os.stat_result) -> StatKey:
    return StatKey(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class Lead:
    """How many files the walker may have queued that are not saved yet: each
    holds its entry, job and path, and a walker that lists a whole tree of small
    files before the workers catch up holds them all (memory grew with the
    tree). The walker's thread waits; close() (the pipeline stopped) wakes it
    for good, and it ends with ReceiverGone."""

    def __init__(self, limit: int) -> None:
        self._cond = threading.Condition()
        self._limit = limit
        self._queued = 0
        self._closed = False

    def take(self, files: int) -> None:
        """Walker thread: room for a listing of this many files to read."""
        if not files:
            return
        with self._cond:
            while self._queued >= self._limit and not self._closed:
                self._cond.wait()
            if self._closed:
                raise ReceiverGone()
            self._queued += files

    def done(self) -> None:
        """Loop side: a queued file is finished."""
        with self._cond:
            self._queued -= 1
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Walker:
    """Runs in a thread: lists directories and emits Listings in depth-first order,
    leaving out what the selection excludes."""

    def __init__(self, paths: list[bytes], repo: Repository, emit: Callable[[Listing], None],
                 skip: Callable[[str], None], stats: SaveStats, uses: set[bytes],
                 selection: Selection | None = None, report: Callable[[bytes], None] | None = None,
                 lead: Lead | None = None) -> None:
        self.paths = paths
        self.lead = lead
        self.repo = repo
        self.uses = uses  # packs the snapshot refers to (cached files' chunks are added here)
        self.emit = emit
        self.skip = skip  # reports something left out of the snapshot
        self.stats = stats
        self.selection = selection or Selection()
        self.report = report  # told each path that goes into the snapshot (save -v)
        self._next_link_id = 1
        # (dev, ino) -> (link_id, entry of the first occurrence, job or None if cached)
        self._links: dict[tuple[int, int], tuple[int, Entry, FileJob | None]] = {}
        self._cached: dict[bytes, tuple[bytes, list[ChunkRef]] | None] = {}  # this folder's stat-cache rows

    @property
    def max_link_id(self) -> int:
        return self._next_link_id - 1

    def run(self, root: DirNode) -> None:
        if b"/" in self.paths:
            self._scan_tree(root)
            return
        trie: dict = {}
        for path in self.paths:
            node = trie
            parts = path.split(b"/")[1:]
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if node is None:
                    break
            else:
                node[parts[-1]] = None  # None marks a path saved in full
        self._scan_virtual(root, trie)

    def _scan_virtual(self, node: DirNode, trie: dict) -> None:
        listing = Listing(node)
        full: list[DirNode] = []
        partial: list[tuple[DirNode, dict]] = []
        for name in sorted(trie):
            path = (node.path or b"") + b"/" + name
            try:
                st = os.lstat(path)
            except OSError as exc:
                self.skip(f"cannot read '{os.fsdecode(path)}': {exc.strerror}")
                continue
            # a saved path itself may be excluded (by name or absolute path);
            # the folders leading to it never are
            if trie[name] is None and self.selection.excluded(name, path, b"", stat.S_ISDIR(st.st_mode)):
                continue
            entry = self._add_child(listing, path, name, st)
            if entry is None or entry.kind != EntryKind.DIRECTORY:
                continue
            child = DirNode(path, entry, node)
            node.pending += 1
            if trie[name] is None:
                full.append(child)
            else:
                partial.append((child, trie[name]))
        self._emit(listing)
        for child, sub in partial:
            self._scan_virtual(child, sub)
        for child in full:
            self._scan_tree(child)

    def _scan_tree(self, top: DirNode) -> None:
        """Everything below the saved path top (b"" for /)."""
        selection = self.selection
        filtering = selection.filters_entries
        base = top.path + b"/" if top.path else b"/"  # what relative patterns are relative to
        root_dev = self._device(top.path or b"/") if selection.one_file_system else None
        # (folder, whether to list it): a folder on another filesystem is kept, empty
        stack: list[tuple[DirNode, bool]] = [(top, True)]
        while stack:
            node, descend = stack.pop()
            listing = Listing(node)
            subdirs: list[tuple[DirNode, bool]] = []
            items = self._list(node.path or b"/") if descend else []
            stats: list[tuple[bytes, bytes, os.stat_result]] = []
            for name, path in items:
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue  # vanished since listing
                except OSError as exc:
                    self.skip(f"cannot read '{os.fsdecode(path)}': {exc.strerror}")
                    continue
                if filtering and selection.excluded(name, path, path[len(base):], stat.S_ISDIR(st.st_mode)):
                    continue
                stats.append((name, path, st))
            self._prefetch_stats(stats)
            for name, path, st in stats:
                entry = self._add_child(listing, path, name, st)
                if entry is not None and entry.kind == EntryKind.DIRECTORY:
                    subdirs.append((DirNode(path, entry, node), root_dev is None or st.st_dev == root_dev))
            node.pending += len(subdirs)
            self._emit(listing)
            stack.extend(reversed(subdirs))

    def _emit(self, listing: Listing) -> None:
        if self.lead is not None:
            self.lead.take(len(listing.jobs))
        self.emit(listing)

    def _prefetch_stats(self, stats: list[tuple[bytes, bytes, os.stat_result]]) -> None:
        """The stat-cache rows of a folder's files in one query (not one per file)."""
        files = [(path, _stat_key(st)) for _, path, st in stats if stat.S_ISREG(st.st_mode) and st.st_size]
        self._cached = dict(zip((path for path, _ in files), self.repo.cache.lookup_stats(files)))

    def _list(self, folder: bytes) -> list[tuple[bytes, bytes]]:
        """(name, path) of the folder's entries, sorted; only the tag of a tagged
        cache folder when caches are excluded."""
        try:
            with os.scandir(folder) as it:
                items = sorted((item.name, item.path) for item in it)
        except OSError as exc:
            self.skip(f"cannot list '{os.fsdecode(folder)}': {exc.strerror}; its content is missing")
            return []
        if self.selection.exclude_caches and any(name == CACHEDIR_TAG for name, _ in items) \
                and is_cache_dir(folder):
            return [(name, path) for name, path in items if name == CACHEDIR_TAG]
        return items

    def _device(self, path: bytes) -> int | None:
        try:
            return os.lstat(path).st_dev
        except OSError:
            return None  # reported when the folder is listed

    def _add_child(self, listing: Listing, path: bytes, name: bytes, st: os.stat_result) -> Entry | None:
        try:
            entry = entry_from_stat(name, st, path)
        except OSError as exc:
            self.skip(f"cannot read '{os.fsdecode(path)}': {exc.strerror}")
            return None
        if entry is None:
            return None
        entry.xattrs = read_xattrs(path)
        listing.node.children.append(entry)
        if self.report is not None:
            self.report(path)
        if entry.kind == EntryKind.DIRECTORY:
            self.stats.dirs += 1
        elif entry.kind == EntryKind.FILE:
            self.stats.scanned_files += 1
            self.stats.scanned_bytes += entry.size
            self._file_job(listing, path, entry, st)
        return entry

    def _file_job(self, listing: Listing, path: bytes, entry: Entry, st: os.stat_result) -> None:
        key = _stat_key(st)
        if st.st_nlink > 1:
            known = self._links.get((st.st_dev, st.st_ino))
            if known is not None:
                link_id, first, first_job = known
                entry.link_id = link_id
                if first_job is None:
                    entry.chunks_raw, entry.size = first.chunks_raw, first.size
                else:
                    listing.jobs.append(FileJob(listing.node, entry, path, key, first=first))
                    listing.node.pending += 1
                return
            entry.link_id = self._next_link_id
            self._next_link_id += 1
        if st.st_size == 0:
            cached: tuple[bytes, list[ChunkRef]] | None = (b"", [])
        elif path in self._cached:
            cached = self._cached.pop(path)
        else:
            cached = self.repo.cache.lookup_stat(path, key)
        job = None
        if cached is not None:
            entry.chunks_raw = cached[0]
            self.uses.update(chunk.location.pack for chunk in cached[1])
        else:
            job = FileJob(listing.node, entry, path, key)
            listing.jobs.append(job)
            listing.node.pending += 1
        if entry.link_id:
            self._links[(st.st_dev, st.st_ino)] = (entry.link_id, entry, job)


class SaveSession:
    def __init__(self, repo: Repository, channel: str, paths: list[str],
                 warn: Callable[[str], None], workers: int | None = None,
                 selection: Selection | None = None, report: Callable[[bytes], None] | None = None) -> None:
        repo.keys.require(Capability.WRITE)
        self.repo = repo
        self.channel = validate_channel(channel)
        self.paths = normalize_paths(paths)
        self.selection = selection
        self.report = report
        self.warn_cb = warn
        self.stats = SaveStats()
        self.uploader = Uploader(repo, self.stats)
        self.workers = workers or save_workers(repo.threads)
        self.root = DirNode(b"", None, None)
        self.root_ref: BlobRef | None = None
        self._link_done: dict[int, trio.Event] = {}
        self.lead = Lead(save_lead(repo.threads))
        self._link_failed: set[int] = set()
        # stat rows to record once the snapshot is published, one bytes object each
        # (_STAT_ROW head, path, encoded chunks): a tuple of objects was 500 bytes a file
        self._stat_rows: list[bytes] = []
        self.uses: set[bytes] = set()  # every pack the snapshot refers to, checked before it is published

    def skip(self, message: str) -> None:
        """Something could not be read and is missing from the snapshot (exit status 3)."""
        self.stats.skipped += 1
        self.warn_cb(message)

    async def run(self) -> SaveResult:
        started = time.monotonic()
        time_ns = time.time_ns()
        await self.repo.prepare_write()
        # The walker hands listings over without waiting for the loop (it only
        # holds metadata, and is much faster than reading files anyway).
        listings_send, listings_recv = trio.open_memory_channel[Listing | None](math.inf)
        jobs_send, jobs_recv = trio.open_memory_channel[list[FileJob]](self.workers * 2)
        token = trio.lowlevel.current_trio_token()
        walker = Walker(self.paths, self.repo, ThreadFeed(listings_send).put,
                        lambda m: token.run_sync_soon(self.skip, m), self.stats, self.uses, self.selection,
                        self.report, self.lead)

        async def walk() -> None:
            try:
                await trio.to_thread.run_sync(walker.run, self.root)
            except ReceiverGone:
                pass  # the pipeline failed: its own error is reported
            finally:
                await trio.lowlevel.checkpoint()  # what the walker queued is delivered first
                listings_send.close()

        async with task_group() as nursery:
            nursery.start_soon(walk)
            nursery.start_soon(self._dispatch, listings_recv, jobs_send)
            for _ in range(self.workers):
                nursery.start_soon(self._worker, jobs_recv.clone())
            jobs_recv.close()

        assert self.root_ref is not None, "save pipeline ended before the root directory was written"
        snapshot = Snapshot(self.channel, time_ns, self.root_ref, self.stats.size, 0, self.stats.files,
                            max_link_id=walker.max_link_id)
        snapshot.stored = self.stats.bytes_stored
        tag = await self.repo.publish_snapshot(snapshot, self.uses)
        await trio.to_thread.run_sync(self._remember)
        return SaveResult(tag.id_hex, self.channel, time_ns, self.stats, time.monotonic() - started)

    def _remember(self) -> None:
        self.repo.remember_session()
        self.repo.cache.store_stats(_unpack_stat_row(row) for row in self._stat_rows)

    async def _dispatch(self, listings: trio.MemoryReceiveChannel[Listing | None],
                        jobs: trio.MemorySendChannel[list[FileJob]]) -> None:
        """Hand jobs to workers: small files in batches, others one by one. A
        batch spans folders while listings keep coming (folders of a few small
        files would otherwise cost a thread hop each), and goes out as soon as
        the walker has nothing more ready."""
        try:
            await self._dispatch_all(listings, jobs)
        finally:
            self.lead.close()  # the walker must not wait for workers that are gone (or done)

    async def _dispatch_all(self, listings: trio.MemoryReceiveChannel[Listing | None],
                            jobs: trio.MemorySendChannel[list[FileJob]]) -> None:
        batch: list[FileJob] = []
        batch_bytes = 0
        async with listings, jobs:
            while True:
                try:
                    listing = listings.receive_nowait()
                except trio.WouldBlock:
                    if batch:
                        await jobs.send(batch)
                        batch, batch_bytes = [], 0
                    try:
                        listing = await listings.receive()
                    except trio.EndOfChannel:
                        break
                except trio.EndOfChannel:
                    break
                assert listing is not None
                if listing.node.pending == 0:
                    await self._finalize(listing.node)
                for job in listing.jobs:
                    if job.entry.link_id and job.primary:
                        self._link_done[job.entry.link_id] = trio.Event()
                    if job.primary and job.key.size <= SMALL_FILE:
                        batch.append(job)
                        batch_bytes += job.key.size
                        if len(batch) >= BATCH_FILES or batch_bytes >= BATCH_BYTES:
                            await jobs.send(batch)
                            batch, batch_bytes = [], 0
                    else:
                        await jobs.send([job])
            if batch:
                await jobs.send(batch)

    async def _worker(self, jobs: trio.MemoryReceiveChannel[list[FileJob]]) -> None:
        async with jobs:
            async for batch in jobs:
                if len(batch) == 1 and (not batch[0].primary or batch[0].key.size > SMALL_FILE):
                    job = batch[0]
                    try:
                        await self._process_single(job)
                        error = None
                    except OSError as exc:
                        error = exc
                    await self._job_done(job, error)
                else:
                    await self._process_batch(batch)

    async def _job_done(self, job: FileJob, error: OSError | None) -> None:
        self.lead.done()
        if error is not None:
            job.node.skipped.add(job.entry.name)
            self._link_failed.add(job.entry.link_id)
            self.skip(f"cannot read '{os.fsdecode(job.path)}': {error.strerror or error}; skipped")
        if job.entry.link_id and job.primary:
            self._link_done[job.entry.link_id].set()
        await self._child_done(job.node)

    async def _process_single(self, job: FileJob) -> None:
        if job.first is not None:
            await self._link_done[job.entry.link_id].wait()
            if job.entry.link_id in self._link_failed:
                raise OSError(errno.EIO, "its first hardlink could not be read")
            job.entry.chunks_raw, job.entry.size = job.first.chunks_raw, job.first.size
            return
        await self._process_large(job)

    async def _process_batch(self, batch: list[FileJob]) -> None:
        """Read, chunk, hash and seal many small files in one thread hop (upload.py)."""
        files = [SmallFile(path=job.path) for job in batch]
        refs = await self.uploader.upload_small(files, read_limit=None)
        for job, item, chunks in zip(batch, files, refs):
            if chunks is None:
                assert item.error is not None
                await self._job_done(job, item.error)
                continue
            assert item.data is not None and item.stat is not None
            self._set_content(job, len(item.data), chunks, _stat_key(item.stat) == job.key)
            await self._job_done(job, None)

    def _set_content(self, job: FileJob, size: int, chunks: list[ChunkRef], unchanged: bool) -> None:
        job.entry.chunks_raw = encode_chunks(chunks)
        job.entry.size = size
        self.uses.update(chunk.location.pack for chunk in chunks)
        if unchanged:
            key = job.key
            self._stat_rows.append(_STAT_ROW.pack(key.size, key.mtime_ns, key.ctime_ns, key.ino, len(job.path))
                                   + job.path + job.entry.chunks_raw)

    def _unchanged(self, handle: BinaryIO, key: StatKey) -> bool:
        return _stat_key(os.fstat(handle.fileno())) == key

    async def _process_large(self, job: FileJob) -> None:
        handle = await trio.to_thread.run_sync(open_regular, job.path)
        try:
            chunks = await self.uploader.upload_stream(handle)
            unchanged = await trio.to_thread.run_sync(self._unchanged, handle, job.key)
        finally:
            handle.close()
        self._set_content(job, sum(c.size for c in chunks), chunks, unchanged)

    async def _child_done(self, node: DirNode) -> None:
        node.pending -= 1
        if node.pending == 0:
            await self._finalize(node)

    async def _finalize(self, node: DirNode) -> None:
        children = [e for e in node.children if e.name not in node.skipped]
        for entry in children:
            if entry.kind == EntryKind.FILE:
                self.stats.files += 1
                self.stats.size += entry.size
        # encoded in the thread that seals it: one hop per folder
        ref, stored = await self.repo.write_blob(BlobKind.DIRECTORY, functools.partial(encode_directory, children))
        self.uses.add(ref.location.pack)
        self.stats.bytes_stored += stored
        if node.entry is None:
            self.root_ref = ref
            return
        node.entry.dir_ref = ref
        assert node.parent is not None
        await self._child_done(node.parent)
