"""Retries against real servers: SeaweedFS (S3) and sshd (SFTP) go down in the
middle of a save and come back, or stay down, or were never there.

The save stops itself before its second write (REKKORD_TEST_STOP), so the
server goes down at a known point: mid-save, with nothing published yet.
These servers are this module's own: the session ones must stay up.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REKKORD, ROOT
from tests.fsutil import assert_one_line_error
from tests.servers import (
    BUCKET,
    OpenSSHServer,
    SeaweedFS,
    backend_runner_class,
    free_ports,
    new_location,
    openssh_server,
    seaweedfs,
    write_config,
)
from tests.stops import wait_stopped
from tests.trees import rsync_differences

# Longer than the old per-backend retries lasted (S3: 6 attempts, ~6 s at most;
# SFTP: one reconnect after 0.5 s), far shorter than the default budget.
OUTAGE = 8.0


@pytest.fixture(scope="module")
def own_s3() -> Iterator[SeaweedFS]:
    with seaweedfs(buckets=(BUCKET,)) as server:
        yield server


@pytest.fixture(scope="module")
def own_sshd() -> Iterator[OpenSSHServer]:
    with openssh_server() as server:
        yield server


@pytest.fixture(params=["s3", "sftp"])
def remote(request, tmp_path: Path):
    """An initialized repository on this module's own S3 or SFTP server."""
    server = request.getfixturevalue("own_s3" if request.param == "s3" else "own_sshd")
    server.start()  # up, whatever the previous test left
    location = new_location(request.param, tmp_path, s3=server if request.param == "s3" else None,
                            ssh=server if request.param == "sftp" else None)
    cache = tmp_path / "cache"
    cache.mkdir()
    runner = backend_runner_class()(cache_dir=cache, config_file=str(location.config_file(tmp_path / "rekkord.ini")),
                                    location=location)
    master = tmp_path / "master.key"
    runner("init", "-K", str(master))
    runner.key_file = str(master)
    yield runner
    server.start()


def make_tree(root: Path) -> Path:
    """Several packs' worth of data (packs are 8 MiB) and some small files."""
    rng = random.Random(13)
    for i in range(20):
        folder = root / f"d{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"big{i}").write_bytes(rng.randbytes(1_500_000 + i))
        (folder / f"small{i}").write_bytes(rng.randbytes(rng.randrange(0, 5000)))
    return root


def start_save(runner, source: Path, **env: str) -> subprocess.Popen:
    """`rekkord save` in the background, stopping itself before its second write."""
    argv = [*REKKORD, "-C", runner.config_file, "-K", runner.key_file, "save", "docs", str(source)]
    full_env = {**os.environ, "REKKORD_CACHE_DIR": str(runner.cache_dir), "PYTHONPATH": str(ROOT),
                "REKKORD_TEST_STOP": "storage-put:2", **env}
    full_env.pop("REKKORD_CONFIG_FILE", None)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
    wait_stopped(process.pid, process)
    return process


def tags(runner) -> int:
    result = runner("snapshots", "-f", "json")
    return result.stdout.count('"id"')


def take_down(server: SeaweedFS | OpenSSHServer) -> None:
    if isinstance(server, SeaweedFS):
        server.kill()
    else:
        server.stop()  # the listener and every session process


def test_save_survives_a_server_restart_mid_save(remote, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    server = remote.location.server
    save = start_save(remote, source)
    try:
        assert tags(remote) == 0  # stopped mid-way: nothing published yet
        take_down(server)
        os.kill(save.pid, signal.SIGCONT)  # it now meets a dead server...
        time.sleep(OUTAGE)  # ...for this long (the outcome must not depend on it)
        server.start()
        out, err = save.communicate(timeout=600)
    finally:
        if save.poll() is None:
            save.kill()
    assert save.returncode == 0, err
    snapshot = out.strip().splitlines()[-1]
    remote("restore", snapshot, str(tmp_path / "out"))
    assert rsync_differences(source, tmp_path / "out" / str(source).lstrip("/")) == ""
    remote("check", "--read-data")


def test_a_server_that_stays_down_ends_the_save_with_one_line_once_the_budget_is_spent(remote, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src")
    server = remote.location.server
    save = start_save(remote, source, REKKORD_RETRY_TIME="3")
    try:
        take_down(server)
        os.kill(save.pid, signal.SIGCONT)
        out, err = save.communicate(timeout=600)
    finally:
        if save.poll() is None:
            save.kill()
    save.stderr = err  # for assert_one_line_error
    line = assert_one_line_error(save, "gave up after 3 s of retries to ")
    assert ("connection refused" in line or "lost connection" in line), line
    assert save.returncode == 1
    server.start()
    assert tags(remote) == 0
    remote("check")  # what the failed save left is consistent


@pytest.mark.parametrize("backend", ["s3", "sftp"])
def test_a_wrong_port_fails_at_once_with_one_line(backend: str, tmp_path: Path, request) -> None:
    """Nothing answers at all: no retries, whatever the budget (the command's
    timeout below is the proof: a retrying command would outlive it)."""
    port = free_ports(1)[0]
    if backend == "s3":
        url = f"http://127.0.0.1:{port}/{BUCKET}/repo"
        sections = {"S3": {"KeyID": "k", "SecretKey": "s"}}
    else:
        server = request.getfixturevalue("own_sshd")
        url = f"sftp://{server.user}@127.0.0.1:{port}/repo"
        sections = server.config_sections()
    config = write_config(tmp_path / "rekkord.ini", url, sections)
    master = tmp_path / "master.key"
    cache = tmp_path / "cache"
    cache.mkdir()
    runner = backend_runner_class()(cache_dir=cache, config_file=str(config))
    runner.env["REKKORD_RETRY_TIME"] = "3600"
    subprocess.run([*REKKORD, "init", "-R", str(tmp_path / "local"), "-K", str(master)], check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                             "REKKORD_CACHE_DIR": str(cache)})
    result = runner("-K", str(master), "snapshots", check=False, timeout=60)
    assert_one_line_error(result, "connection refused", str(port))
    assert result.returncode == 1
