"""Helpers to mount with the real `rekkord mount` and unmount cleanly."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def is_mounted(mnt: Path) -> bool:
    target = os.path.realpath(mnt)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def mount_processes(mnt: Path) -> list[str]:
    result = subprocess.run(["pgrep", "-af", f"mount.* {mnt}$"], capture_output=True, text=True)
    return [line for line in result.stdout.splitlines() if "pgrep" not in line]


def unmount(mnt: Path, timeout: float = 20) -> None:
    """fusermount3 -u, then wait until the daemon is gone; assert it is."""
    subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_mounted(mnt) and not mount_processes(mnt):
            return
        time.sleep(0.05)
    raise AssertionError(f"{mnt} still mounted or its process still alive: {mount_processes(mnt)}")


@contextmanager
def mounted(rekkord, mnt: Path, *args: str) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    rekkord("mount", *args, str(mnt))
    assert is_mounted(mnt), "rekkord mount returned before the mount was usable"
    try:
        yield mnt
    finally:
        unmount(mnt)
