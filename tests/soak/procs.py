"""Processes of the soak: the rekkord CLI, rsync, mounts; stop points and kills.

An operation runs in the background while the soak watches two things: the
operation itself, and the process armed with a stop point (REKKORD_TEST_STOP,
see rekkordfs/testhooks.py), which may be the operation (save) or the mount
daemon serving it (rsync, commit). When the armed process stops itself, the
soak acts at that known point (kill it, or break the storage) while the
operation is provably still running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.mounting import is_mounted, mount_processes
from tests.stops import process_state

ROOT = Path(__file__).resolve().parent.parent.parent
PYTHON_CLI = ["-m", "rekkordfs.cli.main"]
OPERATION_TIMEOUT = 900.0  # seconds: only a hang gets there


class Hang(RuntimeError):
    """An operation did not end within OPERATION_TIMEOUT."""


@dataclass
class Runner:
    """The rekkord CLI with this soak's cache folder and repository options."""

    python: str
    cache: Path
    options: list[str]  # -R/-K, or -C/-K
    logs: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "REKKORD_CACHE_DIR": str(self.cache), "PYTHONPATH": str(ROOT), **self.extra_env,
               **extra}
        for name in ("REKKORD_CONFIG_FILE", "REKKORD_TEST_STOP"):
            if name not in extra:
                env.pop(name, None)
        return env

    def argv(self, *args: str) -> list[str]:
        return [self.python, *PYTHON_CLI, *self.options, *args]

    def run(self, *args: str, timeout: float = OPERATION_TIMEOUT, **env: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(self.argv(*args), capture_output=True, text=True, env=self.env(**env),
                                  timeout=timeout, cwd=str(ROOT))
        except subprocess.TimeoutExpired:
            raise Hang(f"rekkord {' '.join(args)} did not end within {timeout:.0f} s") from None

    def start(self, *args: str, **env: str) -> Background:
        return Background.start(self.argv(*args), self.env(**env), self.logs, f"rekkord-{args[0]}")


@dataclass
class Background:
    """A process whose output goes to files (no pipe to fill up and block it)."""

    process: subprocess.Popen
    out: Path
    err: Path

    @classmethod
    def start(cls, argv: list[str], env: dict[str, str] | None, logs: Path, label: str) -> Background:
        """In a session of its own: kill() ends what it forked too (rsync forks twice)."""
        logs.mkdir(parents=True, exist_ok=True)
        stamp = f"{label}-{time.monotonic_ns()}"
        out, err = logs / f"{stamp}.out", logs / f"{stamp}.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            process = subprocess.Popen(argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env,
                                       cwd=str(ROOT), start_new_session=True)
        return cls(process, out, err)

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def result(self) -> subprocess.CompletedProcess:
        code = self.process.wait()
        self._reap_session()
        stdout = self.out.read_text(errors="replace")
        stderr = self.err.read_text(errors="replace")
        self.out.unlink(missing_ok=True)
        self.err.unlink(missing_ok=True)
        return subprocess.CompletedProcess(self.process.args, code, stdout, stderr)

    def _reap_session(self, grace: float = 30.0) -> None:
        """What the process forked may outlive it briefly (rsync's two helpers):
        wait for them, and end them if they linger."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        self.kill()

    def kill(self) -> None:
        """SIGKILL to its session (its process group): the process and its children."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


@dataclass
class Watch:
    """What to do while an operation runs (see watch())."""

    armed: Callable[[], int | None] = lambda: None  # pid of the process armed with a stop point
    on_stop: Callable[[int], None] | None = None  # called once when it stops itself
    kill_after: float | None = None  # or: kill `victim` this long after the start, if still running
    victim: Callable[[], int | None] = lambda: None
    # rsync, cut off by a dead mount, sometimes waits forever on its own
    # processes (rsync 3.x); its command is killed this long after the event
    grace: float | None = None
    fired: str | None = None  # what happened, for the record
    fired_at: float | None = None
    hung: bool = False  # the operation outlived the grace and was killed


def watch(operation: Background, plan: Watch, timeout: float = OPERATION_TIMEOUT) -> subprocess.CompletedProcess:
    """Wait for the operation; act on the armed process when it stops itself, or
    kill the victim after a delay if the operation is still running then."""
    started = time.monotonic()
    while operation.running():
        now = time.monotonic()
        if now - started > timeout:
            operation.kill()
            raise Hang(f"{operation.process.args[-3:]} did not end within {timeout:.0f} s")
        if plan.fired is None:
            pid = plan.armed()
            if pid is not None and plan.on_stop is not None and process_state(pid) == "T":
                plan.fired, plan.fired_at = "stop point", now
                plan.on_stop(pid)
            elif plan.kill_after is not None and now - started >= plan.kill_after:
                victim = plan.victim()
                if victim is not None and operation.running():
                    plan.fired, plan.fired_at = f"killed {plan.kill_after:.2f} s into the operation", now
                    kill_pid(victim)
        elif plan.grace is not None and plan.fired_at is not None and now - plan.fired_at > plan.grace:
            plan.hung = True
            operation.kill()
        time.sleep(0.02)
    return operation.result()


def wait_stopped_or_ended(process: Background, timeout: float = OPERATION_TIMEOUT) -> bool:
    """True once the process stopped itself at its stop point, False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.running():
            return False
        if process_state(process.pid) == "T":
            return True
        time.sleep(0.02)
    process.kill()
    raise Hang(f"{process.process.args[-3:]} neither stopped nor ended within {timeout:.0f} s")


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


# --- mounts ------------------------------------------------------------------------------


def daemon_pid(mnt: Path) -> int | None:
    found = mount_processes(mnt)
    return int(found[0].split()[0]) if found else None


def mount(runner: Runner, mnt: Path, state: Path, stop: str | None = None) -> subprocess.CompletedProcess:
    mnt.mkdir(parents=True, exist_ok=True)
    env = {"REKKORD_TEST_STOP": stop} if stop else {}
    return runner.run("mount", "--state-dir", str(state), str(mnt), **env)


def wait_gone(mnt: Path, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_mounted(mnt) and not mount_processes(mnt):
            return True
        time.sleep(0.05)
    return False


def unmount(mnt: Path) -> bool:
    """A clean unmount (the daemon finishes what it does); True when all is gone."""
    pid = daemon_pid(mnt)
    if pid is not None and process_state(pid) == "T":
        resume(pid)  # stopped at a point nobody reached in time: let it go on
    subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    return wait_gone(mnt)


def kill_mount(mnt: Path) -> bool:
    """kill -9 of the daemon, then a lazy unmount of what it left."""
    for line in mount_processes(mnt):
        kill_pid(int(line.split()[0]))
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    return wait_gone(mnt)


def leftovers(work: Path, exclude: set[int]) -> list[str]:
    """Processes (other than ours and those excluded) whose command line names the work folder."""
    mine = {os.getpid(), os.getppid(), *exclude}
    needle = os.fsencode(work)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and process_state(int(entry)) is not None:
            text = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry}: {text[:200]}")
    return found
