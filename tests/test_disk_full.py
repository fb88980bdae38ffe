"""`save` onto a full local disk: one line naming the full disk, never a
traceback, and the repository still verifies."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.fsutil import assert_one_line_error


@contextmanager
def small_disk(where: Path, size: str = "32m") -> Iterator[Path]:
    """A tmpfs of `size` mounted on where (the tests run as root)."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file taking all but about `leave` bytes of the disk."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as handle:
        try:
            handle.write(bytes(max(0, free - leave)))
        except OSError:
            pass  # full already: fine
    return filler


def many_folders(root: Path, count: int = 2500) -> Path:
    """A tree the walker takes a while to list, so a failed upload happens while
    it is still walking (the case that ended in TrioInternalError)."""
    for i in range(count):
        folder = root / f"d{i // 100}" / f"e{i}"
        folder.mkdir(parents=True)
        (folder / "f").write_bytes(os.urandom(3000))
    return root


def assert_one_line(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert_one_line_error(result, *expected)
    assert result.returncode == 1


def test_save_onto_a_full_repository_disk_says_so_in_one_line(rekkord, tmp_path: Path) -> None:
    source = many_folders(tmp_path / "src")
    with small_disk(tmp_path / "disk") as disk:
        rekkord.repository = str(disk / "repo")
        master = tmp_path / "master.key"
        rekkord("init", "-K", str(master))
        rekkord.key_file = str(master)
        filler = fill(disk, 0)  # the first write fails, while the walker is far from done
        result = rekkord("save", "docs", str(source), check=False)
        assert_one_line(result, "no space left on device", str(disk / "repo"))
        rekkord("check")  # what the failed save left is consistent, even on the full disk
        filler.unlink()
        rekkord("check")
        snapshot = rekkord.save("docs", str(source))  # room again: the same save works
        rekkord("restore", snapshot, str(tmp_path / "out"))
        assert subprocess.run(["diff", "-r", str(source), str(tmp_path / "out" / str(source).lstrip("/"))]
                              ).returncode == 0
        rekkord("check", "--read-data")


def test_save_with_the_local_cache_on_the_full_disk_says_so_in_one_line(rekkord, tmp_path: Path) -> None:
    source = many_folders(tmp_path / "src", 200)
    with small_disk(tmp_path / "disk") as disk:
        rekkord.cache_dir = disk / "cache"
        rekkord.cache_dir.mkdir()
        rekkord.repository = str(disk / "repo")
        master = tmp_path / "master.key"
        rekkord("init", "-K", str(master))
        rekkord.key_file = str(master)
        filler = fill(disk, 0)
        result = rekkord("save", "docs", str(source), check=False)
        assert_one_line(result, "no space left on device", str(disk / "cache"))
        filler.unlink()
        rekkord("check")
