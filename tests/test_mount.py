"""`rekkord mount` for real: /dev/fuse, a daemonized mount, real cp/rsync/find."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .mounting import is_mounted, mount_processes, mounted, unmount
from .trees import make_awkward_tree, make_wide_dir, rsync_differences


def inside(mnt: Path, snapshot_dir: str, path: Path) -> Path:
    """Where an absolute source path appears inside a mounted snapshot."""
    return mnt / snapshot_dir / str(path).lstrip("/")


@pytest.fixture
def awkward(tmp_path: Path) -> Path:
    return make_awkward_tree(tmp_path / "src")


def test_snapshot_tree_matches_source(local_repo, awkward: Path, tmp_path: Path) -> None:
    snapshot = local_repo.save("docs", str(awkward))
    with mounted(local_repo, tmp_path / "mnt") as mnt:
        latest = inside(mnt, "channels/docs/latest", awkward)
        by_id = inside(mnt, f"ids/{snapshot}", awkward)
        assert rsync_differences(awkward, latest) == ""
        assert rsync_differences(awkward, by_id) == ""

        copy = tmp_path / "copy"
        subprocess.run(["cp", "-a", f"{latest}/.", str(copy)], check=True)
        assert rsync_differences(awkward, copy) == ""

        # the usual tools
        found = subprocess.run(["find", str(latest)], capture_output=True, check=True).stdout.splitlines()
        expected = subprocess.run(["find", str(awkward)], capture_output=True, check=True).stdout.splitlines()
        assert len(found) == len(expected)
        du = subprocess.run(["du", "-s", "--apparent-size", "-B1", str(latest)], capture_output=True,
                            text=True, check=True).stdout.split()[0]
        assert int(du) > 13 << 20
        assert os.readlink(latest / "link-relative") == "small.txt"
        assert os.readlink(latest / "link-dangling") == "does/not/exist"
        getfattr = subprocess.run(["getfattr", "-d", "-e", "hex", str(latest / "small.txt")],
                                  capture_output=True, text=True, check=True).stdout
        assert "user.comment=0x00ff62696e6172792076616c7565" in getfattr
        st = os.stat(latest / "text-10M.txt")
        source = os.stat(awkward / "text-10M.txt")
        assert (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns) == (
            source.st_mode, source.st_uid, source.st_size, source.st_mtime_ns)
        assert st.st_blksize >= 128 << 10


def test_hardlinks_share_an_inode_and_inodes_are_stable(local_repo, awkward: Path, tmp_path: Path) -> None:
    local_repo.save("links", str(awkward))
    with mounted(local_repo, tmp_path / "mnt") as mnt:
        root = inside(mnt, "channels/links/latest", awkward)
        first = os.stat(root / "hard-1")
        assert os.stat(root / "hard-2").st_ino == first.st_ino
        assert os.stat(root / "a/b/c/d/e/hard-3").st_ino == first.st_ino
        assert first.st_nlink == 3
        assert os.stat(root / "small.txt").st_ino != first.st_ino
        before = {p.name: p.lstat().st_ino for p in root.iterdir()}
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
        after = {p.name: p.lstat().st_ino for p in root.iterdir()}
        assert before == after
        assert len(set(before.values())) == len(before) - 1  # hard-1 and hard-2 share one


def test_layout_latest_and_new_snapshots_appear(local_repo, tmp_path: Path) -> None:
    src = tmp_path / "data"
    src.mkdir()
    (src / "v").write_text("one")
    first = local_repo.save("daily", str(src))
    # --refresh 0: every listing re-lists, so what is listed never depends on how
    # much time passed (the interval itself is tested with an injected clock in
    # test_vfs_core.py)
    with mounted(local_repo, tmp_path / "mnt", "--refresh", "0") as mnt:
        names = sorted(os.listdir(mnt / "channels" / "daily"))
        assert names[-1] == "latest" and len(names) == 2
        assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", names[0])
        assert os.readlink(mnt / "channels/daily/latest") == names[0]
        assert os.listdir(mnt / "ids") == [first]
        assert (inside(mnt, "channels/daily/latest", src) / "v").read_text() == "one"

        (src / "v").write_text("two")
        second = local_repo.save("daily", str(src))
        other = local_repo.save("weekly", str(src))
        # a lookup by ID finds a snapshot written after the last listing at once
        assert (inside(mnt, f"ids/{second}", src) / "v").read_text() == "two"
        assert sorted(os.listdir(mnt / "ids")) == sorted([first, second, other])
        assert sorted(os.listdir(mnt / "channels")) == ["daily", "weekly"]
        latest = os.readlink(mnt / "channels/daily/latest")
        names = [n for n in os.listdir(mnt / "channels/daily") if n != "latest"]
        assert len(names) == 2 and latest == max(names)  # same second: the newer one is NAME_2
        assert (inside(mnt, "channels/daily/latest", src) / "v").read_text() == "two"
        # read-only
        with pytest.raises(OSError) as failure:
            (inside(mnt, "channels/daily/latest", src) / "new").write_text("x")
        assert failure.value.errno in (errno.EROFS, errno.EACCES)


def test_mount_one_snapshot_subtree(local_repo, awkward: Path, tmp_path: Path) -> None:
    local_repo.save("sub", str(awkward))
    with mounted(local_repo, tmp_path / "mnt", f"sub:{awkward}/a") as mnt:
        assert sorted(os.listdir(mnt)) == ["b"]
        assert (mnt / "b/c/d/e/deep.txt").read_bytes() == b"deep\n"


def test_corrupted_blob_gives_eio_on_that_file_only(local_repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    victim = os.urandom(300_000)
    (src / "victim.bin").write_bytes(victim)
    (src / "healthy.txt").write_text("fine\n" * 1000)
    local_repo.save("bad", str(src))
    listing = local_repo("list", "bad", "-r", "-f", "json").stdout
    assert "victim.bin" in listing
    # the victim's chunk: the middle of the data pack (healthy.txt compresses to a few bytes;
    # the other pack holds the directory records, far smaller)
    repo = Path(local_repo.repository)
    packs = sorted((p for p in (repo / "packs").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    assert len(packs) == 2 and packs[0].stat().st_size < 10_000
    target = packs[-1]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(target, 0o644)
    target.write_bytes(bytes(data))

    with mounted(local_repo, tmp_path / "mnt") as mnt:
        root = inside(mnt, "channels/bad/latest", src)
        with pytest.raises(OSError) as failure:
            (root / "victim.bin").read_bytes()
        assert failure.value.errno == errno.EIO
        assert (root / "healthy.txt").read_text() == "fine\n" * 1000
        assert sorted(os.listdir(root)) == ["healthy.txt", "victim.bin"]
    logs = list(Path(local_repo.cache_dir).rglob("mount.log"))
    assert logs and "victim.bin" in logs[0].read_text()


def test_key_capabilities_in_the_mount(local_repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("secret")
    snapshot = local_repo.save("c", str(src))
    log_key = tmp_path / "log.key"
    write_key = tmp_path / "write.key"
    local_repo("derive", "-t", "LogOnly", "-O", str(log_key))
    local_repo("derive", "-t", "WriteOnly", "-O", str(write_key))

    local_repo.key_file, master = str(log_key), local_repo.key_file
    try:
        with mounted(local_repo, tmp_path / "mnt-log") as mnt:
            assert os.listdir(mnt / "ids") == [snapshot]
            assert os.listdir(mnt / "channels") == ["c"]
            with pytest.raises(PermissionError):
                os.listdir(mnt / "ids" / snapshot)
            with pytest.raises(PermissionError):
                (mnt / "channels/c/latest" / str(src).lstrip("/")).stat()
        local_repo.key_file = str(write_key)
        with mounted(local_repo, tmp_path / "mnt-write") as mnt:
            assert os.listdir(mnt / "ids") == []
            assert os.listdir(mnt / "channels") == []
    finally:
        local_repo.key_file = master


def test_large_directory(local_repo, tmp_path: Path) -> None:
    wide = make_wide_dir(tmp_path / "wide", 100_000)
    local_repo.save("wide", str(wide))
    with mounted(local_repo, tmp_path / "mnt") as mnt:
        root = inside(mnt, "channels/wide/latest", wide)
        names = os.listdir(root)
        assert len(names) == 100_000
        assert "f099999" in names
        assert os.stat(root / "f054321").st_size == 0
        count = subprocess.run(f"find '{root}' -type f | wc -l", shell=True, capture_output=True, text=True)
        assert count.stdout.strip() == "100000"


def test_file_over_4_gib(local_repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "big", "wb") as handle:
        handle.seek((4 << 30) + 12345)
        handle.write(b"beyond 4 GiB")
        handle.truncate(5 << 30)
    local_repo.save("big", str(src))
    with mounted(local_repo, tmp_path / "mnt") as mnt:
        path = inside(mnt, "channels/big/latest", src) / "big"
        assert path.stat().st_size == 5 << 30
        with open(path, "rb") as handle:
            handle.seek((4 << 30) + 12345)
            assert handle.read(12) == b"beyond 4 GiB"
            handle.seek(3 << 30)
            assert handle.read(1 << 20) == bytes(1 << 20)


def test_signals_and_foreground_unmount_cleanly(local_repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    local_repo.save("s", str(src))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    local_repo("mount", str(mnt))
    assert is_mounted(mnt)
    pid = int(mount_processes(mnt)[0].split()[0])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (is_mounted(mnt) or mount_processes(mnt)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(mnt) and not mount_processes(mnt)

    env = {**os.environ, "REKKORD_CACHE_DIR": str(local_repo.cache_dir)}
    argv = [*__import__("tests.conftest", fromlist=["REKKORD"]).REKKORD, "-R", local_repo.repository,
            "-K", local_repo.key_file, "mount", "--foreground", str(mnt)]
    process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True,
                               cwd=str(Path(__file__).resolve().parent.parent))
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert is_mounted(mnt)
        assert os.listdir(mnt / "channels") == ["s"]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
        assert not is_mounted(mnt)
    finally:
        if process.poll() is None:
            process.kill()
            unmount(mnt)


def test_mount_errors_are_one_line(local_repo, tmp_path: Path) -> None:
    result = local_repo("mount", str(tmp_path / "missing"), check=False)
    assert result.returncode != 0
    assert result.stderr.startswith("rekkord: error:") and "Traceback" not in result.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = local_repo("mount", "nosuchchannel", str(mnt), check=False)
    assert result.returncode != 0 and "nosuchchannel" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not is_mounted(mnt)


def test_second_mount_on_the_same_state_folder_is_refused(local_repo, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    state = tmp_path / "state"
    with mounted(local_repo, first, "--state-dir", str(state)):
        result = local_repo("mount", "--state-dir", str(state), str(second), check=False)
        assert result.returncode != 0
        assert f"already mounted on '{first}'" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not is_mounted(second)
        assert (first / "staging").is_dir()
    with mounted(local_repo, second, "--state-dir", str(state)):  # free again once unmounted
        assert (second / "staging").is_dir()
