"""Server faults at random, through tests/faultproxy.py between rekkord and a
real server: S3 (SeaweedFS) answering 500, 503 SlowDown or resetting the
connection mid-body; sshd's connections dropped or reset mid-transfer.

Sprinkled faults must be ridden out by save, restore and reads through the
mount (the result equal to the source, byte for byte); a server that faults
for good must end the command within the retry budget with one line, and
leave a repository that verifies once the faults stop. Each test asserts
that the proxy really injected faults, so none can pass vacuously.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REKKORD, ROOT
from tests.faultproxy import HEALTHY, HTTP_KINDS, SSH_KINDS, FaultProxy, Schedule
from tests.fsutil import assert_one_line_error
from tests.mounting import is_mounted, mount_processes, mounted
from tests.servers import BUCKET, BackendLocation, backend_runner_class
from tests.stops import wait_stopped
from tests.trees import rsync_differences

SEED = int(os.environ.get("REKKORD_FAULT_SEED", "20261201"))  # replay a failure with the seed it printed
BUDGET = "3"  # seconds of retries when the server faults for good

# Sprinkled: some requests fail, never so many in a row that a retry budget is spent.
S3_SPRINKLED = Schedule(HTTP_KINDS, every=4, probability=0.1, seed=SEED)
# The first two connections of each phase are cut somewhere in their first MiB.
SSH_SPRINKLED = Schedule(SSH_KINDS, every=1, limit=2, seed=SEED, cut_bytes=(48 << 10, 1 << 20))
# Reading a few files through the mount takes few requests (whole packs are
# fetched): its first three meet a fault, one of each kind.
S3_FIRST_THREE = Schedule(HTTP_KINDS, every=1, limit=3, seed=SEED)
# For good: every request answers 503; every connection ends within its handshake.
S3_DOWN = Schedule(("503",), every=1, seed=SEED)
SSH_DOWN = Schedule(SSH_KINDS, every=1, seed=SEED, cut_bytes=(0, 3000))


def make_tree(root: Path) -> Path:
    """About 12 MiB in 31 files over 3 folders, with empty and small files and
    one of several chunks (a restore reads it in ranged runs of chunks)."""
    rng = random.Random(SEED)
    for i in range(30):
        folder = root / f"d{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        size = rng.choice([0, 1, 700, 40_000, 300_000, 600_000])
        (folder / f"f{i}").write_bytes(rng.randbytes(size))
    (root / "d0" / "big").write_bytes(rng.randbytes(6 << 20))
    return root


@contextlib.contextmanager
def through_proxy(request, tmp_path: Path, backend: str) -> Iterator[tuple[object, FaultProxy]]:
    """An initialized repository on the session's S3 or SFTP server, reached
    through a FaultProxy (healthy until the test sets a schedule)."""
    token = os.urandom(6).hex()
    if backend == "s3":
        server = request.getfixturevalue("seaweedfs_server")
        server.create_bucket(BUCKET)
        proxy = FaultProxy(server.s3_port, "http")
        url = f"http://127.0.0.1:{proxy.port}/{BUCKET}/repo-{token}"
    else:
        server = request.getfixturevalue("sshd_server")
        proxy = FaultProxy(server.port, "ssh")
        url = f"sftp://{server.user}@127.0.0.1:{proxy.port}{server.new_dir(f'repo-{token}')}"
    location = BackendLocation(backend, url, server.config_sections(), server)
    cache = tmp_path / "cache"
    cache.mkdir()
    runner = backend_runner_class()(cache_dir=cache, config_file=str(location.config_file(tmp_path / "rekkord.ini")),
                                    location=location)
    runner.env["REKKORD_STATE_DIR"] = str(tmp_path / "state")
    runner.env["REKKORD_RETRY_TIME"] = "30"  # far more than sprinkled faults need, far less than a hang
    with proxy:
        master = tmp_path / "master.key"
        runner("init", "-K", str(master))
        runner.key_file = str(master)
        yield runner, proxy


@pytest.fixture(params=["s3", "sftp"])
def faulty(request, tmp_path: Path) -> Iterator[tuple[object, FaultProxy]]:
    with through_proxy(request, tmp_path, request.param) as both:
        yield both


def sprinkled(proxy: FaultProxy, mount: bool = False) -> Schedule:
    if proxy.mode == "ssh":
        return SSH_SPRINKLED
    return S3_FIRST_THREE if mount else S3_SPRINKLED


def down(proxy: FaultProxy) -> Schedule:
    return S3_DOWN if proxy.mode == "http" else SSH_DOWN


def phase(proxy: FaultProxy, schedule: Schedule) -> int:
    """Start a phase under schedule; returns the fault count so far."""
    proxy.set_schedule(schedule)
    proxy.cut_all()  # connections kept from before start under the new schedule too
    return proxy.count()


def test_sprinkled_faults_are_ridden_out_by_save_restore_and_the_mount(faulty, tmp_path: Path) -> None:
    rekkord, proxy = faulty
    source = make_tree(tmp_path / "src")
    inside = str(source).lstrip("/")

    before = phase(proxy, sprinkled(proxy))
    snapshot = rekkord.save("docs", str(source))
    assert proxy.count() > before, f"save met no fault: {proxy.summary()}"
    print("save", proxy.summary())

    before = phase(proxy, sprinkled(proxy))
    rekkord("restore", snapshot, str(tmp_path / "out"))
    assert proxy.count() > before, f"restore met no fault: {proxy.summary()}"
    print("restore", proxy.summary())
    assert rsync_differences(source, tmp_path / "out" / inside) == "", proxy.summary()

    phase(proxy, HEALTHY)
    with mounted(rekkord, tmp_path / "mnt") as mnt:
        before = phase(proxy, sprinkled(proxy, mount=True))
        copy = tmp_path / "copy"
        subprocess.run(["cp", "-a", f"{mnt / 'ids' / snapshot / inside}/.", str(copy)], check=True)
        assert proxy.count() > before, f"the mount met no fault: {proxy.summary()}"
        print("mount", proxy.summary())
    assert rsync_differences(source, copy) == "", proxy.summary()

    phase(proxy, HEALTHY)
    rekkord("check", "--read-data")
    # every kind of fault was met at least once
    kinds = ("500", "503", "reset-mid-body") if proxy.mode == "http" else SSH_KINDS
    assert all(proxy.count(kind) for kind in kinds), proxy.summary()
    print(proxy.summary())


def start_save(runner, source: Path, **env: str) -> subprocess.Popen:
    """`rekkord save` in the background, stopped before its second write."""
    argv = [*REKKORD, "-C", runner.config_file, "-K", runner.key_file, "save", "docs", str(source)]
    full_env = {**os.environ, "REKKORD_CACHE_DIR": str(runner.cache_dir), "PYTHONPATH": str(ROOT),
                **runner.env, "REKKORD_TEST_STOP": "storage-put:2", **env}
    full_env.pop("REKKORD_CONFIG_FILE", None)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
    wait_stopped(process.pid, process)
    return process


def assert_gave_up(result: subprocess.CompletedProcess | subprocess.Popen, proxy: FaultProxy) -> str:
    line = assert_one_line_error(result, f"gave up after {BUDGET} s of retries to ")
    if proxy.mode == "http":
        assert "SlowDown" in line, line
    else:
        assert "SFTP server" in line and ("lost connection" in line or "closed the connection" in line), line
    assert result.returncode == 1, line
    return line


def test_a_server_faulting_for_good_ends_the_save_with_one_line(faulty, tmp_path: Path) -> None:
    rekkord, proxy = faulty
    save = start_save(rekkord, make_tree(tmp_path / "src"), REKKORD_RETRY_TIME=BUDGET)
    try:
        phase(proxy, down(proxy))
        os.kill(save.pid, signal.SIGCONT)
        _, err = save.communicate(timeout=60)  # a save retrying past its budget would outlive this
    finally:
        if save.poll() is None:
            save.kill()
            save.wait()
    assert_gave_up(subprocess.CompletedProcess(save.args, save.returncode, "", err), proxy)
    assert proxy.count() > 0, proxy.summary()
    # the faults stop: nothing was published, and what the save left verifies
    phase(proxy, HEALTHY)
    assert '"id"' not in rekkord("snapshots", "-f", "json").stdout
    rekkord("check", "--read-data")


def test_a_server_faulting_for_good_ends_restore_mount_and_reads_with_one_line(faulty, tmp_path: Path) -> None:
    rekkord, proxy = faulty
    source = make_tree(tmp_path / "src")
    inside = str(source).lstrip("/")
    snapshot = rekkord.save("docs", str(source))

    rekkord.env["REKKORD_RETRY_TIME"] = BUDGET
    phase(proxy, down(proxy))
    result = rekkord("restore", snapshot, str(tmp_path / "out"), check=False, timeout=60)
    assert_gave_up(result, proxy)
    assert proxy.count() > 0, proxy.summary()
    # so does mounting: one line, nothing left mounted
    (tmp_path / "mnt").mkdir()
    result = rekkord("mount", str(tmp_path / "mnt"), check=False, timeout=60)
    assert_gave_up(result, proxy)
    assert not is_mounted(tmp_path / "mnt") and not mount_processes(tmp_path / "mnt")

    phase(proxy, HEALTHY)
    with mounted(rekkord, tmp_path / "mnt") as mnt:
        before = phase(proxy, down(proxy))
        failed = subprocess.run(["cp", "-a", f"{mnt / 'ids' / snapshot / inside}/.", str(tmp_path / "lost")],
                                capture_output=True, text=True, timeout=120)
        assert failed.returncode != 0 and "Input/output error" in failed.stderr, failed.stderr
        assert proxy.count() > before, proxy.summary()
        log = "".join(p.read_text() for p in Path(rekkord.cache_dir).glob("*/mount.log"))
        assert f"gave up after {BUDGET} s of retries to " in log, log[-2000:]
        # the server is back: the same mount reads everything
        phase(proxy, HEALTHY)
        copy = tmp_path / "copy"
        subprocess.run(["cp", "-a", f"{mnt / 'ids' / snapshot / inside}/.", str(copy)], check=True)
    assert rsync_differences(source, copy) == ""
    rekkord("check", "--read-data")


def test_the_first_request_of_a_command_cut_short_is_retried(faulty) -> None:
    """The server was there (the connection was made): a connection lost on
    the very first requests of a command is retried like any other, not taken
    for a wrong address (regression: it failed at once)."""
    rekkord, proxy = faulty
    if proxy.mode == "http":
        # the first two answers (listings) are cut mid-body
        first = Schedule(("reset",), every=1, limit=2, seed=SEED)
    else:
        # the first connection is closed, the second reset, both mid-handshake
        first = Schedule(SSH_KINDS, every=1, limit=2, seed=SEED, cut_bytes=(1500, 1500))
    phase(proxy, first)
    result = rekkord("snapshots", check=False, timeout=60)
    assert proxy.count() == 2, proxy.summary()
    assert result.returncode == 0, result.stderr


def test_an_s3_endpoint_that_does_not_speak_http_fails_at_once(sshd_server, tmp_path: Path) -> None:
    """The other side of the rule above: an S3 URL at a port where another
    service answers (here sshd) is a wrong address, not retried, whatever
    the budget (the timeout is the proof)."""
    config = tmp_path / "rekkord.ini"
    BackendLocation("s3", f"http://127.0.0.1:{sshd_server.port}/{BUCKET}/repo",
                    {"S3": {"AccessKeyID": "k", "SecretKey": "s"}}).config_file(config)
    cache = tmp_path / "cache"
    cache.mkdir()
    runner = backend_runner_class()(cache_dir=cache, config_file=str(config))
    runner.env["REKKORD_RETRY_TIME"] = "3600"
    result = runner("init", "-K", str(tmp_path / "master.key"), check=False, timeout=60)
    assert_one_line_error(result, f"S3 endpoint http://127.0.0.1:{sshd_server.port}")


def test_s3_writes_whose_answer_was_lost_count_as_written(request, tmp_path: Path) -> None:
    """Every other PUT reaches SeaweedFS and its answer is lost (the connection
    reset before it): the retry finds the object there, and must count it as
    written, never as someone else's (a pack believed unwritten would be
    missing from the snapshot's index, or lost to the next prune)."""
    with through_proxy(request, tmp_path, "s3") as (rekkord, proxy):
        source = make_tree(tmp_path / "src")
        phase(proxy, Schedule(("reset",), every=2, only="PUT ", seed=SEED))
        snapshot = rekkord.save("docs", str(source))
        assert proxy.count("reset-before-answer") > 0, proxy.summary()
        phase(proxy, HEALTHY)
        rekkord("check", "--read-data")
        rekkord("restore", snapshot, str(tmp_path / "out"))
        assert rsync_differences(source, tmp_path / "out" / str(source).lstrip("/")) == ""
        print(proxy.summary())


