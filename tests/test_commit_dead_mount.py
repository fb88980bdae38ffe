"""`rekkord commit` when the mount's process is gone: before the commit, or in
the middle of it. One line saying so and what to do, exit 1 (not the usage
error's 2), and the staged data is still there after a remount."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REKKORD, ROOT
from tests.fsutil import assert_one_line_error
from tests.mounting import is_mounted, mount_processes, mounted, unmount
from tests.stops import process_state, wait_stopped


@pytest.fixture
def staged(local_repo, tmp_path: Path):
    local_repo.env["REKKORD_STATE_DIR"] = str(tmp_path / "state")
    return local_repo


def mount_pid(mnt: Path) -> int:
    return int(mount_processes(mnt)[0].split()[0])


def kill_mount(mnt: Path) -> None:
    """kill -9 the mount's process; its mount point stays, answering ENOTCONN."""
    pid = mount_pid(mnt)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while process_state(pid) is not None:
        assert time.monotonic() < deadline, "the mount process outlived SIGKILL"
        time.sleep(0.02)
    assert is_mounted(mnt)


def lazy_unmount(mnt: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=True, capture_output=True)
    assert not is_mounted(mnt)


def commit_json(rekkord, staging: Path) -> dict:
    return json.loads(rekkord("commit", str(staging), "-f", "json").stdout)


def test_commit_with_the_mount_process_dead_says_so(staged, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    staged("mount", str(mnt))
    staging = mnt / "staging" / "laptop"
    try:
        staging.mkdir()
        (staging / "kept").write_bytes(b"staged before the crash")
        kill_mount(mnt)

        dead = staged("commit", str(staging), check=False)
        line = assert_one_line_error(dead, f"the mount at '{mnt}' is not running", "staged data is kept",
                                     f"rekkord mount {mnt}")
        assert dead.returncode == 1, line

        lazy_unmount(mnt)
        gone = staged("commit", str(staging), check=False)
        line = assert_one_line_error(gone, f"no rekkord mount is running at '{mnt}'", "staged data is kept")
        assert gone.returncode == 1, line
    finally:
        if is_mounted(mnt):
            lazy_unmount(mnt)
    with mounted(staged, mnt):
        assert (staging / "kept").read_bytes() == b"staged before the crash"
        snapshot = commit_json(staged, staging)["id"]
        assert (mnt / "ids" / snapshot / "kept").read_bytes() == b"staged before the crash"
    # a path that is not MNT/staging/CHANNEL at all stays a usage error
    wrong = staged("commit", str(tmp_path), check=False)
    assert_one_line_error(wrong, "is not the staging folder of a channel")
    assert wrong.returncode == 2


def test_mount_killed_in_the_middle_of_a_commit(staged, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    staged.env["REKKORD_TEST_STOP"] = "commit"  # the mount stops itself when a commit starts
    staged("mount", str(mnt))
    del staged.env["REKKORD_TEST_STOP"]
    staging = mnt / "staging" / "laptop"
    try:
        staging.mkdir()
        (staging / "kept").write_bytes(os.urandom(100_000))
        data = (staging / "kept").read_bytes()
        committing = subprocess.Popen(
            [*REKKORD, "commit", str(staging)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "REKKORD_CACHE_DIR": str(staged.cache_dir)})
        pid = mount_pid(mnt)
        wait_stopped(pid)
        assert committing.poll() is None  # the commit is under way, waiting for the mount
        os.kill(pid, signal.SIGKILL)
        out, err = committing.communicate(timeout=120)
        line = assert_one_line_error(subprocess.CompletedProcess(committing.args, committing.returncode, out, err),
                                     "commit of staging/laptop failed", f"the mount at '{mnt}' went away during "
                                     "the commit", "staged data is kept")
        assert committing.returncode == 1, line
        assert "Software caused connection abort" not in line
    finally:
        if is_mounted(mnt):
            lazy_unmount(mnt)
    with mounted(staged, mnt):
        assert (staging / "kept").read_bytes() == data
        snapshot = commit_json(staged, staging)["id"]
        assert (mnt / "ids" / snapshot / "kept").read_bytes() == data
    staged("check", "--read-data")
    assert not mount_processes(mnt)
    unmount(mnt)  # nothing left behind
