"""Read-ahead for the snapshot view: the next chunks of a file read in order,
the records of a listed folder's first subfolders, and the small files after
one being opened (walks and `cp -r` then find them in memory). Everything runs
in the mount's nursery, in batches (one worker-thread hop per batch); errors
are left for the real reads to report.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from .blobcache import BlobCache, DirectoryListing
from .errors import RekkordError
from .format import ChunkRef, EntryKind
from .nodes import FileReader, Node, tree_ino
from .tuning import (
    PREFETCH_BATCH,
    PREFETCH_CHUNKS,
    PREFETCH_FILE_BYTES,
    PREFETCH_FILES,
    PREFETCH_SMALL_FILE,
    PREFETCH_SUBDIRS,
)

log = logging.getLogger(__name__)

async def _fetch_quietly(fetch: Callable[[list], Awaitable[None]], items: list) -> None:
    """Background work of the mount's nursery: a bug here must not end the mount."""
    try:
        await fetch(items)
    except Exception:
        log.exception("internal error in read-ahead")


class ReadAhead:
    def __init__(self, blobs: BlobCache) -> None:
        self.blobs = blobs
        self.nursery: trio.Nursery | None = None  # None: no read-ahead (set by SnapshotView.start)
        # where small files read ahead go, (inode, content) each, in a worker thread:
        # the kernel's page cache once FUSE serves (fuse.py), else nowhere
        self.store: Callable[[list[tuple[int, bytes]]], None] | None = None

    def chunks_after(self, reader: FileReader, index: int) -> None:
        """Sequential reader: fetch the next chunks in the background."""
        if self.nursery is None:
            return
        first = max(index + 1, reader.prefetched)
        last = min(len(reader.map.chunks), index + 1 + PREFETCH_CHUNKS)
        for i in range(first, last):
            self.nursery.start_soon(self._prefetch, reader.map.chunks[i])
        reader.prefetched = max(reader.prefetched, last)

    async def _prefetch(self, chunk: ChunkRef) -> None:
        try:
            await self.blobs.chunk(chunk)
        except RekkordError:
            pass  # the real read reports it

    def subdirs(self, listing: DirectoryListing) -> None:
        if self.nursery is None or listing.subdirs_prefetched:
            return
        listing.subdirs_prefetched = True
        directory = EntryKind.DIRECTORY  # one look-up, not one per entry
        refs = [e.dir_ref for e in listing.entries if e.kind == directory and e.dir_ref is not None]
        self._start(self.blobs.prefetch_directories, refs[:PREFETCH_SUBDIRS])

    def _start(self, fetch: Callable[[list], Awaitable[None]], items: list) -> None:
        """fetch() the items in the background, PREFETCH_BATCH per call."""
        assert self.nursery is not None
        for start in range(0, len(items), PREFETCH_BATCH):
            self.nursery.start_soon(_fetch_quietly, fetch, items[start:start + PREFETCH_BATCH])

    def files_after(self, node: Node) -> None:
        """Opening a file of a directory: read the small files after it ahead,
        unless that was done already (a reader going through in order), and
        hand their content to store() (the kernel's page cache: reading them
        then costs no request at all)."""
        listing = node.siblings
        if self.nursery is None or listing is None or node.entry is None or node.snapshot is None:
            return
        position = listing.index.get(node.entry.name)
        if position is None or position + PREFETCH_FILES // 2 < listing.files_prefetched:
            return
        start = max(position + 1, listing.files_prefetched)
        end = min(len(listing.entries), start + PREFETCH_FILES)
        folder = node.path.rpartition(b"/")[0]
        files: list[tuple[int, int, list[ChunkRef]]] = []  # inode, size, chunks
        total = 0
        file_kind = EntryKind.FILE  # one look-up, not one per entry
        for index in range(start, end):
            entry = listing.entries[index]
            if entry.kind != file_kind or not 0 < entry.size <= PREFETCH_SMALL_FILE:
                continue
            try:
                chunks = entry.chunks
            except RekkordError:
                continue  # a damaged record: reading that file reports it
            files.append((tree_ino(node.snapshot, folder + b"/" + entry.name, entry), entry.size, chunks))
            total += entry.size
            if total >= PREFETCH_FILE_BYTES:
                end = index + 1
                break
        listing.files_prefetched = end
        if files:  # one batch (at most PREFETCH_FILES, 4 MiB): two worker-thread hops in all
            self.nursery.start_soon(_fetch_quietly, self._fetch_files, files)

    async def _fetch_files(self, files: list[tuple[int, int, list[ChunkRef]]]) -> None:
        await self.blobs.prefetch_chunks([chunk for _, _, chunks in files for chunk in chunks])
        store = self.store
        if store is None:
            return
        pages: list[tuple[int, bytes]] = []
        for ino, size, chunks in files:
            datas = [self.blobs.cached_chunk(chunk) for chunk in chunks]
            if all(data is not None and len(data) == chunk.size for data, chunk in zip(datas, chunks)):
                data = b"".join(datas)  # type: ignore[arg-type]
                if len(data) == size:
                    pages.append((ino, data))
        if pages:
            # in a thread: storing waits for a page the kernel may be reading
            # through this mount, and the event loop must stay free to answer it
            await trio.to_thread.run_sync(store, pages)
