"""The profiling simulations under bench/ keep running against the code they
drive without FUSE (StagingTree and Committer; SnapshotView and the FUSE
adapter), and what they count is right."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _simulate(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_commitsim_commits_the_files_it_staged() -> None:
    assert _simulate("bench.commitsim", "300").startswith("300 files staged in ")


def test_listsim_walks_every_entry_of_the_snapshot(tmp_path: Path) -> None:
    profile = tmp_path / "walk.prof"
    out = _simulate("bench.listsim", "300", "--repeat", "2", "--read", "--profile", str(profile))
    # 300 files in 3 folders, and those folders; then the files read, the same bytes each time
    lines = [line.split(",")[0] for line in out.splitlines()]
    assert lines[0::2] == ["walk 1: 303 entries listed", "walk 2: 303 entries listed"]
    assert [line.split(": ")[1] for line in lines[1::2]] == [lines[1].split(": ")[1]] * 2
    assert lines[1].startswith("walk 1: 300 files read (") and not lines[1].endswith("(0 bytes)")
    assert profile.stat().st_size > 0
