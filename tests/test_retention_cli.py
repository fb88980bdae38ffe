"""`forget` and `prune` as a user runs them: every backend, a save running
while another process prunes, prune killed at many points, keys that may not."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REKKORD, ROOT, Rekkord
from tests.fsutil import assert_one_line_error, rsync_diff
from tests.stops import reached_stop, wait_stopped
from tests.trees import rsync_differences


def make_tree(root: Path, seed: int = 1) -> Path:
    rng = random.Random(seed)
    for index in range(40):
        folder = root / f"d{index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{index:02d}").write_bytes(rng.randbytes(rng.choice((500, 20_000, 300_000))))
    (root / "big.bin").write_bytes(rng.randbytes(5 << 20))
    return root


def change(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    for path in rng.sample(sorted(root.rglob("f*")), 6):
        path.write_bytes(rng.randbytes(rng.randrange(100, 200_000)))


def history(rekkord, src: Path, count: int) -> list[tuple[str, Path]]:
    """count snapshots of a changing tree, each with a copy of what it saved."""
    saved = []
    for index in range(count):
        if index:
            change(src, index)
        snapshot = rekkord.save("c", str(src))
        copy = src.parent / f"as-saved-{index}"
        shutil.copytree(src, copy, symlinks=True)
        saved.append((snapshot, copy))
    return saved


def listed(rekkord) -> list[str]:
    return [s["id"] for s in json.loads(rekkord("snapshots", "-f", "json").stdout)]


def test_forget_and_prune_on_every_backend(backend_repo, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    saved = history(backend_repo, src, 4)
    dry = json.loads(backend_repo("forget", "--keep-last", "2", "--prune", "-n", "-f", "json").stdout)
    assert [s["action"] for s in dry["snapshots"]] == ["remove", "remove", "keep", "keep"]
    assert dry["removed"] == 2 and dry["prune"] is not None
    assert len(listed(backend_repo)) == 4  # a dry run changes nothing
    done = json.loads(backend_repo("forget", "--keep-last", "2", "--prune", "--grace", "0", "-f", "json").stdout)
    assert done["removed"] == 2
    assert done["prune"]["deleted"]["packs"] > 0 and done["prune"]["deleted"]["bytes"] > 0
    assert done["prune"]["deleted"]["snapshot_records"] == 2
    assert listed(backend_repo) == [snapshot for snapshot, _ in saved[2:]]
    for snapshot, copy in saved[2:]:
        dest = tmp_path / f"restored-{snapshot[:8]}"
        backend_repo("restore", f"{snapshot}:{src}", str(dest))
        assert rsync_diff(copy, dest) == ""
    result = backend_repo("check", "--read-data")
    assert "No problems found" in result.stdout
    again = json.loads(backend_repo("prune", "--grace", "0", "-f", "json").stdout)
    assert again["deleted"]["packs"] == 0 and again["repacked"]["packs"] == 0


def test_forget_by_id_and_the_plain_report(local_repo, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    saved = history(local_repo, src, 3)
    out = local_repo("forget", saved[0][0][:12]).stdout
    assert "Removed 1 snapshot" in out
    assert listed(local_repo) == [saved[1][0], saved[2][0]]
    assert_one_line_error(local_repo("forget", saved[0][0][:12], check=False), "no snapshot")
    assert_one_line_error(local_repo("forget", check=False), "IDs or --keep-*")
    assert_one_line_error(local_repo("forget", "c", check=False), "not a snapshot ID")
    pruned = local_repo("prune").stdout  # default grace: unused data is condemned, not deleted
    assert "Condemned" in pruned
    local_repo("check", "--read-data")


@pytest.mark.parametrize("kind", ["WriteOnly", "LogOnly"])
def test_keys_that_cannot_read_everything_may_not_forget_or_prune(local_repo, tmp_path: Path, kind: str) -> None:
    src = make_tree(tmp_path / "src")
    snapshot = local_repo.save("c", str(src))
    key = tmp_path / f"{kind}.key"
    local_repo("derive", "-t", kind, "-O", str(key))
    for args in (("forget", snapshot), ("forget", "--keep-last", "1"), ("prune",)):
        assert_one_line_error(local_repo(*args, key=str(key), check=False), kind)
    assert listed(local_repo) == [snapshot]


# --- beside a running save ------------------------------------------------------------------------


def cli_env(rekkord: Rekkord, **extra: str) -> dict[str, str]:
    env = {**os.environ, "REKKORD_CACHE_DIR": str(rekkord.cache_dir), "PYTHONPATH": str(ROOT), **extra}
    env.pop("REKKORD_CONFIG_FILE", None)
    return env


def start(rekkord: Rekkord, *args: str, stop_at: str) -> subprocess.Popen:
    argv = [*REKKORD, "-R", str(rekkord.repository), "-K", str(rekkord.key_file), *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(rekkord, REKKORD_TEST_STOP=stop_at))


def age_packs(repository: Path, seconds: float) -> None:
    """Make every pack look older than it is (as after a backup that ran for hours)."""
    then = time.time() - seconds
    for pack in (repository / "packs").rglob("*"):
        if pack.is_file():
            os.utime(pack, (then, then))


@pytest.mark.parametrize("grace", ["0", "2h"])
def test_a_save_frozen_before_publishing_while_another_process_prunes(local_repo, tmp_path: Path,
                                                                      grace: str) -> None:
    """A re-save (its stat cache refers to the data of the old snapshot) is
    stopped just before it publishes; another process forgets the old snapshot
    and prunes. With --grace 0 (the user promised nothing was running) the data
    is gone and the save refuses to publish, in one line; with a grace, the data
    is only condemned and the save publishes a snapshot that restores exactly.
    Either way check --read-data is clean."""
    src = make_tree(tmp_path / "src")
    old = local_repo.save("c", str(src))
    saving = start(local_repo, "save", "c", str(src), stop_at="publish")
    wait_stopped(saving.pid, saving)
    age_packs(Path(str(local_repo.repository)), 4 * 3600)  # the save's own packs too: it "ran for hours"
    other = Rekkord(cache_dir=tmp_path / "other-machine", repository=local_repo.repository,
                    key_file=local_repo.key_file)
    other.cache_dir.mkdir()
    other("forget", old)
    report = json.loads(other("prune", "--grace", grace, "-f", "json").stdout)
    saving.send_signal(signal.SIGCONT)
    out, err = saving.communicate(timeout=120)
    if grace == "0":
        assert report["deleted"]["packs"] > 0
        assert saving.returncode != 0 and "prune" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1
        assert listed(local_repo) == []
    else:
        assert report["condemned"]["packs"] > 0 and report["deleted"]["packs"] == 0
        assert saving.returncode == 0, err
        snapshot = out.strip().splitlines()[-1]
        local_repo("restore", f"{snapshot}:{src}", str(tmp_path / "out"))
        assert rsync_diff(src, tmp_path / "out") == ""
    assert "No problems found" in local_repo("check", "--read-data").stdout
    # the next save is whole either way
    again = local_repo.save("c", str(src))
    local_repo("restore", f"{again}:{src}", str(tmp_path / "again"))
    assert rsync_diff(src, tmp_path / "again") == ""


# --- prune killed -----------------------------------------------------------------------------------


KILL_POINTS = [("storage-put", n) for n in (1, 2, 3, 4)] + [("storage-delete", n) for n in (1, 2, 3, 5, 8, 13, 21)]


def test_prune_killed_at_many_points(local_repo, tmp_path: Path) -> None:
    """kill -9 of prune at 11 points (writes of a repack and of its record,
    deletes of its sweep): each time the repository checks clean with
    --read-data, the snapshots left restore exactly, and a second prune finishes."""
    src = make_tree(tmp_path / "src")
    saved = history(local_repo, src, 4)
    local_repo("forget", "--keep-last", "2")
    pristine = tmp_path / "pristine"
    shutil.copytree(str(local_repo.repository), pristine)
    killed = 0
    for point, nth in KILL_POINTS:
        repository = tmp_path / f"repo-{point}-{nth}"
        shutil.copytree(pristine, repository)
        runner = Rekkord(cache_dir=tmp_path / f"cache-{point}-{nth}", repository=str(repository),
                         key_file=local_repo.key_file)
        runner.cache_dir.mkdir()
        pruning = start(runner, "prune", "--grace", "0", "--repack-below", "0.99", stop_at=f"{point}:{nth}")
        where = f"kill at {point} #{nth}"
        if reached_stop(pruning.pid, pruning):
            pruning.kill()
            killed += 1
        pruning.communicate(timeout=120)
        result = runner("check", "--read-data", check=False)
        assert result.returncode == 0, f"{where}:\n{result.stderr}"
        for snapshot, copy in saved[2:]:
            dest = tmp_path / f"out-{point}-{nth}-{snapshot[:8]}"
            runner("restore", f"{snapshot}:{src}", str(dest))
            assert rsync_diff(copy, dest) == "", where
        runner("prune", "--grace", "0", "--repack-below", "0.99")
        assert "No problems found" in runner("check", "--read-data").stdout, where
    assert killed >= 8, f"only {killed} of {len(KILL_POINTS)} prunes were stopped before they ended"


# --- the mount follows --------------------------------------------------------------------------


def wait_until(condition, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_the_mount_follows_forget_and_prune(local_repo, tmp_path: Path) -> None:
    """Forgotten snapshots leave channels/ and ids/ within the refresh interval;
    a file held open in one keeps reading (or fails with EIO, never wrong data);
    a staging channel whose base snapshot is forgotten still commits."""
    from tests.mounting import mounted

    src = make_tree(tmp_path / "src")
    local_repo.env["REKKORD_STATE_DIR"] = str(tmp_path / "state")
    first = local_repo.save("c", str(src))
    big = (src / "big.bin").read_bytes()
    change(src, 1)
    second = local_repo.save("other", str(src))
    other_machine = Rekkord(cache_dir=tmp_path / "other-cache", repository=local_repo.repository,
                            key_file=local_repo.key_file)
    other_machine.cache_dir.mkdir()
    with mounted(local_repo, tmp_path / "mnt", "--refresh", "0.5") as mnt:
        held = open(mnt / "ids" / first / str(src).lstrip("/") / "big.bin", "rb")
        head = held.read(1 << 20)
        staged = mnt / "staging" / "c" / str(src).lstrip("/")
        (staged / "d0" / "f00").write_bytes(b"changed in staging")
        other_machine("forget", first, second)
        other_machine("prune", "--grace", "0")
        wait_until(lambda: first not in os.listdir(mnt / "ids") and second not in os.listdir(mnt / "ids"))
        wait_until(lambda: os.listdir(mnt / "channels") == [])
        try:
            rest = held.read()
            assert head + rest == big  # what reads succeed is right
        except OSError as exc:
            assert exc.errno == __import__("errno").EIO
        finally:
            held.close()
        # the base of staging/c is gone with its data: the commit says so, or succeeds whole
        result = local_repo("commit", str(mnt / "staging" / "c"), "-f", "json", check=False)
        if result.returncode == 0:
            snapshot = json.loads(result.stdout)["id"]
            local_repo("restore", f"{snapshot}:{src}", str(tmp_path / "committed"))
        else:
            assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "No problems found" in local_repo("check", "--read-data").stdout


def test_a_staging_channel_whose_base_was_forgotten_still_commits(local_repo, tmp_path: Path) -> None:
    """With a grace period, forgetting the base only condemns its data: the
    commit keeps what it inherits, and a later prune keeps it too."""
    from tests.mounting import mounted

    src = make_tree(tmp_path / "src")
    local_repo.env["REKKORD_STATE_DIR"] = str(tmp_path / "state")
    base = local_repo.save("c", str(src))
    with mounted(local_repo, tmp_path / "mnt", "--refresh", "0.5") as mnt:
        staged = mnt / "staging" / "c" / str(src).lstrip("/")
        (src / "d1" / "new-file").write_bytes(b"added since")
        subprocess.run(["rsync", "-a", "--delete", f"{src}/", f"{staged}/"], check=True)
        local_repo("forget", base)
        age_packs(Path(str(local_repo.repository)), 2 * 86400)  # older than the default grace (1d)
        report = json.loads(local_repo("prune", "-f", "json").stdout)
        assert report["condemned"]["packs"] > 0
        snapshot = json.loads(local_repo("commit", str(mnt / "staging" / "c"), "-f", "json").stdout)["id"]
    local_repo("restore", f"{snapshot}:{src}", str(tmp_path / "out"))
    # rsync leaves a folder's time as it finds it within the same second: compare as rsync does
    assert rsync_differences(src, tmp_path / "out") == ""
    assert "No problems found" in local_repo("check", "--read-data").stdout
