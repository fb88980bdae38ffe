"""Caching reads of blobs for the mount: memory, then disk, then the backend.

- decrypted chunks in an in-memory LRU bounded in bytes;
- decoded directory records in an LRU bounded in entries;
- for remote backends, the raw (still encrypted) blobs on local disk: chunks
  in a folder bounded in bytes (oldest evicted first), directory and snapshot
  records in another folder kept whole, so a second mount of the same
  repository lists trees without network round trips.

Whatever comes from disk is verified exactly like what comes from the backend
(authenticated decryption and a check of the content against its ID).
Concurrent requests for one blob share a single fetch.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from .errors import RekkordError
from .format import BlobKind, BlobRef, ChunkRef, Entry, EntryKind, Location, decode_directory
from .lru import WeightedLRU
from .repository import Repository
from .tasks import task_group

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MEMORY_BYTES = 32 << 20
DEFAULT_DIRECTORY_ENTRIES = 500_000
DEFAULT_DISK_BYTES = 2 << 30
SUBDIR_COUNTS = 1_000_000  # folder counts of records remembered (a few dozen bytes each)
SUBDIR_BATCH = 256  # records read at once to count their folders
# read-ahead batches of chunks up to this many stored bytes are read and decoded
# in one worker-thread hop (open_small_chunks)
ONE_HOP_BYTES = 256 << 10


class DirectoryListing:
    """A decoded directory with a name index (built once, shared by readers)."""

    __slots__ = ("entries", "_index", "subdirs", "subdirs_prefetched", "files_prefetched")

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries
        self._index: dict[bytes, int] | None = None
        directory = EntryKind.DIRECTORY  # one look-up, not one per entry
        self.subdirs = sum(1 for e in entries if e.kind == directory)  # its link count is 2 + this
        self.subdirs_prefetched = False
        self.files_prefetched = 0  # entries below this index were read ahead

    @property
    def index(self) -> dict[bytes, int]:
        """Name -> position, built on the first lookup (readdirplus needs none)."""
        if self._index is None:
            self._index = {e.name: i for i, e in enumerate(self.entries)}
        return self._index


class DiskCache:
    """Raw blobs on local disk; chunks bounded in bytes, metadata kept."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder = folder
        self.limit = limit
        self._chunks = folder / "chunks"
        self._meta = folder / "meta"
        self._tmp = folder / "tmp"
        for path in (self._chunks, self._meta, self._tmp):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        # size of each cached chunk file, least recently used first
        self._sizes: WeightedLRU[str, int] = WeightedLRU(limit, weigh=int, on_evict=self._remove_chunk)
        items = []
        for item in os.scandir(self._chunks):
            st = item.stat()
            items.append((st.st_mtime_ns, item.name, st.st_size))
        for _, name, size in sorted(items):
            self._sizes.put(name, size)

    def _remove_chunk(self, name: str, _size: int) -> None:
        (self._chunks / name).unlink(missing_ok=True)

    @property
    def used(self) -> int:
        return self._sizes.used

    @staticmethod
    def _name(blob_id: bytes, location: Location) -> str:
        # a blob stored twice has two sealed forms (each pack has its own key)
        return f"{blob_id.hex()}-{location.pack.hex()[:32]}"

    def _path(self, kind: BlobKind, name: str) -> Path:
        return (self._chunks if kind == BlobKind.CHUNK else self._meta) / name

    def load(self, kind: BlobKind, blob_id: bytes, location: Location) -> bytes | None:
        name = self._name(blob_id, location)
        path = self._path(kind, name)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        if kind == BlobKind.CHUNK:
            self._sizes.get(name)  # now the most recently used
        return data

    def store(self, kind: BlobKind, blob_id: bytes, location: Location, raw: bytes) -> None:
        name = self._name(blob_id, location)
        path = self._path(kind, name)
        tmp = self._tmp / secrets.token_hex(8)
        try:
            with open(tmp, "wb") as handle:
                handle.write(raw)
            os.replace(tmp, path)
        except OSError as exc:  # a full cache disk must not break reads
            log.warning("cannot write blob cache %s: %s", path, exc.strerror)
            tmp.unlink(missing_ok=True)
            return
        if kind == BlobKind.CHUNK:
            self._sizes.put(name, len(raw))

    def drop(self, kind: BlobKind, blob_id: bytes, location: Location) -> None:
        name = self._name(blob_id, location)
        self._path(kind, name).unlink(missing_ok=True)
        if kind == BlobKind.CHUNK:
            self._sizes.pop(name)


