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
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from operator import attrgetter
from typing import BinaryIO

import trio

from . import tuning
from .cache import StatKey, stat_row
from .format import (
    BlobKind,
    BlobRef,
    ChunkRef,
    EntryKind,
    Snapshot,
    encode_chunks,
    encode_directory,
    validate_channel,
)
from .gcquiet import quiet_gc
from .keys import Capability
from .localfiles import open_in_folder
from .prepprocs import PreparedFile, PrepPool
from .repository import Repository
from .savewalk import DirNode, FileJob, Lead, Listing, Walker, normalize_paths, stat_key
from .selection import Selection
from .tasks import ReceiverGone, ThreadFeed, task_group
from .tuning import BATCH_BYTES, BATCH_FILES, BULK_GC_THRESHOLDS, SMALL_FILE, STAT_BATCH, save_lead, save_workers
from .upload import SmallFile, TransferStats, Uploader

_FILE = EntryKind.FILE  # looked up once: a member looked up on its class is slow in Python 3.11


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


class SaveSession:
    def __init__(self, repo: Repository, channel: str, paths: list[str],
                 warn: Callable[[str], None], workers: int | None = None,
                 selection: Selection | None = None, report: Callable[[bytes], None] | None = None,
                 processes: int | None = None) -> None:
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
        # worker processes for small files (prepprocs.py), started once the
        # walk has found enough of them to be worth a process start
        self.processes = tuning.save_processes(repo.threads) if processes is None else processes
        self._pool: PrepPool | None = None
        self._walker: Walker | None = None
        self._small_seen = 0
        self._nursery: trio.Nursery | None = None
        self.root = DirNode(b"", None, None)
        self.root_ref: BlobRef | None = None
        self._link_done: dict[int, trio.Event] = {}
        self.lead = Lead(save_lead(repo.threads))
        self._link_failed: set[int] = set()
        # folders whose children are all done, their records not written yet:
        # written RECORD_BATCH at a time (a thread hop each time), the rest
        # once every file is done
        self._finished: list[DirNode] = []
        self._finished_entries = 0  # their children, together
        # stat rows not stored yet, one stat_row() each (a tuple of objects was 500
        # bytes a file); stored STAT_BATCH at a time as the save goes: kept to the
        # end they were 20 MB at 100,000 files, and a 1.5 s wait after the snapshot
        self._stat_rows: list[bytes] = []
        self._stat_send, self._stat_recv = trio.open_memory_channel[list[bytes]](math.inf)
        self._stats_sent = trio.Event()  # every stat row written or sent to a worker process
        self.uses: set[bytes] = set()  # every pack the snapshot refers to, checked before it is published

    def skip(self, message: str) -> None:
        """Something could not be read and is missing from the snapshot (exit status 3)."""
        self.stats.skipped += 1
        self.warn_cb(message)

    async def run(self) -> SaveResult:
        with quiet_gc(BULK_GC_THRESHOLDS):
            return await self._run()

    async def _run(self) -> SaveResult:
        started = time.monotonic()
        time_ns = time.time_ns()
        await self.repo.prepare_write()
        # The walker hands listings over without waiting for the loop (it only
        # holds metadata, and is much faster than reading files anyway).
        listings_send, listings_recv = trio.open_memory_channel[Listing | None](math.inf)
        jobs_send, jobs_recv = trio.open_memory_channel[list[FileJob]](self.workers * 2)
        token = trio.lowlevel.current_trio_token()
        self._walker = walker = Walker(self.paths, self.repo, ThreadFeed(listings_send).put,
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

        async with task_group() as outer:
            self._nursery = outer  # the worker processes outlive the files: they write the last cache rows
            outer.start_soon(self._store_stats)
            async with self._stat_send:
                async with task_group() as nursery:
                    nursery.start_soon(walk)
                    nursery.start_soon(self._dispatch, listings_recv, jobs_send)
                    nursery.start_soon(self._work, jobs_recv)
                self._stat_send.send_nowait(self._stat_rows)
            # the worker process writes the last stat rows, and the blob rows of
            # the packs written last, while this one publishes: they were a
            # quarter of a second and more at the end of a save of 100,000 files
            assert self.root_ref is not None, "save pipeline ended before the root directory was written"
            snapshot = Snapshot(self.channel, time_ns, self.root_ref, self.stats.size, 0, self.stats.files,
                                max_link_id=walker.max_link_id)
            snapshot.stored = self.stats.bytes_stored
            # every stat row sent to the worker, or written here (not beside the publication's fsyncs)
            await self._stats_sent.wait()
            try:
                tag = await self.repo.publish_snapshot(snapshot, self.uses)
            finally:
                await self._close_pool()
        # once the worker ended: its writes and this one's would wait for each other
        await trio.to_thread.run_sync(self.repo.remember_session)
        return SaveResult(tag.id_hex, self.channel, time_ns, self.stats, time.monotonic() - started)

    async def _store_stats(self) -> None:
        """Stores the stat rows as they come (a row is used only once the packs
        it names are known blobs, which they become when the snapshot is published)."""
        cache = self.repo.cache
        async with self._stat_recv:
            async for rows in self._stat_recv:
                # a worker process writes them while there is one, off this process's core
                if self._pool is None or not await self._pool.write_rows("stats", cache.signed_stats(rows)):
                    await trio.to_thread.run_sync(cache.store_stats, rows)
        self._stats_sent.set()

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
        limit = BATCH_FILES  # larger once a worker process takes the batches
        complete: list[DirNode] = []  # folders with nothing to read (a re-save's): records in one hop
        async with listings, jobs:
            while True:
                try:
                    listing = listings.receive_nowait()
                except trio.WouldBlock:
                    if batch:
                        self._count_small(len(batch))
                        await jobs.send(batch)
                        batch, batch_bytes = [], 0
                    await self._records(complete)
                    complete = []
                    try:
                        listing = await listings.receive()
                    except trio.EndOfChannel:
                        break
                except trio.EndOfChannel:
                    break
                assert listing is not None
                if listing.node.pending == 0:
                    complete.append(listing.node)
                    if len(complete) >= tuning.RECORD_BATCH:
                        await self._records(complete)
                        complete = []
                for job in listing.jobs:
                    if job.entry.link_id and job.primary:
                        self._link_done[job.entry.link_id] = trio.Event()
                    if job.primary and job.key.size <= SMALL_FILE:
                        batch.append(job)
                        batch_bytes += job.key.size
                        if len(batch) >= limit or batch_bytes >= BATCH_BYTES:
                            self._count_small(len(batch))
                            await jobs.send(batch)
                            batch, batch_bytes = [], 0
                            if self._pool is not None and self._pool.ready:
                                limit = tuning.PROCESS_BATCH_FILES
                    else:
                        await jobs.send([job])
            if batch:
                self._count_small(len(batch))
                await jobs.send(batch)
            await self._records(complete)

    async def _work(self, jobs: trio.MemoryReceiveChannel[list[FileJob]]) -> None:
        """Every job done (the worker processes stay: _run() closes them, or
        the save's nursery kills them if it fails)."""
        async with task_group() as workers:
            for _ in range(self.workers):
                workers.start_soon(self._worker, jobs.clone())
            jobs.close()
        # every file is done (the dispatcher closed the jobs after its last folders)
        await self._records([], flush=True)

    async def _close_pool(self) -> None:
        """No more batches nor cache rows for the worker processes: they end once
        they wrote what they were sent (the save's nursery waits for that)."""
        if self._pool is not None:
            self.repo.row_writer = None
            with trio.CancelScope(shield=True):
                await self._pool.close()

    def _count_small(self, files: int) -> None:
        """Dispatcher: start the worker processes once there is enough small-file work."""
        self._small_seen += files
        if self._pool is None and self.processes > 0 and self._small_seen >= tuning.SAVE_PROCESS_FILES:
            assert self._nursery is not None
            self._pool = PrepPool(self.repo, self.processes, self.stats)
            self.repo.row_writer = self._pool.write_rows
            self._nursery.start_soon(self._pool.run)

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
        if self._file_done(job, error):
            await self._records([job.node])

    def _file_done(self, job: FileJob, error: OSError | None) -> bool:
        """A file job is finished (its lead counted by the caller); whether
        that was the last its folder waited for."""
        if error is not None:
            job.node.skipped.add(job.entry.name)
            self._link_failed.add(job.entry.link_id)
            self.skip(f"cannot read '{os.fsdecode(job.path)}': {error.strerror or error}; skipped")
        if job.entry.link_id and job.primary:
            self._link_done[job.entry.link_id].set()
        job.node.pending -= 1
        return job.node.pending == 0

    async def _process_single(self, job: FileJob) -> None:
        if job.first is not None:
            await self._link_done[job.entry.link_id].wait()
            if job.entry.link_id in self._link_failed:
                raise OSError(errno.EIO, "its first hardlink could not be read")
            job.entry.chunks_raw, job.entry.size = job.first.chunks_raw, job.first.size
            return
        await self._process_large(job)

    async def _process_batch(self, batch: list[FileJob]) -> None:
        """Read, chunk, hash and seal many small files in a worker process, or
        in one thread hop (upload.py) until one is ready (or started, once
        there are many: see tuning.SAVE_WAIT_FILES)."""
        assert self._walker is not None
        leaves = self._walker.leaves_xattrs  # the walker read the others' (a re-save: all)
        pool = self._pool
        if pool is not None and (pool.ready or self._small_seen >= tuning.SAVE_WAIT_FILES):
            folders = [(node.folder, len(list(jobs))) for node, jobs in groupby(batch, attrgetter("node"))]
            names = [job.entry.name for job in batch]
            want = bytes(leaves(job.entry) for job in batch)
            sizes = [job.key.size for job in batch]
            await self._store_batch(batch, *await pool.prepare(folders, names, want, sizes))
            return
        files = [SmallFile(path=job.entry.name, folder=job.node.folder, want_xattrs=leaves(job.entry))
                 for job in batch]
        refs = await self.uploader.upload_small(files, read_limit=None)
        self.lead.done(len(batch))
        complete: list[DirNode] = []  # folders finished by this batch: their records in one hop
        for job, item, chunks in zip(batch, files, refs):
            if chunks is None:
                assert item.error is not None
                if self._file_done(job, item.error):
                    complete.append(job.node)
                continue
            if item.want_xattrs:
                job.entry.xattrs = item.xattrs or []
            self._set_content(job, item.size, chunks, item.key == job.key)
            if self._file_done(job, None):
                complete.append(job.node)
        await self._records(complete)

    async def _store_batch(self, batch: list[FileJob], files: list[PreparedFile | OSError],
                           packs: set[bytes]) -> None:
        """The batch's files as a worker process prepared them (prepprocs.py);
        _set_raw_content() and _file_done() inlined: this runs once per file
        on the loop, the save's busiest core."""
        await self.repo.upload_ready()
        self.lead.done(len(batch))
        self.uses.update(packs)  # the whole batch's, gathered by the pool
        complete: list[DirNode] = []
        rows, link_done = self._stat_rows, self._link_done
        for job, item in zip(batch, files):
            if isinstance(item, OSError):
                if self._file_done(job, item):
                    complete.append(job.node)
                continue
            entry = job.entry
            if item.xattrs is not None:
                entry.xattrs = item.xattrs
            entry.chunks_raw = raw = item.chunks_raw
            entry.size = item.size
            # the size its lstat gave: the content read is no older than that
            # lstat, so a stat row of it is safe to reuse (localfiles.read_expected())
            if item.size == job.key.size:
                rows.append(stat_row(job.path, job.key, raw))
            if entry.link_id:
                link_done[entry.link_id].set()  # a batch holds primary jobs only
            node = job.node
            node.pending -= 1
            if not node.pending:
                complete.append(node)
        self._send_full_stat_rows()
        await self._records(complete)

    def _set_content(self, job: FileJob, size: int, chunks: list[ChunkRef], unchanged: bool) -> None:
        """A file's content is stored in these chunks."""
        self.uses.update(chunk.location.pack for chunk in chunks)
        self._set_raw_content(job, size, encode_chunks(chunks), unchanged)

    def _set_raw_content(self, job: FileJob, size: int, chunks_raw: bytes, unchanged: bool) -> None:
        """A file's content is stored (chunks_raw: encode_chunks() of its chunks,
        whose packs the caller added to self.uses)."""
        job.entry.chunks_raw = chunks_raw
        job.entry.size = size
        if unchanged:
            self._stat_rows.append(stat_row(job.path, job.key, chunks_raw))
            self._send_full_stat_rows()

    def _send_full_stat_rows(self) -> None:
        """The waiting stat rows go to be stored once STAT_BATCH of them wait."""
        if len(self._stat_rows) >= STAT_BATCH:
            self._stat_send.send_nowait(self._stat_rows)
            self._stat_rows = []

    def _unchanged(self, handle: BinaryIO, key: StatKey) -> bool:
        return stat_key(os.fstat(handle.fileno())) == key

    async def _process_large(self, job: FileJob) -> None:
        handle = await trio.to_thread.run_sync(open_in_folder, job.node.folder, job.entry.name)
        try:
            chunks = await self.uploader.upload_stream(handle)
            unchanged = await trio.to_thread.run_sync(self._unchanged, handle, job.key)
        finally:
            handle.close()
        self._set_content(job, sum(c.size for c in chunks), chunks, unchanged)

    async def _records(self, nodes: list[DirNode], flush: bool = False) -> None:
        """Folders whose children are all done: their records are written
        once RECORD_BATCH of them or RECORD_ENTRIES entries wait (a batch of
        small files often finishes one folder: a thread hop for its record
        alone cost the loop more than the record), or when flush says
        nothing more will finish."""
        self._finished += nodes
        for node in nodes:
            self._finished_entries += len(node.children)
        if self._finished and (flush or len(self._finished) >= tuning.RECORD_BATCH
                               or self._finished_entries >= tuning.RECORD_ENTRIES):
            nodes, self._finished, self._finished_entries = self._finished, [], 0
            await self._finalize(nodes)

    async def _finalize(self, nodes: list[DirNode]) -> None:
        """Write the records of folders whose children are all done, in one
        thread hop, then those of the parents that finishes, and so on up."""
        while nodes:
            makers: list[bytes | Callable[[], bytes]] = []
            for node in nodes:
                children = [e for e in node.children if e.name not in node.skipped]
                for entry in children:
                    if entry.kind == _FILE:
                        self.stats.files += 1
                        self.stats.size += entry.size
                # encoded in the thread that seals it
                makers.append(functools.partial(encode_directory, children))
            written = await self.repo.write_blobs(BlobKind.DIRECTORY, makers)
            parents: list[DirNode] = []
            for node, (ref, stored) in zip(nodes, written):
                self.uses.add(ref.location.pack)
                self.stats.bytes_stored += stored
                if node.entry is None:
                    self.root_ref = ref
                    continue
                node.entry.dir_ref = ref
                assert node.parent is not None
                node.parent.pending -= 1
                if node.parent.pending == 0:
                    parents.append(node.parent)
            nodes = parents
