"""FolderFds: the restore's cache of open destination folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rekkordfs.destination import FolderFds

pytestmark = pytest.mark.fast


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _folders(root: Path) -> list[tuple[bytes, ...]]:
    made = []
    for top in range(3):
        for sub in range(10):
            (root / f"t{top}" / f"s{sub}").mkdir(parents=True)
            made.append((f"t{top}".encode(), f"s{sub}".encode()))
    return made


def test_lent_descriptors_are_the_folders_asked_for_and_the_cache_stays_bounded(tmp_path: Path) -> None:
    folders = _folders(tmp_path)
    dest = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    before = _open_fds()
    fds = FolderFds(dest, limit=4)
    try:
        for parts in folders + folders[::-1] + folders[::7]:  # misses, hits and evictions
            fd = fds.open_parent(parts + (b"file",))
            try:
                assert os.fstat(fd).st_ino == os.lstat(tmp_path.joinpath(*map(os.fsdecode, parts))).st_ino
            finally:
                os.close(fd)
            assert _open_fds() <= before + 4
    finally:
        fds.close()
        os.close(dest)
    assert _open_fds() == before - 1


def test_a_symlinked_folder_is_never_followed(tmp_path: Path) -> None:
    (tmp_path / "dest" / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "dest" / "link").symlink_to(tmp_path / "elsewhere")
    dest = os.open(tmp_path / "dest", os.O_RDONLY | os.O_DIRECTORY)
    fds = FolderFds(dest)
    try:
        with pytest.raises(OSError):
            fds.open_folder((b"link",))
        with pytest.raises(OSError):
            fds.open_parent((b"link", b"x", b"file"))
        # a folder swapped for a symlink once it is open: writes still land in
        # the folder that was opened, never in the symlink's target
        original = os.lstat(tmp_path / "dest" / "a").st_ino
        os.close(fds.open_folder((b"a",)))
        os.rename(tmp_path / "dest" / "a", tmp_path / "dest" / "moved")
        (tmp_path / "dest" / "a").symlink_to(tmp_path / "elsewhere")
        fd = fds.open_parent((b"a", b"file"))
        try:
            assert os.fstat(fd).st_ino == original
        finally:
            os.close(fd)
    finally:
        fds.close()
        os.close(dest)
    assert list((tmp_path / "elsewhere").iterdir()) == []
