"""`stats`: how much the repository holds, and how much it saves.

- logical size: the sum of the snapshots' sizes (what restoring every
  snapshot would write), from their signed tags, so LogOnly keys see it too;
- distinct data: the plaintext bytes of the distinct chunks the snapshots
  refer to (keys that can read: it takes reading every directory record once,
  whatever the number of snapshots sharing it);
- stored size: the bytes of the packs in the storage (chunks and directory
  records, compressed and encrypted, and whatever a prune has not removed
  yet), from one listing.

The dedup ratio is logical / distinct; the overall ratio logical / stored
(deduplication and compression together).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .codec import PACKS_PREFIX, pack_id_from_key
from .errors import RekkordError
from .format import BlobRef, Entry, EntryKind, Tag, decode_chunks
from .keys import Capability
from .treeread import read_records

if TYPE_CHECKING:
    from .repository import Repository

Warn = Callable[[str], None]


@dataclass
class ChannelStats:
    name: str
    snapshots: int
    logical_size: int
    latest: Tag | None


@dataclass
class Stats:
    snapshots: int = 0
    files: int = 0  # over all snapshots (a file in two snapshots counts twice)
    logical_size: int = 0
    stored_size: int = 0
    packs: int = 0
    channels: list[ChannelStats] = field(default_factory=list)
    distinct_size: int | None = None  # None: the key cannot read
    distinct_chunks: int | None = None
    directories: int | None = None  # distinct directory records
    problems: int = 0

    @property
    def average_pack_size(self) -> int:
        return self.stored_size // self.packs if self.packs else 0

    @property
    def dedup_ratio(self) -> float | None:
        if self.distinct_size is None:
            return None
        return self.logical_size / self.distinct_size if self.distinct_size else 1.0

    @property
    def stored_ratio(self) -> float:
        return self.logical_size / self.stored_size if self.stored_size else 1.0


def _reduce(entries: list[Entry]) -> tuple[list[BlobRef], list[tuple[bytes, int]]]:
    """Worker-thread side: a record's subfolders, and the (ID, size) of its files' chunks."""
    chunks: list[tuple[bytes, int]] = []
    for entry in entries:
        if entry.kind == EntryKind.FILE:
            chunks += [(c.id, c.size) for c in decode_chunks(entry.chunks_raw)]
    return [e.dir_ref for e in entries if e.kind == EntryKind.DIRECTORY and e.dir_ref is not None], chunks


async def _distinct_data(repo: Repository, roots: list[BlobRef], stats: Stats, warn: Warn) -> None:
    """Every directory record below roots, read once, level by level."""
    seen: set[bytes] = set()
    chunks: set[bytes] = set()
    size = 0
    level = roots
    while level:
        fresh = [ref for ref in level if ref.id not in seen]
        seen.update(ref.id for ref in fresh)
        following: list[BlobRef] = []
        for _record_id, result in (await read_records(repo, fresh, then=_reduce)).items():
            if isinstance(result, RekkordError):
                warn(f"{result.message}; what it holds is not counted")
                stats.problems += 1
                continue
            subdirs, file_chunks = result
            for chunk_id, chunk_size in file_chunks:
                if chunk_id not in chunks:
                    chunks.add(chunk_id)
                    size += chunk_size
            following += [ref for ref in subdirs if ref.id not in seen]
        level = following
    stats.distinct_size, stats.distinct_chunks, stats.directories = size, len(chunks), len(seen)


async def gather(repo: Repository, warn: Warn) -> Stats:
    listing = await repo.list_snapshots()
    for line in listing.rejected:
        warn(line)
    stats = Stats(problems=len(listing.rejected))
    by_channel: dict[str, list[Tag]] = {}
    for tag in listing.tags:
        by_channel.setdefault(tag.channel, []).append(tag)
        stats.snapshots += 1
        stats.files += tag.files
        stats.logical_size += tag.size
    readable = repo.keys.can(Capability.READ)
    roots: dict[bytes, BlobRef] = {}

    async def load(tag: Tag) -> None:
        try:
            roots[tag.snapshot_id] = (await repo.load_snapshot(tag)).root_ref
        except RekkordError as exc:
            warn(f"{exc.message}; its data is not counted")
            stats.problems += 1

    if readable:  # the records, many at a time (newest_usable() below then finds them loaded)
        await repo.for_each(listing.tags, load)
    for name, tags in sorted(by_channel.items()):
        latest = await repo.newest_usable(tags)
        stats.channels.append(ChannelStats(name, len(tags), sum(t.size for t in tags), latest))
    packs = await repo.storage.list_details(PACKS_PREFIX)
    for key, info in packs.items():
        if pack_id_from_key(key) is not None:
            stats.packs += 1
            stats.stored_size += info.size
    if readable:
        await _distinct_data(repo, list(roots.values()), stats, warn)
    return stats
