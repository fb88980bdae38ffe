"""What the mount's cores hand the FUSE adapter: nodes and their attributes,
the fixed inode numbers of the mount's own folders, and open snapshot files.
Shared by the snapshot view (vfs.py) and the staging area."""

from __future__ import annotations

import enum
import hashlib
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .chunkmap import ChunkMap
from .format import BlobRef, Entry

if TYPE_CHECKING:
    from .blobcache import DirectoryListing

ROOT_INO = 1
CHANNELS_INO = 2
IDS_INO = 3
STAGING_INO = 4
FIRST_DYNAMIC_INO = 1 << 20
IO_BLOCK_SIZE = 1 << 20
IMMUTABLE_TIMEOUT = 3600.0  # snapshot trees never change
MUTABLE_TIMEOUT = 1.0  # channels/, ids/, latest: new snapshots appear
NAME_MAX = 255  # longest name a folder entry may have, in bytes (as on ext4)


class NodeKind(enum.Enum):
    VIRTUAL_DIR = 1  # root, channels/, ids/, channels/<channel>/
    LATEST = 2  # channels/<channel>/latest
    SNAPSHOT_ROOT = 3
    TREE = 4  # anything inside a snapshot


@dataclass(slots=True)
class Attr:
    ino: int
    mode: int  # with file type bits
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    rdev: int = 0
    timeout: float = IMMUTABLE_TIMEOUT  # how long the kernel may keep it
    allocated: int | None = None  # 512-byte blocks in use, when known (a staged file with holes)

    @property
    def blocks(self) -> int:
        if self.allocated is not None:
            return self.allocated
        return (self.size + 511) // 512 if stat.S_ISREG(self.mode) else 0


class Node:
    __slots__ = ("ino", "kind", "attr", "snapshot", "path", "entry", "channel", "lookups", "permanent", "siblings",
                 "child_inos")

    def __init__(self, ino: int, kind: NodeKind, attr: Attr, snapshot: bytes | None = None, path: bytes = b"",
                 entry: Entry | None = None, channel: str | None = None, permanent: bool = False,
                 siblings: DirectoryListing | None = None) -> None:
        self.ino = ino
        self.kind = kind
        self.attr = attr
        self.snapshot = snapshot
        self.path = path
        self.entry = entry
        self.siblings = siblings  # the listing this entry came from (read-ahead)
        self.channel = channel
        self.lookups = 0
        self.permanent = permanent
        self.child_inos: list[int] | None = None  # a snapshot folder's entries' inodes, once listed

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.attr.mode)

    @property
    def dir_ref(self) -> BlobRef | None:
        return self.entry.dir_ref if self.entry is not None else None


class Listed:
    """An entry the kernel holds only because a readdirplus listed it: its
    folder's node and listing, and its place there. Its Node is built when
    the kernel first asks for it by inode; a `find` never does, so it lists
    100,000 entries without building their nodes."""

    __slots__ = ("parent", "listing", "index", "lookups")

    def __init__(self, parent: Node, listing: DirectoryListing, index: int) -> None:
        self.parent = parent
        self.listing = listing
        self.index = index
        self.lookups = 1


def derive_ino(*parts: bytes) -> int:
    digest = hashlib.blake2b(b"\0".join(parts), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 2) | FIRST_DYNAMIC_INO


def tree_ino(snapshot: bytes, path: bytes, entry: Entry) -> int:
    """The inode of the entry at path in a snapshot (hardlinks share their group's)."""
    if entry.link_id:
        return derive_ino(snapshot, b"link", str(entry.link_id).encode())
    return derive_ino(snapshot, path)


def child_inos(snapshot: bytes, folder: bytes, entries: list[Entry]) -> list[int]:
    """tree_ino of each entry of the folder at path folder, the shared prefix
    hashed once (a folder of many small files: one blake2b copy an entry)."""
    prefix = hashlib.blake2b(snapshot + b"\0" + folder + b"/", digest_size=8)
    copy, from_bytes = prefix.copy, int.from_bytes
    inos = []
    for entry in entries:
        if entry.link_id:
            inos.append(tree_ino(snapshot, b"", entry))
            continue
        hasher = copy()
        hasher.update(entry.name)
        inos.append((from_bytes(hasher.digest(), "little") >> 2) | FIRST_DYNAMIC_INO)
    return inos


class FileReader:
    """An open snapshot file: its chunks, and read-ahead state."""

    __slots__ = ("node", "map", "next_offset", "prefetched")

    def __init__(self, node: Node) -> None:
        assert node.entry is not None
        self.node = node
        self.map = ChunkMap(node.entry.chunks)
        self.next_offset = 0
        self.prefetched = 0  # chunks below this index were already scheduled
