"""An inode of a staging tree as the journal holds it, and where its content lives."""

from __future__ import annotations

import operator
import struct
from dataclasses import dataclass, fields
from enum import IntEnum

from ..format import BlobRef, Entry, EntryKind
from ..fsmeta import FILE_TYPE_BITS

ROOT = 1


class Content(IntEnum):
    """Where a file's content is (the journal's `local` column). Only STORED is
    false: `if node.local` means "written here, not committed yet"."""

    STORED = 0  # the chunks of the base snapshot or of the last commit (`chunks`)
    DATA_FILE = 1  # data/<ino> in the state folder
    INLINE = 2  # the journal's `inline` table (small files)


COLUMNS = ("ino, kind, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, rdev, nlink, target, chunks, local, "
           "dir_ref, link_id, xattrs")
_KIND_COLUMN, _LOCAL_COLUMN, _DIR_REF_COLUMN = 1, 13, 14  # positions in COLUMNS


def encode_xattrs(items: list[tuple[bytes, bytes]]) -> bytes:
    out = bytearray(struct.pack("<H", len(items)))
    for name, value in items:
        out += struct.pack("<HI", len(name), len(value)) + name + value
    return bytes(out)


def decode_xattrs(raw: bytes | None) -> list[tuple[bytes, bytes]]:
    if not raw:
        return []
    (count,) = struct.unpack_from("<H", raw, 0)
    pos, items = 2, []
    for _ in range(count):
        name_len, value_len = struct.unpack_from("<HI", raw, pos)
        pos += 6
        items.append((raw[pos:pos + name_len], raw[pos + name_len:pos + name_len + value_len]))
        pos += name_len + value_len
    return items


@dataclass(slots=True)
class Inode:
    ino: int
    kind: EntryKind
    mode: int  # permission bits
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int
    nlink: int
    target: bytes | None
    chunks: bytes | None
    local: Content  # where the content is; true: written here, not stored
    dir_ref: BlobRef | None
    link_id: int | None
    xattrs: bytes | None

    @property
    def is_dir(self) -> bool:
        return self.kind == EntryKind.DIRECTORY

    @property
    def full_mode(self) -> int:
        return FILE_TYPE_BITS[self.kind] | self.mode

    def entry(self, name: bytes) -> Entry:
        """Its metadata as a directory entry (content fields are the caller's)."""
        return Entry(self.kind, name, self.mode, self.uid, self.gid, self.mtime_ns, self.atime_ns, self.ctime_ns,
                     self.size, self.nlink, 0, self.rdev, decode_xattrs(self.xattrs), target=self.target)


_FIELDS = COLUMNS.replace(" ", "").split(",")  # Inode's fields, in the order of COLUMNS
_FIELD_INDEX = {name: i for i, name in enumerate(_FIELDS)}
_all_fields = operator.attrgetter(*_FIELDS)


def changed_inode(node: Inode, changes: dict[str, object]) -> Inode:
    """A copy of node with changes (dataclasses.replace, at half its cost: this
    runs for most requests)."""
    values = list(_all_fields(node))
    for name, value in changes.items():
        values[_FIELD_INDEX[name]] = value
    return Inode(*values)


def row_values(node: Inode) -> tuple:
    """Its columns after ino, then ino: the parameters of journal's row UPDATE."""
    values = _all_fields(node)
    dir_ref = values[_DIR_REF_COLUMN]
    return (*values[1:_DIR_REF_COLUMN], dir_ref.encode() if dir_ref is not None else None,
            *values[_DIR_REF_COLUMN + 1:], values[0])


# enum members by value: a dict lookup costs a tenth of calling the enum (a commit converts 100,000 rows)
_KINDS = {kind.value: kind for kind in EntryKind}
_CONTENTS = {content.value: content for content in Content}


def inode_from_row(row: tuple) -> Inode:
    """An Inode from a row of `SELECT {COLUMNS} FROM inodes`."""
    values = list(row)
    values[_KIND_COLUMN] = _KINDS[values[_KIND_COLUMN]]
    values[_LOCAL_COLUMN] = _CONTENTS[values[_LOCAL_COLUMN]]
    values[_DIR_REF_COLUMN] = BlobRef.decode(values[_DIR_REF_COLUMN]) if values[_DIR_REF_COLUMN] else None
    return Inode(*values)


assert _FIELDS == [f.name for f in fields(Inode)], "COLUMNS and Inode disagree"
