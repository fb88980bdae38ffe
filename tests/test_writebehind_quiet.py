"""Write-behind leaves the small files of a steady writer to the commit and
uploads closed files once writes pause (writebehind.QUIET_SECONDS). On trio's
mock clock: the test decides when time passes, nothing depends on real timing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
import trio.testing

from rekkordfs import keys as keymod
from rekkordfs.format import EntryKind
from rekkordfs.nodes import STAGING_INO
from rekkordfs.stagingarea import StagingArea
from rekkordfs.writebehind import QUIET_SECONDS
from tests.test_fast_core import master, private_cache  # noqa: F401  (fixtures)
from tests.test_fast_failures import new_repository, snapshot_file, staging_area

pytestmark = pytest.mark.fast
FILES = 30


async def _write(area: StagingArea, parent: int, name: bytes, content: bytes) -> None:
    handle, _ = await area.create(parent, name, 0o644, 0, 0)
    await area.write(handle, 0, content)
    area.release(handle)


async def _pause(area: StagingArea, channel: str, done: int) -> None:
    """Let virtual time pass until write-behind recorded `done` uploads (its
    worker threads take real time: only a hang reaches the real deadline)."""
    tree = area.trees[channel]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        await trio.sleep(QUIET_SECONDS)
        if tree.uploads.done_count() >= done and not tree.uploads.running():
            return
    raise AssertionError(f"write-behind recorded {tree.uploads.done_count()} uploads, not {done}")


def test_write_behind_waits_for_a_pause_and_skips_committed_files(master: keymod.Keyset,
                                                                  tmp_path: Path) -> None:
    contents = {b"f%d" % i: b"%d " % i * (50 + i) for i in range(FILES)}

    async def main() -> None:
        memory = await new_repository(master)
        async with staging_area(memory, master, tmp_path / "state") as area:
            root = await area.make(STAGING_INO, b"q", EntryKind.DIRECTORY, 0o755, 0, 0)
            tree = area.trees["q"]
            # a steady writer: a file closed every QUIET_SECONDS / 5, never a pause
            for name, content in contents.items():
                await _write(area, root.ino, name, content)
                await trio.sleep(QUIET_SECONDS / 5)
                assert tree.uploads.done_count() == 0 and not tree.uploads.running()
            # committed at once: the commit uploads them; write-behind, once writes
            # pause, finds them committed and uploads nothing
            result = await area.commit("q")
            await trio.sleep(QUIET_SECONDS * 10)
            assert tree.uploads.done_count() == 0 and not tree.uploads.running()
            for name, content in contents.items():
                assert await snapshot_file(area.repo, result.tag.id_hex, name) == content
            # a writer that pauses: its files are uploaded in the pause
            await _write(area, root.ino, b"later", b"written, then a pause")
            await _pause(area, "q", 1)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
