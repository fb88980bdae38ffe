"""localfiles.read_expected(): a save worker's read of a small file that
trusts the walker's lstat for its type and size, and checks with fstat only
when the read disagrees (real files, FIFOs, symlinks and folders)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from rekkordfs.localfiles import read_expected


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
