"""The mount and its staging area on S3 (SeaweedFS) and SFTP (sshd) repositories."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .mounting import mounted
from .servers import make_backend_runner
from .trees import make_awkward_tree, rsync_differences


@pytest.fixture(params=["s3", "sftp"])
def remote_repo(request, tmp_path: Path):
    runner = make_backend_runner(request, tmp_path, request.param)
    runner.env["REKKORD_STATE_DIR"] = str(tmp_path / "state")
    return runner


def test_mount_and_staging_on_remote_repository(remote_repo, tmp_path: Path) -> None:
    rekkord = remote_repo
    src = make_awkward_tree(tmp_path / "src")
    snapshot = rekkord.save("remote", str(src))
    inside = str(src).lstrip("/")
    with mounted(rekkord, tmp_path / "mnt") as mnt:
        assert rsync_differences(src, mnt / "channels/remote/latest" / inside) == ""
        copy = tmp_path / "copy"
        subprocess.run(["cp", "-a", f"{mnt / 'ids' / snapshot / inside}/.", str(copy)], check=True)
        assert rsync_differences(src, copy) == ""

        (src / "added-after-save").write_bytes(os.urandom(100_000))
        staging = mnt / "staging/remote" / inside
        subprocess.run(["rsync", "-aHAX", "--delete", f"{src}/", f"{staging}/"], check=True)
        result = json.loads(rekkord("commit", str(mnt / "staging/remote"), "-f", "json").stdout)
        assert rsync_differences(src, mnt / "ids" / result["id"] / inside) == ""
    # fetched directory records stay on disk, encrypted, for the next mount
    cached = [p for p in Path(rekkord.cache_dir).rglob("meta/*") if p.is_file()]
    assert cached
    with mounted(rekkord, tmp_path / "mnt") as mnt:
        assert rsync_differences(src, mnt / "channels/remote/latest" / inside) == ""
    rekkord("check", "--read-data")
