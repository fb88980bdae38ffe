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

import base64
import binascii
import logging
import os
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TypeVar

import trio

from . import crypto
from .cache import KnownBlob, LocalCache, repository_cache_dir
from .chunker import ChunkParams
from .codec import STORED_OVERHEAD, BlobCodec, PackIndex, index_name_from_key, pack_id_from_key, pack_key, snapshot_key
from .config import Config
from .errors import CorruptedData, KeyFileError, NotFound, ObjectMissing, RekkordError, RepositoryError
from .format import (
    BlobKind,
    BlobRef,
    ChunkRef,
    Entry,
    EntryKind,
    Location,
    Snapshot,
    Tag,
    decode_directory,
    decode_snapshot,
    decode_tag,
)
from .keys import Capability, Keyset, KeyType, Signer
from .marks import CONDEMNED_PREFIX, MARK_KEPT_NS, Condemned, decode_condemned
from .packs import COALESCE_GAP, PackReader, PackWriter, Sealed, check_length, coalesce
from .storage import open_storage
from .storage.base import Storage
from .tasks import task_group
from .testhooks import stop_point
from .tuning import small_file_threads

T = TypeVar("T")
log = logging.getLogger(__name__)

CONFIG_KEY = "rekkord"
CONFIG_MAGIC = b"RKREPO"
CONFIG_VERSION = 2  # the repository format version (docs/format.md)
TAGS_PREFIX = "tags/"
INDEX_PREFIX = "index/"
PACKS_PREFIX = "packs/"
SNAPSHOTS_PREFIX = "snapshots/"
# A snapshot dated further ahead than this is not listed: it would stay the
# newest of its channel for years (a wrong clock, or a writer gone rogue).
FUTURE_TOLERANCE_NS = 24 * 3600 * 10**9
# Writers treat a prune record as due this much before its grace ends (clocks
# differ between machines, and a tag is written a moment after the check).
WRITER_MARGIN_NS = 10 * 60 * 10**9
# Prune records stay at least this long after they are due (marks.py); a writer
# that has run longer may have missed one, so it checks that its packs exist.
LONG_SESSION_NS = MARK_KEPT_NS
RESYNC_NS = 10 * 10**9  # a reader missing a moved blob re-reads the indexes at most this often
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


def tag_key(sealed: bytes) -> str:
    """The signed summary is too long for one file name (255 bytes): two halves."""
    name = base64.urlsafe_b64encode(sealed).decode().rstrip("=")
    half = (len(name) + 1) // 2
    return f"{TAGS_PREFIX}{name[:half]}/{name[half:]}"


def _tag_from_key(key: str) -> bytes:
    name = key[len(TAGS_PREFIX):].replace("/", "")
    return base64.urlsafe_b64decode(name + "=" * (-len(name) % 4))


def _try(fn: Callable[..., T], *args: object) -> T | RekkordError:
    try:
        return fn(*args)
    except RekkordError as exc:
        return exc


@dataclass(frozen=True)
class TagListing:
    """Every snapshot that verifies, oldest first, and what was left out and why."""

    tags: list[Tag]
    rejected: list[str]  # one line per tag that does not verify


