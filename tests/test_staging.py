"""The writable staging area of a real mount: rsync in, `rekkord commit`, compare."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import REKKORD
from .mounting import is_mounted, mount_processes, mounted, unmount
from .stops import wait_stopped
from .trees import make_awkward_tree, rsync_differences

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(old: Path, new: Path, flags: int) -> None:
    if libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def commit(rekkord, staging: Path) -> dict:
    return json.loads(rekkord("commit", str(staging), "-f", "json").stdout)


def count_objects(repo: Path, kind: str) -> int:
    return sum(1 for p in (repo / kind).rglob("*") if p.is_file())


@pytest.fixture
def state_env(local_repo, tmp_path: Path):
    local_repo.env["REKKORD_STATE_DIR"] = str(tmp_path / "state")
    return local_repo


def test_rsync_tree_into_staging_and_commit(state_env, tmp_path: Path) -> None:
    rekkord = state_env
    src = make_awkward_tree(tmp_path / "src")
    with mounted(rekkord, tmp_path / "mnt") as mnt:
        staging = mnt / "staging" / "laptop"
        staging.mkdir()
        subprocess.run(["rsync", "-aHAX", "--delete", f"{src}/", f"{staging}/"], check=True)
        assert rsync_differences(src, staging) == ""
        result = commit(rekkord, staging)
        assert result["channel"] == "laptop" and len(result["id"]) == 64
        assert rsync_differences(src, mnt / "channels/laptop/latest") == ""
        assert rsync_differences(src, mnt / "ids" / result["id"]) == ""
        assert rsync_differences(src, staging) == ""  # staging shows the committed tree
    with mounted(rekkord, tmp_path / "mnt") as mnt:
        assert rsync_differences(src, mnt / "channels/laptop/latest") == ""
        assert rsync_differences(src, mnt / "staging/laptop") == ""
    dest = tmp_path / "restored"
    rekkord("restore", "laptop", str(dest))
    assert rsync_differences(src, dest) == ""
    rekkord("check", "--read-data")


def test_incremental_commit_transfers_and_uploads_only_changes(state_env, tmp_path: Path) -> None:
    rekkord = state_env
    src = tmp_path / "src"
    rng = random.Random(7)
    for i in range(200):
        folder = src / f"d{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i}").write_bytes(rng.randbytes(rng.randrange(1000, 200_000)))
    rekkord.save("inc", str(src))  # the base, saved by `save`: staging starts from it
    repo = Path(rekkord.repository)
    with mounted(rekkord, tmp_path / "mnt") as mnt:
        staging = mnt / "staging" / "inc" / str(src).lstrip("/")
        unchanged = subprocess.run(["rsync", "-aHAX", "--delete", "--stats", f"{src}/", f"{staging}/"],
                                   capture_output=True, text=True, check=True).stdout
        assert "Number of regular files transferred: 0" in unchanged
        changed = sorted(src.rglob("f*"))[:2]  # 1% of 200 files
        for path in changed:
            path.write_bytes(rng.randbytes(50_000))
        before = {kind: count_objects(repo, kind) for kind in ("snapshots", "packs", "index", "tags")}
        stats = subprocess.run(["rsync", "-aHAX", "--delete", "--stats", f"{src}/", f"{staging}/"],
                               capture_output=True, text=True, check=True).stdout
        assert "Number of regular files transferred: 2" in stats
        result = commit(rekkord, mnt / "staging" / "inc")
        assert 100_000 <= result["bytes_new"] <= 100_000 + 4096
        # the two new small files go into one pack, the records of the changed directories
        # (the path down to src, src, two subdirectories) into another; and the snapshot
        assert count_objects(repo, "packs") - before["packs"] == 2
        assert count_objects(repo, "index") - before["index"] == 2
        assert count_objects(repo, "snapshots") - before["snapshots"] == 1
        assert count_objects(repo, "tags") - before["tags"] == 1
        assert rsync_differences(src, mnt / "channels/inc/latest" / str(src).lstrip("/")) == ""


def test_posix_operations_in_staging(state_env, tmp_path: Path) -> None:
    rekkord = state_env
    with mounted(rekkord, tmp_path / "mnt") as mnt:
        root = mnt / "staging" / "posix"
        root.mkdir()
        f = root / "file"
        f.write_bytes(b"0123456789")
        with open(f, "r+b") as handle:  # write at offsets, past the end, then truncate
            handle.seek(4)
            handle.write(b"xx")
            handle.seek(20)
            handle.write(b"end")
            handle.flush()
            os.fsync(handle.fileno())
        assert f.read_bytes() == b"0123xx6789" + bytes(10) + b"end"
        os.truncate(f, 5)
        assert f.read_bytes() == b"0123x"
        os.chmod(f, 0o640)
        os.chown(f, 1234, 5678)
        os.utime(f, ns=(1_111_111_111_222_333_444, 1_234_567_890_123_456_789))
        st = os.stat(f)
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns) == (0o640, 1234, 5678,
                                                                               1_234_567_890_123_456_789)
        os.setxattr(f, "user.a", b"1")
        os.setxattr(f, "user.b", b"\x00\xff")
        assert sorted(os.listxattr(f)) == ["user.a", "user.b"]
        os.removexattr(f, "user.a")
        assert os.listxattr(f) == ["user.b"] and os.getxattr(f, "user.b") == b"\x00\xff"

        (root / "dir").mkdir()
        (root / "dir" / "inner").write_text("inner")
        os.symlink("dir/inner", root / "sym")
        assert (root / "sym").read_text() == "inner"
        os.link(f, root / "dir" / "hard")
        assert os.stat(root / "dir" / "hard").st_ino == os.stat(f).st_ino and os.stat(f).st_nlink == 2
        os.mkfifo(root / "fifo")

        (root / "a").write_text("A")
        (root / "b").write_text("B")
        os.rename(root / "a", root / "b")  # over an existing file
        assert (root / "b").read_text() == "A" and not (root / "a").exists()
        (root / "c").write_text("C")
        with pytest.raises(OSError) as failure:
            renameat2(root / "c", root / "b", RENAME_NOREPLACE)
        assert failure.value.errno == errno.EEXIST
        renameat2(root / "c", root / "b", RENAME_EXCHANGE)
        assert (root / "b").read_text() == "C" and (root / "c").read_text() == "A"
        (root / "empty").mkdir()
        (root / "full").mkdir()
        (root / "full" / "x").write_text("x")
        os.rename(root / "full", root / "empty")  # over an empty directory
        assert (root / "empty" / "x").read_text() == "x"
        (root / "other").mkdir()
        (root / "other" / "y").write_text("y")
        with pytest.raises(OSError) as failure:
            os.rename(root / "empty", root / "other")
        assert failure.value.errno == errno.ENOTEMPTY
        with pytest.raises(OSError) as failure:
            os.rmdir(root / "other")
        assert failure.value.errno == errno.ENOTEMPTY
        with pytest.raises(OSError) as failure:
            os.rename(root / "dir", root / "dir" / "sub")
        assert failure.value.errno == errno.EINVAL
        os.unlink(root / "c")
        assert os.statvfs(root).f_bavail > 0

        result = commit(rekkord, root)
        snap = mnt / "ids" / result["id"]
        assert (snap / "file").read_bytes() == b"0123x"
        assert os.stat(snap / "dir" / "hard").st_ino == os.stat(snap / "file").st_ino
        assert os.stat(snap / "file").st_mtime_ns == 1_234_567_890_123_456_789
        assert os.readlink(snap / "sym") == "dir/inner"
        assert sorted(os.listdir(snap)) == sorted(os.listdir(root))
    # snapshots are read-only, and a LogOnly key has no staging at all
    log_key = tmp_path / "log.key"
    rekkord("derive", "-t", "LogOnly", "-O", str(log_key))
    master, rekkord.key_file = rekkord.key_file, str(log_key)
    try:
        with mounted(rekkord, tmp_path / "mnt") as mnt:
            assert "staging" not in os.listdir(mnt)
            with pytest.raises(OSError) as failure:
                (mnt / "staging").mkdir()
            assert failure.value.errno == errno.EROFS
    finally:
        rekkord.key_file = master


def test_write_only_key_stages_and_commits(state_env, tmp_path: Path) -> None:
    rekkord = state_env
    src = make_awkward_tree(tmp_path / "src")
    rekkord.save("wo", str(tmp_path / "src" / "a"))  # a channel the key cannot read
    write_key = tmp_path / "write.key"
    rekkord("derive", "-t", "WriteOnly", "-O", str(write_key))
    master, rekkord.key_file = rekkord.key_file, str(write_key)
    try:
        with mounted(rekkord, tmp_path / "mnt") as mnt:
            assert os.listdir(mnt / "channels") == [] and os.listdir(mnt / "ids") == []
            staging = mnt / "staging" / "wo"
            staging.mkdir()
            assert os.listdir(staging) == []  # starts empty: the base cannot be read
            subprocess.run(["rsync", "-aHAX", "--delete", f"{src}/", f"{staging}/"], check=True)
            snapshot = commit(rekkord, staging)["id"]
    finally:
        rekkord.key_file = master
    with mounted(rekkord, tmp_path / "mnt") as mnt:
        assert rsync_differences(src, mnt / "ids" / snapshot) == ""
    rekkord("check")


def test_failed_commit_keeps_staging_and_retry_succeeds(state_env, tmp_path: Path) -> None:
    rekkord = state_env
    repo = Path(rekkord.repository)
    with mounted(rekkord, tmp_path / "mnt") as mnt:
        staging = mnt / "staging" / "retry"
        staging.mkdir()
        (staging / "data").write_bytes(os.urandom(300_000))
        moved = tmp_path / "repo-away"
        repo.rename(moved)  # the backend is gone
        try:
            result = rekkord("commit", str(staging), check=False)
        finally:
            moved.rename(repo)
        assert result.returncode != 0
        assert result.stderr.startswith("rekkord: error: commit of staging/retry failed")
        assert len(result.stderr.strip().splitlines()) == 1
        assert len((staging / "data").read_bytes()) == 300_000
        snapshot = commit(rekkord, staging)["id"]
        assert (mnt / "ids" / snapshot / "data").stat().st_size == 300_000
    rekkord("check", "--read-data")


def _mount_pid(mnt: Path) -> int:
    return int(mount_processes(mnt)[0].split()[0])


def _kill_mount(mnt: Path) -> None:
    os.kill(_mount_pid(mnt), signal.SIGKILL)
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    deadline = time.monotonic() + 10
    while (is_mounted(mnt) or mount_processes(mnt)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(mnt)


def _mount_stopping_at(rekkord, mnt: Path, point: str) -> int:
    """Mount with a stop point armed in the daemon; returns the daemon's pid."""
    rekkord.env["REKKORD_TEST_STOP"] = point
    try:
        rekkord("mount", str(mnt))
    finally:
        del rekkord.env["REKKORD_TEST_STOP"]
    return _mount_pid(mnt)


