"""Chunks read from a server with one ranged request per run of a pack
(blobreader.read_raws): each chunk's stored bytes are cut out of its run's
data (views, not copies), whatever order the chunks come in, and an answer
shorter than asked is refused."""

from __future__ import annotations

import marshal
import os

import pytest

from rekkordfs.errors import CorruptedData
from rekkordfs.format import ChunkRef, Location
from rekkordfs.rawruns import coalesce, cut_runs

PACK_A, PACK_B = b"a" * 32, b"b" * 32
PACKS = {PACK_A: os.urandom(10_000), PACK_B: os.urandom(10_000)}
# (pack, offset, length), out of order, one inside the gap of another run
SPANS = [(PACK_B, 5000, 700), (PACK_A, 0, 100), (PACK_A, 300, 50), (PACK_A, 120, 30), (PACK_B, 100, 1)]


def _chunks() -> list[ChunkRef]:
    return [ChunkRef(os.urandom(32), length, Location(pack, offset, length)) for pack, offset, length in SPANS]


def test_each_chunk_is_cut_out_of_its_run() -> None:
    chunks = _chunks()
    runs = coalesce([c.location for c in chunks], 8192)
    assert [run[0] for run in runs] == [PACK_A, PACK_B]  # one request per pack
    datas = [PACKS[pack][start:start + length] for pack, start, length, _ in runs]
    raws = cut_runs(chunks, runs, datas)
    for (pack, offset, length), chunk, (raw, location) in zip(SPANS, chunks, raws):
        assert location == chunk.location
        assert bytes(raw) == PACKS[pack][offset:offset + length]
        # as a restore's worker process receives it
        assert marshal.loads(marshal.dumps(raw)) == PACKS[pack][offset:offset + length]


def test_a_short_answer_is_refused() -> None:
    chunks = _chunks()
    runs = coalesce([c.location for c in chunks], 8192)
    datas = [PACKS[pack][start:start + length] for pack, start, length, _ in runs]
    datas[1] = datas[1][:-1]  # the server answered one byte short: the last chunk of pack B is cut
    with pytest.raises(CorruptedData, match="truncated"):
        cut_runs(chunks, runs, datas)