class Repository:
    """Open one with `async with Repository.connect(config, keys) as repo`."""

    def __init__(self, storage: Storage, keys: Keyset, config: RepoConfig, threads: int = 2) -> None:
        self.storage = storage
        self.keys = keys
        self.config = config
        self.threads = threads
        self.codec = BlobCodec(keys, config.repo_id)
        # CPU-bound work (hash, compress, seal, open) runs under this limiter.
        self.cpu = trio.CapacityLimiter(threads)
        self._small = trio.CapacityLimiter(small_file_threads(threads))  # batches of small files
        self._known: dict[bytes, KnownBlob] = {}  # stored by this session
        self._cache: LocalCache | None = None
        self._packer = PackWriter(storage, self.codec, self._forget)
        self._packs = PackReader(storage)
        self._zero_chunk_id: bytes | None = None
        # tag object name -> its verified tag, or why it was rejected (each is checked once)
        self._tag_results: dict[str, Tag | str] = {}
        self._snapshots: dict[bytes, Snapshot] = {}  # records loaded and matched with their tags
        self.unusable: dict[bytes, str] = {}  # snapshot ID -> why its record cannot be used
        self._condemned: dict[str, Condemned] = {}  # prune records in force, by object name
        self.session_start_ns: int | None = None  # when this process first learned what is stored
        self._interrupted: set[bytes] = set()  # snapshots whose publication failed after their record may have landed
        self._indexes_synced_ns = 0  # monotonic time of the last sync_indexes()

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

    async def run_small(self, fn: Callable[..., T], *args: object) -> T:
        """run_cpu() of a batch of small files (see tuning.small_file_threads)."""
        async with self._small:
            return await self.run_cpu(fn, *args)

    # --- blobs we may deduplicate against ----------------------------------------

    def known(self, blob_id: bytes) -> KnownBlob | None:
        """Where a blob is stored, if stored by a writer this key trusts (thread-safe)."""
        found = self._known.get(blob_id)
        return found if found is not None else self.cache.lookup_blob(blob_id)

    def known_many(self, blob_ids: list[bytes]) -> dict[bytes, KnownBlob]:
        """known() of many blobs at once (thread-safe); unknown ones are absent."""
        found = {i: self._known[i] for i in blob_ids if i in self._known}
        rest = [i for i in blob_ids if i not in found]
        if rest:
            found.update(self.cache.lookup_blobs(rest))
        return found

    def _forget(self, blob_ids: list[bytes]) -> None:
        for blob_id in blob_ids:
            self._known.pop(blob_id, None)

    def remember_session(self) -> None:
        """Once what this session stored is durable (its snapshot published):
        record its packs and blobs in the cache (thread side)."""
        by_pack: dict[bytes, list[tuple[bytes, Location]]] = {}
        for blob_id, known in self._known.items():
            by_pack.setdefault(known.location.pack, []).append((blob_id, known.location))
        for name, pack in self._packer.written_indexes.items():
            self.cache.add_index(name, pack, by_pack.get(pack, []))

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

    async def load_condemned(self) -> list[Condemned]:
        """The prune records in force (those that verify); their packs are
        excluded from deduplication from now on."""
        names = await self.storage.list(CONDEMNED_PREFIX)

        async def load(name: str) -> None:
            try:
                self._condemned[name] = decode_condemned(await self.storage.get(name), self.keys,
                                                         self.config.repo_id, name)
            except (CorruptedData, ObjectMissing) as exc:
                log.warning("ignoring %s", exc.message)

        await self.for_each([n for n in names if n not in self._condemned], load)
        for gone in set(self._condemned) - set(names):
            del self._condemned[gone]
        marks = list(self._condemned.values())
        self.cache.excluded_packs = frozenset(pack for mark in marks for pack in mark.packs)
        return marks

    @property
    def condemned(self) -> dict[str, Condemned]:
        """The prune records in force when load_condemned() last ran, by name."""
        return dict(self._condemned)

    async def check_before_publish(self, uses: set[bytes]) -> None:
        """Refuse to publish a snapshot that uses a pack a prune may delete now
        (docs/format.md, "Pruning beside running writers")."""
        marks = await self.load_condemned()
        now = time.time_ns()
        due = {pack for mark in marks if mark.due(now, WRITER_MARGIN_NS) for pack in mark.packs}
        if uses & due:
            raise RepositoryError(
                "a prune condemned data this snapshot uses while it was being made, and may delete it now; "
                "nothing was published: run it again")
        started = self.session_start_ns or now
        if now - started >= LONG_SESSION_NS:
            # marks of prunes long past may be gone: check that every pack is still there
            existing = {pack_id_from_key(key) for key in await self.storage.list(PACKS_PREFIX)}
            missing = uses - existing - set(self._packer.written_indexes.values())
            if missing:
                raise RepositoryError(
                    f"{len(missing)} pack{'s' if len(missing) > 1 else ''} this snapshot uses were pruned while it "
                    "was being made; nothing was published: run it again")

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

    def seal_many(self, kind: BlobKind, datas: list[memoryview]) -> list[Sealed]:
        """seal() of many blobs (small files' chunks), compressed together."""
        sealed: list[Sealed] = []
        try:
            for compression, payload in self.codec.compress_many(datas):
                slot = self._packer.claim(kind, len(payload) + STORED_OVERHEAD)
                try:
                    sealed.append(Sealed(slot, self.codec.seal(slot.sealer, kind, compression, payload)))
                except BaseException:
                    self._packer.cancel(slot)
                    raise
        except BaseException:
            self.discard(sealed)
            raise
        return sealed

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
        known = self._known.get(blob_id)
        if known is not None:
            self._packer.cancel(sealed.slot)
            return known.location, False
        location = self._packer.add(sealed, blob_id, kind)
        self._known[blob_id] = KnownBlob(location)
        return location, True

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

        def prepare() -> tuple[bytes, KnownBlob | Sealed]:
            record = data() if callable(data) else data
            blob_id = self.codec.blob_id(kind, record)
            known = self.known(blob_id)
            return blob_id, known if known is not None else self.seal(kind, record)

        blob_id, found = await self.run_cpu(prepare)
        if isinstance(found, KnownBlob):
            return BlobRef(blob_id, found.location), 0
        location, was_new = self.store(kind, blob_id, found)
        await self.upload_ready()
        return BlobRef(blob_id, location), len(found.data) if was_new else 0

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

    # --- reading ------------------------------------------------------------------

    async def relocate(self, blob_id: bytes, missing: Location) -> Location | None:
        """Where a blob whose pack is gone is stored now: a prune that repacks
        moves live blobs into new packs, listed in indexes it signs, and
        records keep referring to the old place. Only indexes this key trusts
        are believed (the blob is verified against its ID anyway)."""
        if self.keys.id_key is None:
            return None
        if not self._indexes_synced_ns or time.monotonic_ns() - self._indexes_synced_ns > RESYNC_NS:
            await self.sync_indexes()  # the cache may still list packs another machine pruned
        found = await trio.to_thread.run_sync(self.cache.lookup_blobs, [blob_id], missing.pack)
        return found[blob_id].location if blob_id in found else None

    async def read_raw(self, blob_id: bytes, location: Location) -> tuple[bytes, Location]:
        """The stored (sealed) bytes of a blob, and where they were found: in its
        pack, or where a prune moved it."""
        try:
            return await self._read_at(blob_id, location), location
        except ObjectMissing:
            moved = await self.relocate(blob_id, location)
            if moved is None:
                raise ObjectMissing(f"blob {blob_id.hex()} (pack {location.pack.hex()}) is missing from the "
                                    "repository") from None
            return await self._read_at(blob_id, moved), moved

    async def _read_at(self, blob_id: bytes, location: Location) -> bytes:
        if self.storage.remote:
            raw = await self._packs.read(location)
        else:
            raw = await self.storage.get_range(pack_key(location.pack), location.offset, location.length)
        return check_length(blob_id, location, raw)

    async def read_raws(self, chunks: list[ChunkRef]) -> list[tuple[bytes, Location]]:
        """The stored bytes of many chunks at once (a restore's small files), and
        where each was found.

        Chunks of one pack are read with one ranged request when the gaps
        between them are small (on a remote backend, up to COALESCE_GAP bytes
        are read for nothing rather than pay another round trip)."""
        locations = [c.location for c in chunks]
        runs = coalesce(locations, COALESCE_GAP if self.storage.remote else 0)
        try:
            datas = await self.storage.get_ranges([(pack_key(pack), start, length) for pack, start, length, _ in runs])
        except ObjectMissing:  # a pack was pruned: one by one, each where it is now
            results = await self._read_each([(c.id, c.location) for c in chunks])
            for result in results:
                if isinstance(result, RekkordError):
                    raise result from None
            return results  # type: ignore[return-value]
        raws: list[tuple[bytes, Location]] = [(b"", c.location) for c in chunks]
        for (_, start, _, members), data in zip(runs, datas):
            for index in members:
                location = chunks[index].location
                begin = location.offset - start
                raws[index] = (check_length(chunks[index].id, location, data[begin:begin + location.length]),
                               location)
        return raws

    def read_raws_blocking(self, chunks: list[ChunkRef]) -> list[tuple[bytes, Location]]:
        """Thread side, for storage that reads in the calling thread (local
        disks): read_raws() without a hop to a storage thread. ObjectMissing when
        a pack is gone: read_raws() then finds where its blobs went."""
        read_blocking = self.storage.read_blocking
        assert read_blocking is not None
        raws: list[tuple[bytes, Location]] = [(b"", c.location) for c in chunks]
        for pack, start, length, members in coalesce([c.location for c in chunks], 0):
            data = read_blocking(pack_key(pack), start, length)
            for index in members:
                location = chunks[index].location
                begin = location.offset - start
                raws[index] = (check_length(chunks[index].id, location, data[begin:begin + location.length]),
                               location)
        return raws

    async def _read_each(self, blobs: list[tuple[bytes, Location]]) -> list[tuple[bytes, Location] | RekkordError]:
        """read_raw() of every blob, concurrently; a blob's error is its result."""
        raws: list[tuple[bytes, Location] | RekkordError] = [(b"", location) for _, location in blobs]

        async def fetch(index: int, blob_id: bytes, location: Location) -> None:
            try:
                raws[index] = await self.read_raw(blob_id, location)
            except RekkordError as exc:
                raws[index] = exc

        async with task_group() as nursery:
            for index, (blob_id, location) in enumerate(blobs):
                nursery.start_soon(fetch, index, blob_id, location)
        return raws

    async def _open_blob(self, kind: BlobKind, blob_id: bytes, location: Location,
                         then: Callable[[bytes | bytearray], T] | None = None) -> T | bytes | bytearray:
        """Read, authenticate and decompress a blob (and give it to `then`, in the
        same worker thread)."""
        result = (await self.open_many(kind, [(blob_id, location)], then))[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def open_many(self, kind: BlobKind, blobs: list[tuple[bytes, Location]],
                        then: Callable[[bytes | bytearray], T] | None = None
                        ) -> list[T | bytes | bytearray | Exception]:
        """_open_blob of many blobs in one worker thread (on a local disk the reads
        happen there too). Each result is the value or the error of that blob,
        so one bad blob spoils nothing else."""
        self.keys.require(Capability.READ)

        def finish(blob_id: bytes, location: Location, raw: bytes) -> T | bytes | bytearray:
            data = self.codec.unpack(kind, blob_id, location.pack, check_length(blob_id, location, raw))
            return then(data) if then is not None else data

        read_blocking = self.storage.read_blocking
        if read_blocking is None:
            raws = await self._read_each(blobs)

            def finish_all() -> list[T | bytes | bytearray | Exception]:
                return [raw if isinstance(raw, Exception) else _try(finish, blob_id, raw[1], raw[0])
                        for (blob_id, _), raw in zip(blobs, raws)]

            return await self.run_cpu(finish_all)

        def read_and_finish(blob_id: bytes, location: Location) -> T | bytes | bytearray:
            return finish(blob_id, location, read_blocking(pack_key(location.pack), location.offset, location.length))

        def read_all() -> list[T | bytes | bytearray | Exception]:
            return [_try(read_and_finish, blob_id, location) for blob_id, location in blobs]

        def read_all_at(items: list[tuple[bytes, Location]]) -> list[T | bytes | bytearray | Exception]:
            return [_try(read_and_finish, blob_id, location) for blob_id, location in items]

        results = await self.run_cpu(read_all)
        for index, result in enumerate(results):
            if isinstance(result, ObjectMissing):  # its pack was pruned: where is it now?
                blob_id, location = blobs[index]
                moved = await self.relocate(blob_id, location)
                results[index] = (ObjectMissing(f"blob {blob_id.hex()} (pack {location.pack.hex()}) is missing "
                                                "from the repository") if moved is None
                                  else (await self.run_cpu(read_all_at, [(blob_id, moved)]))[0])
        return results

    async def read_chunk(self, chunk: ChunkRef) -> bytes | bytearray:
        return await self._open_blob(BlobKind.CHUNK, chunk.id, chunk.location)

    async def read_directory(self, ref: BlobRef) -> list[Entry]:
        try:
            return await self._open_blob(BlobKind.DIRECTORY, ref.id, ref.location, then=decode_directory)
        except CorruptedData as exc:
            raise CorruptedData(f"directory {ref.id.hex()}: {exc.message}") from None

    # --- snapshots -------------------------------------------------------------

    async def publish_snapshot(self, snapshot: Snapshot, uses: set[bytes]) -> Tag:
        """Store a snapshot record, then its signed tag (the commit point).
        `uses`: every pack the snapshot refers to (check_before_publish)."""
        self.keys.require(Capability.WRITE)
        snapshot.writer = self.keys.key_id
        await self.flush_packs()
        await self.storage.flush()  # everything the snapshot refers to is durable first
        stop_point("publish")
        await self.check_before_publish(uses)
        record = snapshot.encode()

        def seal() -> tuple[bytes, bytes]:
            return self.codec.blob_id(BlobKind.SNAPSHOT, record), self.codec.seal_alone(BlobKind.SNAPSHOT, record)

        record_id, raw = await self.run_cpu(seal)
        tag = Tag(record_id, snapshot.channel, snapshot.time_ns, snapshot.size, snapshot.stored, snapshot.files,
                  self.keys.signer)
        tag = replace(tag, signature=self.keys.sign(tag.signature_message(self.config.repo_id)))
        sealed = crypto.seal_to(self.keys.log_public, tag.encode())
        # if this process dies between the record and its tag, the next writer
        # of this key on this machine writes the tag (finish_pending)
        await trio.to_thread.run_sync(self.cache.add_pending, tag.snapshot_id, sealed)
        try:
            if not await self.storage.put(snapshot_key(tag.snapshot_id), raw):
                raise RepositoryError(f"snapshot record {tag.id_hex} exists already")
            await self.storage.flush()
            stop_point("snapshot-tag")
            await self.storage.put(tag_key(sealed), b"")
            await self.storage.flush()
        except BaseException:
            self._interrupted.add(tag.snapshot_id)
            raise
        await trio.to_thread.run_sync(self.cache.drop_pending, tag.snapshot_id)
        return tag

    async def finish_pending(self, only: set[bytes] | None = None) -> None:
        """Publishes an earlier process of this key left half done: a record
        written, its tag not. The record is complete (written last of all but
        the tag), so its tag is written now. `only`: just these snapshots."""
        for snapshot_id, sealed in await trio.to_thread.run_sync(self.cache.pending):
            if only is not None and snapshot_id not in only:
                continue
            if await self.storage.exists(snapshot_key(snapshot_id)):
                await self.storage.put(tag_key(sealed), b"")  # put-if-absent: a tag already there stays
                await self.storage.flush()
                log.warning("snapshot %s: its publication was interrupted; it is listed now", snapshot_id.hex())
            await trio.to_thread.run_sync(self.cache.drop_pending, snapshot_id)
            self._interrupted.discard(snapshot_id)

    async def list_snapshots(self) -> TagListing:
        """Every snapshot whose tag verifies, each once, oldest first; the tags that
        do not verify are named in `rejected` (a bad tag never spoils a listing)."""
        self.keys.require(Capability.LIST)
        keys = await self.storage.list(TAGS_PREFIX)
        fresh = [key for key in keys if key not in self._tag_results]
        if fresh:
            for key, result in zip(fresh, await self.run_cpu(self._verify_tags, fresh)):
                self._tag_results[key] = result
        tags: dict[bytes, Tag] = {}
        rejected: list[str] = []
        now = time.time_ns()
        for key in keys:
            result = self._tag_results[key]
            if isinstance(result, str):
                rejected.append(result)
            elif result.time_ns > now + FUTURE_TOLERANCE_NS:
                rejected.append(f"snapshot {result.id_hex} of channel '{result.channel}' is dated "
                                f"{time.strftime('%Y-%m-%d', time.gmtime(result.time_ns // 10**9))}, in the future: "
                                f"not listed (is that machine's clock wrong?)")
            else:
                tags.setdefault(result.snapshot_id, result)
        return TagListing(sorted(tags.values(), key=lambda t: (t.time_ns, t.snapshot_id)), rejected)

    def _verify_tags(self, keys: list[str]) -> list[Tag | str]:
        assert self.keys.log_secret is not None
        signers: dict[bytes, str | None] = {}  # each signer's certificate is checked once
        results: list[Tag | str] = []
        for key in keys:
            try:
                tag = decode_tag(crypto.open_sealed(self.keys.log_public, self.keys.log_secret, _tag_from_key(key)))
            except (CorruptedData, binascii.Error, ValueError):
                results.append(f"snapshot tag '{key}' is unreadable: ignored")
                continue
            signer = tag.signer.encode()
            if signer not in signers:
                signers[signer] = tag.signer.certificate_problem(self.keys)
            problem = signers[signer] or tag.signer.signature_problem(
                tag.signature_message(self.config.repo_id), tag.signature)
            if problem:
                results.append(f"snapshot {tag.id_hex} of channel '{tag.channel}': its tag {problem}: ignored")
            else:
                results.append(tag)
        return results

    async def tag_keys(self) -> dict[bytes, list[str]]:
        """The tag objects of every snapshot that verifies (forget deletes them)."""
        keys = await self.storage.list(TAGS_PREFIX)
        await self.list_snapshots()
        found: dict[bytes, list[str]] = {}
        for key in keys:
            result = self._tag_results.get(key)
            if isinstance(result, Tag):
                found.setdefault(result.snapshot_id, []).append(key)
        return found

    async def list_tags(self, warn: Callable[[str], None] | None = None) -> list[Tag]:
        """list_snapshots(), telling warn() about every tag left out."""
        listing = await self.list_snapshots()
        if warn is not None:
            for line in listing.rejected:
                warn(line)
        return listing.tags

    async def load_snapshot(self, tag: Tag) -> Snapshot:
        """The record of a listed snapshot, checked against its (verified) tag."""
        self.keys.require(Capability.READ)
        loaded = self._snapshots.get(tag.snapshot_id)
        if loaded is not None:
            return loaded
        if tag.snapshot_id in self.unusable:
            raise CorruptedData(self.unusable[tag.snapshot_id])
        try:
            raw = await self.storage.get(snapshot_key(tag.snapshot_id))
        except ObjectMissing:
            raise ObjectMissing(f"the record of snapshot {tag.id_hex} is missing from the repository") from None
        try:
            data = await self.run_cpu(self.codec.unpack_alone, BlobKind.SNAPSHOT, tag.record_id, raw)
            snapshot = decode_snapshot(data)
            if not snapshot.matches(tag):
                raise CorruptedData("its record does not match its signed tag; refusing to use it")
        except CorruptedData as exc:
            self.unusable[tag.snapshot_id] = f"snapshot {tag.id_hex}: {exc.message}"
            raise CorruptedData(self.unusable[tag.snapshot_id]) from None
        self._snapshots[tag.snapshot_id] = snapshot
        return snapshot

    async def newest_usable(self, tags: list[Tag], warn: Callable[[str], None] | None = None) -> Tag | None:
        """The newest of a channel's tags (oldest first) whose record matches it.
        A key that cannot read records trusts the newest signed tag."""
        if not self.keys.can(Capability.READ):
            return tags[-1] if tags else None
        for tag in reversed(tags):
            try:
                await self.load_snapshot(tag)
                return tag
            except (CorruptedData, ObjectMissing) as exc:
                if warn is not None:
                    warn(exc.message)
        return None

    async def resolve(self, spec: str) -> Tag:
        """A snapshot by full ID, unique ID prefix (8+ hex digits) or channel name
        (its newest usable snapshot)."""
        tags = await self.list_tags()
        lowered = spec.lower()
        id_like = len(lowered) >= 8 and all(c in "0123456789abcdef" for c in lowered)
        if id_like:
            matches = [t for t in tags if t.id_hex.startswith(lowered)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise NotFound(f"snapshot ID prefix '{spec}' is ambiguous")
        in_channel = [t for t in tags if t.channel == spec]
        if in_channel:
            problems: list[str] = []
            newest = await self.newest_usable(in_channel, warn=problems.append)
            if newest is None:
                more = f"; no older snapshot of channel '{spec}' is usable either" if len(problems) > 1 else ""
                raise CorruptedData(problems[0] + more)
            for line in problems:  # an older snapshot stands in for the newest
                log.warning("%s; using %s instead", line, newest.id_hex)
            return newest
        if id_like:
            raise NotFound(f"no snapshot or channel named '{spec}'")
        raise NotFound(f"no channel named '{spec}', and it is not a snapshot ID "
                       "(an ID prefix needs at least 8 hex digits)")


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