class BlobCache:
    def __init__(self, repo: Repository, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 directory_entries: int = DEFAULT_DIRECTORY_ENTRIES, disk: DiskCache | None = None) -> None:
        self.repo = repo
        self.disk = disk
        self._chunks: WeightedLRU[bytes, bytes | bytearray] = WeightedLRU(memory_bytes, weigh=len)
        self._dirs: WeightedLRU[bytes, DirectoryListing] = WeightedLRU(
            directory_entries, weigh=lambda listing: len(listing.entries) + 1, keep_heavy=True)
        self._inflight: dict[tuple[BlobKind, bytes], trio.Event] = {}
        self._subdirs: dict[bytes, int] = {}  # record ID -> folders it holds (see subdir_counts)
        self._zeros = b""

    async def _shared(self, key: tuple[BlobKind, bytes], cached: Callable[[], T | None],
                      fetch: Callable[[], Awaitable[T]]) -> T:
        """Return cached(); else one fetch() per blob however many ask at once.

        A waiter whose shared fetch failed (or whose result was already evicted)
        fetches again itself, so it gets the value or its own error.
        """
        while True:
            value = cached()
            if value is not None:
                return value
            pending = self._inflight.get(key)
            if pending is None:
                break
            await pending.wait()
            value = cached()
            if value is not None:
                return value
            if key not in self._inflight:
                break
        event = self._inflight[key] = trio.Event()
        try:
            return await fetch()
        finally:
            del self._inflight[key]
            event.set()

    async def _raw(self, kind: BlobKind, blob_id: bytes, location: Location) -> tuple[bytes, Location]:
        """The sealed blob, and the place it was read from (a prune may have moved it)."""
        if self.disk is not None:
            raw = await trio.to_thread.run_sync(self.disk.load, kind, blob_id, location)
            if raw is not None:
                return raw, location
        raw, found_at = await self.repo.read_raw(blob_id, location)
        if self.disk is not None and found_at == location:
            await trio.to_thread.run_sync(self.disk.store, kind, blob_id, location, raw)
        return raw, found_at

    async def _open(self, kind: BlobKind, blob_id: bytes, location: Location) -> bytes | bytearray:
        raw, found_at = await self._raw(kind, blob_id, location)
        try:
            return await self.repo.run_cpu(self.repo.codec.unpack, kind, blob_id, found_at.pack, raw)
        except Exception:
            if self.disk is not None:
                self.disk.drop(kind, blob_id, location)  # never keep serving a bad copy
            raise

    async def chunk(self, chunk: ChunkRef) -> bytes | bytearray:
        """A decrypted, verified chunk; all-zero chunks never touch the backend."""
        if self.repo.is_zero_chunk(chunk):
            if len(self._zeros) != chunk.size:
                self._zeros = bytes(chunk.size)  # shared: readers only slice it
            return self._zeros
        blob_id = chunk.id

        async def fetch() -> bytes | bytearray:
            if self.disk is None:
                data = await self.repo.read_chunk(chunk)
            else:
                data = await self._open(BlobKind.CHUNK, blob_id, chunk.location)
            self._chunks.put(blob_id, data)
            return data

        return await self._shared((BlobKind.CHUNK, blob_id), lambda: self._chunks.get(blob_id), fetch)

    async def directory(self, ref: BlobRef) -> DirectoryListing:
        dir_id = ref.id

        async def fetch() -> DirectoryListing:
            if self.disk is None:
                entries = await self.repo.read_directory(ref)
            else:
                raw = await self._open(BlobKind.DIRECTORY, dir_id, ref.location)
                entries = await self.repo.run_cpu(decode_directory, raw)
            listing = DirectoryListing(entries)
            self._dirs.put(dir_id, listing)
            return listing

        return await self._shared((BlobKind.DIRECTORY, dir_id), lambda: self._dirs.get(dir_id), fetch)

    def cached_chunk(self, chunk: ChunkRef) -> bytes | bytearray | None:
        """The chunk if it is in memory (no I/O)."""
        if self.repo.is_zero_chunk(chunk):
            return bytes(chunk.size)
        return self._chunks.get(chunk.id)

    def known_subdirs(self, record_id: bytes) -> int | None:
        """subdir_counts() of one record, if already known (no I/O)."""
        return self._subdirs.get(record_id)

    async def subdir_counts(self, refs: list[BlobRef]) -> dict[bytes, int]:
        """How many folders each of these directory records holds (a folder's link
        count is 2 + that), by record ID. The records are read in one batch and
        their counts kept beyond the listings' LRU; unreadable ones are left out
        (listing that folder reports them)."""
        missing = [ref for ref in refs if ref.id not in self._subdirs]
        if len(self._subdirs) + len(missing) > SUBDIR_COUNTS:
            self._subdirs.clear()
        for start in range(0, len(missing), SUBDIR_BATCH):  # bounded: a folder may hold many thousands
            batch = missing[start:start + SUBDIR_BATCH]
            await self.prefetch_directories(batch)
            for ref in batch:
                try:
                    self._subdirs[ref.id] = (await self.directory(ref)).subdirs
                except RekkordError:
                    continue
        return {ref.id: self._subdirs[ref.id] for ref in refs if ref.id in self._subdirs}

    # --- read-ahead: many blobs in one batch, off the reader's critical path -----------

    async def prefetch_chunks(self, chunks: list[ChunkRef]) -> None:
        """Load these chunks into memory; errors are left for the real reads to report."""
        wanted = {c.id: c for c in chunks if not self.repo.is_zero_chunk(c)}
        if self.disk is not None:  # remote: each through the disk cache, concurrently
            await self._prefetch_each([functools.partial(self.chunk, c) for c in wanted.values()])
            return
        blobs = [(c.id, c.location) for c in wanted.values()]
        if sum(c.location.length for c in wanted.values()) <= ONE_HOP_BYTES:
            async def open_small(claimed: list[tuple[bytes, Location]]) -> list[Any]:
                return await self.repo.open_small_chunks([wanted[blob_id] for blob_id, _ in claimed])

            await self._prefetch_batch(BlobKind.CHUNK, blobs, self._chunks.get, None, self._chunks.put, open_small)
            return
        await self._prefetch_batch(BlobKind.CHUNK, blobs, self._chunks.get, None, self._chunks.put)

    async def prefetch_directories(self, refs: list[BlobRef]) -> None:
        if self.disk is not None:
            await self._prefetch_each([functools.partial(self.directory, ref) for ref in refs])
            return
        blobs = [(ref.id, ref.location) for ref in refs]
        await self._prefetch_batch(BlobKind.DIRECTORY, blobs, self._dirs.get, decode_directory,
                                   lambda key, entries: self._dirs.put(key, DirectoryListing(entries)))

    async def _prefetch_batch(self, kind: BlobKind, blobs: list[tuple[bytes, Location]],
                              cached: Callable[[bytes], object], then: Callable | None,
                              keep: Callable[[bytes, Any], None],
                              opener: Callable[[list[tuple[bytes, Location]]], Awaitable[list[Any]]] | None = None
                              ) -> None:
        """One open_many for the blobs neither cached nor being fetched; readers
        that ask for one of them meanwhile wait for the batch (see _shared)."""
        unique = dict(blobs)  # equal records (empty folders, say) share one ID
        claimed = [(i, loc) for i, loc in unique.items() if cached(i) is None and (kind, i) not in self._inflight]
        if not claimed:
            return
        done = trio.Event()  # one for the whole batch
        for blob_id, _ in claimed:
            self._inflight[(kind, blob_id)] = done
        try:
            results = await (opener(claimed) if opener is not None else self.repo.open_many(kind, claimed, then))
            for (blob_id, _), result in zip(claimed, results):
                if not isinstance(result, Exception):
                    keep(blob_id, result)
        finally:
            for blob_id, _ in claimed:
                del self._inflight[(kind, blob_id)]
            done.set()

    @staticmethod
    async def _prefetch_each(fetches: list[Callable[[], Awaitable[object]]]) -> None:
        async def one(fetch: Callable[[], Awaitable[object]]) -> None:
            try:
                await fetch()
            except RekkordError:
                pass

        async with task_group() as nursery:
            for fetch in fetches:
                nursery.start_soon(one, fetch)
