"""Where repositories live: a local folder now; S3 and SFTP servers plug in here.

A backend hands each tool a Repo (the URL that tool understands, credentials in
its environment, and how to measure the repository's size).  The save/restore
rows take a backend, so the same rows run on every backend (rows.SAVE_RESTORE).
The S3 and SFTP servers come from tests/servers.py, the helpers the test suite
uses: SeaweedFS and an sshd of our own on 127.0.0.1, started once per bench run.
"""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path

from .measure import NotAvailable
from .tools import Repo, S3Place, SFTPPlace, Tool, remove_tree


class Backend:
    name = "local"

    def __init__(self, work: Path) -> None:
        self.work = work

    def start(self) -> None:
        """Starts the server(s) the backend needs (once per bench run)."""

    def stop(self) -> None:
        pass

    def repo(self, tool: Tool, name: str) -> Repo:
        """A fresh, empty location for a repository of TOOL (not initialized)."""
        raise NotImplementedError


class LocalBackend(Backend):
    name = "local"

    def repo(self, tool: Tool, name: str) -> Repo:
        path = self.work / "repos" / tool.slug() / name
        remove_tree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return Repo(name, str(path), path)


class ServerBackend(Backend):
    """A server from tests/servers.py (the helpers the test suite uses), started once per bench run."""

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self._stack: contextlib.ExitStack | None = None
        self.server = None
        self.failed: str | None = None

    def _servers(self):
        try:
            from tests import servers
        except ImportError as exc:
            raise NotAvailable(f"{self.name}: tests/servers.py is not available ({exc})") from exc
        return servers

    def _enter(self, manager) -> object:
        self._stack = contextlib.ExitStack()
        try:
            return self._stack.enter_context(manager)
        except Exception as exc:  # noqa: BLE001 - any start failure makes the rows n/a
            self._stack.close()
            self._stack = None
            raise NotAvailable(f"{self.name} server did not start: {str(exc).splitlines()[0]}") from exc

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None


class S3Backend(ServerBackend):
    """SeaweedFS (`weed mini`) on 127.0.0.1; data in the bench's work folder."""

    name = "s3"
    bucket = "rekkordfs-bench"

    def start(self) -> None:
        servers = self._servers()
        (self.work / "servers").mkdir(parents=True, exist_ok=True)
        self.server = self._enter(servers.seaweedfs(buckets=(self.bucket,), root=self.work / "servers"))

    def repo(self, tool: Tool, name: str) -> Repo:
        if self.server is None:
            raise NotAvailable("s3 server not started")
        s3 = self.server
        prefix = f"{tool.slug()}-{name}-{secrets.token_hex(4)}"
        place = S3Place(s3.endpoint, self.bucket, prefix, s3.access_key, s3.secret_key)
        repo = tool.s3_repo(name, place)
        repo.size = lambda: _s3_size(s3, self.bucket, prefix)
        return repo


def _s3_size(server, bucket: str, prefix: str) -> tuple[int, int]:
    total = 0
    paginator = server.client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/"):
        total += sum(obj["Size"] for obj in page.get("Contents", []))
    return total, total


class SFTPBackend(ServerBackend):
    """OpenSSH sshd on 127.0.0.1 with its own config; key login as its test user."""

    name = "sftp"

    def start(self) -> None:
        servers = self._servers()
        self.server = self._enter(servers.openssh_server())

    def repo(self, tool: Tool, name: str) -> Repo:
        if self.server is None:
            raise NotAvailable("sftp server not started")
        ssh = self.server
        path = ssh.new_dir(f"{tool.slug()}-{name}-{secrets.token_hex(4)}")
        place = SFTPPlace("127.0.0.1", ssh.port, ssh.user, path, ssh.client_key, ssh.fingerprint)
        return tool.sftp_repo(name, place)


def make_backend(kind: str, work: Path) -> Backend:
    return {"local": LocalBackend, "s3": S3Backend, "sftp": SFTPBackend}[kind](work)
