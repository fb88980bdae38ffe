"""Stored bytes of many blobs read in few ranges: neighbours in a pack are
read together (coalesce), then cut apart again (cut_runs). Light to import
(no trio): a restore's worker processes read a local repository's packs
with it themselves (read_local)."""

from __future__ import annotations

import os
from typing import TypeVar

from .codec import pack_key
from .errors import CorruptedData, ObjectMissing
from .format import ChunkRef, Location, Raw

B = TypeVar("B", bytes, memoryview)

# a range to read: (pack, start, length, indexes of the locations inside)
Run = tuple[bytes, int, int, list[int]]


def coalesce(locations: list[Location], gap: int) -> list[Run]:
    """Ranges to read for these locations: (pack, start, length, indexes of the
    locations inside), neighbours of a pack at most `gap` apart sharing one."""
    order = sorted(range(len(locations)), key=lambda i: (locations[i].pack, locations[i].offset))
    runs: list[Run] = []
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


def check_length(blob_id: bytes, location: Location, raw: B) -> B:
    if len(raw) != location.length:
        raise CorruptedData(f"blob {blob_id.hex()}: pack {location.pack.hex()} is truncated")
    return raw


def cut_runs(chunks: list[ChunkRef], runs: list[Run], datas: list[bytes]) -> list[Raw]:
    """Each chunk's stored bytes, cut out of the data read for its run (coalesce()), checked for length:
    views of that data, not copies (a restore's 250 MB were copied once more, holding the GIL)."""
    raws: list[Raw] = [(b"", c.location) for c in chunks]
    for (_, start, _, members), whole in zip(runs, datas):
        data = memoryview(whole)
        for index in members:
            location = chunks[index].location
            begin = location.offset - start
            raws[index] = (check_length(chunks[index].id, location, data[begin:begin + location.length]), location)
    return raws


def read_local(root: str, chunks: list[ChunkRef]) -> list[Raw]:
    """The chunks' stored bytes from the packs of the local repository at
    root (pread_ranges()). ObjectMissing for a pack that is not there
    (pruned since the snapshot's tree was read: the caller finds where its
    blobs went); OSError as the disk gives it."""
    runs = coalesce([c.location for c in chunks], 0)
    datas = pread_ranges(root, [(pack_key(pack), start, length) for pack, start, length, _ in runs])
    return cut_runs(chunks, runs, datas)


def pread_ranges(root: str, ranges: list[tuple[str, int, int]]) -> list[bytes]:
    """The bytes of each (key, offset, length) of the objects in the folder
    root, each object opened once. ObjectMissing for one that is not there;
    any other OSError as the disk gives it, with the key as its filename."""
    fds: dict[str, int] = {}
    try:
        results = []
        for key, offset, length in ranges:
            try:
                fd = fds.get(key)
                if fd is None:
                    fd = fds[key] = os.open(os.path.join(root, key), os.O_RDONLY | os.O_CLOEXEC)
                results.append(os.pread(fd, length, offset))
            except FileNotFoundError:
                raise ObjectMissing(f"object '{key}' is missing from '{root}'") from None
            except OSError as exc:
                exc.filename = key
                raise
        return results
    finally:
        for fd in fds.values():
            os.close(fd)
