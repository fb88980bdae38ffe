"""Shared fixtures: run the real `rekkord` command against real repositories."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REKKORD = [sys.executable, "-m", "rekkordfs.cli.main"]
ROOT = Path(__file__).resolve().parent.parent

# Staging trees (in tests and in the mounts they start) check every cached
# inode row against the journal: a change that bypasses the cache fails a test.
os.environ["REKKORD_CHECK_INODE_CACHE"] = "1"


@dataclass
class Rekkord:
    """Runs the CLI with a private cache folder and optional default -R/-K."""

    cache_dir: Path
    repository: str | None = None
    key_file: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    def __call__(self, *args: str, check: bool = True, input: str | None = None,
                 key: str | None = None, timeout: float = 600, cwd: str | None = None) -> subprocess.CompletedProcess:
        argv = list(REKKORD)
        if self.repository:
            argv += ["-R", self.repository]
        if key or self.key_file:
            argv += ["-K", key or self.key_file]
        argv += list(args)
        env = {**os.environ, "REKKORD_CACHE_DIR": str(self.cache_dir), "PYTHONPATH": str(ROOT), **self.env}
        env.pop("REKKORD_CONFIG_FILE", None)
        result = subprocess.run(argv, capture_output=True, text=True, input=input, env=env,
                                timeout=timeout, cwd=cwd or str(self.cache_dir.parent))
        if check and result.returncode != 0:
            raise AssertionError(
                f"rekkord {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result

    def save(self, channel: str, *paths: str, key: str | None = None) -> str:
        """Save and return the new snapshot ID (the last line of output)."""
        out = self("save", channel, *paths, key=key).stdout.strip().splitlines()
        return out[-1]


@pytest.fixture
def rekkord(tmp_path: Path) -> Rekkord:
    cache = tmp_path / "cache"
    cache.mkdir()
    return Rekkord(cache_dir=cache)


@pytest.fixture
def local_repo(tmp_path: Path, rekkord: Rekkord) -> Rekkord:
    """An initialized local repository; rekkord() uses it with its master key."""
    repo = tmp_path / "repo"
    master = tmp_path / "master.key"
    rekkord.repository = str(repo)
    rekkord("init", "-K", str(master))
    rekkord.key_file = str(master)
    return rekkord


from tests.servers import backend_repo, seaweedfs_server, sshd_server  # noqa: E402,F401  (S3/SFTP servers, see tests/servers.py)
