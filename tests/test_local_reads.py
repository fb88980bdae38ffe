"""localfiles: a save worker's read of a small file (read_expected()) that
trusts the walker's lstat for its type and size, and checks with fstat only
when the read disagrees (real files, FIFOs, symlinks and folders); files
opened by name only in the folder the walker listed (FolderOpener)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from rekkordfs.localfiles import FolderOpener, FolderRef
from rekkordfs.localfiles import read_expected as read_open


def folder_of(path: Path) -> FolderRef:
    st = os.stat(path.parent)
    return (bytes(path.parent), st.st_dev, st.st_ino)


def read_expected(path: bytes, size: int, xattrs: int) -> tuple[bytes, list[tuple[bytes, bytes]] | None]:
    """read_open() of the file at path, opened as a save's worker opens it."""
    opener = FolderOpener()
    try:
        fd = opener.open(folder_of(Path(os.fsdecode(path))), os.path.basename(path))
        try:
            return read_open(fd, size, xattrs)
        finally:
            os.close(fd)
    finally:
        opener.close()


def test_expected_size_with_xattrs_through_the_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello")
    os.setxattr(path, "user.b", b"2")
    os.setxattr(path, "user.a", b"1")
    data, xattrs = read_expected(bytes(path), 5, 1)
    assert data == b"hello"
    assert xattrs == [(b"user.a", b"1"), (b"user.b", b"2")]
    assert read_expected(bytes(path), 5, 0) == (b"hello", None)


def test_grown_and_shrunk_files_are_read_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "f"
    content = os.urandom(3 << 20)  # grown far past what the first read asks for
    path.write_bytes(content)
    assert read_expected(bytes(path), 10, 0)[0] == content
    path.write_bytes(b"abc")
    assert read_expected(bytes(path), 10, 1) == (b"abc", [])


def test_what_is_no_longer_a_regular_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as caught:  # must neither block nor read it as an empty file
        read_expected(bytes(fifo), 5, 0)
    assert caught.value.errno == errno.EINVAL
    (tmp_path / "target").write_bytes(b"12345")
    os.symlink(tmp_path / "target", tmp_path / "link")
    with pytest.raises(OSError) as caught:
        read_expected(bytes(tmp_path / "link"), 5, 0)
    assert caught.value.errno == errno.ELOOP
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError) as caught:
        read_expected(bytes(tmp_path / "dir"), 5, 0)
    assert caught.value.errno == errno.EISDIR
    with pytest.raises(OSError) as caught:  # a device gives more than expected: fstat says what it is
        read_expected(b"/dev/zero", 5, 0)
    assert caught.value.errno == errno.EINVAL


def test_a_folder_swapped_since_its_listing_lends_no_file(tmp_path: Path) -> None:
    """A folder replaced by a symlink (or another folder) after the walker
    listed it: its files are refused, not read from wherever it leads now."""
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "f").write_bytes(b"not yours")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "f").write_bytes(b"yours")
    listed = folder_of(tmp_path / "mine" / "f")
    opener = FolderOpener()
    try:
        os.close(opener.open(listed, b"f"))  # the folder as listed: fine
        opener.close()
        os.rename(tmp_path / "mine", tmp_path / "old")
        os.symlink(tmp_path / "secret", tmp_path / "mine")
        with pytest.raises(OSError) as caught:
            opener.open(listed, b"f")
        assert caught.value.errno == errno.ESTALE
        with pytest.raises(OSError):  # every file of that folder, not just the first
            opener.open(listed, b"g")
        opener.close()
        os.unlink(tmp_path / "mine")
        os.rename(tmp_path / "secret", tmp_path / "mine")  # a real folder, but not the one listed
        with pytest.raises(OSError) as caught:
            opener.open(listed, b"f")
        assert caught.value.errno == errno.ESTALE
    finally:
        opener.close()
