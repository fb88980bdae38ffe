"""Bounded work on hostile trees.

Directory records are deduplicated: one record may sit at many paths of a
snapshot, which is how equal folders cost nothing. A hostile writer can use it
to build a few records whose tree doubles at every level (12 records, 2,047
folders; 40 records, a trillion). Whatever expands a tree therefore counts the
entries it expands against the entries of the distinct records behind them,
and refuses a snapshot that multiplies them beyond AMPLIFICATION (plus
FREE_ENTRIES of slack), or nests deeper than MAX_DEPTH: restore, `list -r` and
check measure the whole tree first (refuse_hostile_tree, reading each distinct
record once) and refuse before any work; the mount, which walks lazily, counts
as it lists (TreeBudget) and answers EIO past the limits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import CorruptedData
from .format import BlobKind, BlobRef, Location, directory_shape
from .tuning import RECORD_BATCH, RECORD_READS

if TYPE_CHECKING:
    from .repository import Repository

MAX_DEPTH = 4096  # Linux paths are at most 4096 bytes: "a/" per level gives 2048
AMPLIFICATION = 100  # real trees stay near 1: copies of a folder are rare, copies of copies rarer
FREE_ENTRIES = 100_000


def too_amplified(expanded: int, distinct: int) -> bool:
    return expanded > AMPLIFICATION * distinct + FREE_ENTRIES


class TreeBudget:
    """What one walk of one snapshot has expanded so far."""

    def __init__(self, name: str) -> None:
        self.name = name  # for messages: "snapshot <id>"
        self._distinct: set[bytes] = set()
        self.distinct_entries = 0
        self.expanded_entries = 0

    def visit(self, record_id: bytes, entries: int, depth: int, where: str) -> None:
        """One directory record expanded at one path; CorruptedData past the limits."""
        if depth > MAX_DEPTH:
            raise CorruptedData(f"{self.name}: '{where}' is nested more than {MAX_DEPTH} folders deep; "
                                "refusing to walk it")
        if record_id not in self._distinct:
            self._distinct.add(record_id)
            self.distinct_entries += entries
        self.expanded_entries += entries
        if too_amplified(self.expanded_entries, self.distinct_entries):
            raise CorruptedData(f"{self.name}: its folders repeat the same records over and over ('{where}'): "
                                f"more than {AMPLIFICATION} times the entries stored; refusing a tree built "
                                "to multiply work")


# --- the whole tree at once: restore, list and check refuse before any work ----------

# record ID -> (its number of entries, the record IDs of its subdirectories)
TreeShape = dict[bytes, tuple[int, list[bytes]]]


def shape_problem(shape: TreeShape, root: bytes) -> str | None:
    """Why the tree under root breaks the limits, or None. Records missing from
    shape (unreadable) count as empty."""
    order: list[bytes] = []  # post-order over distinct records
    seen: set[bytes] = set()
    stack: list[tuple[bytes, bool]] = [(root, False)]
    while stack:
        record_id, done = stack.pop()
        if done:
            order.append(record_id)
        elif record_id not in seen:
            seen.add(record_id)
            stack.append((record_id, True))
            stack.extend((child, False) for child in shape.get(record_id, (0, []))[1] if child not in seen)
    expanded: dict[bytes, int] = {}  # entries below a record, repeats counted
    depth: dict[bytes, int] = {}
    distinct = 0
    for record_id in order:
        entries, children = shape.get(record_id, (0, []))
        distinct += entries
        expanded[record_id] = entries + sum(expanded[child] for child in children)
        depth[record_id] = 1 + max((depth[child] for child in children), default=0)
    if depth[root] > MAX_DEPTH:
        return f"its tree is nested more than {MAX_DEPTH} folders deep"
    if too_amplified(expanded[root], distinct):
        return (f"its folders repeat the same records more than {AMPLIFICATION} times over "
                "(a tree built to multiply work)")
    return None




async def refuse_hostile_tree(repo: Repository, root: BlobRef, name: str) -> None:
    """Read each distinct directory record under root once (their shape only)
    and raise CorruptedData if the tree breaks the limits, before anything is
    written. Unreadable records are left for the real walk to report."""
    shape: TreeShape = {}

    async def measure(job: tuple[list[tuple[bytes, Location]], dict[bytes, Location]]) -> None:
        batch, found = job  # records to read, and where the subfolders they name go
        results = await repo.open_many(BlobKind.DIRECTORY, batch, then=directory_shape)
        for (record_id, _), result in zip(batch, results):
            if isinstance(result, Exception):
                continue
            entries, refs = result
            shape[record_id] = (entries, [ref[0] for ref in refs])
            for child_id, pack, offset, length in refs:
                if child_id not in shape:
                    found[child_id] = Location(pack, offset, length)

    frontier = {root.id: root.location}
    while frontier:
        items = list(frontier.items())
        frontier = {}
        # a level's batches at once: from a server each waits for its packs
        await repo.for_each([(items[start:start + RECORD_BATCH], frontier)
                             for start in range(0, len(items), RECORD_BATCH)], measure, limit=RECORD_READS)
    problem = shape_problem(shape, root.id)
    if problem:
        raise CorruptedData(f"{name}: {problem}; refusing it")

