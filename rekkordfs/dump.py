"""`dump`: a file of a snapshot as its bytes, a folder as a tar stream.

Memory stays flat whatever the size: a file's chunks are fetched in order, a
few ahead of the writer (ChunkFeed), and written out as they come; a folder's
small files are fetched in batches, and its large files streamed like a
single file.

The archive is written by Python's tarfile in streaming mode ('w|', PAX
format): modes, owners, nanosecond modification times, symlinks, hardlinks,
FIFOs, devices, extended attributes (GNU tar's SCHILY.xattr records), names of
any bytes (hdrcharset=BINARY for those that are not UTF-8). Sockets cannot be
archived: they are left out with a warning. Member names are built only from
validated record names joined by '/', so no member is absolute or climbs out
with '..'; the dumped folder itself is the member './'.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

import trio

from .errors import CorruptedData, RekkordError
from .format import BlobKind, ChunkRef, Entry, EntryKind
from .treebudget import refuse_hostile_tree
from .tuning import BATCH_BYTES, BATCH_FILES, SMALL_FILE, chunks_in_flight

if TYPE_CHECKING:
    from .repository import Repository

COPY_BLOCK = 1 << 20  # tarfile copies file data in blocks of this size

Warn = Callable[[str], None]


class _Slot:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | bytearray = b""
        self.error: RekkordError | None = None


class ChunkFeed:
    """The chunks of one file, in order, fetched a few ahead of the reader
    (next()), as many as a save keeps in flight. Runs in the nursery given;
    cancel it to stop early."""

    def __init__(self, repo: Repository, chunks: list[ChunkRef], label: str) -> None:
        self.repo = repo
        self.chunks = chunks
        self.label = label  # the path, for messages
        self._room = trio.Semaphore(chunks_in_flight(repo.threads))
        self._send, self._receive = trio.open_memory_channel[_Slot](len(chunks) + 1)

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._produce, nursery)

    async def _produce(self, nursery: trio.Nursery) -> None:
        async with self._send:
            for chunk in self.chunks:
                await self._room.acquire()
                slot = _Slot()
                nursery.start_soon(self._fetch, chunk, slot)
                self._send.send_nowait(slot)

    async def _fetch(self, chunk: ChunkRef, slot: _Slot) -> None:
        try:
            slot.data = await read_chunk(self.repo, chunk, self.label)
        except RekkordError as exc:
            slot.error = exc
        slot.done.set()

    async def next(self) -> bytes | bytearray:
        slot = await self._receive.receive()
        await slot.done.wait()
        self._room.release()
        if slot.error is not None:
            raise slot.error
        return slot.data


async def read_chunk(repo: Repository, chunk: ChunkRef, label: str) -> bytes | bytearray:
    if repo.is_zero_chunk(chunk):
        return bytes(chunk.size)  # long zero runs: no need to fetch them
    try:
        data = await repo.read_chunk(chunk)
    except RekkordError as exc:
        raise type(exc)(f"'{label}': {exc.message}") from None
    if len(data) != chunk.size:
        raise CorruptedData(f"'{label}': chunk {chunk.id.hex()} has the wrong size")
    return data


def file_chunks(entry: Entry, label: str) -> list[ChunkRef]:
    chunks = entry.chunks
    if sum(c.size for c in chunks) != entry.size:
        raise CorruptedData(f"'{label}': chunk sizes do not add up to the file size")
    return chunks


async def dump_file(repo: Repository, entry: Entry, out: BinaryIO, label: str) -> int:
    """Write a file's content to out (a binary stream); the bytes written."""
    chunks = file_chunks(entry, label)
    written = 0
    async with trio.open_nursery() as nursery:
        feed = ChunkFeed(repo, chunks, label)
        feed.start(nursery)
        for _ in chunks:
            data = await feed.next()
            await trio.to_thread.run_sync(out.write, data)
            written += len(data)
        await trio.to_thread.run_sync(out.flush)
    return written


# --- tar --------------------------------------------------------------------------


def _member_name(parts: list[bytes]) -> str:
    """A member name from record names: never absolute, never '..' (the
    decoder refuses such names already; this does not rely on it)."""
    for part in parts:
        if not part or part in (b".", b"..") or b"/" in part or b"\0" in part:
            raise CorruptedData(f"a folder holds an impossible name {part!r}")
    return os.fsdecode(b"/".join(parts)) if parts else "."


def _exact_time(ns: int) -> str:
    sign = "-" if ns < 0 else ""
    seconds, fraction = divmod(abs(ns), 10**9)
    return f"{sign}{seconds}.{fraction:09d}".rstrip("0").rstrip(".")


