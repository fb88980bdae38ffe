"""Binary encodings of the records stored in a repository (docs/format.md).

Every record starts with a version byte. Integers are little-endian. Decoders
treat their input as hostile: any inconsistency raises CorruptedData.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .crypto import SIGNATURE_SIZE
from .errors import CorruptedData, UsageError
from .keys import KEY_ID_SIZE, Signer

RECORD_VERSION = 2
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


# value -> kind: calling EntryKind(value) costs ten times this look-up, once per entry decoded
_KIND_BY_VALUE = {int(kind): kind for kind in EntryKind}
# compared with these: EntryKind.X is a slow metaclass attribute look-up
_FILE, _DIRECTORY, _SYMLINK = EntryKind.FILE, EntryKind.DIRECTORY, EntryKind.SYMLINK
_DOT_NAMES = frozenset((b".", b".."))  # no entry may have these names

PACK_ID_SIZE = 32  # a pack's ID is the public half of its own X25519 key pair


@dataclass(frozen=True, slots=True)
class Location:
    """Where a blob lives: a byte range of a pack object."""

    pack: bytes
    offset: int
    length: int


# a blob's stored bytes, or a view of them inside a larger read (no copy), and
# where they were found
Raw = tuple[bytes | memoryview, Location]


@dataclass(frozen=True, slots=True)
class BlobRef:
    """A stored record (directory): its ID and where it lives. Nothing is found
    by a name a writer could compute in advance, so nobody can squat one."""

    id: bytes
    location: Location

    def encode(self) -> bytes:
        loc = self.location
        return _REF.pack(self.id, loc.pack, loc.offset, loc.length)

    @classmethod
    def decode(cls, raw: bytes) -> BlobRef:
        blob_id, pack, offset, length = _REF.unpack(raw)
        return cls(blob_id, Location(pack, offset, length))


@dataclass(frozen=True, slots=True)
class ChunkRef:
    id: bytes
    size: int  # plaintext bytes
    location: Location


_ENTRY_HEAD = struct.Struct("<BH")  # kind, name length
_ENTRY_STAT = struct.Struct("<IIIqqqQIIQH")  # mode uid gid mtime atime ctime size nlink link_id rdev xattr_count
_XATTR_NAME = struct.Struct("<H")
_U32 = struct.Struct("<I")
# bound once: _decode_entry runs for every entry a mount lists
_unpack_head, _unpack_stat, _unpack_u32 = _ENTRY_HEAD.unpack_from, _ENTRY_STAT.unpack_from, _U32.unpack_from
_HEAD_SIZE, _STAT_SIZE, _U32_SIZE = _ENTRY_HEAD.size, _ENTRY_STAT.size, _U32.size
_REF = struct.Struct(f"<{ID_SIZE}s{PACK_ID_SIZE}sII")  # id, pack, offset, length
_CHUNK = struct.Struct(f"<{ID_SIZE}sI{PACK_ID_SIZE}sII")  # id, size, pack, offset, length
_CHUNK_LENGTH = struct.Struct("<I")  # the size field of one _CHUNK, after the ID
REF_SIZE = _REF.size
CHUNK_STRUCT = _CHUNK  # what encode_chunk() packs, for loops that pack many


@dataclass(slots=True)
class Entry:
    """One directory entry. `chunks` for files, `target` for symlinks, `dir_ref` for directories."""

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
    dir_ref: BlobRef | None = None
    target: bytes | None = None
    chunks_raw: bytes = b""  # encoded chunk list, decoded on demand

    @property
    def chunks(self) -> list[ChunkRef]:
        return decode_chunks(self.chunks_raw)

    def payload(self) -> bytes:
        if self.kind == _FILE:
            return self.chunks_raw
        if self.kind == EntryKind.DIRECTORY:
            return self.dir_ref.encode() if self.dir_ref else b""  # only a snapshot's root metadata has none
        if self.kind == EntryKind.SYMLINK:
            assert self.target is not None
            return self.target
        return b""


def encode_chunks(chunks: Iterable[ChunkRef]) -> bytes:
    pack = _CHUNK.pack
    return b"".join([pack(c.id, c.size, c.location.pack, c.location.offset, c.location.length) for c in chunks])


def encode_chunk(blob_id: bytes, size: int, location: Location) -> bytes:
    """encode_chunks() of one chunk, without a ChunkRef (saves join these)."""
    return _CHUNK.pack(blob_id, size, location.pack, location.offset, location.length)


def chunk_fields(raw: bytes) -> Iterator[tuple[bytes, int, bytes, int, int]]:
    """(chunk ID, size, pack, offset, length) of each chunk of an encoded list
    (no ChunkRef made: a commit reads 100,000 files' lists this way)."""
    if len(raw) % _CHUNK.size:
        raise CorruptedData("file chunk list is malformed")
    return _CHUNK.iter_unpack(raw)


def decode_chunks(raw: bytes) -> list[ChunkRef]:
    return [ChunkRef(cid, size, Location(pack, offset, length))
            for cid, size, pack, offset, length in chunk_fields(raw)]


def chunks_size(raw: bytes) -> int:
    """The plaintext size of an encoded chunk list."""
    if len(raw) == _CHUNK.size:  # most files have one chunk: a commit sizes 100,000 of them
        return _CHUNK_LENGTH.unpack_from(raw, ID_SIZE)[0]
    return sum(size for _, size, _, _, _ in chunk_fields(raw))


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
    """One entry starting at pos; its name is not validated here. (A mount
    decodes 100,000 of these for one `find`: bounds are checked by offsets,
    not by slicing and measuring, and the rare parts kept off the common path.)"""
    kind_value, name_len = _unpack_head(raw, pos)
    name_at = pos + _HEAD_SIZE
    stat_at = name_at + name_len
    (mode, uid, gid, mtime, atime, ctime, size, nlink, link_id, rdev, nxattr) = _unpack_stat(raw, stat_at)
    pos = stat_at + _STAT_SIZE
    xattrs: list[tuple[bytes, bytes]] = []
    if nxattr:
        pos = _decode_xattrs(raw, pos, nxattr, xattrs)
    (payload_len,) = _unpack_u32(raw, pos)
    pos += _U32_SIZE
    end = pos + payload_len
    if end > len(raw):
        raise ValueError("truncated payload")
    kind = _KIND_BY_VALUE.get(kind_value)
    if kind is None:
        raise ValueError(f"{kind_value} is not a valid EntryKind")
    entry = Entry(kind, raw[name_at:stat_at], mode & 0o7777, uid, gid, mtime, atime, ctime, size, nlink, link_id,
                  rdev, xattrs)
    if kind is _FILE:
        entry.chunks_raw = raw[pos:end]  # checked when decoded (decode_chunks)
    elif kind is _DIRECTORY:
        if payload_len not in (0, REF_SIZE):
            raise ValueError("bad directory reference")
        entry.dir_ref = BlobRef.decode(raw[pos:end]) if payload_len else None
    elif kind is _SYMLINK:
        target = raw[pos:end]
        if not target or b"\0" in target:  # symlink(2) accepts neither
            raise ValueError("bad symlink target")
        entry.target = target
    return entry, end


def _decode_xattrs(raw: bytes, pos: int, count: int, xattrs: list[tuple[bytes, bytes]]) -> int:
    """Appends count extended attributes read from pos; returns where they end."""
    for _ in range(count):
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
    return pos


def encode_directory(entries: Iterable[Entry]) -> bytes:
    """Entries are written sorted by name so equal trees give equal records."""
    ordered = sorted(entries, key=lambda e: e.name)
    out = bytearray(struct.pack("<BI", RECORD_VERSION, len(ordered)))
    for entry in ordered:
        _encode_entry(entry, out)
    return bytes(out)


def decode_directory(raw: bytes | bytearray) -> list[Entry]:
    try:
        return _decode_entries(bytes(raw))
    except (struct.error, ValueError, AssertionError) as exc:
        raise CorruptedData(f"directory record is malformed ({exc})") from None


def _decode_entries(raw: bytes) -> list[Entry]:
    """Every entry, names checked inline (a mount decodes 100,000 of them for
    one `find`: a call per check showed in its profile)."""
    version, count = struct.unpack_from("<BI", raw, 0)
    if version != RECORD_VERSION:
        raise ValueError(f"unsupported version {version}")
    pos = 5
    previous = b""  # "" sorts first and is no valid name
    entries: list[Entry] = []
    decode, append, dots = _decode_entry, entries.append, _DOT_NAMES
    for _ in range(count):
        entry, pos = decode(raw, pos)
        name = entry.name
        if not name or name in dots or b"/" in name or b"\0" in name:
            raise ValueError("bad entry name")
        if name <= previous:
            raise ValueError("entries not sorted or duplicated")
        if entry.kind == _DIRECTORY and entry.dir_ref is None:
            raise ValueError("directory without a record")
        previous = name
        append(entry)
    if pos != len(raw):
        raise ValueError("trailing bytes")
    return entries


# (record ID, pack, offset, length) of a subdirectory; (chunk ID, pack, offset, length) of a file's chunk
RefTuple = tuple[bytes, bytes, int, int]
_KIND_VALUES = frozenset(int(kind) for kind in EntryKind)


def directory_refs(raw: bytes | bytearray) -> tuple[list[RefTuple], list[RefTuple]]:
    """What a directory record refers to, for walks that need nothing else
    (prune, over every tree): its subdirectories' records and its files'
    chunks, without building entries. Framing is checked as decode_directory()
    checks it; names, modes and such are not looked at."""
    try:
        _, dirs, chunks = _directory_refs(bytes(raw), with_chunks=True)
    except (struct.error, ValueError) as exc:
        raise CorruptedData(f"directory record is malformed ({exc})") from None
    return dirs, chunks


def directory_shape(raw: bytes | bytearray) -> tuple[int, list[RefTuple]]:
    """A directory record's number of entries and its subdirectories' records,
    framing checked as directory_refs() checks it: what measuring a tree's
    shape needs (treebudget.py), at a fraction of decoding its entries."""
    try:
        count, dirs, _ = _directory_refs(bytes(raw), with_chunks=False)
    except (struct.error, ValueError) as exc:
        raise CorruptedData(f"directory record is malformed ({exc})") from None
    return count, dirs


def _directory_refs(raw: bytes, with_chunks: bool) -> tuple[int, list[RefTuple], list[RefTuple]]:
    """The entry count, subdirectory refs and (if asked) chunk refs of a record."""
    version, count = struct.unpack_from("<BI", raw, 0)
    if version != RECORD_VERSION:
        raise ValueError(f"unsupported version {version}")
    pos = 5
    dirs: list[RefTuple] = []
    chunks: list[RefTuple] = []
    for _ in range(count):
        kind, name_len = _ENTRY_HEAD.unpack_from(raw, pos)
        if kind not in _KIND_VALUES:
            raise ValueError(f"{kind} is not a valid EntryKind")
        pos += _ENTRY_HEAD.size + name_len
        nxattr = _ENTRY_STAT.unpack_from(raw, pos)[-1]
        pos += _ENTRY_STAT.size
        for _ in range(nxattr):
            (xname_len,) = _XATTR_NAME.unpack_from(raw, pos)
            pos += _XATTR_NAME.size + xname_len
            (value_len,) = _U32.unpack_from(raw, pos)
            pos += _U32.size + value_len
        (payload_len,) = _U32.unpack_from(raw, pos)
        pos += _U32.size
        end = pos + payload_len
        if end > len(raw):
            raise ValueError("truncated payload")
        if kind == EntryKind.FILE:
            if payload_len % _CHUNK.size:
                raise ValueError("file chunk list is malformed")
            if with_chunks:
                chunks.extend((cid, pack, offset, length)
                              for cid, _, pack, offset, length in _CHUNK.iter_unpack(raw[pos:end]))
        elif kind == EntryKind.DIRECTORY:
            if payload_len != REF_SIZE:
                raise ValueError("directory without a record")
            dirs.append(_REF.unpack_from(raw, pos))
        pos = end
    if pos != len(raw):
        raise ValueError("trailing bytes")
    return count, dirs, chunks


# --- snapshots ---------------------------------------------------------------

_SNAPSHOT_FIXED = struct.Struct(f"<BqQQQI{KEY_ID_SIZE}s")  # version time size stored files max_link_id writer


def validate_channel(channel: str) -> str:
    raw = channel.encode("utf-8", "surrogateescape")
    if not raw or len(raw) > MAX_CHANNEL_BYTES:
        raise UsageError(f"channel name must be 1 to {MAX_CHANNEL_BYTES} bytes long")
    if "/" in channel or channel in (".", "..") or any(ord(c) < 32 or ord(c) == 127 for c in channel):
        raise UsageError(f"invalid channel name '{channel}': no '/', control characters, '.' or '..'")
    if ":" in channel:
        raise UsageError(f"invalid channel name '{channel}': ':' separates a channel from a path")
    return channel


def _encode_channel(channel: str) -> bytes:
    raw = channel.encode("utf-8")
    return bytes((len(raw),)) + raw


def _decode_channel(raw: bytes, pos: int) -> tuple[str, int]:
    length = raw[pos]
    text = raw[pos + 1:pos + 1 + length]
    if len(text) != length:
        raise ValueError("truncated channel")
    return text.decode("utf-8"), pos + 1 + length


@dataclass
class Snapshot:
    """The record of one snapshot (blob kind 3). Its tag carries the same summary
    fields, signed; readers accept the record only when the two agree."""

    channel: str
    time_ns: int
    root_ref: BlobRef
    size: int  # logical bytes of all files
    stored: int  # bytes newly written by this save
    files: int
    max_link_id: int = 0  # hardlink groups use IDs 1..max_link_id
    root: Entry | None = None  # the root directory's own metadata, when it has any
    writer: bytes = bytes(KEY_ID_SIZE)  # key ID of the key that wrote (and signed) it

    def encode(self) -> bytes:
        out = bytearray(_SNAPSHOT_FIXED.pack(RECORD_VERSION, self.time_ns, self.size, self.stored, self.files,
                                             self.max_link_id, self.writer))
        out += self.root_ref.encode()
        out += _encode_channel(self.channel)
        if self.root is None:
            out += b"\0"
        else:
            out += b"\1"
            _encode_entry(Entry(EntryKind.DIRECTORY, b"", self.root.mode, self.root.uid, self.root.gid,
                                self.root.mtime_ns, self.root.atime_ns, self.root.ctime_ns,
                                xattrs=self.root.xattrs), out)
        return bytes(out)

    def matches(self, tag: Tag) -> bool:
        return (self.channel, self.time_ns, self.size, self.stored, self.files, self.writer) == (
            tag.channel, tag.time_ns, tag.size, tag.stored, tag.files, tag.signer.key_id)


def decode_snapshot(raw: bytes | bytearray) -> Snapshot:
    raw = bytes(raw)
    try:
        version, time_ns, size, stored, files, max_link_id, writer = _SNAPSHOT_FIXED.unpack_from(raw, 0)
        if version != RECORD_VERSION:
            raise ValueError(f"unsupported version {version}")
        pos = _SNAPSHOT_FIXED.size
        root_ref = BlobRef.decode(raw[pos:pos + REF_SIZE])
        pos += REF_SIZE
        channel, pos = _decode_channel(raw, pos)
        root = None
        has_root = raw[pos]
        pos += 1
        if has_root:
            root, pos = _decode_entry(raw, pos)
            if root.kind != EntryKind.DIRECTORY or root.name:
                raise ValueError("bad root metadata")
        if pos != len(raw):
            raise ValueError("trailing bytes")
    except (struct.error, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise CorruptedData(f"snapshot record is malformed ({exc})") from None
    return Snapshot(channel, time_ns, root_ref, size, stored, files, max_link_id, root, writer)


# --- tags: the sealed, signed snapshot summaries listed by LogOnly keys -------

_TAG_FIXED = struct.Struct(f"<B{ID_SIZE}sqQQQ")  # version record_id time size stored files
TAG_SIGNATURE_CONTEXT = b"rekkord-tag-v2"


@dataclass(frozen=True)
class Tag:
    """A snapshot as listed: signed by the key that wrote it, so every key that
    can list (LogOnly included) can check who claims what. The snapshot ID is
    the hash of the signed summary: two different claims never share an ID."""

    record_id: bytes  # blob ID of the snapshot record
    channel: str
    time_ns: int
    size: int
    stored: int
    files: int
    signer: Signer
    signature: bytes = b""

    def signed_part(self) -> bytes:
        return (_TAG_FIXED.pack(RECORD_VERSION, self.record_id, self.time_ns, self.size, self.stored, self.files)
                + _encode_channel(self.channel) + self.signer.encode())

    def signature_message(self, repo_id: bytes) -> bytes:
        return TAG_SIGNATURE_CONTEXT + repo_id + self.signed_part()

    def encode(self) -> bytes:
        return self.signed_part() + self.signature

    @functools.cached_property
    def snapshot_id(self) -> bytes:
        return hashlib.blake2b(self.signed_part(), digest_size=ID_SIZE, person=b"rekkord-snapshot").digest()

    @property
    def id_hex(self) -> str:
        return self.snapshot_id.hex()


def decode_tag(raw: bytes) -> Tag:
    try:
        version, record_id, time_ns, size, stored, files = _TAG_FIXED.unpack_from(raw, 0)
        if version != RECORD_VERSION:
            raise ValueError(f"unsupported version {version}")
        channel, pos = _decode_channel(raw, _TAG_FIXED.size)
        signer = Signer.decode(raw[pos:pos + Signer.SIZE])
        signature = raw[pos + Signer.SIZE:]
        if len(signature) != SIGNATURE_SIZE:
            raise ValueError("bad signature length")
        return Tag(record_id, channel, time_ns, size, stored, files, signer, signature)
    except (struct.error, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise CorruptedData(f"snapshot tag is malformed ({exc})") from None