def _tag_count(repo: Path) -> int:
    return count_objects(repo, "tags")


def test_kill_mount_during_rsync_and_during_commit(state_env, tmp_path: Path) -> None:
    """The daemon stops itself at a known point (REKKORD_TEST_STOP): in the middle
    of an rsync (its 40th write), then of a commit (all uploaded, not published),
    and is killed there; the test proves each operation was still under way."""
    rekkord = state_env
    repo = Path(rekkord.repository)
    src = tmp_path / "src"
    rng = random.Random(3)
    for i in range(60):
        (src / f"d{i % 6}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 6}" / f"f{i}").write_bytes(rng.randbytes(rng.randrange(1 << 10, 3 << 20)))
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    # kill -9 in the middle of an rsync
    daemon = _mount_stopping_at(rekkord, mnt, "staging-write:40")
    staging = mnt / "staging" / "crash"
    staging.mkdir()
    rsync = subprocess.Popen(["rsync", "-a", f"{src}/", f"{staging}/"], stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        wait_stopped(daemon)
        assert rsync.poll() is None, "rsync ended before the mount died"
        _kill_mount(mnt)
        try:
            assert rsync.wait(timeout=60) != 0  # it was cut off mid-transfer
        except subprocess.TimeoutExpired:
            pass  # rsync 3.x sometimes waits forever on its own processes once its destination is gone
    finally:
        if rsync.poll() is None:
            os.killpg(rsync.pid, signal.SIGKILL)  # its session: rsync and the processes it forked
            rsync.wait()

    daemon = _mount_stopping_at(rekkord, mnt, "commit-publish")
    try:
        # what rsync finished (renamed into place) is intact and complete
        finished = [path for path in staging.rglob("f*")]
        assert len(finished) < 60
        for path in finished:
            assert path.read_bytes() == (src / path.relative_to(staging)).read_bytes()
        subprocess.run(["rsync", "-a", "--delete", f"{src}/", f"{staging}/"], check=True)
        assert rsync_differences(src, staging) == ""
        # kill -9 in the middle of a commit: everything stored but the snapshot
        committing = subprocess.Popen(
            [*REKKORD, "-R", rekkord.repository, "-K", rekkord.key_file, "commit", str(staging)],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
                 "REKKORD_CACHE_DIR": str(rekkord.cache_dir)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_stopped(daemon)
        assert committing.poll() is None, "the commit ended before the mount died"
        assert _tag_count(repo) == 0  # started (the daemon stops only inside a commit), not published
        _kill_mount(mnt)
        _, err = committing.communicate(timeout=60)
        assert committing.returncode == 1 and "went away during the commit" in err
    finally:
        if is_mounted(mnt):
            unmount(mnt)

    with mounted(rekkord, mnt):
        assert rsync_differences(src, staging) == ""
        snapshot = commit(rekkord, staging)["id"]
        assert rsync_differences(src, mnt / "ids" / snapshot) == ""
    assert _tag_count(repo) == 1
    rekkord("check", "--read-data")


def test_kill_after_a_pause_loses_nothing_written_before_it(state_env, tmp_path: Path) -> None:
    """The journal commits its open batch once the mount is idle: files written
    (without fsync) before a pause of the writer survive a kill -9, every time."""
    rekkord = state_env
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rekkord("mount", str(mnt))
    staging = mnt / "staging" / "pauses"
    try:
        staging.mkdir()
        for i in range(3):  # each after a pause: a batch of its own
            (staging / f"f{i}").write_bytes(b"x" * (100 * i))
            os.chmod(staging / f"f{i}", 0o600)
            time.sleep(0.3)
        _kill_mount(mnt)
    finally:
        if is_mounted(mnt):
            unmount(mnt)
    with mounted(rekkord, mnt):
        for i in range(3):
            assert (staging / f"f{i}").read_bytes() == b"x" * (100 * i)
            assert (staging / f"f{i}").stat().st_mode & 0o777 == 0o600


def test_out_of_space_gives_enospc_not_corruption(state_env, tmp_path: Path) -> None:
    rekkord = state_env
    small = tmp_path / "small-state"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        rekkord("mount", "--state-dir", str(small), str(mnt))
        try:
            staging = mnt / "staging" / "full"
            staging.mkdir()
            (staging / "fits").write_bytes(b"x" * 1000)
            with pytest.raises(OSError) as failure:
                with open(staging / "too-big", "wb") as handle:
                    for _ in range(16):
                        handle.write(os.urandom(1 << 20))
                        handle.flush()
            assert failure.value.errno == errno.ENOSPC
            os.unlink(staging / "too-big")
            assert (staging / "fits").read_bytes() == b"x" * 1000
            snapshot = commit(rekkord, staging)["id"]
            assert (mnt / "ids" / snapshot / "fits").read_bytes() == b"x" * 1000
        finally:
            unmount(mnt)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_large_files_streamed_while_written_and_rewritten_out_of_order(state_env, tmp_path: Path) -> None:
    """Files over 2 MiB written front to back upload as they grow; a write
    elsewhere, a truncate or a second writer must still give exact content."""
    rekkord = state_env
    rng = random.Random(11)
    sequential = rng.randbytes(24 << 20)
    patched = bytearray(rng.randbytes(12 << 20))
    truncated = rng.randbytes(9 << 20)
    with mounted(rekkord, tmp_path / "mnt") as mnt:
        root = mnt / "staging" / "stream"
        root.mkdir()
        with open(root / "sequential", "wb") as handle:
            for start in range(0, len(sequential), 1 << 20):
                handle.write(sequential[start:start + (1 << 20)])
        with open(root / "patched", "wb") as handle:
            handle.write(bytes(patched))
            handle.seek(5 << 20)  # back into what was already streamed
            handle.write(b"PATCH" * 1000)
        patched[5 << 20:(5 << 20) + 5000] = b"PATCH" * 1000
        with open(root / "truncated", "wb") as handle:
            handle.write(truncated + rng.randbytes(4 << 20))
            handle.flush()
            os.truncate(root / "truncated", len(truncated))
        with open(root / "two-writers", "wb") as first, open(root / "two-writers", "r+b") as second:
            first.write(sequential[:8 << 20])
            first.flush()
            second.seek(1 << 20)
            second.write(b"second writer")
        two = bytearray(sequential[:8 << 20])
        two[1 << 20:(1 << 20) + 13] = b"second writer"
        result = commit(rekkord, root)
        snap = mnt / "ids" / result["id"]
        assert (snap / "sequential").read_bytes() == sequential
        assert (snap / "patched").read_bytes() == bytes(patched)
        assert (snap / "truncated").read_bytes() == truncated
        assert (snap / "two-writers").read_bytes() == bytes(two)
    rekkord("check", "--read-data")