def _xattr_keyword(name: bytes) -> str | None:
    """GNU tar's record name for an extended attribute ('%' and '=' escaped);
    None for a name a PAX keyword cannot hold (not UTF-8)."""
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "SCHILY.xattr." + text.replace("%", "%25").replace("=", "%3D")


_TYPES = {EntryKind.FILE: tarfile.REGTYPE, EntryKind.DIRECTORY: tarfile.DIRTYPE,
          EntryKind.SYMLINK: tarfile.SYMTYPE, EntryKind.FIFO: tarfile.FIFOTYPE,
          EntryKind.CHAR_DEVICE: tarfile.CHRTYPE, EntryKind.BLOCK_DEVICE: tarfile.BLKTYPE}


class _TarInfo(tarfile.TarInfo):
    """PAX records as raw bytes, as GNU tar writes them. Python's tarfile marks
    a header holding bytes that are not UTF-8 (a name, an ACL's binary value)
    with hdrcharset=BINARY, which GNU tar does not know and warns about for
    every such member; GNU tar and Python both read raw values without it."""

    @classmethod
    def _create_pax_generic_header(cls, pax_headers: dict[str, str], type: bytes,  # noqa: A002
                                   encoding: str) -> bytes:
        records = b"".join(_pax_record(keyword.encode("utf-8"), value.encode("utf-8", "surrogateescape"))
                           for keyword, value in pax_headers.items())
        info = {"name": "././@PaxHeader", "type": type, "size": len(records), "magic": tarfile.POSIX_MAGIC}
        return (cls._create_header(info, tarfile.USTAR_FORMAT, "ascii", "replace")  # type: ignore[attr-defined]
                + cls._create_payload(records))  # type: ignore[attr-defined]


def _pax_record(keyword: bytes, value: bytes) -> bytes:
    """'<length> <keyword>=<value>\\n', the length counting its own digits."""
    body = b" " + keyword + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def tar_info(name: str, entry: Entry, warn: Warn) -> tarfile.TarInfo:
    info = _TarInfo(name)
    info.type = _TYPES[entry.kind]
    info.mode = entry.mode & 0o7777
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""  # not stored: owners are numeric
    info.mtime = max(0, entry.mtime_ns // 10**9)
    if entry.mtime_ns % 10**9 or entry.mtime_ns < 0:
        info.pax_headers["mtime"] = _exact_time(entry.mtime_ns)  # type: ignore[index]  # a dict at run time
    if entry.kind == EntryKind.FILE:
        info.size = entry.size
    elif entry.kind == EntryKind.SYMLINK:
        info.linkname = os.fsdecode(entry.target or b"")
    elif entry.kind in (EntryKind.CHAR_DEVICE, EntryKind.BLOCK_DEVICE):
        info.devmajor, info.devminor = os.major(entry.rdev), os.minor(entry.rdev)
    for xname, value in entry.xattrs:
        keyword = _xattr_keyword(xname)
        if keyword is None:
            warn(f"'{name}': extended attribute {xname!r} cannot be archived (its name is not UTF-8); left out")
            continue
        info.pax_headers[keyword] = value.decode("utf-8", "surrogateescape")  # type: ignore[index]
    return info


@dataclass
class DumpStats:
    files: int = 0
    directories: int = 0
    other: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)


@dataclass
class _Member:
    info: tarfile.TarInfo
    chunks: list[ChunkRef] = field(default_factory=list)  # a small file's chunks...
    data: bytes | None = None  # ...and its content, once fetched


class _FeedReader:
    """A large file's content for tarfile, read in a worker thread: each block
    comes from the feed on the event loop (one hop per chunk)."""

    def __init__(self, feed: ChunkFeed) -> None:
        self.feed = feed
        self.pending = memoryview(b"")

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        while len(out) < size:
            if not self.pending:
                self.pending = memoryview(trio.from_thread.run(self.feed.next))
            take = min(size - len(out), len(self.pending))
            out += self.pending[:take]
            self.pending = self.pending[take:]
        return bytes(out)


