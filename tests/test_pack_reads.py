"""Which ranges of packs a batch read asks for (repository._coalesce)."""

from __future__ import annotations

from rekkordfs.format import Location
from rekkordfs.repository import _coalesce

A, B = b"a" * 16, b"b" * 16


def test_neighbours_in_one_pack_share_a_read() -> None:
    locations = [Location(A, 100, 10), Location(B, 0, 5), Location(A, 0, 50), Location(A, 5000, 10),
                 Location(A, 50, 50)]
    assert _coalesce(locations, 0) == [(A, 0, 110, [2, 4, 0]), (A, 5000, 10, [3]), (B, 0, 5, [1])]
    assert _coalesce(locations, 1 << 20) == [(A, 0, 5010, [2, 4, 0, 3]), (B, 0, 5, [1])]


def test_a_large_gap_splits_and_duplicates_stay_covered() -> None:
    locations = [Location(A, 0, 10), Location(A, 0, 10), Location(A, 10_000, 20)]
    assert _coalesce(locations, 100) == [(A, 0, 10, [0, 1]), (A, 10_000, 20, [2])]
    assert _coalesce([], 100) == []
