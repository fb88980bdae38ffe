"""Bounded work on hostile trees.

Directory records are deduplicated: one record may sit at many paths of a
snapshot, which is how equal folders cost nothing. A hostile writer can use it
to build a few records whose tree doubles at every level (12 records, 2,047
folders; 40 records, a trillion). Whatever expands a tree (restore, list, the
mount, check) therefore counts the entries it expands against the entries of
the distinct records behind them, and refuses a snapshot that multiplies them
beyond AMPLIFICATION (plus FREE_ENTRIES of slack), or nests deeper than
MAX_DEPTH. Real trees stay far below both: copies of one folder add their
parent's entries too, so the ratio grows only with copies of copies.
"""

from __future__ import annotations

from .errors import CorruptedData

MAX_DEPTH = 4096  # Linux paths are at most 4096 bytes: "a/" per level gives 2048
AMPLIFICATION = 1000
FREE_ENTRIES = 1_000_000


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
