"""A repository: its identity, blobs, snapshots and tags over one Storage.

Object names (docs/format.md):

    rekkord                      repository identity, signed by the master key
    blobs/<2 hex>/<64 hex>       chunks, directory records, snapshot records
    tags/<base64url>             one empty-bodied object per snapshot; the name
                                 is the snapshot summary sealed to the log key,
                                 so a single LIST enumerates every snapshot
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import struct
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable, TypeVar

import trio

from . import crypto
from .cache import KnownBlob, LocalCache, repository_cache_dir
from .codec import BlobCodec, blob_id_from_key, index_key, object_key, pack_id_from_key, pack_key
from .errors import CorruptedData, KeyFileError, NotFound, ObjectMissing, RekkordError, RepositoryError
from .format import PACK_ID_SIZE, BlobKind, ChunkRef, Entry, EntryKind, Location, Snapshot, Tag, decode_directory, decode_snapshot, decode_tag
from .keys import Capability, Keyset
from .config import Config
from .storage import open_storage
from .storage.base import Storage
from .tasks import task_group

T = TypeVar("T")
log = logging.getLogger(__name__)

CONFIG_KEY = "rekkord"
CONFIG_MAGIC = b"RKREPO"
CONFIG_VERSION = 1
TAGS_PREFIX = "tags/"
BLOBS_PREFIX = "blobs/"
INDEX_PREFIX = "index/"
PACKS_PREFIX = "packs/"
PACK_TARGET = 8 << 20  # a pack is written once it holds this much
PACK_CACHE = 48 << 20  # whole packs kept in memory when reading a remote repository
COALESCE_GAP = 1 << 20  # remote reads of one pack: gaps up to this are read rather than skipped
_CONFIG_FIXED = struct.Struct("<6sB16s32sIII")  # magic version repo_id master_public chunk min/avg/max


@dataclass(frozen=True)
class ChunkParams:
    min_size: int = 256 << 10
    avg_size: int = 1 << 20
    max_size: int = 4 << 20


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
    return TAGS_PREFIX + base64.urlsafe_b64encode(sealed).decode().rstrip("=")


def _tag_from_key(key: str) -> bytes:
    name = key[len(TAGS_PREFIX):]
    return base64.urlsafe_b64decode(name + "=" * (-len(name) % 4))


class PackWriter:
    """Gathers small sealed chunks into pack objects, each with an index.

    A chunk's location is known as soon as it is added, so file entries can
    refer to it at once; the pack (then its index) is uploaded when full
    (upload_full) or on flush(). flush() also waits for uploads other tasks
    started, so once it returns every pack added so far is stored or its
    chunks forgotten; publish_snapshot() calls it before anything refers to
    them durably.
    """

    def __init__(self, storage: Storage, codec: BlobCodec, forget: Callable[[list[bytes]], None]) -> None:
        self.storage = storage
        self.codec = codec
        self.forget = forget  # called with the blob IDs of a pack that failed to upload
        self.written_indexes: set[str] = set()  # their blobs are known already
        self._uploading = 0
        self._idle = trio.Event()
        self._idle.set()
        self._start()

    def _start(self) -> None:
        self.pack_id = crypto.random_bytes(PACK_ID_SIZE)
        self.pieces: list[bytes | bytearray] = []  # joined once, when uploaded
        self.size = 0
        self.entries: list[tuple[bytes, Location]] = []

    def add(self, blob_id: bytes, packed: bytes | bytearray) -> Location:
        location = Location(self.pack_id, self.size, len(packed))
        self.pieces.append(packed)
        self.size += len(packed)
        self.entries.append((blob_id, location))
        return location

    async def upload_full(self) -> None:
        if self.size >= PACK_TARGET:
            await self._upload()

    async def flush(self) -> None:
        await self._upload()
        while self._uploading:
            await self._idle.wait()

    async def _upload(self) -> None:
        if not self.entries:
            return
        pack_id, buffer, entries = self.pack_id, b"".join(self.pieces), self.entries
        self._start()  # adds may go on while this pack uploads
        self._uploading += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        try:
            await self.storage.put(pack_key(pack_id), buffer)
            index = await trio.to_thread.run_sync(self.codec.seal_index, pack_id, entries)
            await self.storage.put(index_key(pack_id), index)
            self.written_indexes.add(index_key(pack_id))
        except BaseException:
            self.forget([blob_id for blob_id, _ in entries])  # nothing may refer to them now
            raise
        finally:
            self._uploading -= 1
            if not self._uploading:
                self._idle.set()


def _coalesce(locations: list[Location], gap: int) -> list[tuple[bytes, int, int, list[int]]]:
    """Ranges to read for these locations: (pack, start, length, indexes of the
    locations inside), neighbours of a pack at most `gap` apart sharing one."""
    order = sorted(range(len(locations)), key=lambda i: (locations[i].pack, locations[i].offset))
    runs: list[tuple[bytes, int, int, list[int]]] = []
    for index in order:
        location = locations[index]
        end = location.offset + location.length
        if runs and runs[-1][0] == location.pack and location.offset - (runs[-1][1] + runs[-1][2]) <= gap:
            pack, start, length, members = runs[-1]
            members.append(index)
            runs[-1] = (pack, start, max(length, end - start), members)
        else:
            runs.append((location.pack, location.offset, location.length, [index]))
    return runs


def _try(fn: Callable[..., T], *args: object) -> T | RekkordError:
    try:
        return fn(*args)
    except RekkordError as exc:
        return exc


def _check_length(blob_id: bytes, location: Location | None, raw: bytes) -> bytes:
    if location is not None and len(raw) != location.length:
        raise CorruptedData(f"blob {blob_id.hex()}: pack {location.pack.hex()} is truncated")
    return raw


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
        self.limit = limit
        self._packs: dict[bytes, bytes] = {}  # insertion order = age
        self._used = 0
        self._loading: dict[bytes, _PackLoad] = {}

    async def read(self, location: Location) -> bytes:
        pack = self._packs.get(location.pack)
        if pack is not None:
            self._packs[location.pack] = self._packs.pop(location.pack)  # now the youngest
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
        self._used += len(pack) - len(self._packs.pop(location.pack, b""))  # a twin fetch after a failure
        self._packs[location.pack] = pack
        while self._used > self.limit and len(self._packs) > 1:
            self._used -= len(self._packs.pop(next(iter(self._packs))))
        return pack[location.offset:location.offset + location.length]


class Repository:
    """Open one with `async with Repository.connect(config, keys) as repo`."""

    def __init__(self, storage: Storage, keys: Keyset, config: RepoConfig, threads: int = 2) -> None:
        self.storage = storage
        self.keys = keys
        self.config = config
        self.threads = threads
        self.codec = BlobCodec(keys)
        # CPU-bound work (hash, compress, seal, open) runs under this limiter.
        self.cpu = trio.CapacityLimiter(threads)
        self._known: dict[bytes, KnownBlob] = {}  # stored by this session
        self._cache: LocalCache | None = None
        self._packer = PackWriter(storage, self.codec, self._forget)
        self._packs = PackReader(storage)
        self._zero_chunk_id: bytes | None = None

    # --- lifecycle -----------------------------------------------------------

    @classmethod
    async def create(cls, storage: Storage, keys: Keyset, threads: int = 2) -> "Repository":
        keys.require(Capability.DERIVE)
        config = RepoConfig(crypto.random_bytes(16), keys.master_public, ChunkParams())
        body = config.signed_part()
        await storage.create()
        if not await storage.put(CONFIG_KEY, body + keys.sign(body)):
            raise RepositoryError(f"a repository already exists at '{storage.description}'")
        await storage.flush()
        return cls(storage, keys, config, threads)

    @classmethod
    async def open(cls, storage: Storage, keys: Keyset, threads: int = 2) -> "Repository":
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
    async def connect(cls, config: Config, keys: Keyset) -> AsyncIterator["Repository"]:
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
        if self._cache is None:
            self._cache = LocalCache(repository_cache_dir(self.id_hex))
        return self._cache

    async def run_cpu(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.cpu)

    # --- blobs ---------------------------------------------------------------

    def known(self, blob_id: bytes) -> KnownBlob | None:
        """Where a blob is stored, if certainly stored (thread-safe)."""
        found = self._known.get(blob_id)
        return found if found is not None else self.cache.lookup_blob(blob_id)

    def known_many(self, blob_ids: list[bytes]) -> dict[bytes, KnownBlob]:
        """known() of many blobs at once (thread-safe); unknown ones are absent."""
        found = {i: self._known[i] for i in blob_ids if i in self._known}
        rest = [i for i in blob_ids if i not in found]
        if rest:
            found.update(self.cache.lookup_blobs(rest))
        return found

    def is_known(self, blob_id: bytes) -> bool:
        return self.known(blob_id) is not None

    def _forget(self, blob_ids: list[bytes]) -> None:
        for blob_id in blob_ids:
            self._known.pop(blob_id, None)

    def session_blobs(self) -> list[tuple[bytes, Location | None]]:
        """Blobs stored by this session, to remember once they are durable."""
        return [(blob_id, known.location) for blob_id, known in self._known.items()]

    async def prepare_write(self) -> None:
        """Before writing: learn which blobs other writers stored.

        New pack indexes go into the known-blob cache (so small blobs another
        machine packed are not packed again); on hosts that may overwrite,
        existing standalone blobs are listed too.
        """
        self.keys.require(Capability.WRITE)
        await self._load_indexes()
        if not self.storage.conditional_writes:
            keys = await self.storage.list(BLOBS_PREFIX)
            ids = [(i, None) for i in (blob_id_from_key(k) for k in keys) if i is not None]
            await trio.to_thread.run_sync(self.cache.add_blobs, ids)

    async def _load_indexes(self) -> None:
        names = await self.storage.list(INDEX_PREFIX)
        seen = await trio.to_thread.run_sync(self.cache.known_indexes) | self._packer.written_indexes
        slots = trio.Semaphore(16)

        async def load(name: str, pack_id: bytes) -> None:
            async with slots:
                raw = await self.storage.get(name)
            try:
                entries = self.codec.open_index(pack_id, raw)
            except CorruptedData as exc:
                log.warning("ignoring pack index %s: %s", name, exc.message)
                return
            await trio.to_thread.run_sync(self.cache.add_index, name, entries)

        async with task_group() as nursery:
            for name in names:
                pack_id = pack_id_from_key(name)
                if pack_id is not None and name not in seen:
                    nursery.start_soon(load, name, pack_id)

    async def store_chunks(self, items: list[tuple[bytes, bytearray]]) -> list[tuple[Location | None, bool]]:
        """Store sealed chunks, into packs, unless this session stored them meanwhile.

        The caller looked them up with known_many() just before sealing them, so
        only this session's own blobs need checking here (a twin sealed by a
        concurrent task); one that an index loaded meanwhile reveals is stored
        once more, a harmless duplicate.
        Returns, for each, where it is stored and whether this call stored it.
        """
        results: list[tuple[Location | None, bool]] = []
        for blob_id, packed in items:
            known = self._known.get(blob_id)
            if known is not None:
                results.append((known.location, False))
            else:
                location = self._packer.add(blob_id, packed)
                self._known[blob_id] = KnownBlob(location)
                results.append((location, True))
        await self._packer.upload_full()
        return results

    async def flush_packs(self) -> None:
        await self._packer.flush()

    async def write_blob(self, kind: BlobKind, data: bytes) -> tuple[bytes, int]:
        """Hash, seal and store a standalone blob unless known; returns (id, bytes stored)."""

        def prepare() -> tuple[bytes, bytes | None]:
            blob_id = self.codec.blob_id(kind, data)
            if self.is_known(blob_id):
                return blob_id, None
            return blob_id, self.codec.pack(kind, data)

        blob_id, packed = await self.run_cpu(prepare)
        if packed is None:
            return blob_id, 0
        written = await self.storage.put(object_key(blob_id), packed)
        self._known[blob_id] = KnownBlob(None)
        return blob_id, len(packed) if written else 0

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

    async def read_raw(self, blob_id: bytes, location: Location | None = None) -> bytes:
        """The stored (sealed) bytes of a blob, from its pack when it has one."""
        try:
            if location is None:
                return await self.storage.get(object_key(blob_id))
            if self.storage.remote:
                raw = await self._packs.read(location)
            else:
                raw = await self.storage.get_range(pack_key(location.pack), location.offset, location.length)
        except ObjectMissing:
            where = f" (pack {location.pack.hex()})" if location else ""
            raise ObjectMissing(f"blob {blob_id.hex()}{where} is missing from the repository") from None
        return _check_length(blob_id, location, raw)

    async def read_raws(self, chunks: list[ChunkRef]) -> list[bytes]:
        """The stored bytes of many chunks at once (a restore's small files).

        Chunks of one pack are read with one ranged request when the gaps
        between them are small (on a remote backend, up to COALESCE_GAP bytes
        are read for nothing rather than pay another round trip)."""
        if any(c.location is None for c in chunks):  # stored alone (older repositories)
            results = await self._read_each([(c.id, c.location) for c in chunks])
            for result in results:
                if isinstance(result, Exception):
                    raise result
            return results  # type: ignore[return-value]
        locations = [c.location for c in chunks if c.location is not None]
        runs = _coalesce(locations, COALESCE_GAP if self.storage.remote else 0)
        try:
            datas = await self.storage.get_ranges([(pack_key(pack), start, length) for pack, start, length, _ in runs])
        except ObjectMissing as exc:
            raise ObjectMissing(f"a pack is missing from the repository: {exc.message}") from None
        raws: list[bytes] = [b""] * len(chunks)
        for (_, start, _, members), data in zip(runs, datas):
            for index in members:
                location = chunks[index].location
                assert location is not None
                begin = location.offset - start
                raws[index] = _check_length(chunks[index].id, location, data[begin:begin + location.length])
        return raws

    async def _read_each(self, blobs: list[tuple[bytes, Location | None]]) -> list[bytes | RekkordError]:
        """read_raw() of every blob, concurrently; a blob's error is its result."""
        raws: list[bytes | RekkordError] = [b""] * len(blobs)

        async def fetch(index: int, blob_id: bytes, location: Location | None) -> None:
            try:
                raws[index] = await self.read_raw(blob_id, location)
            except RekkordError as exc:
                raws[index] = exc

        async with task_group() as nursery:
            for index, (blob_id, location) in enumerate(blobs):
                nursery.start_soon(fetch, index, blob_id, location)
        return raws

    async def _open_blob(self, kind: BlobKind, blob_id: bytes, location: Location | None = None,
                         then: Callable[[bytes | bytearray], T] | None = None) -> T | bytes | bytearray:
        """Read, authenticate and decompress a blob (and give it to `then`, in the
        same worker thread)."""
        result = (await self.open_many(kind, [(blob_id, location)], then))[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def open_many(self, kind: BlobKind, blobs: list[tuple[bytes, Location | None]],
                        then: Callable[[bytes | bytearray], T] | None = None) -> list[T | bytes | bytearray | Exception]:
        """_open_blob of many blobs in one worker thread (on a local disk the reads
        happen there too). Each result is the value or the error of that blob,
        so one bad blob spoils nothing else."""
        self.keys.require(Capability.READ)

        def finish(blob_id: bytes, location: Location | None, raw: bytes) -> T | bytes | bytearray:
            data = self.codec.unpack(kind, blob_id, _check_length(blob_id, location, raw))
            return then(data) if then is not None else data

        read_blocking = self.storage.read_blocking
        if read_blocking is None:
            raws = await self._read_each(blobs)

            def finish_all() -> list[T | bytes | bytearray | Exception]:
                return [raw if isinstance(raw, Exception) else _try(finish, blob_id, location, raw)
                        for (blob_id, location), raw in zip(blobs, raws)]

            return await self.run_cpu(finish_all)

        def read_and_finish(blob_id: bytes, location: Location | None) -> T | bytes | bytearray:
            key, offset, length = self._blob_range(blob_id, location)
            try:
                raw = read_blocking(key, offset, length)
            except ObjectMissing:
                raise ObjectMissing(f"blob {blob_id.hex()} is missing from the repository") from None
            return finish(blob_id, location, raw)

        def read_all() -> list[T | bytes | bytearray | Exception]:
            return [_try(read_and_finish, blob_id, location) for blob_id, location in blobs]

        return await self.run_cpu(read_all)

    @staticmethod
    def _blob_range(blob_id: bytes, location: Location | None) -> tuple[str, int | None, int | None]:
        if location is None:
            return object_key(blob_id), None, None
        return pack_key(location.pack), location.offset, location.length

    async def read_blob(self, kind: BlobKind, blob_id: bytes) -> bytes | bytearray:
        return await self._open_blob(kind, blob_id)

    async def read_chunk(self, chunk: ChunkRef) -> bytes | bytearray:
        return await self._open_blob(BlobKind.CHUNK, chunk.id, chunk.location)

    async def read_directory(self, dir_id: bytes) -> list[Entry]:
        try:
            return await self._open_blob(BlobKind.DIRECTORY, dir_id, then=decode_directory)
        except CorruptedData as exc:
            raise CorruptedData(f"directory {dir_id.hex()}: {exc.message}") from None

    # --- snapshots -------------------------------------------------------------

    async def publish_snapshot(self, snapshot: Snapshot) -> Tag:
        """Sign and store a snapshot record, then its tag (the commit point)."""
        self.keys.require(Capability.WRITE)
        snapshot.signer = self.keys.signer
        snapshot.signature = self.keys.sign(snapshot.signed_part())
        await self.flush_packs()
        await self.storage.flush()  # everything the snapshot refers to is durable first
        snapshot_id, _ = await self.write_blob(BlobKind.SNAPSHOT, snapshot.encode())
        tag = Tag(snapshot_id, snapshot.channel, snapshot.time_ns, snapshot.size, snapshot.stored)
        sealed = crypto.seal_to(self.keys.log_public, tag.encode())
        await self.storage.flush()
        await self.storage.put(tag_key(sealed), b"")
        await self.storage.flush()
        return tag

    async def list_tags(self, warn: Callable[[str], None] | None = None) -> list[Tag]:
        """Every snapshot tag, oldest first. Unreadable tags are reported, not fatal."""
        self.keys.require(Capability.LIST)
        assert self.keys.log_secret is not None
        keys = await self.storage.list(TAGS_PREFIX)
        tags: list[Tag] = []
        for key in keys:
            try:
                sealed = _tag_from_key(key)
                tags.append(decode_tag(crypto.open_sealed(self.keys.log_public, self.keys.log_secret, sealed)))
            except (CorruptedData, binascii.Error, ValueError):
                if warn:
                    warn(f"ignoring unreadable snapshot tag '{key}'")
        tags.sort(key=lambda t: (t.time_ns, t.snapshot_id))
        return tags

    async def load_snapshot(self, snapshot_id: bytes, verify: bool = True) -> Snapshot:
        raw = await self.read_blob(BlobKind.SNAPSHOT, snapshot_id)
        snapshot = decode_snapshot(raw)
        if verify:
            problem = self.signature_problem(snapshot)
            if problem:
                raise CorruptedData(f"snapshot {snapshot_id.hex()} {problem}; refusing to use it (run 'rekkord check')")
        return snapshot

    def signature_problem(self, snapshot: Snapshot) -> str | None:
        signer = snapshot.signer
        assert signer is not None
        if not signer.is_certified(self.keys.master_public, self.keys.data_public, self.keys.log_public):
            return "is signed by a key the master key did not certify"
        if not crypto.verify_signature(signer.sign_public, snapshot.signed_part(), snapshot.signature):
            return "has an invalid signature"
        return None

    async def resolve(self, spec: str) -> Tag:
        """A snapshot by full ID, unique ID prefix (8+ hex digits) or channel name (its newest)."""
        tags = await self.list_tags()
        lowered = spec.lower()
        if len(lowered) >= 8 and all(c in "0123456789abcdef" for c in lowered):
            matches = [t for t in tags if t.id_hex.startswith(lowered)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise NotFound(f"snapshot ID prefix '{spec}' is ambiguous")
        in_channel = [t for t in tags if t.channel == spec]
        if in_channel:
            return in_channel[-1]
        raise NotFound(f"no snapshot or channel named '{spec}'")


async def walk_path(repo: Repository, snapshot: Snapshot, path: str) -> tuple[Entry, bool]:
    """The entry at path inside a snapshot ('' or '/' is its root), and whether
    it carries metadata of its own (every entry does; the root only when the
    snapshot stored it, as commits do)."""
    root = snapshot.root
    if root is not None:
        current = replace(root, dir_id=snapshot.root_id, name=b"")
    else:
        current = Entry(kind=EntryKind.DIRECTORY, name=b"", dir_id=snapshot.root_id, mode=0o755)
    has_metadata = root is not None
    for part in [p for p in os.fsencode(path).split(b"/") if p]:
        if current.dir_id is None:
            raise NotFound(f"'{path}' does not exist in this snapshot")
        entries = await repo.read_directory(current.dir_id)
        found = next((e for e in entries if e.name == part), None)
        if found is None:
            raise NotFound(f"'{path}' does not exist in this snapshot")
        current, has_metadata = found, True
    return current, has_metadata
