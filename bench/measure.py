"""Running commands with wall time and peak RSS; sizes of folders; FUSE helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MB = 1_000_000
GNU_TIME = "/usr/bin/time"  # Debian package time (scripts/bench installs it)


class ToolFailure(Exception):
    """A tool command failed: the row is reported as FAIL with this message."""


class NotAvailable(Exception):
    """The tool cannot do this (yet): the row is reported as n/a."""


@dataclass
class Run:
    argv: list[str]
    seconds: float
    rss: int  # bytes: peak resident set of the largest process of the tree
    cpu: float  # user + system seconds of the process tree
    rc: int
    stdout: str
    stderr: str

    def check(self, what: str) -> Run:
        if self.rc != 0:
            tail = (self.stderr.strip() or self.stdout.strip()).splitlines()[-3:]
            raise ToolFailure(f"{what} failed (exit {self.rc}): {' | '.join(tail)}")
        return self


def run(argv: list[str] | str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 3600) -> Run:
    """Runs a command to completion; wall time from spawn to reap, CPU from wait4,
    peak RSS from GNU time run in between.

    wait4's ru_maxrss would include this process's own peak: a child forked
    from the bench copies its memory map, and exec records that map's high-water
    mark. GNU time is small, so what it forks starts from nothing; its %M is the
    peak of the largest process of the command's tree, as wait4 gives it.
    """
    command = ["sh", "-c", argv] if isinstance(argv, str) else list(argv)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as peak:
        started = time.perf_counter()
        proc = subprocess.Popen([GNU_TIME, "-q", "-f", "%M", "-o", peak.name, *command],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=env, cwd=cwd, start_new_session=True)
        timer = threading.Timer(timeout, _kill_group, (proc.pid,))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        kib = peak.read().strip().splitlines()
        return Run([argv] if isinstance(argv, str) else list(argv), seconds, int(kib[-1]) * 1024 if kib else 0,
                   usage.ru_utime + usage.ru_stime, proc.returncode,
                   out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def loadavg() -> float:
    """1-minute load average: the bench shares the machine with whatever else runs."""
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError):
        return -1.0


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes on disk, apparent bytes) of a folder, like `du -s` and `du -sb`."""
    disk = apparent = 0
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(path):
        for name in files + dirs:
            st = os.lstat(os.path.join(folder, name))
            if st.st_nlink > 1 and not os.path.isdir(os.path.join(folder, name)):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            disk += st.st_blocks * 512
            apparent += st.st_size
    return disk, apparent


def tree_figures(path: Path) -> tuple[int, int]:
    """(regular files, bytes of regular files) under PATH."""
    count = total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if os.path.isfile(os.path.join(folder, name)) and not os.path.islink(os.path.join(folder, name)):
                count += 1
                total += st.st_size
    return count, total


def warm(path: Path) -> int:
    """Reads every file under PATH once, so timed runs start with a warm page cache."""
    total = 0
    buf = bytearray(1 << 20)
    paths = [path] if path.is_file() else (Path(d) / f for d, _, fs in os.walk(path) for f in fs)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


# --- mounts ------------------------------------------------------------------------

def is_mount(path: Path) -> bool:
    target = os.path.realpath(path).encode()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            if line.split()[4].replace(b"\\040", b" ") == target:
                return True
    return False


def unmount(path: Path) -> None:
    for argv in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if not is_mount(path):
            return
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(predicate, timeout: float, interval: float = 0.002, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(interval)
    return False


def exists(path: Path) -> bool:
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def reset_peak_rss(pid: int) -> None:
    """Resets VmHWM of PID (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def proc_cpu(pid: int | None) -> float | None:
    """User + system seconds PID has used so far."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def find_pids(*needles: str) -> list[int]:
    """PIDs whose command line contains every needle (used to find a daemonized mount)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(n in cmdline for n in needles):
            found.append(int(entry))
    return found


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] not in ("Z", "X")
    except OSError:
        return False
