"""A repository: its identity, packs, indexes, snapshots and tags over one Storage.

Object names (docs/format.md); none can be computed before its writer makes it,
so no one can take a name in advance and block or replace an honest write:

    rekkord                      repository identity, signed by the master key
    packs/<2 hex>/<64 hex>       sealed blobs: chunks and directory records
    index/<32 hex>               what one pack holds, signed by its writer
    snapshots/<64 hex>           one snapshot record, named by the snapshot ID
    tags/<base64url>/<base64url> one empty-bodied object per snapshot; the name
                                 is its signed summary sealed to the log key,
                                 so a single LIST enumerates every snapshot
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TypeVar

import trio

from . import crypto
from .blobreader import BlobReader
from .cache import KnownBlob, LocalCache, repository_cache_dir
from .cacherows import pack_rows
from .chunker import ChunkParams
from .codec import (
    INDEX_PREFIX,
    STORED_OVERHEAD,
    BlobCodec,
    PackIndex,
    index_name_from_key,
)
from .config import Config
from .errors import CorruptedData, KeyFileError, NotFound, ObjectMissing, RepositoryError
from .format import (
    BlobKind,
    BlobRef,
    ChunkRef,
    Entry,
    EntryKind,
    Location,
    Snapshot,
)
from .keys import Capability, Keyset, KeyType, Signer
from .packs import PackReader, PackWriter, Sealed
from .snapshotlog import SnapshotLog
from .storage import open_storage
from .storage.base import Storage
from .tasks import task_group
from .tuning import small_file_threads

T = TypeVar("T")
log = logging.getLogger(__name__)

CONFIG_KEY = "rekkord"
CONFIG_MAGIC = b"RKREPO"
CONFIG_VERSION = 2  # the repository format version (docs/format.md)
_CONFIG_FIXED = struct.Struct("<6sB16s32sIII")  # magic version repo_id master_public chunk min/avg/max


@dataclass(frozen=True)
class RepoConfig:
    repo_id: bytes
    master_public: bytes
    chunking: ChunkParams

    def signed_part(self) -> bytes:
        c = self.chunking
        return _CONFIG_FIXED.pack(
            CONFIG_MAGIC, CONFIG_VERSION, self.repo_id, self.master_public, c.min_size, c.avg_size, c.max_size
        )


def _decode_config(raw: bytes, where: str) -> tuple[RepoConfig, bytes]:
    if len(raw) != _CONFIG_FIXED.size + crypto.SIGNATURE_SIZE or not raw.startswith(CONFIG_MAGIC):
        raise RepositoryError(f"'{where}' is not a rekkord repository (bad identity object)")
    magic, version, repo_id, master_public, cmin, cavg, cmax = _CONFIG_FIXED.unpack_from(raw)
    if version != CONFIG_VERSION:
        raise RepositoryError(f"repository '{where}' has unsupported format version {version}")
    return RepoConfig(repo_id, master_public, ChunkParams(cmin, cavg, cmax)), raw[_CONFIG_FIXED.size:]


class Repository(SnapshotLog, BlobReader):
    """Open one with `async with Repository.connect(config, keys) as repo`."""

    def __init__(self, storage: Storage, keys: Keyset, config: RepoConfig, threads: int = 2) -> None:
        self.storage = storage
        self.keys = keys
        self.config = config
        self.threads = threads
        self.codec = BlobCodec(keys, config.repo_id)
        # CPU-bound work (hash, compress, seal, open) runs under this limiter.
        self.cpu = trio.CapacityLimiter(threads)
        # Directory records are opened under their own limiter: a walk (restore,
        # list) must not wait behind batches of file contents holding every CPU
        # thread, or it stops feeding the requests that keep a server busy.
        self._records_cpu = trio.CapacityLimiter(threads)
        self._small = trio.CapacityLimiter(small_file_threads(threads))  # batches of small files
        # Stored by this session: blob ID -> its place, packed into one int
        # (_place): a KnownBlob with its Location was 300 bytes a blob, 30 MB
        # of a save's peak at 100,000 small files.
        self._known: dict[bytes, int] = {}
        self._known_packs: list[bytes] = []  # pack IDs by their number in a place
        self._pack_numbers: dict[bytes, int] = {}
        self._cache: LocalCache | None = None
        self._packer = PackWriter(storage, self.codec, self._forget, self._written)
        # set by a save while a worker process writes the cache's rows (prepprocs.PrepPool.write_rows)
        self.row_writer: Callable[[str, list], Awaitable[bool]] | None = None
        self._packs = PackReader(storage)
        self._zero_chunk_id: bytes | None = None
        self.session_start_ns: int | None = None  # when this process first learned what is stored
        self._indexes_synced_ns = 0  # monotonic time of the last sync_indexes()
        self._init_snapshot_log()

    # --- lifecycle -----------------------------------------------------------

    @classmethod
    async def create(cls, storage: Storage, keys: Keyset, threads: int = 2) -> Repository:
        keys.require(Capability.DERIVE)
        config = RepoConfig(crypto.random_bytes(16), keys.master_public, ChunkParams())
        body = config.signed_part()
        await storage.create()
        if not await storage.put(CONFIG_KEY, body + keys.sign(body)):
            raise RepositoryError(f"a repository already exists at '{storage.description}'")
        await storage.flush()
        return cls(storage, keys, config, threads)

    @classmethod
    async def open(cls, storage: Storage, keys: Keyset, threads: int = 2) -> Repository:
        await storage.connect()
        try:
            raw = await storage.get(CONFIG_KEY)
        except ObjectMissing:
            raise RepositoryError(f"no repository at '{storage.description}' (run 'rekkord init' first)") from None
        config, signature = _decode_config(raw, storage.description)
        if config.master_public != keys.master_public:
            raise KeyFileError(f"this key does not belong to the repository at '{storage.description}'")
        if not crypto.verify_signature(keys.master_public, config.signed_part(), signature):
            raise RepositoryError(f"the identity of repository '{storage.description}' has an invalid signature")
        return cls(storage, keys, config, threads)

    @classmethod
    @asynccontextmanager
    async def connect(cls, config: Config, keys: Keyset) -> AsyncIterator[Repository]:
        """The configured repository, opened with keys; closed on exit."""
        storage = open_storage(config)
        try:
            repo = await cls.open(storage, keys, threads=config.threads)
        except BaseException:
            await storage.aclose()
            raise
        try:
            yield repo
        finally:
            await repo.aclose()

    async def aclose(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        await self.storage.aclose()

    @property
    def id_hex(self) -> str:
        return self.config.repo_id.hex()

    @property
    def cache(self) -> LocalCache:
        """This key's cache: what it trusts is its own (another key on the same
        machine may trust different writers)."""
        if self._cache is None:
            self._cache = LocalCache(repository_cache_dir(self.id_hex) / f"key-{self.keys.id_hex}", self.keys)
        return self._cache

    async def run_cpu(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.cpu)

    async def run_records(self, fn: Callable[..., T], *args: object) -> T:
        """run_cpu() of directory records (see _records_cpu)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._records_cpu)

    async def run_small(self, fn: Callable[..., T], *args: object) -> T:
        """run_cpu() of a batch of small files (see tuning.small_file_threads)."""
        async with self._small:
            return await self.run_cpu(fn, *args)

    # --- blobs we may deduplicate against ----------------------------------------

    def _place(self, location: Location) -> int:
        """A location in this session's blob table: pack number, offset, length."""
        number = self._pack_numbers.get(location.pack)
        if number is None:
            number = self._pack_numbers[location.pack] = len(self._known_packs)
            self._known_packs.append(location.pack)
        return number << 64 | location.offset << 32 | location.length

    def _location(self, place: int) -> Location:
        return Location(self._known_packs[place >> 64], place >> 32 & 0xFFFFFFFF, place & 0xFFFFFFFF)

    def known(self, blob_id: bytes) -> KnownBlob | None:
        """Where a blob is stored, if stored by a writer this key trusts (thread-safe)."""
        place = self._known.get(blob_id)
        return KnownBlob(self._location(place)) if place is not None else self.cache.lookup_blob(blob_id)

    def known_many(self, blob_ids: list[bytes]) -> dict[bytes, KnownBlob]:
        """known() of many blobs at once (thread-safe); unknown ones are absent."""
        found: dict[bytes, KnownBlob] = {}
        rest: list[bytes] = []
        for blob_id in blob_ids:
            place = self._known.get(blob_id)
            if place is not None:
                found[blob_id] = KnownBlob(self._location(place))
            else:
                rest.append(blob_id)
        if rest:
            found.update(self.cache.lookup_blobs(rest))
        return found

    def _forget(self, blob_ids: list[bytes]) -> None:
        for blob_id in blob_ids:
            self._known.pop(blob_id, None)

    async def _written(self, pack: bytes, entries: list[tuple[bytes, BlobKind, Location]]) -> None:
        """A pack and its index are stored: its blobs go into the cache now,
        known only once remember_session() records the index."""
        writer = self.row_writer
        if writer is not None and await writer("pack", [pack, *pack_rows(
                [blob_id for blob_id, _, _ in entries], [at.offset << 32 | at.length for _, _, at in entries])]):
            return
        await trio.to_thread.run_sync(self.cache.add_blobs, [(blob_id, at) for blob_id, _, at in entries])

    def remember_session(self) -> None:
        """Once what this session stored is durable (its snapshot published):
        record its pack indexes in the cache, which makes their blobs known
        (thread side)."""
        for name, pack in self._packer.written_indexes.items():
            self.cache.add_index(name, pack, [])

    def trusts(self, signer: Signer) -> bool:
        """Whose pack indexes this key deduplicates against: its own, and those of
        keys that can read everything (they gain nothing by lying). Never another
        WriteOnly key's: a compromised one could point any blob ID at junk."""
        return signer.key_id == self.keys.key_id or signer.kind in (KeyType.MASTER, KeyType.READ_WRITE)

    async def prepare_write(self) -> None:
        """Before writing: learn which blobs trusted writers stored, and which
        packs a prune condemned (their blobs are not used: they may go)."""
        self.keys.require(Capability.WRITE)
        if self.session_start_ns is None:
            self.session_start_ns = time.time_ns()
            await self.finish_pending()
        elif self._interrupted:
            # a publication of this process failed (a full or read-only disk, a
            # server gone) after its record: a long-lived writer (the mount)
            # lists it at its next write, as a new process would
            await self.finish_pending(only=self._interrupted)
        await self.load_condemned()
        await self.sync_indexes()

    async def sync_indexes(self) -> None:
        """Bring the known-blob cache up to date with the pack indexes: new ones
        of trusted writers are read, vanished ones (pruned) forgotten."""
        names = set(await self.storage.list(INDEX_PREFIX))
        cached = await trio.to_thread.run_sync(self.cache.known_indexes)
        vanished = cached - names
        if vanished:
            await trio.to_thread.run_sync(self.cache.forget_indexes, vanished)

        async def load(name: str) -> None:
            try:
                index, problem = await self.read_index(name)
            except (CorruptedData, ObjectMissing) as exc:
                log.warning("ignoring pack index %s: %s", name, exc.message)
                await trio.to_thread.run_sync(self.cache.add_index, name, b"", [])
                return
            trusted = problem is None and self.trusts(index.signer)
            entries = [(blob_id, location) for blob_id, _, location in index.entries] if trusted else []
            await trio.to_thread.run_sync(self.cache.add_index, name, index.pack, entries)

        fresh = names - cached - set(self._packer.written_indexes)
        await self.for_each([n for n in fresh if index_name_from_key(n) is not None], load)
        self._indexes_synced_ns = time.monotonic_ns()

    async def read_index(self, name: str) -> tuple[PackIndex, str | None]:
        """A pack index and why its signature cannot be trusted (None: it can)."""
        raw = await self.storage.get(name)
        try:
            return await trio.to_thread.run_sync(self.codec.open_index, raw)
        except CorruptedData as exc:
            raise CorruptedData(f"pack index '{name}': {exc.message}") from None

    async def for_each(self, items: list[T], fn: Callable[[T], object], limit: int = 16) -> None:
        """await fn(item) for every item, `limit` at a time."""
        slots = trio.Semaphore(limit)

        async def one(item: T) -> None:
            async with slots:
                await fn(item)  # type: ignore[misc]

        async with task_group() as nursery:
            for item in items:
                nursery.start_soon(one, item)

    # --- writing ------------------------------------------------------------------

    def seal(self, kind: BlobKind, data: bytes | bytearray | memoryview) -> Sealed:
        """Thread side: compress and seal a blob for the open pack it goes into.
        The result must be given to store() (or its slot cancelled)."""
        compression, payload = self.codec.compress(data)
        slot = self._packer.claim(kind, len(payload) + STORED_OVERHEAD)
        try:
            return Sealed(slot, self.codec.seal(slot.sealer, kind, compression, payload))
        except BaseException:
            self._packer.cancel(slot)
            raise

    def reseal(self, kind: BlobKind, blob_id: bytes, location: Location,
               stored: bytes | bytearray | memoryview) -> Sealed:
        """Thread side: the stored bytes of a blob at location, checked against
        its ID and sealed again, as compressed as they were, for the open pack
        it goes into (a prune's repack). The result goes to store() as seal()'s."""
        slot = self._packer.claim(kind, len(stored))  # same payload, same overhead: same size
        try:
            return Sealed(slot, self.codec.reseal(slot.sealer, kind, blob_id, location.pack, stored))
        except BaseException:
            self._packer.cancel(slot)
            raise

    def seal_many(self, kind: BlobKind, datas: list[memoryview]) -> list[Sealed]:
        """seal() of many blobs (small files' chunks), compressed together."""
        compressed = self.codec.compress_many(datas)
        slots = self._packer.claim_many(kind, [len(payload) + STORED_OVERHEAD for _, payload in compressed])
        try:
            blobs = self.codec.seal_many(kind, [(slot.sealer, compression, payload)
                                                for slot, (compression, payload) in zip(slots, compressed)])
        except BaseException:
            for slot in slots:
                self._packer.cancel(slot)
            raise
        return [Sealed(slot, blob) for slot, blob in zip(slots, blobs)]

    def store_adopted(self, items: list[tuple[bytes, bytes, bytes]]) -> list[tuple[Location, bool]]:
        """Chunks a save's worker process sealed for its own packs (prepprocs.py):
        (pack ID, blob ID, sealed bytes) each, distinct IDs, in the order the
        worker sealed them; like store_many(), where each is stored and whether
        this call stored it. close_adopted() once the worker moved on to
        another pack; upload_ready() afterwards."""
        known = self._known
        new = [item for item in items if item[1] not in known]  # all of them, mostly
        locations = self._packer.add_adopted(new)
        place = self._place
        for item, location in zip(new, locations):
            known[item[1]] = place(location)
        if len(new) == len(items):
            return [(location, True) for location in locations]
        fresh = {item[1] for item in new}
        stored = iter(locations)
        return [(next(stored), True) if item[1] in fresh else (self._location(known[item[1]]), False)
                for item in items]

    def close_adopted(self, pack_id: bytes) -> None:
        self._packer.close_adopted(pack_id)

    def discard(self, sealed: list[Sealed]) -> None:
        """Sealed blobs that will not be stored (their batch failed)."""
        for item in sealed:
            self._packer.cancel(item.slot)

    def store(self, kind: BlobKind, blob_id: bytes, sealed: Sealed) -> tuple[Location, bool]:
        """Put a sealed blob into its pack unless this session stored it meanwhile
        (a twin sealed by a concurrent task); where it is stored, and whether
        this call stored it. The caller looked it up with known_many() just
        before sealing it; one that an index loaded meanwhile reveals is stored
        once more, a harmless duplicate. Call upload_ready() after a batch."""
        return self.store_many(kind, [(blob_id, sealed)])[0]

    def store_many(self, kind: BlobKind, items: list[tuple[bytes, Sealed]]) -> list[tuple[Location, bool]]:
        """store() of many blobs (distinct IDs), into their packs at once."""
        out: list[tuple[Location, bool] | None] = []
        new: list[tuple[Sealed, bytes]] = []
        for blob_id, sealed in items:
            place = self._known.get(blob_id)
            if place is not None:
                self._packer.cancel(sealed.slot)
                out.append((self._location(place), False))
            else:
                new.append((sealed, blob_id))
                out.append(None)
        locations = iter(self._packer.add_many(new, kind))
        for index, found in enumerate(out):
            if found is None:
                location = next(locations)
                self._known[items[index][0]] = self._place(location)
                out[index] = (location, True)
        return [found for found in out if found is not None]

    def lost_packs(self, packs: set[bytes]) -> set[bytes]:
        """Those of packs whose upload failed in this session (after
        flush_packs(), the others it uploaded are stored)."""
        return packs & self._packer.failed

    def stored_now(self, blob_id: bytes) -> bool:
        """Stored by this session, and not lost with a pack that failed to upload
        (after flush_packs(): durably)."""
        return blob_id in self._known

    async def upload_ready(self) -> None:
        """Upload the packs that are full and no longer held (backpressure for writers)."""
        await self._packer.upload_ready()

    async def flush_packs(self) -> None:
        await self._packer.flush()

    async def write_blob(self, kind: BlobKind, data: bytes | Callable[[], bytes]) -> tuple[BlobRef, int]:
        """Hash, seal and pack a record unless known; returns its reference and the bytes stored.
        data may be a function that makes the record: it runs in the same thread hop."""
        return (await self.write_blobs(kind, [data]))[0]

    async def write_blobs(self, kind: BlobKind, datas: list[bytes | Callable[[], bytes]]
                          ) -> list[tuple[BlobRef, int]]:
        """write_blob() of several records in one thread hop (a hop costs the
        loop about as much as encoding and sealing a small record)."""

        def prepare() -> list[tuple[bytes, KnownBlob | Sealed]]:
            out: list[tuple[bytes, KnownBlob | Sealed]] = []
            try:
                for data in datas:
                    record = data() if callable(data) else data
                    blob_id = self.codec.blob_id(kind, record)
                    known = self.known(blob_id)
                    out.append((blob_id, known if known is not None else self.seal(kind, record)))
            except BaseException:
                for _, found in out:
                    if isinstance(found, Sealed):
                        self._packer.cancel(found.slot)
                raise
            return out

        refs: list[tuple[BlobRef, int]] = []
        for blob_id, found in await self.run_cpu(prepare):
            if isinstance(found, KnownBlob):
                refs.append((BlobRef(blob_id, found.location), 0))
                continue
            location, was_new = self.store(kind, blob_id, found)  # one by one: twin records may come together
            refs.append((BlobRef(blob_id, location), len(found.data) if was_new else 0))
        await self.upload_ready()
        return refs

    def is_zero_chunk(self, chunk: ChunkRef) -> bool:
        """A maximum-size chunk of zeros (long zero runs, sparse files): no I/O needed.

        Content-defined chunking cuts long zero runs into maximum-size chunks,
        so one precomputed ID recognizes nearly all of them.
        """
        size = self.config.chunking.max_size
        if chunk.size != size:
            return False
        if self._zero_chunk_id is None:
            self._zero_chunk_id = self.codec.blob_id(BlobKind.CHUNK, bytes(size))
        return chunk.id == self._zero_chunk_id


async def walk_path(repo: Repository, snapshot: Snapshot, path: str) -> tuple[Entry, bool]:
    """The entry at path inside a snapshot ('' or '/' is its root), and whether
    it carries metadata of its own (every entry does; the root only when the
    snapshot stored it, as commits do)."""
    root = snapshot.root
    if root is not None:
        current = replace(root, dir_ref=snapshot.root_ref, name=b"")
    else:
        current = Entry(kind=EntryKind.DIRECTORY, name=b"", dir_ref=snapshot.root_ref, mode=0o755)
    has_metadata = root is not None
    for part in [p for p in os.fsencode(path).split(b"/") if p]:
        if current.dir_ref is None:
            raise NotFound(f"'{path}' does not exist in this snapshot")
        entries = await repo.read_directory(current.dir_ref)
        found = next((e for e in entries if e.name == part), None)
        if found is None:
            raise NotFound(f"'{path}' does not exist in this snapshot")
        current, has_metadata = found, True
    return current, has_metadata
