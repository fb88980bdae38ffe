"""Packs: writing sealed blobs into pack objects with their signed indexes,
and reading them back (whole packs for remote repositories, ranges otherwise).

A pack holds either file chunks or records (directories, never both), each blob
sealed with the pack's own key (crypto.PackSealer). Its ID is its public key,
so nothing about its name can be known before its writer makes it.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from . import crypto
from .codec import INDEX_NAME_SIZE, BlobCodec, index_key, pack_key
from .errors import RepositoryError
from .format import BlobKind, Location
from .lru import WeightedLRU
from .storage.base import Storage

PACK_TARGET = 8 << 20  # a pack is written once it holds this much
PACK_CACHE = 48 << 20  # whole packs kept in memory when reading a remote repository
COALESCE_GAP = 1 << 20  # remote reads of one pack: gaps up to this are read rather than skipped


class PackSlot:
    """Room claimed in an open pack for one blob about to be sealed with its key.

    A pack's key is its own, so a blob must know its pack before it is sealed
    (in a worker thread); the pack is not uploaded while a slot on it is open.
    Every slot ends in PackWriter.add() or PackWriter.cancel()."""

    __slots__ = ("pack", "size")

    def __init__(self, pack: _OpenPack, size: int) -> None:
        self.pack = pack
        self.size = size

    @property
    def sealer(self) -> crypto.PackSealer:
        assert self.pack.sealer is not None, "a pack sealed by another process has no sealer here"
        return self.pack.sealer


@dataclass(frozen=True, slots=True)
class Sealed:
    """A blob sealed for the pack of its slot, not stored yet."""

    slot: PackSlot
    data: bytes | bytearray


class _OpenPack:
    __slots__ = ("pack_id", "sealer", "records", "pieces", "size", "reserved", "entries", "holds", "closed", "done")

    def __init__(self, pack_id: bytes, sealer: crypto.PackSealer | None, records: bool) -> None:
        self.pack_id = pack_id
        self.sealer = sealer  # None: an adopted pack, sealed by a worker process that holds its key
        self.records = records
        self.pieces: list[bytes | bytearray] = []  # joined once, when uploaded
        self.size = 0
        self.reserved = 0  # bytes of open slots
        self.entries: list[tuple[bytes, BlobKind, Location]] = []
        self.holds = 0  # open slots
        self.closed = False
        self.done = trio.Event()  # uploaded, or failed and its blobs forgotten


class PackWriter:
    """Gathers sealed blobs into pack objects, each with a signed index.

    Worker threads claim slots; the trio side adds the sealed blobs (a blob's
    location is known then, so records can refer to it at once) and uploads a
    pack (then its index) once it is closed (full, or on flush) and no slot on
    it is open. flush() waits for every pack added to so far to be stored or its
    blobs forgotten; publish_snapshot() calls it before anything refers to them
    durably.
    """

    def __init__(self, storage: Storage, codec: BlobCodec, forget: Callable[[list[bytes]], None],
                 written: Callable[[bytes, list[tuple[bytes, BlobKind, Location]]], Awaitable[None]]) -> None:
        self.storage = storage
        self.codec = codec
        self.forget = forget  # called with the blob IDs of a pack that failed to upload
        self.written = written  # awaited with a pack and its entries once it and its index are stored
        self.written_indexes: dict[str, bytes] = {}  # index name -> its pack: their blobs are known already
        self.failed: set[bytes] = set()  # packs whose upload failed (their blobs forgotten)
        self._lock = threading.Lock()  # claim() runs in worker threads
        # file data and records never share a pack: listing a tree reads only
        # small packs of records, never megabytes of file data
        self._current: dict[bool, _OpenPack] = {}  # is a record pack -> its open pack
        self._ready: list[_OpenPack] = []  # closed, no open slot, waiting for an uploader
        self._unfinished: set[_OpenPack] = set()  # closed and not done
        # chunk packs whose blobs a save's worker process seals with its own key
        # (prepprocs.py): open until it says it is done with them, or flush()
        self._adopted: dict[bytes, _OpenPack] = {}

    def claim(self, kind: BlobKind, size: int) -> PackSlot:
        """Room for a blob of `size` stored bytes (any thread)."""
        with self._lock:
            return self._claim(kind != BlobKind.CHUNK, size)

    def _claim(self, records: bool, size: int) -> PackSlot:
        pack = self._current.get(records)
        if pack is not None and pack.size + pack.reserved + size > PACK_TARGET and (pack.size or pack.reserved):
            self._close(pack)
            pack = None
        if pack is None:
            sealer = self.codec.new_sealer()
            pack = self._current[records] = _OpenPack(sealer.pack_id, sealer, records)
        pack.holds += 1
        pack.reserved += size
        return PackSlot(pack, size)

    def claim_many(self, kind: BlobKind, sizes: list[int]) -> list[PackSlot]:
        """claim() of many blobs, taking the lock once."""
        with self._lock:
            return [self._claim(kind != BlobKind.CHUNK, size) for size in sizes]

    def add_adopted(self, items: list[tuple[bytes, bytes, bytes]]) -> list[Location]:
        """Chunks a worker process sealed for packs of its own: (pack ID, blob
        ID, sealed bytes) each, added in order. Such a pack stays open until
        close_adopted() or flush(), never closed by its size: the worker may
        still be sealing for it."""
        locations: list[Location] = []
        with self._lock:
            pack: _OpenPack | None = None
            for pack_id, blob_id, data in items:
                if pack is None or pack.pack_id != pack_id:
                    pack = self._adopted.get(pack_id)
                    if pack is None:
                        pack = self._adopted[pack_id] = _OpenPack(pack_id, None, False)
                location = Location(pack_id, pack.size, len(data))
                pack.pieces.append(data)
                pack.size += len(data)
                pack.entries.append((blob_id, BlobKind.CHUNK, location))
                locations.append(location)
        return locations

    def close_adopted(self, pack_id: bytes) -> None:
        """The worker seals no more for pack_id: it goes once its blobs are stored."""
        with self._lock:
            pack = self._adopted.pop(pack_id, None)
            if pack is not None:
                self._close(pack)

    def add(self, sealed: Sealed, blob_id: bytes, kind: BlobKind) -> Location:
        return self.add_many([(sealed, blob_id)], kind)[0]

    def add_many(self, items: list[tuple[Sealed, bytes]], kind: BlobKind) -> list[Location]:
        """add() of many blobs, taking the lock once."""
        locations: list[Location] = []
        with self._lock:
            for sealed, blob_id in items:
                pack = sealed.slot.pack
                location = Location(pack.pack_id, pack.size, len(sealed.data))
                pack.pieces.append(sealed.data)
                pack.size += len(sealed.data)
                pack.entries.append((blob_id, kind, location))
                self._release(sealed.slot)
                locations.append(location)
        return locations

    def cancel(self, slot: PackSlot) -> None:
        """The blob of slot will not be added (a twin was stored meanwhile, or sealing failed)."""
        with self._lock:
            self._release(slot)

    def _release(self, slot: PackSlot) -> None:
        pack = slot.pack
        pack.holds -= 1
        pack.reserved -= slot.size
        if not pack.closed and pack.size >= PACK_TARGET:
            self._close(pack)
        elif pack.closed and pack.holds == 0:
            self._ready.append(pack)

    def _close(self, pack: _OpenPack) -> None:
        pack.closed = True
        if self._current.get(pack.records) is pack:
            del self._current[pack.records]
        self._unfinished.add(pack)
        if pack.holds == 0:
            self._ready.append(pack)

    async def upload_ready(self) -> None:
        """Upload the packs that are closed with no open slot (backpressure for writers)."""
        while True:
            with self._lock:
                if not self._ready:
                    return
                pack = self._ready.pop()
            await self._upload(pack)

    async def flush(self) -> None:
        with self._lock:
            for pack in [*self._current.values(), *self._adopted.values()]:
                if pack.entries or pack.holds:
                    self._close(pack)
            self._adopted.clear()
            waiting = list(self._unfinished)
        await self.upload_ready()
        for pack in waiting:
            await pack.done.wait()

    async def _upload(self, pack: _OpenPack) -> None:
        try:
            if pack.entries:
                pieces, pack.pieces = pack.pieces, []
                if not await self.storage.put_pieces(pack_key(pack.pack_id), pieces):
                    raise RepositoryError(f"pack {pack.pack_id.hex()} exists already")
                index = await trio.to_thread.run_sync(self.codec.seal_index, pack.pack_id, pack.entries)
                name = index_key(crypto.random_bytes(INDEX_NAME_SIZE))
                if not await self.storage.put(name, index):
                    raise RepositoryError(f"pack index {name} exists already")
                self.written_indexes[name] = pack.pack_id
                await self.written(pack.pack_id, pack.entries)
        except BaseException:
            self.failed.add(pack.pack_id)
            self.forget([blob_id for blob_id, _, _ in pack.entries])  # nothing may refer to them now
            raise
        finally:
            with self._lock:
                self._unfinished.discard(pack)
            pack.done.set()


class _PackLoad:
    """A pack being fetched: who waits for it gets it from here, even if the
    cache has already evicted it for younger packs."""

    __slots__ = ("done", "pack")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.pack: bytes | None = None


class PackReader:
    """Whole packs of a remote repository, fetched once into a small LRU: reading
    many small files costs one request per pack instead of one per file."""

    def __init__(self, storage: Storage, limit: int = PACK_CACHE) -> None:
        self.storage = storage
        self._packs: WeightedLRU[bytes, bytes] = WeightedLRU(limit, weigh=len, keep_heavy=True)
        self._loading: dict[bytes, _PackLoad] = {}

    async def read(self, location: Location) -> bytes:
        pack = self._packs.get(location.pack)
        if pack is not None:
            return pack[location.offset:location.offset + location.length]
        loading = self._loading.get(location.pack)
        if loading is not None:
            await loading.done.wait()
            if loading.pack is not None:
                return loading.pack[location.offset:location.offset + location.length]
            # that fetch failed: try (and fail) ourselves
        loading = self._loading[location.pack] = _PackLoad()
        try:
            pack = loading.pack = await self.storage.get(pack_key(location.pack))
        finally:
            if self._loading.get(location.pack) is loading:
                del self._loading[location.pack]
            loading.done.set()
        self._packs.put(location.pack, pack)
        return pack[location.offset:location.offset + location.length]
