"""Staging on a full state disk, with a real mount whose state folder is a
small tmpfs: writers are told "No space left on device" (never an I/O error
or a broken pipe), and deleting or truncating staged files gives their space
back at once, before any commit."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from tests.mounting import is_mounted, unmount
from tests.test_disk_full import fill, small_disk
from tests.trees import rsync_differences


def free(disk: Path) -> int:
    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


def wait_free(disk: Path, at_least: int, timeout: float = 60) -> None:
    """The mount frees unlinked files when the kernel forgets them: soon, not
    necessarily before unlink() returns."""
    deadline = time.monotonic() + timeout
    while free(disk) < at_least:
        assert time.monotonic() < deadline, f"only {free(disk)} bytes free on {disk}, expected {at_least}"
        time.sleep(0.05)


@pytest.fixture
def mount_on_small_state(local_repo, tmp_path: Path):
    """(rekkord, MNT, state disk): a mount whose staging state lives on 4 MiB."""
    with small_disk(tmp_path / "state", "4m") as state:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        local_repo("mount", "--state-dir", str(state), str(mnt))
        try:
            yield local_repo, mnt, state
        finally:
            if is_mounted(mnt):
                unmount(mnt)


def source_tree(root: Path, small: int, big: int) -> Path:
    rng = random.Random(5)
    root.mkdir()
    for i in range(small):
        (root / f"s{i:03d}").write_bytes(rng.randbytes(20_000))
    for i in range(big):
        (root / f"b{i}").write_bytes(rng.randbytes(1 << 20))
    return root


def test_first_rsync_into_staging_on_a_full_state_disk_says_no_space(mount_on_small_state, tmp_path: Path) -> None:
    rekkord, mnt, state = mount_on_small_state
    src = source_tree(tmp_path / "src", 20, 1)
    filler = fill(state, 0)
    result = subprocess.run(["rsync", "-a", f"{src}/", f"{mnt}/staging/laptop/"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "No space left on device" in result.stderr, result.stderr
    assert "Input/output error" not in result.stderr, result.stderr
    assert os.listdir(mnt / "staging") == []  # no half-made channel left behind
    filler.unlink()
    subprocess.run(["rsync", "-a", f"{src}/", f"{mnt}/staging/laptop/"], check=True)
    assert rsync_differences(src, mnt / "staging" / "laptop") == ""
    snapshot = rekkord("commit", str(mnt / "staging" / "laptop")).stdout.split()[-1]
    assert rsync_differences(src, mnt / "ids" / snapshot) == ""


def test_rsync_filling_the_state_disk_says_no_space(mount_on_small_state, tmp_path: Path) -> None:
    rekkord, mnt, state = mount_on_small_state
    src = source_tree(tmp_path / "src", 150, 3)  # twice what the disk holds
    result = subprocess.run(["rsync", "-a", f"{src}/", f"{mnt}/staging/laptop/"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "No space left on device" in result.stderr, result.stderr
    assert "Input/output error" not in result.stderr, result.stderr


def test_deleting_and_truncating_staged_files_frees_their_space_at_once(mount_on_small_state) -> None:
    rekkord, mnt, state = mount_on_small_state
    staging = mnt / "staging" / "laptop"
    staging.mkdir()
    empty = free(state)
    # small files (their content lives in the journal) until the disk is full
    small: list[Path] = []
    with pytest.raises(OSError) as failure:
        for i in range(1000):
            path = staging / f"small{i}"
            small.append(path)
            path.write_bytes(os.urandom(60_000))
    assert failure.value.errno == errno.ENOSPC
    assert free(state) < empty // 4
    for path in small:
        path.unlink(missing_ok=True)
    wait_free(state, empty * 3 // 4)  # the journal gave the space back
    # room for a large file now (its content goes to a file of its own)
    big = staging / "big"
    data = os.urandom(2 << 20)
    big.write_bytes(data)
    # fill up with it, then truncate it: its space comes back too
    with pytest.raises(OSError) as failure:
        with open(staging / "more", "wb") as handle:
            for _ in range(8):
                handle.write(os.urandom(1 << 20))
                handle.flush()
    assert failure.value.errno == errno.ENOSPC
    os.truncate(staging / "more", 0)
    os.unlink(staging / "more")
    wait_free(state, (1 << 20))
    (staging / "after").write_bytes(b"still room")
    snapshot = rekkord("commit", str(staging)).stdout.split()[-1]
    assert (mnt / "ids" / snapshot / "big").read_bytes() == data
    assert sorted(os.listdir(mnt / "ids" / snapshot)) == ["after", "big"]
    unmount(mnt)
    rekkord("check", "--read-data")
