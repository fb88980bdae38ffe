"""A restore's fetch process (rekkordfs/fetchprocs.py, fetchworker.py): from a
real SFTP server (sshd), the tree it restores is the source's; what it fetches
is checked like what the main process fetches (a pack altered on the server
is refused, a missing one named); one that cannot connect leaves the restore
to the main process; one that dies fails the restore with one line.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from rekkordfs import fetchprocs
from rekkordfs import keys as keymod
from rekkordfs import restore as restoremod
from rekkordfs.codec import pack_key
from rekkordfs.config import Config, load_config
from rekkordfs.errors import CorruptedData, ObjectMissing
from rekkordfs.repository import Repository, walk_path
from rekkordfs.restore import RestoreOptions, RestoreSession
from rekkordfs.save import SaveSession
from rekkordfs.storage import open_storage
from rekkordfs.workerprocs import WorkerFailed
from tests.fsutil import rsync_diff
from tests.servers import OpenSSHServer, new_location
from tests.test_save_processes import small_tree


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REKKORD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(restoremod, "REMOTE_BATCH_FILES", 64)  # many requests from a small tree


def saved(tmp_path: Path, server: OpenSSHServer, master: keymod.Keyset, files: int = 600) -> tuple[Config, Path, str]:
    src = small_tree(tmp_path / "src", files)
    (src / "large").write_bytes(os.urandom(3 << 20))  # chunk windows, beside the small files' batches
    location = new_location("sftp", tmp_path, ssh=server)
    config = load_config(str(location.config_file(tmp_path / "rekkord.ini")), threads=2)

    async def main() -> str:
        storage = open_storage(config)
        await Repository.create(storage, master)
        repo = await Repository.open(storage, master)
        try:
            return (await SaveSession(repo, "t", [str(src)], warn=lambda _m: None, processes=0).run()).snapshot_id
        finally:
            await repo.aclose()

    return config, src, trio.run(main)


async def restore(config: Config, keys: keymod.Keyset, snapshot: str, src: Path, dest: Path,
                  fetch_config: Config | None = None) -> fetchprocs.FetchPool:
    """Restore src's folder once the fetch process (on fetch_config, if given)
    is ready or gave up; the process."""
    async with fetchprocs.fetch_process(fetch_config or config) as fetcher, \
            Repository.connect(config, keys) as repo:
        assert fetcher is not None
        with trio.fail_after(60):
            while not fetcher.ready and not (fetcher.workers and fetcher.workers[0].process.returncode is not None):
                await trio.sleep(0.05)
        snap = await repo.load_snapshot(await repo.resolve(snapshot))
        target, has_metadata = await walk_path(repo, snap, str(src))
        session = RestoreSession(repo, target, str(dest), RestoreOptions(), lambda _m: None,
                                 has_metadata=has_metadata, fetcher=fetcher)
        with trio.fail_after(120):  # never a hang
            await session.run()
        return fetcher


def test_the_fetch_process_restores_the_tree(tmp_path: Path, sshd_server: OpenSSHServer) -> None:
    master = keymod.new_master()
    config, src, snapshot = saved(tmp_path, sshd_server, master)
    fetcher = trio.run(restore, config, master, snapshot, src, tmp_path / "out")
    assert fetcher._requests > 5  # every batch and window went through it
    assert rsync_diff(src, tmp_path / "out") == ""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    assert not [p for p in pids if _is_fetcher(p)]  # it ended with the restore


def test_no_fetch_process_for_s3_local_or_one_cpu(tmp_path: Path) -> None:
    async def made(url: str, threads: int) -> bool:
        (tmp_path / "c.ini").write_text(f"[Repository]\nURL = {url}\n[S3]\nAccessKeyID = a\nSecretKey = b\n")
        async with fetchprocs.fetch_process(load_config(str(tmp_path / "c.ini"), threads=threads)) as fetcher:
            return fetcher is not None

    assert not trio.run(made, str(tmp_path / "repo"), 2)
    assert not trio.run(made, "s3://127.0.0.1:9/bucket", 2)
    assert not trio.run(made, "sftp://u@127.0.0.1:9/repo", 1)


def test_an_altered_pack_is_refused_and_a_missing_one_named(tmp_path: Path, sshd_server: OpenSSHServer) -> None:
    master = keymod.new_master()
    config, src, snapshot = saved(tmp_path, sshd_server, master, files=200)
    victim = src / "d00037" / "f00040"
    assert victim.stat().st_size > 0

    async def victim_chunk() -> tuple[str, int]:
        async with Repository.connect(config, master) as repo:
            snap = await repo.load_snapshot(await repo.resolve(snapshot))
            entry, _ = await walk_path(repo, snap, str(victim))
            location = entry.chunks[0].location
            return pack_key(location.pack), location.offset + location.length // 2

    key, at = trio.run(victim_chunk)
    pack = Path(config.require_location().path) / key  # type: ignore[union-attr]
    data = pack.read_bytes()
    pack.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
    with pytest.raises(CorruptedData):
        trio.run(restore, config, master, snapshot, src, tmp_path / "altered")
    assert not (tmp_path / "altered" / victim.relative_to(src)).exists()
    pack.unlink()
    with pytest.raises(ObjectMissing) as missing:
        trio.run(restore, config, master, snapshot, src, tmp_path / "gone")
    assert "missing from the repository" in str(missing.value)


def test_a_fetch_process_that_cannot_connect_leaves_the_restore_to_the_main_process(
        tmp_path: Path, sshd_server: OpenSSHServer) -> None:
    master = keymod.new_master()
    config, src, snapshot = saved(tmp_path, sshd_server, master, files=300)
    ini = tmp_path / "wrong.ini"
    text = (tmp_path / "rekkord.ini").read_text()
    ini.write_text(text.replace(sshd_server.fingerprint, "SHA256:" + "A" * 43))  # another host's key
    fetcher = trio.run(restore, config, master, snapshot, src, tmp_path / "out", load_config(str(ini), threads=2))
    assert not fetcher.workers[0].ready and fetcher._requests == 0
    assert rsync_diff(src, tmp_path / "out") == ""


def test_a_fetch_process_that_dies_fails_the_restore_with_one_line(
        tmp_path: Path, sshd_server: OpenSSHServer, monkeypatch: pytest.MonkeyPatch) -> None:
    master = keymod.new_master()
    config, src, snapshot = saved(tmp_path, sshd_server, master)
    real = fetchprocs.FetchPool.get_ranges
    killed: list[int] = []

    async def kill_first(pool: fetchprocs.FetchPool, ranges: list[tuple[str, int, int]]) -> list[bytes]:
        got = await real(pool, ranges)
        if not killed:  # once its first request is answered: mid-way through the restore
            killed.append(pool.workers[0].process.pid)
            os.kill(killed[0], signal.SIGKILL)
        return got

    monkeypatch.setattr(fetchprocs.FetchPool, "get_ranges", kill_first)
    with pytest.raises(WorkerFailed) as failed:
        trio.run(restore, config, master, snapshot, src, tmp_path / "out")
    assert str(failed.value) == "a worker process of the restore (fetching) ended unexpectedly (killed by signal 9)"
    with pytest.raises(ProcessLookupError):  # reaped, not left a zombie
        os.kill(killed[0], 0)


def _is_fetcher(pid: int) -> bool:
    try:
        return b"rekkordfs.fetchworker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
