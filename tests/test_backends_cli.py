"""The whole CLI on local, S3 (SeaweedFS) and SFTP (sshd) repositories, and the
failures users meet with remote ones: a server going away mid-save, wrong
secrets, wrong bucket, unreachable hosts, a changed host key."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import secrets
import select
import signal
import subprocess
import termios
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import REKKORD, ROOT, Rekkord
from tests.servers import (
    BUCKET,
    OpenSSHServer,
    SeaweedFS,
    backend_runner_class,
    free_ports,
    openssh_server,
    seaweedfs,
    write_config,
)
from tests.stops import wait_stopped


def make_tree(root: Path) -> Path:
    """A small tree with the usual shapes: nested folders, empty and larger files, a symlink."""
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "docs" / "readme.txt").write_text("hello\n" * 100)
    (root / "docs" / "deep" / "er" / "data.bin").write_bytes(os.urandom(3 << 20))
    (root / "docs" / "deep" / "same.bin").write_bytes(b"\x00" * 700_000)
    (root / "empty").write_bytes(b"")
    (root / "empty-dir").mkdir()
    (root / "link").symlink_to("docs/readme.txt")
    os.chmod(root / "docs" / "readme.txt", 0o640)
    return root


def assert_same_tree(src: Path, dest: Path) -> None:
    diff = subprocess.run(["rsync", "-aHAXnci", "--delete", f"{src}/", f"{dest}/"],
                          capture_output=True, text=True, check=True).stdout
    assert diff == "", diff


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error of a failed command: non-zero exit, one line, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("rekkord: error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def runner_for(tmp_path: Path, url: str, sections: dict[str, dict[str, str]], name: str = "cfg"):
    """A Rekkord runner with its own cache and a config file (-C) for url."""
    cache = tmp_path / f"cache-{name}"
    cache.mkdir(exist_ok=True)
    config = write_config(tmp_path / f"{name}.ini", url, sections)
    return backend_runner_class()(cache_dir=cache, config_file=str(config))


# --- the same end-to-end run on every backend ------------------------------------------


def test_cli_end_to_end(backend_repo, tmp_path: Path) -> None:
    rekkord = backend_repo
    src = make_tree(tmp_path / "src")
    first = rekkord.save("laptop", str(src))

    keys = tmp_path / "keys"
    keys.mkdir()
    for kind in ("ReadWrite", "WriteOnly", "LogOnly"):
        rekkord("derive", "-t", kind, "-O", str(keys / f"{kind}.key"))

    (src / "docs" / "new.txt").write_text("added later\n")
    second = rekkord.save("laptop", str(src), key=str(keys / "WriteOnly.key"))
    other = rekkord.save("server", str(src / "docs"))

    listed = json.loads(rekkord("snapshots", "-f", "json", key=str(keys / "LogOnly.key")).stdout)
    assert [s["id"] for s in listed if s["channel"] == "laptop"] == [first, second]
    assert {s["channel"] for s in listed} == {"laptop", "server"}
    assert all(s["size"] > 3 << 20 for s in listed)
    channels = json.loads(rekkord("channels", "-f", "json").stdout)
    assert {c["channel"]: c["latest"] for c in channels} == {"laptop": second, "server": other}

    out = tmp_path / "restored"
    rekkord("restore", f"laptop:{src}", str(out), key=str(keys / "ReadWrite.key"))
    assert_same_tree(src, out)
    old = tmp_path / "restored-first"
    rekkord("restore", f"{first}:{src}", str(old))
    assert not (old / "docs" / "new.txt").exists()
    assert (old / "docs" / "deep" / "er" / "data.bin").read_bytes() == (
        src / "docs" / "deep" / "er" / "data.bin").read_bytes()

    refused = rekkord("restore", "laptop", str(tmp_path / "nope"), key=str(keys / "WriteOnly.key"), check=False)
    assert "WriteOnly" in one_line_error(refused)

    checked = rekkord("check", "--read-data")
    assert "No problems found" in checked.stdout
    assert "Checked 3 snapshots" in checked.stdout


def test_init_refuses_an_existing_repository(backend_repo, tmp_path: Path) -> None:
    again = backend_repo("init", "-K", str(tmp_path / "second.key"), check=False)
    assert "already exists" in one_line_error(again) or "not empty" in one_line_error(again)


# --- server outage in the middle of a save ---------------------------------------------


def _popen(runner: Rekkord, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    argv = list(REKKORD) + ["-C", runner.config_file]  # type: ignore[attr-defined]
    if runner.key_file:
        argv += ["-K", runner.key_file]
    env = {**os.environ, "REKKORD_CACHE_DIR": str(runner.cache_dir), "PYTHONPATH": str(ROOT), **runner.env,
           **(extra_env or {})}
    env.pop("REKKORD_CONFIG_FILE", None)
    return subprocess.Popen(argv + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=str(runner.cache_dir.parent))


def _big_source(root: Path, files: int = 48, size: int = 2 << 20) -> Path:
    root.mkdir()
    for i in range(files):
        (root / f"f{i:02d}").write_bytes(os.urandom(size))
    return root


def _save_through_outage(runner, src: Path, count_tags: Callable[[], int], stop: Callable[[], None]) -> str:
    """Start a save, which stops itself at its third write (packs are arriving),
    stop the server, let the save go on and fail once a short retry budget is
    spent."""
    process = _popen(runner, "save", "big", str(src),
                     extra_env={"REKKORD_RETRY_TIME": "2", "REKKORD_TEST_STOP": "storage-put:3"})
    try:
        wait_stopped(process.pid, process)  # frozen mid-save: the outage happens now
        assert count_tags() == 0, "the save finished before the outage"
        stop()
        process.send_signal(signal.SIGCONT)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    error = one_line_error(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    assert "gave up after 2 s of retries to " in error
    return error


def test_s3_server_stopped_mid_save(tmp_path: Path) -> None:
    src = _big_source(tmp_path / "src")
    with seaweedfs(buckets=(BUCKET,)) as server:
        prefix = f"outage-{secrets.token_hex(4)}"
        runner = runner_for(tmp_path, server.url(BUCKET, prefix), server.config_sections())
        runner("init", "-K", str(tmp_path / "master.key"))
        runner.key_file = str(tmp_path / "master.key")

        error = _save_through_outage(runner, src, lambda: server.count(BUCKET, f"{prefix}/tags/"), server.stop)
        # the last attempt met the closed port, or a pooled connection the server's exit cut
        assert f"S3 endpoint {server.endpoint}" in error
        assert "connection refused" in error or "lost connection" in error

        server.start()
        runner("check")
        snapshot = runner.save("big", str(src))
        assert "No problems found" in runner("check", "--read-data").stdout
        runner("restore", f"{snapshot}:{src}", str(tmp_path / "out"))
        assert_same_tree(src, tmp_path / "out")


def test_sftp_server_stopped_mid_save(tmp_path: Path) -> None:
    src = _big_source(tmp_path / "src")
    with openssh_server() as server:
        repo = server.new_dir("outage")
        runner = runner_for(tmp_path, server.url(repo), server.config_sections())
        runner("init", "-K", str(tmp_path / "master.key"))
        runner.key_file = str(tmp_path / "master.key")

        def count(folder: str) -> int:
            return sum(len(files) for _, _, files in os.walk(repo / folder))

        error = _save_through_outage(runner, src, lambda: count("tags"), server.stop)
        assert f"SFTP server 127.0.0.1:{server.port}" in error
        assert "connection refused" in error or "lost connection" in error

        server.start()
        runner("check")
        snapshot = runner.save("big", str(src))
        assert "No problems found" in runner("check", "--read-data").stdout
        runner("restore", f"{snapshot}:{src}", str(tmp_path / "out"))
        assert_same_tree(src, tmp_path / "out")


# --- one-line errors for the usual mistakes ----------------------------------------------


def test_s3_wrong_secret(seaweedfs_server: SeaweedFS, tmp_path: Path) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    runner = runner_for(tmp_path, seaweedfs_server.url(BUCKET, "x"),
                        {"S3": {"KeyID": seaweedfs_server.access_key, "SecretKey": wrong}})
    result = runner("init", "-K", str(tmp_path / "k"), check=False)
    error = one_line_error(result)
    assert "secret key" in error and seaweedfs_server.access_key in error
    assert wrong not in result.stdout + result.stderr
    assert not (tmp_path / "k").exists()  # no key for a repository that was not created


def test_s3_unknown_key_id(seaweedfs_server: SeaweedFS, tmp_path: Path) -> None:
    runner = runner_for(tmp_path, seaweedfs_server.url(BUCKET, "x"), {"S3": {"KeyID": "nobody", "SecretKey": "s"}})
    assert "does not know the access key ID 'nobody'" in one_line_error(runner("init", check=False))


def test_s3_wrong_bucket(seaweedfs_server: SeaweedFS, tmp_path: Path) -> None:
    runner = runner_for(tmp_path, seaweedfs_server.url("no-such-bucket", "x"), seaweedfs_server.config_sections())
    error = one_line_error(runner("init", "-K", str(tmp_path / "k"), check=False))
    assert "bucket 'no-such-bucket' does not exist" in error


def test_s3_unreachable_host(seaweedfs_server: SeaweedFS, tmp_path: Path) -> None:
    port = free_ports(1)[0]
    runner = runner_for(tmp_path, f"http://127.0.0.1:{port}/{BUCKET}", seaweedfs_server.config_sections())
    error = one_line_error(runner("init", "-K", str(tmp_path / "k"), check=False))
    assert f"cannot connect to S3 endpoint http://127.0.0.1:{port}: connection refused" in error
    unknown = runner_for(tmp_path, f"http://no-such-host.invalid:8333/{BUCKET}", seaweedfs_server.config_sections(),
                         name="dns")
    assert "cannot resolve the host name" in one_line_error(unknown("init", "-K", str(tmp_path / "k"), check=False))


def test_s3_missing_secret_without_terminal(seaweedfs_server: SeaweedFS, tmp_path: Path) -> None:
    runner = runner_for(tmp_path, seaweedfs_server.url(BUCKET, "x"), {"S3": {"KeyID": seaweedfs_server.access_key}})
    error = one_line_error(runner("init", "-K", str(tmp_path / "k"), check=False, input=""))
    assert "secret key" in error and "no terminal" in error


def test_sftp_wrong_password(sshd_server: OpenSSHServer, tmp_path: Path) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    runner = runner_for(tmp_path, sshd_server.url(sshd_server.new_dir()),
                        {"SFTP": {"Password": wrong, "Fingerprint": sshd_server.fingerprint}})
    result = runner("init", "-K", str(tmp_path / "k"), check=False)
    error = one_line_error(result)
    assert f"refused login as '{sshd_server.user}': wrong password" in error
    assert wrong not in result.stdout + result.stderr


def test_sftp_unreachable_host(sshd_server: OpenSSHServer, tmp_path: Path) -> None:
    port = free_ports(1)[0]
    runner = runner_for(tmp_path, f"sftp://{sshd_server.user}@127.0.0.1:{port}/tmp/x",
                        sshd_server.config_sections())
    error = one_line_error(runner("init", "-K", str(tmp_path / "k"), check=False))
    assert f"cannot connect to SFTP server 127.0.0.1:{port}: connection refused" in error


def test_sftp_password_login_and_port_setting(sshd_server: OpenSSHServer, tmp_path: Path) -> None:
    """Password login, scp-like URL (no port) with the port from [SFTP] Port."""
    repo = sshd_server.new_dir()
    sections = sshd_server.config_sections(password=True)
    sections["SFTP"]["Port"] = str(sshd_server.port)
    runner = runner_for(tmp_path, f"{sshd_server.user}@127.0.0.1:{repo}", sections)
    runner("init", "-K", str(tmp_path / "master.key"))
    runner.key_file = str(tmp_path / "master.key")
    src = make_tree(tmp_path / "src")
    snapshot = runner.save("pw", str(src))
    runner("restore", f"{snapshot}:{src}", str(tmp_path / "out"))
    assert_same_tree(src, tmp_path / "out")


def test_sftp_changed_host_key(tmp_path: Path) -> None:
    with openssh_server() as server:
        runner = runner_for(tmp_path, server.url(server.new_dir()), server.config_sections())
        runner("init", "-K", str(tmp_path / "master.key"))
        runner.key_file = str(tmp_path / "master.key")
        pinned = server.fingerprint
        server.stop()
        actual = server.rotate_host_key()
        server.start()
        error = one_line_error(runner("snapshots", check=False))
        assert "does not match the pinned fingerprint" in error
        assert f"expected {pinned}, got {actual}" in error


def test_sftp_known_hosts(sshd_server: OpenSSHServer, tmp_path: Path) -> None:
    """Without a pinned fingerprint: refused when unknown (showing the fingerprint),
    accepted once in ~/.ssh/known_hosts, refused when known_hosts has another key."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    runner = runner_for(tmp_path, sshd_server.url(sshd_server.new_dir()),
                        {"SFTP": {"KeyFile": str(sshd_server.client_key)}})
    runner.env["HOME"] = str(home)

    error = one_line_error(runner("init", "-K", str(tmp_path / "k"), check=False, input=""))
    assert "unknown" in error and f"Fingerprint = {sshd_server.fingerprint}" in error

    (home / ".ssh" / "known_hosts").write_text(sshd_server.known_hosts_line())
    runner("init", "-K", str(tmp_path / "master.key"))

    other = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")],
                           check=True)
    assert other.returncode == 0
    key = (tmp_path / "other.pub").read_text().split()
    (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{sshd_server.port} {key[0]} {key[1]}\n")
    changed = one_line_error(runner("snapshots", "-K", str(tmp_path / "master.key"), check=False))
    assert "CHANGED" in changed and sshd_server.fingerprint in changed


# --- terminals: prompts for what is missing ---------------------------------------------


def _run_on_terminal(runner, args: list[str], answers: list[tuple[bytes, bytes]],
                     timeout: float = 60) -> tuple[int, str]:
    """Run rekkord with a pseudo-terminal as its controlling terminal; answer prompts."""
    master, slave = pty.openpty()
    env = {**os.environ, "REKKORD_CACHE_DIR": str(runner.cache_dir), "PYTHONPATH": str(ROOT), **runner.env}
    env.pop("REKKORD_CONFIG_FILE", None)

    def make_controlling() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen(list(REKKORD) + ["-C", runner.config_file] + args, stdin=slave, stdout=slave,
                               stderr=slave, env=env, cwd=str(runner.cache_dir.parent), preexec_fn=make_controlling)
    os.close(slave)
    output = b""
    pending = list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break  # the child closed the terminal
                if not chunk:
                    break
                output += chunk
            if pending and pending[0][0] in output:
                os.write(master, pending.pop(0)[1])
            if process.poll() is not None and not ready:
                break
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    return process.returncode, output.decode(errors="replace")


def test_s3_secret_prompted_on_a_terminal(seaweedfs_server: SeaweedFS, tmp_path: Path) -> None:
    runner = runner_for(tmp_path, seaweedfs_server.url(BUCKET, f"prompt-{secrets.token_hex(4)}"),
                        {"S3": {"KeyID": seaweedfs_server.access_key}})
    code, output = _run_on_terminal(runner, ["init", "-K", str(tmp_path / "master.key")],
                                    [(b"S3 secret key", seaweedfs_server.secret_key.encode() + b"\n")])
    assert code == 0, output
    assert "Repository created" in output
    assert seaweedfs_server.secret_key not in output  # not echoed


def test_sftp_unknown_host_accepted_on_a_terminal(sshd_server: OpenSSHServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    runner = runner_for(tmp_path, sshd_server.url(sshd_server.new_dir()),
                        {"SFTP": {"KeyFile": str(sshd_server.client_key)}})
    runner.env["HOME"] = str(home)
    code, output = _run_on_terminal(runner, ["init", "-K", str(tmp_path / "master.key")],
                                    [(b"(yes/no)?", b"yes\n")])
    assert code == 0, output
    assert sshd_server.fingerprint in output
    remembered = (home / ".ssh" / "known_hosts").read_text()
    assert f"[127.0.0.1]:{sshd_server.port} ssh-ed25519 " in remembered
    runner.key_file = str(tmp_path / "master.key")
    runner("snapshots")  # no prompt any more: the key is known


def test_sftp_password_prompted_on_a_terminal(sshd_server: OpenSSHServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    runner = runner_for(tmp_path, sshd_server.url(sshd_server.new_dir()),
                        {"SFTP": {"Fingerprint": sshd_server.fingerprint}})
    runner.env["HOME"] = str(home)  # no default keys to try
    code, output = _run_on_terminal(runner, ["init", "-K", str(tmp_path / "master.key")],
                                    [(b"password", sshd_server.password.encode() + b"\n")])
    assert code == 0, output
    assert sshd_server.password not in output


# --- secrets stay secret -------------------------------------------------------------------


def test_secrets_never_shown(seaweedfs_server: SeaweedFS, sshd_server: OpenSSHServer, tmp_path: Path) -> None:
    """Neither in output nor errors nor the process command line (ps), for secrets
    from the config file or from the environment."""
    src = _big_source(tmp_path / "src", files=4, size=1 << 20)
    s3 = runner_for(tmp_path, seaweedfs_server.url(BUCKET, f"secret-{secrets.token_hex(4)}"),
                    {"S3": {"KeyID": seaweedfs_server.access_key}}, name="s3")
    s3.env["AWS_SECRET_ACCESS_KEY"] = seaweedfs_server.secret_key
    sftp = runner_for(tmp_path, sshd_server.url(sshd_server.new_dir()), sshd_server.config_sections(password=True),
                      name="sftp")
    for runner, secret in ((s3, seaweedfs_server.secret_key), (sftp, sshd_server.password)):
        runner("init", "-K", str(tmp_path / f"{runner.config_file}.key"))
        runner.key_file = str(tmp_path / f"{runner.config_file}.key")
        process = _popen(runner, "save", "c", str(src))
        seen = ""
        while process.poll() is None:
            seen += subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
            time.sleep(0.05)
        stdout, stderr = process.communicate()
        assert process.returncode == 0, stderr
        assert str(src) in seen or "rekkordfs.cli.main" in seen  # ps did see the command
        for text in (seen, stdout, stderr, runner("snapshots").stdout, runner("check").stdout):
            assert secret not in text
        bad = runner("snapshots", "-K", str(tmp_path / "nope.key"), check=False)
        assert secret not in bad.stdout + bad.stderr