@pytest.mark.parametrize("cut", [4853, 5064, 5275])
def test_sftp_a_connection_closed_while_its_channels_open_is_retried(request, tmp_path: Path, cut: int) -> None:
    """Closed (FIN) after login, while the SFTP channels open: asyncssh says
    ChannelOpenError, which was taken for a final 'SSH error' (regression).
    The offsets are where a sweep of cuts through the handshake found it."""
    with through_proxy(request, tmp_path, "sftp") as (rekkord, proxy):
        phase(proxy, Schedule(("drop",), every=1, limit=1, seed=SEED, cut_bytes=(cut, cut)))
        result = rekkord("snapshots", check=False, timeout=60)
        assert proxy.count("drop") == 1, proxy.summary()
        assert result.returncode == 0, result.stderr


def test_s3_a_connect_retried_resumes_after_its_first_listing(request, tmp_path: Path) -> None:
    """connect() is a listing then the conditional-write probe (PUTs); when
    the probe meets 503s, the retries redo the probe only (regression: each
    retry listed again, so on a server failing some requests every attempt
    needed all of them to pass in a row)."""
    with through_proxy(request, tmp_path, "s3") as (rekkord, proxy):
        phase(proxy, Schedule(("503",), every=1, limit=3, only="PUT ", seed=SEED))
        first = len(proxy.requests)
        rekkord("snapshots")
        assert proxy.count("503") == 3, proxy.summary()
        listings = [r for r in proxy.requests[first:] if r.startswith("GET ") and "max-keys=1&" in r + "&"]
        assert len(listings) == 1, proxy.requests[first:]
