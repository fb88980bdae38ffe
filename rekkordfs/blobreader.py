"""Reading blobs for the repository: wherever they are now (a prune may have
moved them into new packs), one at a time or many per thread hop, checked
against their IDs and decoded.

`BlobReader` is a base class of `Repository`: it uses the repository's
storage, keys, codec and cache, declared below for the type checker.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, overload

import trio

from .codec import pack_key
from .errors import CorruptedData, ObjectMissing, RekkordError
from .format import BlobKind, BlobRef, ChunkRef, Entry, Location, Raw, decode_directory
from .keys import Capability
from .packs import COALESCE_GAP
from .rawruns import check_length, coalesce, cut_runs
from .tasks import task_group

if TYPE_CHECKING:
    from .cache import LocalCache
    from .codec import BlobCodec
    from .keys import Keyset
    from .packs import PackReader
    from .storage.base import Storage

T = TypeVar("T")

RESYNC_NS = 10 * 10**9  # a reader missing a moved blob re-reads the indexes at most this often


def _try(fn: Callable[..., T], *args: object) -> T | RekkordError:
    try:
        return fn(*args)
    except RekkordError as exc:
        return exc


class BlobReader:
    if TYPE_CHECKING:  # provided by Repository
        storage: Storage
        keys: Keyset
        codec: BlobCodec
        _packs: PackReader
        _indexes_synced_ns: int

        @property
        def cache(self) -> LocalCache: ...

        async def run_cpu(self, fn: Callable[..., T], *args: object) -> T: ...

        async def run_records(self, fn: Callable[..., T], *args: object) -> T: ...

        async def sync_indexes(self) -> None: ...

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

    async def read_raws(self, chunks: list[ChunkRef]) -> list[Raw]:
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
        return cut_runs(chunks, runs, datas)

    def read_raws_blocking(self, chunks: list[ChunkRef]) -> list[Raw]:
        """Thread side, for storage that reads in the calling thread (local
        disks): read_raws() without a hop to a storage thread. ObjectMissing when
        a pack is gone: read_raws() then finds where its blobs went."""
        read_blocking = self.storage.read_blocking
        assert read_blocking is not None
        runs = coalesce([c.location for c in chunks], 0)
        datas = [read_blocking(pack_key(pack), start, length) for pack, start, length, _ in runs]
        return cut_runs(chunks, runs, datas)

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

    @overload
    async def _open_blob(self, kind: BlobKind, blob_id: bytes, location: Location) -> bytes | bytearray: ...

    @overload
    async def _open_blob(self, kind: BlobKind, blob_id: bytes, location: Location,
                         then: Callable[[bytes | bytearray], T]) -> T: ...

    async def _open_blob(self, kind: BlobKind, blob_id: bytes, location: Location,
                         then: Callable[[bytes | bytearray], T] | None = None) -> T | bytes | bytearray:
        """Read, authenticate and decompress a blob (and give it to `then`, in the
        same worker thread)."""
        result = (await self.open_many(kind, [(blob_id, location)], then))[0]
        if isinstance(result, Exception):
            raise result
        return result

    @overload
    async def open_many(self, kind: BlobKind, blobs: list[tuple[bytes, Location]],
                        then: None = None) -> list[bytes | bytearray | Exception]: ...

    @overload
    async def open_many(self, kind: BlobKind, blobs: list[tuple[bytes, Location]],
                        then: Callable[[bytes | bytearray], T]) -> list[T | Exception]: ...

    async def open_many(self, kind: BlobKind, blobs: list[tuple[bytes, Location]],
                        then: Callable[[bytes | bytearray], T] | None = None
                        ) -> list[T | bytes | bytearray | Exception] | list[T | Exception]:
        """_open_blob of many blobs in one worker thread (on a local disk the reads
        happen there too). Each result is the value or the error of that blob,
        so one bad blob spoils nothing else."""
        self.keys.require(Capability.READ)
        run = self.run_records if kind == BlobKind.DIRECTORY else self.run_cpu

        def finish(blob_id: bytes, location: Location, raw: bytes) -> T | bytes | bytearray:
            data = self.codec.unpack(kind, blob_id, location.pack, check_length(blob_id, location, raw))
            return then(data) if then is not None else data

        read_blocking = self.storage.read_blocking
        if read_blocking is None:
            raws = await self._read_each(blobs)

            def finish_all() -> list[T | bytes | bytearray | Exception]:
                return [raw if isinstance(raw, Exception) else _try(finish, blob_id, raw[1], raw[0])
                        for (blob_id, _), raw in zip(blobs, raws)]

            return await run(finish_all)

        def read_and_finish(blob_id: bytes, location: Location) -> T | bytes | bytearray:
            return finish(blob_id, location, read_blocking(pack_key(location.pack), location.offset, location.length))

        def read_all() -> list[T | bytes | bytearray | Exception]:
            return [_try(read_and_finish, blob_id, location) for blob_id, location in blobs]

        def read_all_at(items: list[tuple[bytes, Location]]) -> list[T | bytes | bytearray | Exception]:
            return [_try(read_and_finish, blob_id, location) for blob_id, location in items]

        results = await run(read_all)
        for index, result in enumerate(results):
            if isinstance(result, ObjectMissing):  # its pack was pruned: where is it now?
                blob_id, location = blobs[index]
                moved = await self.relocate(blob_id, location)
                results[index] = (ObjectMissing(f"blob {blob_id.hex()} (pack {location.pack.hex()}) is missing "
                                                "from the repository") if moved is None
                                  else (await run(read_all_at, [(blob_id, moved)]))[0])
        return results

    async def open_small_chunks(self, chunks: list[ChunkRef]) -> list[bytes | bytearray | Exception]:
        """open_many() of chunks of a few KiB each (the mount's read-ahead of small
        files) from a local disk in one worker-thread hop: read (neighbours of a
        pack in one read), authenticated and decompressed together. Anything
        unusual (a moved or damaged blob) goes to open_many()."""
        self.keys.require(Capability.READ)
        blobs = [(c.id, c.location) for c in chunks]
        if self.storage.read_blocking is None:
            return await self.open_many(BlobKind.CHUNK, blobs)
        try:
            return await self.run_cpu(self._open_small_chunks_blocking, chunks)
        except RekkordError:
            return await self.open_many(BlobKind.CHUNK, blobs)

    def _open_small_chunks_blocking(self, chunks: list[ChunkRef]) -> list[bytes | bytearray | Exception]:
        unpack = self.codec.unpack
        return [_try(unpack, BlobKind.CHUNK, chunk.id, location.pack, raw)
                for chunk, (raw, location) in zip(chunks, self.read_raws_blocking(chunks))]

    async def read_chunk(self, chunk: ChunkRef) -> bytes | bytearray:
        return await self._open_blob(BlobKind.CHUNK, chunk.id, chunk.location)

    async def read_directory(self, ref: BlobRef) -> list[Entry]:
        try:
            return await self._open_blob(BlobKind.DIRECTORY, ref.id, ref.location, then=decode_directory)
        except CorruptedData as exc:
            raise CorruptedData(f"directory {ref.id.hex()}: {exc.message}") from None
