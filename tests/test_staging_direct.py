"""Staged files written past the kernel's page cache (stagingarea/direct.py):
which handles, what their writes drop, and that nothing else changes."""

from __future__ import annotations

import mmap
import os
import random
import stat
import subprocess
from pathlib import Path

import pytest

from rekkordfs.format import EntryKind
from rekkordfs.staging.inode import Content, Inode, encode_xattrs
from rekkordfs.stagingarea.direct import CAPABILITY, direct_io, drop_on_write

from .mounting import mounted

# a file capability (cap_net_raw+ep), version 2, as setcap writes it
CAP_VALUE = bytes.fromhex("01000002" "00200000" "00000000" "00000000" "00000000")


def _node(mode: int, gid: int = 100, xattrs: list[tuple[bytes, bytes]] | None = None) -> Inode:
    return Inode(7, EntryKind.FILE, mode, 1000, gid, 0, 0, 0, 0, 0, 1, None, None, Content.DATA_FILE, None, None,
                 encode_xattrs(xattrs) if xattrs else None)


def test_which_handles_are_direct() -> None:
    assert direct_io(os.O_WRONLY, created=False)
    assert direct_io(os.O_WRONLY | os.O_TRUNC, created=False)
    assert direct_io(os.O_RDWR | os.O_CREAT | os.O_EXCL, created=True)  # mkstemp, rsync's temporary file
    assert not direct_io(os.O_RDWR, created=False)  # may be mapped shared for writing
    assert not direct_io(os.O_RDWR | os.O_CREAT, created=True)
    assert not direct_io(os.O_RDONLY, created=False)


def test_what_a_write_drops_like_the_kernel() -> None:
    # root keeps set-id bits (CAP_FSETID); anyone else loses them
    assert drop_on_write(_node(0o6755), 0, 0) == (None, False)
    assert drop_on_write(_node(0o6755), 1000, 100) == (0o755, False)
    assert drop_on_write(_node(0o4700), 1000, 100) == (0o700, False)
    # set-group-ID without group execute (mandatory locking): kept in the file's group only
    assert drop_on_write(_node(0o2745, gid=100), 1000, 100) == (None, False)
    assert drop_on_write(_node(0o2745, gid=100), 1000, 200) == (0o745, False)
    assert drop_on_write(_node(0o644), 1000, 100) == (None, False)
    # a file capability goes whoever writes
    assert drop_on_write(_node(0o755, xattrs=[(CAPABILITY, CAP_VALUE)]), 0, 0) == (None, True)
    assert drop_on_write(_node(0o755, xattrs=[(b"user.x", b"1")]), 1000, 100) == (None, False)


def _write_cases(root: Path, data: bytes) -> None:
    """The same writes on a local folder and on staging."""
    fd = os.open(root / "excl", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for start in range(0, len(data), 256 << 10):
            os.write(fd, data[start:start + (256 << 10)])
        assert os.pread(fd, 100, 1000) == data[1000:1100]  # read through the direct handle
    finally:
        os.close(fd)
    for name, mode in (("suid", 0o6755), ("cap", 0o755)):
        (root / name).write_bytes(b"old")
        os.chmod(root / name, mode)
    os.setxattr(root / "cap", CAPABILITY, CAP_VALUE)
    for name in ("suid", "cap"):
        fd = os.open(root / name, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b" new")
        finally:
            os.close(fd)
    (root / "mapped").write_bytes(bytes(8192))
    fd = os.open(root / "mapped", os.O_RDWR)  # not direct: shared writable mappings work
    try:
        with mmap.mmap(fd, 8192) as mapped:
            mapped[100:105] = b"MMAP!"
            mapped.flush()
    finally:
        os.close(fd)


def _state(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for path in sorted(root.iterdir()):
        if path.is_dir():
            continue
        st = os.lstat(path)
        out[path.name] = (stat.S_IMODE(st.st_mode), st.st_size, path.read_bytes()[:200],
                          sorted(name for name in os.listxattr(path) if name != "security.selinux"))
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="setting security.capability needs root")
def test_direct_writes_behave_as_a_local_folder(local_repo, tmp_path: Path) -> None:
    rekkord = local_repo
    rekkord.env["REKKORD_STATE_DIR"] = str(tmp_path / "state")
    data = random.Random(5).randbytes(5 << 20)  # past SMALL_FILE: streamed while written
    local = tmp_path / "local"
    local.mkdir()
    _write_cases(local, data)
    with mounted(rekkord, tmp_path / "mnt") as mnt:
        staging = mnt / "staging" / "direct"
        staging.mkdir()
        _write_cases(staging, data)
        assert _state(staging) == _state(local)
        assert (staging / "excl").read_bytes() == data
        # rsync writes its temporary file exclusively created: direct, and exact
        src = tmp_path / "src"
        src.mkdir()
        (src / "big").write_bytes(data)
        subprocess.run(["rsync", "-a", f"{src}/", f"{staging}/copy/"], check=True)
        assert (staging / "copy" / "big").read_bytes() == data
        committed = mnt / "channels" / "direct" / "latest"
        rekkord("commit", str(staging))
        assert (committed / "excl").read_bytes() == data
        assert (committed / "copy" / "big").read_bytes() == data
        assert _state(committed) == _state(local)
