"""Acting at a known point of another process: it stops itself there
(REKKORD_TEST_STOP, see rekkordfs/testhooks.py) and the test waits for that."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def process_state(pid: int) -> str | None:
    """The one-letter state of /proc/PID/stat ('T' when stopped); None once gone
    (or a zombie, which is as good as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state = stat[stat.rindex(")") + 2]
    return None if state in "ZX" else state


def reached_stop(pid: int, process: subprocess.Popen | None = None, timeout: float = 120) -> bool:
    """True once pid has stopped itself; False if it ended first (a stop
    point a short run may never reach)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = process_state(pid)
        if state == "T":
            return True
        if state is None or (process is not None and process.poll() is not None):
            return False
        time.sleep(0.01)
    raise AssertionError(f"process {pid} neither reached its stop point nor ended within {timeout:.0f} s")


def wait_stopped(pid: int, process: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Wait until pid has stopped itself; fail if it ends or never gets there."""
    if not reached_stop(pid, process, timeout):
        out = process.communicate()[1] if process is not None else ""
        raise AssertionError(f"process {pid} ended before its stop point: {out}")
