"""Where repositories live: a local folder now; S3 and SFTP servers plug in here.

A backend hands each tool a Repo (the URL that tool understands, credentials in
its environment, and the folder whose size is the repository size).  The
save/restore rows take a backend, so the same rows run on every backend
(see rows.remote_rows).
"""

from __future__ import annotations

from pathlib import Path

from .measure import NotAvailable
from .tools import Repo, Tool, remove_tree


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
        path = self.work / "repos" / tool.name / name
        remove_tree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if tool.name == "rekkordfs":
            pass  # rekkord init creates the folder
        return Repo(name, str(path), path)


class ServerBackend(Backend):
    """S3 (SeaweedFS) and SFTP (sshd) repositories, from the test-server helpers.

    Hook: these need tests/servers.py (started servers with their URLs and
    credentials).  Until it exists every row on these backends reports n/a.
    """

    def __init__(self, work: Path, kind: str) -> None:
        super().__init__(work)
        self.name = kind
        self.server = None

    def start(self) -> None:
        try:
            import tests.servers  # noqa: F401
        except ImportError as exc:
            raise NotAvailable(f"{self.name}: tests/servers.py is not available ({exc})") from exc
        raise NotAvailable(f"{self.name}: server rows are not wired to tests/servers.py yet")

    def repo(self, tool: Tool, name: str) -> Repo:
        raise NotAvailable(f"{self.name} backend not started")


def make_backend(kind: str, work: Path) -> Backend:
    if kind == "local":
        return LocalBackend(work)
    return ServerBackend(work, kind)
