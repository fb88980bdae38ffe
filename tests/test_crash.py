"""Crash safety of save (kill -9 at random points) and saves with unreadable files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import REKKORD, ROOT, Rekkord
from tests.fsutil import rsync_diff

MiB = 1 << 20


def build_tree(root: Path, rng: random.Random) -> None:
    """~70 MB: incompressible large files and many small ones in nested folders."""
    root.mkdir()
    for index in range(13):
        (root / f"large-{index:02d}.bin").write_bytes(os.urandom(4 * MiB + rng.randrange(MiB)))
    for folder in range(15):
        sub = root / f"dir-{folder:02d}" / "nested"
        sub.mkdir(parents=True)
        for index in range(100):
            (sub / f"small-{index:03d}").write_bytes(os.urandom(rng.randrange(1, 20_000)))
        os.symlink(f"nested/small-{folder:03d}", root / f"dir-{folder:02d}" / "link")
    os.link(root / "large-00.bin", root / "dir-00" / "hardlink-to-large")


def cli_env(rekkord: Rekkord) -> dict[str, str]:
    env = {**os.environ, "REKKORD_CACHE_DIR": str(rekkord.cache_dir), "PYTHONPATH": str(ROOT)}
    env.pop("REKKORD_CONFIG_FILE", None)
    return env


def start_save(rekkord: Rekkord, channel: str, src: Path) -> subprocess.Popen:
    argv = [*REKKORD, "-R", str(rekkord.repository), "-K", str(rekkord.key_file), "save", channel, str(src)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(rekkord))


def count_objects(repo: Path) -> int:
    """Objects (packs, indexes, snapshot records) stored so far."""
    total = 0
    for top in ("packs", "index", "snapshots"):
        for _folder, _dirs, files in os.walk(repo / top):
            total += len(files)
    return total


def count_tags(repo: Path) -> int:
    return len(os.listdir(repo / "tags")) if (repo / "tags").is_dir() else 0


def wait_until(condition, process: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while process.poll() is None and not condition() and time.monotonic() < deadline:
        time.sleep(0.003)


def new_repository(tmp_path: Path, name: str) -> Rekkord:
    cache = tmp_path / f"{name}-cache"
    cache.mkdir()
    rekkord = Rekkord(cache_dir=cache, repository=str(tmp_path / name))
    rekkord("init", "-K", str(tmp_path / f"{name}.key"))
    rekkord.key_file = str(tmp_path / f"{name}.key")
    return rekkord


def test_kill_during_save(tmp_path: Path) -> None:
    """kill -9 of save while it starts, while it uploads (after a random number of
    objects), and right after it published its snapshot: each time the repository
    passes check --read-data, and the next save completes and restores exactly."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    src = tmp_path / "src"
    build_tree(src, rng)

    # a complete save, for its duration and the number of objects it writes
    scratch = new_repository(tmp_path, "scratch")
    started = time.monotonic()
    scratch.save("timing", str(src))
    duration = time.monotonic() - started
    total = count_objects(Path(str(scratch.repository)))
    assert total > 15
    context = f"(random seed {seed}, complete save {duration:.2f} s, {total} objects)"

    plans = [("after", 0.15 * duration), ("objects", rng.randint(1, total // 3)),
             ("objects", rng.randint(total // 3, 2 * total // 3)), ("objects", rng.randint(2 * total // 3, total - 1)),
             ("tag", 1)]
    killed = 0
    for round_no, (trigger, amount) in enumerate(plans):
        rekkord = new_repository(tmp_path, f"repo{round_no}")
        repo = Path(str(rekkord.repository))
        process = start_save(rekkord, "crash", src)
        if trigger == "after":
            time.sleep(amount)
        elif trigger == "objects":
            wait_until(lambda repo=repo, amount=amount: count_objects(repo) >= amount, process)
        else:
            wait_until(lambda repo=repo, amount=amount: count_tags(repo) >= amount, process)
        process.send_signal(signal.SIGKILL)
        _out, err = process.communicate(timeout=120)
        where = f"after a kill {trigger} {amount:g} {context}"
        if process.returncode == -signal.SIGKILL:
            killed += 1
        else:  # it finished first: then it must have succeeded
            assert process.returncode == 0, f"{where}: {err.decode(errors='replace')}"
        result = rekkord("check", "--read-data", "-f", "json", check=False)
        problems = json.loads(result.stdout)["problems"] if result.stdout.strip() else None
        # a kill between the snapshot's record and its tag (its last two writes)
        # leaves a record without a tag, which check must report; the next save
        # publishes it, and then check must find nothing
        unfinished = bool(problems) and all("has no valid tag" in line for line in problems)
        if not unfinished:
            assert result.returncode == 0 and problems == [], f"check failed {where}:\n{result.stdout}\n{result.stderr}"
        # the next save completes and its snapshot restores exactly
        snapshot = rekkord.save("crash", str(src))
        if unfinished:
            result = rekkord("check", check=False)
            assert result.returncode == 0, f"check after the next save {where}:\n{result.stdout}\n{result.stderr}"
        dest = tmp_path / f"restored{round_no}"
        rekkord("restore", f"{snapshot}:{src}", str(dest))
        assert rsync_diff(src, dest) == "", where
    assert killed >= 3, f"only {killed} of {len(plans)} saves were still running when killed {context}"


# --- unreadable files -----------------------------------------------------------------------------

# Root reads everything; without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH it obeys
# file modes like any user, while still owning the repository, keyfile and cache.
NO_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def save_without_dac(rekkord: Rekkord, channel: str, src: Path) -> subprocess.CompletedProcess:
    argv = [*NO_DAC, *REKKORD, "-R", str(rekkord.repository), "-K", str(rekkord.key_file), "save", channel, str(src)]
    return subprocess.run(argv, capture_output=True, text=True, env=cli_env(rekkord), timeout=300)


def test_setpriv_really_drops_root_read_access(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0o000)
    assert subprocess.run([*NO_DAC, "cat", str(secret)], capture_output=True).returncode != 0
    assert subprocess.run(["cat", str(secret)], capture_output=True).returncode == 0


def test_unreadable_files_are_skipped(local_repo: Rekkord, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "readable.txt").write_text("fine")
    (src / "sub" / "also-fine.bin").write_bytes(os.urandom(3 * MiB))
    (src / "sub" / "secret-small").write_text("unreadable")
    (src / "sub" / "secret-small").chmod(0o000)
    (src / "secret-large").write_bytes(os.urandom(5 * MiB))
    (src / "secret-large").chmod(0o200)
    (src / "zz-after").write_text("after the unreadable ones")
    result = save_without_dac(local_repo, "partial", src)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for name in ("secret-small", "secret-large"):
        assert any(name in line and line.startswith("rekkord: warning:") for line in result.stderr.splitlines()), (
            result.stderr)
    assert "could not be read" in result.stderr
    snapshot = result.stdout.strip().splitlines()[-1]
    assert len(snapshot) == 64
    # the snapshot is complete apart from those files
    listed = local_repo("list", f"{snapshot}:{src}", "-r").stdout
    assert "secret" not in listed and "zz-after" in listed and "also-fine.bin" in listed
    dest = tmp_path / "dest"
    local_repo("restore", f"{snapshot}:{src}", str(dest))
    assert not (dest / "secret-large").exists() and not (dest / "sub" / "secret-small").exists()
    assert rsync_diff(src, dest, "--exclude=/secret-large", "--exclude=/sub/secret-small") == ""
    local_repo("check", "--read-data")
    # once readable, the next save has them all and exits 0
    (src / "sub" / "secret-small").chmod(0o600)
    (src / "secret-large").chmod(0o600)
    result = save_without_dac(local_repo, "partial", src)
    assert result.returncode == 0, result.stderr
    dest2 = tmp_path / "dest2"
    local_repo("restore", f"partial:{src}", str(dest2))
    assert rsync_diff(src, dest2) == ""


def test_unreadable_directory_is_reported(local_repo: Rekkord, tmp_path: Path) -> None:
    """A directory that cannot be listed loses its contents: that is a partial save (exit 3)."""
    src = tmp_path / "src"
    (src / "locked").mkdir(parents=True)
    (src / "locked" / "inside").write_text("cannot be listed")
    (src / "open.txt").write_text("fine")
    (src / "locked").chmod(0o000)
    result = save_without_dac(local_repo, "locked", src)
    assert "Traceback" not in result.stderr
    assert any("locked" in line and line.startswith("rekkord: warning:") for line in result.stderr.splitlines()), (
        result.stderr)
    assert result.returncode == 3, (
        f"save lost the contents of an unreadable directory but exited {result.returncode}:\n{result.stderr}")