class TarDumper:
    """Writes the folder `top` of a snapshot as a tar stream to out."""

    def __init__(self, repo: Repository, out: BinaryIO, warn: Warn, name: str) -> None:
        self.repo = repo
        self.warn = warn
        self.name = name  # "snapshot <id>", for messages
        self.tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
                                errors="surrogateescape", bufsize=COPY_BLOCK)
        self.tar.copybufsize = COPY_BLOCK  # type: ignore[attr-defined]  # tarfile's own, not in its stubs
        self.stats = DumpStats()
        self._links: dict[int, str] = {}  # hardlink group -> its first member
        self._batch: list[_Member] = []
        self._batch_bytes = 0
        self.nursery: trio.Nursery | None = None  # where large files' feeds run

    async def run(self, top: Entry, with_top: bool) -> DumpStats:
        """with_top: whether the folder's own metadata is known (it becomes './')."""
        assert top.dir_ref is not None
        await refuse_hostile_tree(self.repo, top.dir_ref, self.name)
        try:
            return await self._run(top, with_top)
        except BaseException:
            # the archive is cut short: tarfile must not try to finish it when
            # collected (the reader may be gone, and the error says it all)
            self.tar.fileobj.closed = True  # type: ignore[attr-defined]
            self.tar.closed = True  # type: ignore[attr-defined]
            raise

    async def _run(self, top: Entry, with_top: bool) -> DumpStats:
        assert top.dir_ref is not None
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            if with_top:
                await self._add([], top)
            stack: list[tuple[list[bytes], Iterator[Entry]]] = [([], iter(await self.repo.read_directory(top.dir_ref)))]
            while stack:  # depth first, a folder's content right after it
                parts, entries = stack[-1]
                entry = next(entries, None)
                if entry is None:
                    stack.pop()
                    continue
                child = parts + [entry.name]
                await self._add(child, entry)
                if entry.kind == EntryKind.DIRECTORY and entry.dir_ref is not None:
                    stack.append((child, iter(await self._read_dir(entry, child))))
            await self._flush()
            await trio.to_thread.run_sync(self.tar.close)
        return self.stats

    async def _read_dir(self, entry: Entry, parts: list[bytes]) -> list[Entry]:
        assert entry.dir_ref is not None
        try:
            return await self.repo.read_directory(entry.dir_ref)
        except RekkordError as exc:
            raise type(exc)(f"'{_member_name(parts)}': {exc.message}") from None

    async def _add(self, parts: list[bytes], entry: Entry) -> None:
        name = _member_name(parts)
        if entry.kind == EntryKind.SOCKET:
            self.warn(f"'{name}' is a socket: tar cannot hold it; left out")
            self.stats.skipped.append(name)
            return
        info = tar_info(name, entry, self.warn)
        if entry.kind == EntryKind.FILE and entry.link_id:
            first = self._links.get(entry.link_id)
            if first is not None:  # a hardlink of a file already in the archive
                info.type, info.linkname, info.size = tarfile.LNKTYPE, first, 0
                self._queue(_Member(info))
                self.stats.files += 1
                return
            self._links[entry.link_id] = name
        if entry.kind == EntryKind.FILE:
            self.stats.files += 1
            self.stats.bytes += entry.size
            chunks = file_chunks(entry, name)
            if entry.size > SMALL_FILE:
                await self._flush()
                feed = ChunkFeed(self.repo, chunks, name)
                assert self.nursery is not None
                feed.start(self.nursery)
                await trio.to_thread.run_sync(self.tar.addfile, info, _FeedReader(feed))
                return
            self._queue(_Member(info, chunks))
        else:
            if entry.kind == EntryKind.DIRECTORY:
                self.stats.directories += 1
            else:
                self.stats.other += 1
            self._queue(_Member(info))
        if len(self._batch) >= BATCH_FILES or self._batch_bytes >= BATCH_BYTES:
            await self._flush()

    def _queue(self, member: _Member) -> None:
        self._batch.append(member)
        self._batch_bytes += member.info.size

    async def _flush(self) -> None:
        """Fetch the batch's small files (one thread hop) and write the batch (another)."""
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if not batch:
            return
        wanted = [(c.id, c.location) for m in batch for c in m.chunks if not self.repo.is_zero_chunk(c)]
        results = await self.repo.open_many(BlobKind.CHUNK, wanted) if wanted else []
        found = dict(zip([blob_id for blob_id, _ in wanted], results))
        for member in batch:
            parts = []
            for chunk in member.chunks:
                data = bytes(chunk.size) if self.repo.is_zero_chunk(chunk) else found[chunk.id]
                if isinstance(data, RekkordError):
                    raise type(data)(f"'{member.info.name}': {data.message}")
                if isinstance(data, Exception):
                    raise data
                if len(data) != chunk.size:
                    raise CorruptedData(f"'{member.info.name}': chunk {chunk.id.hex()} has the wrong size")
                parts.append(data)
            if member.info.type == tarfile.REGTYPE:
                member.data = b"".join(parts)
        await trio.to_thread.run_sync(self._write, batch)

    def _write(self, batch: list[_Member]) -> None:
        for member in batch:
            self.tar.addfile(member.info, io.BytesIO(member.data) if member.data is not None else None)
