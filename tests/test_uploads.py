"""staging.Uploads: the one owner of write-behind's results (rekkordfs/staging/uploads.py)."""

from __future__ import annotations

import pytest
import trio

from rekkordfs.format import ChunkRef, Location, encode_chunks
from rekkordfs.staging import Uploads

pytestmark = pytest.mark.fast

CHUNKS = [ChunkRef(b"\1" * 32, 8, Location(b"\2" * 32, 0, 48))]


def test_an_upload_counts_only_for_the_version_it_read() -> None:
    uploads = Uploads()
    uploads.changed(7)
    read = uploads.version(7)
    uploads.record(7, read, CHUNKS)
    assert uploads.result(7) == encode_chunks(CHUNKS) and uploads.result(7, read) == encode_chunks(CHUNKS)
    assert uploads.result(7, read - 1) is None
    uploads.changed(7)  # written again: the upload is void
    assert uploads.result(7) is None and uploads.result(7, read) is None
    uploads.record(7, read, CHUNKS)  # an upload of the old content, finishing late: ignored
    assert uploads.result(7) is None and uploads.done_count() == 0
    uploads.record(7, uploads.version(7), CHUNKS)
    uploads.committed(7)  # stored as the base now
    assert uploads.result(7) is None
    uploads.record(7, uploads.version(7), CHUNKS)
    uploads.deleted(7)
    assert uploads.result(7) is None and uploads.version(7) == 0


def test_a_commit_waits_for_a_running_upload_and_only_for_the_last_one_begun() -> None:
    async def main() -> None:
        uploads = Uploads()
        assert not await uploads.wait(1)  # nothing runs: no wait
        first = uploads.begin([1, 2])
        second = uploads.begin([2])  # a later upload of 2 takes over
        assert uploads.running()
        waited: list[int] = []

        async def commit(ino: int) -> None:
            assert await uploads.wait(ino)
            waited.append(ino)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit, 1)
            nursery.start_soon(commit, 2)
            await trio.sleep(0.01)
            assert waited == []
            uploads.finish([1, 2], first)  # 2 is the second upload's: still running
            await trio.sleep(0.01)
            assert waited == [1] and uploads.running()
            uploads.finish([2], second)
        assert waited == [1, 2] and not uploads.running()

    trio.run(main)
