"""Storage faults the soak injects while an operation is stopped at a known point.

Local repositories live on a small tmpfs of their own, so their faults are
real and cheap: the disk fills up (every byte taken by a filler file:
ENOSPC), or it is remounted read-only (EROFS). S3 and SFTP repositories lose
their server: stopped, then started again after a short while (a "blip" the
retries must ride out) or only once the operation has failed (an "outage"
longer than the operation's retry budget, which must end in one line).
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path
from typing import Protocol

from tests.servers import OpenSSHServer, SeaweedFS

OUTAGE_RETRY_TIME = "3"  # seconds of retries given to an operation that meets an outage


class Faults(Protocol):
    kinds: tuple[str, ...]

    def inject(self, kind: str, rng: random.Random) -> bool:
        """Break the storage; False if this fault could not be made now."""

    def after_resume(self, kind: str, rng: random.Random) -> None:
        """Called once the stopped process runs again (a blip ends here)."""

    def repair(self) -> None:
        """Make the storage whole again (idempotent)."""

    def env(self, kind: str) -> dict[str, str]:
        """Environment of the operation that will meet this fault."""


class LocalDisk:
    """The repository's own tmpfs: full, or read-only."""

    kinds = ("enospc", "erofs")

    def __init__(self, folder: Path, size: str) -> None:
        self.folder = folder
        self.size = size
        self.filler = folder / "filler"
        self.read_only = False

    def setup(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs", str(self.folder)],
                       check=True)

    def teardown(self) -> None:
        self.repair()
        subprocess.run(["umount", str(self.folder)], capture_output=True)

    def inject(self, kind: str, rng: random.Random) -> bool:
        if kind == "erofs":
            done = subprocess.run(["mount", "-o", "remount,ro", str(self.folder)], capture_output=True)
            self.read_only = done.returncode == 0  # EBUSY while a file is open for writing
            return self.read_only
        st = os.statvfs(self.folder)
        free = st.f_bavail * st.f_frsize
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, max(free, 1))
        except OSError:
            pass  # whatever it took, the disk is now full (or nearly)
        finally:
            os.close(fd)
        return True

    def after_resume(self, kind: str, rng: random.Random) -> None:
        pass

    def repair(self) -> None:
        if self.read_only:
            subprocess.run(["mount", "-o", "remount,rw", str(self.folder)], check=True)
            self.read_only = False
        self.filler.unlink(missing_ok=True)

    def env(self, kind: str) -> dict[str, str]:
        return {}


class ServerDown:
    """An S3 or SFTP server taken down at the stop point."""

    kinds = ("blip", "outage")

    def __init__(self, server: SeaweedFS | OpenSSHServer) -> None:
        self.server = server
        self.down = False

    def inject(self, kind: str, rng: random.Random) -> bool:
        if isinstance(self.server, SeaweedFS):
            self.server.kill()
        else:
            self.server.stop()  # the listener and every session it serves
        self.down = True
        return True

    def after_resume(self, kind: str, rng: random.Random) -> None:
        if kind == "blip":
            # the operation is retrying meanwhile; how long must not change the outcome
            time.sleep(rng.uniform(0.2, 5.0))
            self.repair()

    def repair(self) -> None:
        if self.down:
            self.server.start()
            self.down = False

    def env(self, kind: str) -> dict[str, str]:
        return {"REKKORD_RETRY_TIME": OUTAGE_RETRY_TIME} if kind == "outage" else {}
