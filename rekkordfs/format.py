"""Binary encodings of the records stored in a repository (docs/format.md).

Every record starts with a version byte. Integers are little-endian. Decoders
treat their input as hostile: any inconsistency raises CorruptedData.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .errors import CorruptedData, UsageError
from .keys import Signer

RECORD_VERSION = 1
ID_SIZE = 32
MAX_CHANNEL_BYTES = 64


class BlobKind(enum.IntEnum):
    CHUNK = 1
    DIRECTORY = 2
    SNAPSHOT = 3


class EntryKind(enum.IntEnum):
    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3
    FIFO = 4
    CHAR_DEVICE = 5
    BLOCK_DEVICE = 6
    SOCKET = 7


PACK_ID_SIZE = 16


@dataclass(frozen=True)
class Location:
    """Where a packed blob lives: a byte range of a pack object."""

    pack: bytes
    offset: int
    length: int


@dataclass(frozen=True)
class ChunkRef:
    id: bytes
    size: int  # plaintext bytes
    location: Location | None = None  # None: a standalone object blobs/<id>


_ENTRY_HEAD = struct.Struct("<BH")  # kind, name length
_ENTRY_STAT = struct.Struct("<IIIqqqQIIQH")  # mode uid gid mtime atime ctime size nlink link_id rdev xattr_count
_XATTR_NAME = struct.Struct("<H")
_U32 = struct.Struct("<I")
_CHUNK = struct.Struct(f"<{ID_SIZE}sIB")  # id, size, flags
_PACKED = struct.Struct(f"<{PACK_ID_SIZE}sII")  # pack, offset, length
_FLAG_PACKED = 1


@dataclass
class Entry:
    """One directory entry. `chunks` for files, `target` for symlinks, `dir_id` for directories."""

    kind: EntryKind
    name: bytes
    mode: int = 0o644  # permission bits only (no file type)
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    atime_ns: int = 0
    ctime_ns: int = 0
    size: int = 0
    nlink: int = 1
    link_id: int = 0  # non-zero: entries sharing it are hardlinks of one inode
    rdev: int = 0
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    dir_id: bytes | None = None
    target: bytes | None = None
    chunks_raw: bytes = b""  # encoded chunk list, decoded on demand

    @property
    def chunks(self) -> list[ChunkRef]:
        return decode_chunks(self.chunks_raw)

    def payload(self) -> bytes:
        if self.kind == EntryKind.FILE:
            return self.chunks_raw
        if self.kind == EntryKind.DIRECTORY:
            return self.dir_id or b""  # only a snapshot's root metadata has none
        if self.kind == EntryKind.SYMLINK:
            assert self.target is not None
            return self.target
        return b""


def encode_chunks(chunks: Iterable[ChunkRef]) -> bytes:
    out = bytearray()
    for c in chunks:
        if c.location is None:
            out += _CHUNK.pack(c.id, c.size, 0)
        else:
            out += _CHUNK.pack(c.id, c.size, _FLAG_PACKED)
            out += _PACKED.pack(c.location.pack, c.location.offset, c.location.length)
    return bytes(out)


def decode_chunks(raw: bytes) -> list[ChunkRef]:
    chunks = []
    pos = 0
    try:
        while pos < len(raw):
            cid, size, flags = _CHUNK.unpack_from(raw, pos)
            pos += _CHUNK.size
            location = None
            if flags & _FLAG_PACKED:
                pack, offset, length = _PACKED.unpack_from(raw, pos)
                pos += _PACKED.size
                location = Location(pack, offset, length)
            elif flags:
                raise ValueError("unknown chunk flags")
            chunks.append(ChunkRef(cid, size, location))
    except (struct.error, ValueError):
        raise CorruptedData("file chunk list is malformed") from None
    return chunks


def _encode_entry(entry: Entry, out: bytearray) -> None:
    out += _ENTRY_HEAD.pack(entry.kind, len(entry.name))
    out += entry.name
    out += _ENTRY_STAT.pack(
        entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.atime_ns, entry.ctime_ns,
        entry.size, entry.nlink, entry.link_id, entry.rdev, len(entry.xattrs),
    )
    for name, value in entry.xattrs:
        out += _XATTR_NAME.pack(len(name)) + name + _U32.pack(len(value)) + value
    payload = entry.payload()
    out += _U32.pack(len(payload)) + payload


def _decode_entry(raw: bytes, pos: int) -> tuple[Entry, int]:
    """One entry starting at pos; its name is not validated here."""
    kind_value, name_len = _ENTRY_HEAD.unpack_from(raw, pos)
    pos += _ENTRY_HEAD.size
    name = raw[pos:pos + name_len]
    pos += name_len
    if len(name) != name_len:
        raise ValueError("truncated name")
    (mode, uid, gid, mtime, atime, ctime, size, nlink, link_id, rdev, nxattr) = _ENTRY_STAT.unpack_from(raw, pos)
    pos += _ENTRY_STAT.size
    xattrs = []
    for _ in range(nxattr):
        (xname_len,) = _XATTR_NAME.unpack_from(raw, pos)
        pos += _XATTR_NAME.size
        xname = raw[pos:pos + xname_len]
        pos += xname_len
        (value_len,) = _U32.unpack_from(raw, pos)
        pos += _U32.size
        value = raw[pos:pos + value_len]
        pos += value_len
        if len(xname) != xname_len or len(value) != value_len:
            raise ValueError("truncated xattr")
        if not xname or b"\0" in xname:  # no system has such names: hostile or damaged
            raise ValueError("bad xattr name")
        xattrs.append((xname, value))
    (payload_len,) = _U32.unpack_from(raw, pos)
    pos += _U32.size
    payload = raw[pos:pos + payload_len]
    pos += payload_len
    if len(payload) != payload_len:
        raise ValueError("truncated payload")
    kind = EntryKind(kind_value)
    entry = Entry(kind, name, mode & 0o7777, uid, gid, mtime, atime, ctime, size, nlink, link_id, rdev, xattrs)
    if kind == EntryKind.FILE:
        entry.chunks_raw = payload  # checked when decoded (decode_chunks)
    elif kind == EntryKind.DIRECTORY:
        if payload_len not in (0, ID_SIZE):
            raise ValueError("bad directory reference")
        entry.dir_id = payload or None
    elif kind == EntryKind.SYMLINK:
        if not payload or b"\0" in payload:  # symlink(2) accepts neither
            raise ValueError("bad symlink target")
        entry.target = payload
    return entry, pos


def encode_directory(entries: Iterable[Entry]) -> bytes:
    """Entries are written sorted by name so equal trees give equal records."""
    ordered = sorted(entries, key=lambda e: e.name)
    out = bytearray(struct.pack("<BI", RECORD_VERSION, len(ordered)))
    for entry in ordered:
        _encode_entry(entry, out)
    return bytes(out)


def decode_directory(raw: bytes | bytearray) -> list[Entry]:
    try:
        return list(_iter_directory(bytes(raw)))
    except (struct.error, ValueError, AssertionError) as exc:
        raise CorruptedData(f"directory record is malformed ({exc})") from None


def _iter_directory(raw: bytes) -> Iterator[Entry]:
    version, count = struct.unpack_from("<BI", raw, 0)
    if version != RECORD_VERSION:
        raise ValueError(f"unsupported version {version}")
    pos = 5
    previous = None
    for _ in range(count):
        entry, pos = _decode_entry(raw, pos)
        if not _valid_name(entry.name):
            raise ValueError("bad entry name")
        if previous is not None and entry.name <= previous:
            raise ValueError("entries not sorted or duplicated")
        if entry.kind == EntryKind.DIRECTORY and entry.dir_id is None:
            raise ValueError("directory without a record")
        previous = entry.name
        yield entry
    if pos != len(raw):
        raise ValueError("trailing bytes")


def _valid_name(name: bytes) -> bool:
    return bool(name) and name not in (b".", b"..") and b"/" not in name and b"\0" not in name


# --- snapshots ---------------------------------------------------------------

_SNAPSHOT_FIXED = struct.Struct(f"<Bq{ID_SIZE}sQQQI")  # version time root size stored files max_link_id


def validate_channel(channel: str) -> str:
    raw = channel.encode("utf-8", "surrogateescape")
    if not raw or len(raw) > MAX_CHANNEL_BYTES:
        raise UsageError(f"channel name must be 1 to {MAX_CHANNEL_BYTES} bytes long")
    if "/" in channel or channel in (".", "..") or any(ord(c) < 32 or ord(c) == 127 for c in channel):
        raise UsageError(f"invalid channel name '{channel}': no '/', control characters, '.' or '..'")
    if ":" in channel:
        raise UsageError(f"invalid channel name '{channel}': ':' separates a channel from a path")
    return channel


@dataclass
class Snapshot:
    channel: str
    time_ns: int
    root_id: bytes
    size: int  # logical bytes of all files
    stored: int  # bytes newly written by this save
    files: int
    max_link_id: int = 0  # hardlink groups use IDs 1..max_link_id
    root: Entry | None = None  # the root directory's own metadata, when it has any
    signer: Signer | None = None
    signature: bytes = b""

    def signed_part(self) -> bytes:
        channel = self.channel.encode("utf-8")
        out = bytearray(_SNAPSHOT_FIXED.pack(RECORD_VERSION, self.time_ns, self.root_id, self.size, self.stored,
                                             self.files, self.max_link_id))
        out += bytes((len(channel),)) + channel
        if self.root is None:
            out += b"\0"
        else:
            out += b"\1"
            _encode_entry(Entry(EntryKind.DIRECTORY, b"", self.root.mode, self.root.uid, self.root.gid,
                                self.root.mtime_ns, self.root.atime_ns, self.root.ctime_ns,
                                xattrs=self.root.xattrs), out)
        assert self.signer is not None
        return bytes(out) + self.signer.encode()

    def encode(self) -> bytes:
        return self.signed_part() + self.signature


def decode_snapshot(raw: bytes | bytearray) -> Snapshot:
    raw = bytes(raw)
    try:
        version, time_ns, root_id, size, stored, files, max_link_id = _SNAPSHOT_FIXED.unpack_from(raw, 0)
        if version != RECORD_VERSION:
            raise ValueError(f"unsupported version {version}")
        pos = _SNAPSHOT_FIXED.size
        channel_len = raw[pos]
        pos += 1
        channel = raw[pos:pos + channel_len].decode("utf-8")
        pos += channel_len
        root = None
        has_root = raw[pos]
        pos += 1
        if has_root:
            root, pos = _decode_entry(raw, pos)
            if root.kind != EntryKind.DIRECTORY or root.name:
                raise ValueError("bad root metadata")
        signer = Signer.decode(raw[pos:pos + Signer.SIZE])
        pos += Signer.SIZE
        signature = raw[pos:]
        if len(signature) != 64:
            raise ValueError("bad signature length")
    except (struct.error, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise CorruptedData(f"snapshot record is malformed ({exc})") from None
    return Snapshot(channel, time_ns, root_id, size, stored, files, max_link_id, root, signer, signature)


# --- tags: the sealed snapshot summaries listed by LogOnly keys -------------

_TAG_FIXED = struct.Struct(f"<B{ID_SIZE}sqQQ")


@dataclass(frozen=True)
class Tag:
    snapshot_id: bytes
    channel: str
    time_ns: int
    size: int
    stored: int

    def encode(self) -> bytes:
        channel = self.channel.encode("utf-8")
        return _TAG_FIXED.pack(RECORD_VERSION, self.snapshot_id, self.time_ns, self.size, self.stored) + bytes(
            (len(channel),)
        ) + channel

    @property
    def id_hex(self) -> str:
        return self.snapshot_id.hex()


def decode_tag(raw: bytes) -> Tag:
    try:
        version, snapshot_id, time_ns, size, stored = _TAG_FIXED.unpack_from(raw, 0)
        if version != RECORD_VERSION:
            raise ValueError(f"unsupported version {version}")
        channel_len = raw[_TAG_FIXED.size]
        channel = raw[_TAG_FIXED.size + 1:]
        if len(channel) != channel_len:
            raise ValueError("bad channel length")
        return Tag(snapshot_id, channel.decode("utf-8"), time_ns, size, stored)
    except (struct.error, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise CorruptedData(f"snapshot tag is malformed ({exc})") from None
