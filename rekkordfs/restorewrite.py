"""Writing small restored files, each from its one chunk's stored bytes:
authenticated, decompressed, its size checked, then created below DEST
(destination.py) with its metadata. Shared by the restore's threads
(restorefiles.py) and its worker processes (restoreworker.py), which hold
no repository: what opens a blob is given as `unpack`."""

from __future__ import annotations

import os
from collections.abc import Callable

from .chunkmap import pwrite_all
from .destination import FolderFds, Made, NewFiles, XattrFailed, apply_metadata, move_into_place, remove_quietly
from .errors import CorruptedData
from .format import CHUNK_STRUCT, ChunkRef, Entry, Raw
from .tuning import SMALL_FILE

# (blob ID, pack ID, stored bytes) -> the chunk's plaintext, checked against its ID
Unpack = Callable[[bytes, bytes, bytes | bytearray | memoryview], bytes | bytearray]


class FileJob:
    """A file to restore: its path below DEST (the last part is its name) and
    entry. Its chunk list is decoded when first used, in the thread that
    writes it: the walk's thread, which makes the jobs, is the one the GIL
    lets run least."""

    __slots__ = ("parts", "entry", "_chunks")

    def __init__(self, parts: tuple[bytes, ...], entry: Entry) -> None:
        self.parts = parts
        self.entry = entry
        self._chunks: list[ChunkRef] | None = None

    @property
    def chunks(self) -> list[ChunkRef]:
        if self._chunks is None:
            self._chunks = self.entry.chunks
        return self._chunks

    @property
    def large(self) -> bool:
        """Restored on its own, chunks fetched concurrently (others go in batches)."""
        return self.entry.size > SMALL_FILE or len(self.entry.chunks_raw) > CHUNK_STRUCT.size


class SmallWriter:
    def __init__(self, unpack: Unpack, folders: FolderFds, show: Callable[[tuple[bytes, ...]], str],
                 xattr_failed: Callable[[tuple[bytes, ...]], XattrFailed]) -> None:
        self.unpack = unpack
        self.folders = folders
        self.show = show  # a path below DEST as the user gave it, for messages
        self.xattr_failed = xattr_failed
        self.new_files = NewFiles()

    def unpack_chunk(self, chunk: ChunkRef, raw: Raw,
                     parts: tuple[bytes, ...]) -> bytes | bytearray:
        """A chunk read raw for the file at parts: authenticated, decompressed, its size checked."""
        try:
            data = self.unpack(chunk.id, raw[1].pack, raw[0])
        except CorruptedData as exc:
            raise CorruptedData(f"'{self.show(parts)}': {exc.message}") from None
        if len(data) != chunk.size:
            raise CorruptedData(f"'{self.show(parts)}': chunk {chunk.id.hex()} has the wrong size")
        return data

    def write_batch(self, batch: list[FileJob], raws: dict[bytes, Raw]) -> int:
        """Every file of the batch (raws: the stored bytes of their chunks by
        ID; a file whose chunk is absent is empty or all zeros); bytes written."""
        written = 0
        # a batch's files mostly share a folder: its descriptor, and what it gives new files
        parents: dict[tuple[bytes, ...], tuple[int, tuple[int, int | None]]] = {}
        try:
            for job in batch:
                parent = parents.get(job.parts[:-1])
                if parent is None:
                    fd = self.folders.open_parent(job.parts)
                    try:
                        parent = parents[job.parts[:-1]] = fd, self.new_files.folder(fd)
                    except BaseException:
                        os.close(fd)
                        raise
                written += self._write_one(job, raws, *parent)
        finally:
            for fd, _ in parents.values():
                os.close(fd)
        return written

    def _write_one(self, job: FileJob, raws: dict[bytes, Raw], parent: int, folder: tuple[int, int | None]) -> int:
        data: bytes | bytearray = b""  # stays empty for an empty file or one all-zero chunk
        chunk = job.chunks[0] if job.chunks else None
        if chunk is not None and chunk.id in raws:
            data = self.unpack_chunk(chunk, raws[chunk.id], job.parts)
            if len(data) != job.entry.size:
                raise CorruptedData(f"'{self.show(job.parts)}': chunk {chunk.id.hex()} has the wrong size")
        fd, temp, made = self.new_files.create(parent, job.parts[-1], job.entry, folder)
        try:
            try:
                pwrite_all(fd, data, 0)
                self.finish_file(fd, job.entry, job.parts, len(data), made)
            finally:
                os.close(fd)
            if temp is not None:
                move_into_place(parent, temp, job.parts[-1])
        except BaseException:
            remove_quietly(parent, temp or job.parts[-1])
            raise
        return len(data)

    def finish_file(self, fd: int, entry: Entry, parts: tuple[bytes, ...], written: int | None = None,
                    made: Made | None = None) -> None:
        if written != entry.size:  # holes left for zero chunks, or a hole at the end
            os.ftruncate(fd, entry.size)
        apply_metadata(fd, entry, self.xattr_failed(parts), made)


def xattr_warning(name: bytes, exc: OSError, shown: str) -> str:
    return f"cannot set extended attribute '{os.fsdecode(name)}' on '{shown}': {exc.strerror or exc}"
