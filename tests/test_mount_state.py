"""The mount's staging state per key, its lock naming the mount point, what
`df` shows, and the mount's wording for snapshot names: real mounts, driven
as a user would."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Rekkord
from tests.fsutil import assert_one_line_error
from tests.mounting import is_mounted, mounted, unmount
from tests.test_disk_full import small_disk


@pytest.fixture
def repo(local_repo: Rekkord, tmp_path: Path) -> Rekkord:
    """A local repository with a WriteOnly key beside the master, staging state under tmp_path."""
    local_repo.env["REKKORD_STATE_DIR"] = str(tmp_path / "state")
    local_repo("derive", "-t", "WriteOnly", "-O", str(tmp_path / "write.key"))
    local_repo("derive", "-t", "LogOnly", "-O", str(tmp_path / "log.key"))
    return local_repo


def commit(rekkord: Rekkord, staging: Path) -> str:
    return json.loads(rekkord("commit", str(staging), "-f", "json").stdout)["id"]


def repository_id(rekkord: Rekkord) -> str:
    """The repository ID: the name of its cache folder."""
    return next(p.name for p in rekkord.cache_dir.iterdir() if len(p.name) == 32)


def test_write_only_mount_after_a_master_mount(repo: Rekkord, tmp_path: Path) -> None:
    write = str(tmp_path / "write.key")
    mnt = tmp_path / "mnt"
    with mounted(repo, mnt):
        (mnt / "staging" / "laptop").mkdir()
        (mnt / "staging" / "laptop" / "from-master.txt").write_text("master\n")
        commit(repo, mnt / "staging" / "laptop")
        assert os.listdir(mnt / "staging" / "laptop") == ["from-master.txt"]

    mnt.mkdir(exist_ok=True)
    repo("mount", "-K", write, str(mnt))
    try:
        # it cannot list the repository's channels (tags are sealed to the log key): none shown
        assert os.listdir(mnt / "staging") == []
        assert os.listdir(mnt / "channels") == [] and os.listdir(mnt / "ids") == []
        (mnt / "staging" / "laptop").mkdir()  # a new snapshot of an existing channel
        assert os.listdir(mnt / "staging" / "laptop") == []  # it cannot read the base: starts empty
        (mnt / "staging" / "laptop" / "from-write.txt").write_text("write\n")
        snapshot = commit(repo, mnt / "staging" / "laptop")
        assert os.listdir(mnt / "staging") == ["laptop"]
    finally:
        unmount(mnt)

    repo("mount", "-K", write, str(mnt))
    try:  # its own channels, as it left them
        assert os.listdir(mnt / "staging") == ["laptop"]
        assert os.listdir(mnt / "staging" / "laptop") == ["from-write.txt"]
    finally:
        unmount(mnt)

    listed = json.loads(repo("snapshots", "-c", "laptop", "-f", "json").stdout)
    assert len(listed) == 2 and listed[-1]["id"] == snapshot
    with mounted(repo, mnt):  # the master's clean tree follows the channel's newest snapshot
        assert os.listdir(mnt / "staging" / "laptop") == ["from-write.txt"]
        assert (mnt / "staging" / "laptop" / "from-write.txt").read_text() == "write\n"


def test_a_second_mount_says_where_the_first_one_is(repo: Rekkord, tmp_path: Path) -> None:
    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    with mounted(repo, first):
        second.mkdir()
        result = repo("mount", str(second), check=False)
        line = assert_one_line_error(result, f"already mounted on '{first}'", "fusermount3 -u")
        assert "process" in line and not is_mounted(second)
        # another key has a state folder of its own: both mount at once
        with mounted(repo, third, "-K", str(tmp_path / "write.key")):
            assert (third / "staging").is_dir()
    with mounted(repo, second):  # free again once unmounted
        assert (second / "staging").is_dir()


def test_a_state_dir_belongs_to_the_key_that_first_used_it(repo: Rekkord, tmp_path: Path) -> None:
    state, mnt = tmp_path / "given", tmp_path / "mnt"
    with mounted(repo, mnt, "--state-dir", str(state)):
        (mnt / "staging" / "kept").mkdir()
        (mnt / "staging" / "kept" / "staged.txt").write_text("not committed\n")
    result = repo("mount", "--state-dir", str(state), "-K", str(tmp_path / "write.key"), str(mnt), check=False)
    assert_one_line_error(result, str(state), "belongs to another key", "Master key")
    assert not is_mounted(mnt)
    with mounted(repo, mnt, "--state-dir", str(state)):
        assert (mnt / "staging" / "kept" / "staged.txt").read_text() == "not committed\n"


def test_staged_data_of_the_old_per_repository_folder_is_kept(repo: Rekkord, tmp_path: Path) -> None:
    """Before state folders were per key, trees lay in <state>/<repository id>/:
    after the upgrade, uncommitted data staged there shows up and commits."""
    mnt = tmp_path / "mnt"
    repo.save("base", str(tmp_path / "log.key"))
    old = tmp_path / "state" / repository_id(repo)
    with mounted(repo, mnt, "--state-dir", str(old)):  # the old layout, by hand
        (mnt / "staging" / "wip").mkdir()
        (mnt / "staging" / "wip" / "draft.txt").write_text("staged before the upgrade\n")
        assert os.listdir(mnt / "staging") == ["base", "wip"]
    (old / "owner").unlink()  # what the older version left: trees and a lock, nothing else
    (old / "lock").write_text("")

    with mounted(repo, mnt):  # the default folder: this key's, below the old one
        assert (mnt / "staging" / "wip" / "draft.txt").read_text() == "staged before the upgrade\n"
        snapshot = commit(repo, mnt / "staging" / "wip")
    assert not (old / "wip").exists() and (old / f"key-{key_id(repo)}" / "wip").is_dir()
    restored = tmp_path / "restored"
    repo("restore", snapshot, str(restored))
    assert (restored / "draft.txt").read_text() == "staged before the upgrade\n"


def key_id(rekkord: Rekkord, key: str | None = None) -> str:
    return json.loads(rekkord("identify", "-f", "json", key=key).stdout)["id"]


def test_df_shows_the_snapshots_as_used_and_the_state_disk_as_available(repo: Rekkord, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(os.urandom(3 << 20))
    (src / "more").write_bytes(os.urandom(12345))
    repo.save("one", str(src))
    repo.save("two", str(src / "data"))
    listed = json.loads(repo("snapshots", "-f", "json").stdout)
    logical = sum(s["size"] for s in listed)
    files = sum(s["files"] for s in listed)
    mnt = tmp_path / "mnt"
    with small_disk(tmp_path / "statedisk", "64m") as disk:
        with mounted(repo, mnt, "--state-dir", str(disk / "state")):
            st = os.statvfs(mnt)
            used = (st.f_blocks - st.f_bfree) * st.f_frsize
            assert used == math.ceil(logical / st.f_frsize) * st.f_frsize
            assert st.f_files - st.f_ffree == files
            room = os.statvfs(disk)
            assert abs(st.f_bavail * st.f_frsize - room.f_bavail * room.f_frsize) <= 1 << 20
            assert 50 << 20 < st.f_bavail * st.f_frsize <= 64 << 20
            df = subprocess.run(["df", "-B1", "--output=size,used,avail", str(mnt)], capture_output=True,
                                text=True, check=True).stdout.splitlines()[1].split()
            assert int(df[1]) == used and int(df[0]) == used + int(df[2])
            # staged data lands on that disk: what is available shrinks
            (mnt / "staging" / "one").mkdir(exist_ok=True)
            with open(mnt / "staging" / "one" / "staged.bin", "wb") as handle:
                handle.write(os.urandom(16 << 20))
                handle.flush()
                os.fsync(handle.fileno())
            after = os.statvfs(mnt)
            assert st.f_bavail * st.f_frsize - after.f_bavail * after.f_frsize >= 15 << 20
            assert (after.f_blocks - after.f_bfree) * after.f_frsize == used  # snapshots unchanged
    with mounted(repo, mnt, "-K", str(tmp_path / "log.key")):  # read-only: nothing available
        st = os.statvfs(mnt)
        assert st.f_bavail == 0 and (st.f_blocks - st.f_bfree) * st.f_frsize == used


def test_mount_of_an_unknown_name_says_what_an_id_prefix_is(repo: Rekkord, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    repo.save("docs", str(tmp_path / "log.key"))
    for name in ("d4419eb", "nosuch"):
        line = assert_one_line_error(repo("mount", f"{name}:/x", str(mnt), check=False))
        assert f"'{name}'" in line and "at least 8 hex digits" in line
    assert_one_line_error(repo("mount", "0123456789abcdef", str(mnt), check=False),
                          "no snapshot or channel named '0123456789abcdef'")
    assert not is_mounted(mnt)
