"""Reading many directory records at once, for the commands that walk trees
level by level (diff, find, stats).

Records are read in batches, one worker-thread hop per batch (on a local disk
the reads happen in that thread too), several batches at a time, and decoded
(or reduced by `then`) in the same thread, so the event loop only sees the
results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

from .errors import CorruptedData, RekkordError
from .format import BlobKind, BlobRef, Entry, decode_directory
from .tuning import RECORD_BATCH

if TYPE_CHECKING:
    from .repository import Repository

T = TypeVar("T")


async def read_records(repo: Repository, refs: Iterable[BlobRef],
                       then: Callable[[list[Entry]], T] | None = None) -> dict[bytes, T | RekkordError]:
    """Each distinct record of refs, decoded (and given to then()), by record
    ID; a record that cannot be read or decoded maps to its error."""
    unique: dict[bytes, BlobRef] = {}
    for ref in refs:
        unique.setdefault(ref.id, ref)
    items = [(ref.id, ref.location) for ref in unique.values()]
    batches = [items[start:start + RECORD_BATCH] for start in range(0, len(items), RECORD_BATCH)]
    results: dict[bytes, T | RekkordError] = {}

    def decode(raw: bytes | bytearray) -> object:
        entries = decode_directory(raw)
        return then(entries) if then is not None else entries

    async def one(batch: list) -> None:
        for (record_id, _), result in zip(batch, await repo.open_many(BlobKind.DIRECTORY, batch, then=decode)):
            if isinstance(result, CorruptedData):
                result = CorruptedData(f"directory {record_id.hex()}: {result.message}")
            elif isinstance(result, Exception) and not isinstance(result, RekkordError):
                raise result
            results[record_id] = result  # type: ignore[assignment]

    await repo.for_each(batches, one, limit=max(2, repo.threads))
    return results
