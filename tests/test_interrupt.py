"""Ctrl-C at any moment: one line, exit 130, never a traceback, and the
repository still checks clean afterwards.

Two ways to pick the moment:

- at named points of rekkord's start (the import of a module, the call of a
  function), where the process sends SIGINT to itself: deterministic, and it
  covers imports and argument parsing, which take only milliseconds;
- by the clock: a command is started through the installed `rekkord` script
  (what a user runs) and sent SIGINT at 20 moments spread over a second,
  counted from when rekkord's first Ctrl-C handler is in place: the process
  says so through a pipe (tests/ready_hook/sitecustomize.py). Counting CPU
  time instead failed on loaded machines, where CPython's own start took
  longer than the threshold and the signal landed before rekkord ran.

Every run must end in one of these ways:

- "rekkord: interrupted" as the only line on stderr, exit status 130;
- the command finished before the signal came, with its normal output
  (exit 0), or the signal came while Python was exiting and ended it without
  a word (killed by SIGINT, as a shell shows: status 130).

A signal in the first few milliseconds of a process, while CPython itself
starts and before any code of rekkord runs, is out of rekkord's reach
(docs/operations.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT, Rekkord

MOMENTS = [i / 19 for i in range(20)]  # 0 to 1 s after the process started rekkord's own work
READY_HOOK = Path(__file__).parent / "ready_hook"
SCRIPT = str(Path(sys.executable).parent / "rekkord")


def _big_tree(root: Path) -> Path:
    """Enough work that a save or restore takes about a second."""
    rng = __import__("random").Random(7)
    for d in range(30):
        folder = root / f"d{d:02d}"
        folder.mkdir(parents=True)
        for f in range(60):
            (folder / f"f{f:03d}.txt").write_bytes(rng.randbytes(rng.randrange(100, 6000)))
    for i in range(6):
        (root / f"big{i}.bin").write_bytes(rng.randbytes(3 << 20))
    return root


def _interrupt_at(rekkord: Rekkord, args: list[str], moment: float, stdout: int = subprocess.PIPE,
                  extra_env: dict[str, str] | None = None,
                  before_signal: Callable[[int], None] | None = None) -> subprocess.CompletedProcess:
    """Run rekkord and send it SIGINT `moment` seconds after its Ctrl-C handler
    is in place; before_signal(pid) runs just before the signal."""
    argv = [SCRIPT, "-R", str(rekkord.repository), "-K", str(rekkord.key_file), *args]
    ready_read, ready_write = os.pipe()
    env = {**os.environ, "REKKORD_CACHE_DIR": str(rekkord.cache_dir), **(extra_env or {}),
           "PYTHONPATH": f"{READY_HOOK}:{ROOT}", "REKKORD_TEST_READY_FD": str(ready_write)}
    env.pop("REKKORD_CONFIG_FILE", None)
    try:
        process = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env,
                                   cwd=str(rekkord.cache_dir.parent), pass_fds=(ready_write,))
    finally:
        os.close(ready_write)
    try:
        with os.fdopen(ready_read, "rb") as ready:
            assert ready.read(1) == b"!", "rekkord ended before installing its Ctrl-C handler"
        time.sleep(moment)
        if before_signal is not None:
            before_signal(process.pid)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def _outcome(result: subprocess.CompletedProcess, moment: float) -> str:
    """'interrupted' or 'finished'; fails on anything else."""
    where = f"SIGINT at {moment:.3f} s: exit {result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr and "Fatal Python error" not in result.stderr, where
    if result.returncode == 130:
        assert result.stderr.splitlines() == ["rekkord: interrupted"], where
        return "interrupted"
    if result.returncode == -signal.SIGINT:  # while Python was exiting, after the command's work
        assert result.stderr == "", where
        return "finished"
    assert result.returncode == 0, where
    return "finished"


def _interrupt_everywhere(rekkord: Rekkord, args: list[str], after_each=None,  # noqa: ANN001
                          stdout: int = subprocess.PIPE) -> list[str]:
    outcomes = []
    for moment in MOMENTS:
        outcomes.append(_outcome(_interrupt_at(rekkord, args, moment, stdout), moment))
        if after_each is not None:
            after_each()
    # the test is worth something only if most signals landed while rekkord ran
    assert outcomes.count("interrupted") >= len(MOMENTS) // 3, outcomes
    return outcomes


@pytest.fixture
def big_repo(local_repo: Rekkord, tmp_path: Path) -> tuple[Rekkord, Path]:
    return local_repo, _big_tree(tmp_path / "src")


def test_ctrl_c_during_save(big_repo: tuple[Rekkord, Path], tmp_path: Path) -> None:
    rekkord, src = big_repo
    _interrupt_everywhere(rekkord, ["save", "big", str(src)])
    assert "No problems found" in rekkord("check").stdout
    snapshot = rekkord.save("big", str(src))  # an interrupted save leaves nothing in the way
    rekkord("restore", f"{snapshot}:{src}", str(tmp_path / "out"))
    diff = subprocess.run(["rsync", "-aHAXnci", "--delete", f"{src}/", f"{tmp_path / 'out'}/"],
                          capture_output=True, text=True, check=True).stdout
    assert diff == ""
    assert "No problems found" in rekkord("check", "--read-data").stdout


def test_ctrl_c_during_restore(big_repo: tuple[Rekkord, Path], tmp_path: Path) -> None:
    rekkord, src = big_repo
    snapshot = rekkord.save("big", str(src))
    dest = tmp_path / "dest"

    def fresh_destination() -> None:
        subprocess.run(["rm", "-rf", str(dest)], check=True)

    workers: list[list[int]] = []  # the restore workers running at each signal

    def note_workers(pid: int) -> None:
        workers.append(_restore_workers_of(pid))

    outcomes = []
    for moment in MOMENTS:
        result = _interrupt_at(rekkord, ["restore", f"{snapshot}:{src}", str(dest)], moment,
                               before_signal=note_workers)
        outcomes.append(_outcome(result, moment))
        left = [pid for pid in workers[-1] if _running(pid)]
        assert not left, f"SIGINT at {moment:.3f} s left restore workers {left} running"
        fresh_destination()
    assert outcomes.count("interrupted") >= len(MOMENTS) // 3, outcomes
    if (os.cpu_count() or 1) >= 2:  # the restore has workers (started before it connects): a signal met them
        assert any(workers), workers  # (on a loaded machine, as few as 3 of 20 did)
    assert "No problems found" in rekkord("check").stdout


def _restore_workers_of(parent: int) -> list[int]:
    found = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            is_worker = b"rekkordfs.restoreworker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if is_worker and any(line.split() == ["PPid:", str(parent)] for line in status.splitlines()):
            found.append(pid)
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's end may be reaped late)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not any(line.split()[:2] == ["State:", "Z"] for line in status.splitlines())


def test_ctrl_c_during_dump(big_repo: tuple[Rekkord, Path]) -> None:
    """The tar stream is written by worker threads that pull chunks from the
    event loop: a cancelled loop must end them too."""
    rekkord, src = big_repo
    snapshot = rekkord.save("big", str(src))
    _interrupt_everywhere(rekkord, ["dump", f"{snapshot}:{src}"], stdout=subprocess.DEVNULL)
    assert "No problems found" in rekkord("check").stdout


def test_ctrl_c_during_snapshots(big_repo: tuple[Rekkord, Path]) -> None:
    rekkord, src = big_repo
    snapshot = rekkord.save("big", str(src))
    moments = [0.01 * i for i in range(20)]  # it takes a fraction of a second
    outcomes = [_outcome(_interrupt_at(rekkord, ["snapshots", "-f", "json"], moment), moment) for moment in moments]
    assert "interrupted" in outcomes, outcomes
    assert snapshot in rekkord("snapshots").stdout


# --- at named points of the start -----------------------------------------------------------

# The process imports rekkord's entry module, then sends itself SIGINT when the
# named module is first imported, or the named function first called.
_DRIVER = """
import os, signal, sys
kind, name = sys.argv[1], sys.argv[2]
def fire():
    os.kill(os.getpid(), signal.SIGINT)
if kind == "import":
    class Trigger:
        def find_spec(self, fullname, path=None, target=None):
            if fullname == name:
                sys.meta_path.remove(self)
                fire()
            return None
    sys.meta_path.insert(0, Trigger())
else:
    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_name == name:
            sys.setprofile(None)
            fire()
    sys.setprofile(profile)
from rekkordfs.cli.main import main
sys.exit(main(sys.argv[3:]))
"""

START_POINTS = [
    ("import", "rekkordfs.cli.parser"),  # the first thing main() does
    ("import", "argparse"),
    ("call", "build_parser"),
    ("call", "parse_args"),
    ("call", "_handler"),  # about to import the command's modules
    ("import", "trio"),
    ("import", "rekkordfs.repository"),
    ("call", "make_config"),
    ("call", "load_config"),
    ("call", "load_keyfile"),
    ("call", "connect"),  # Repository.connect, inside trio.run
    ("call", "list_snapshots"),
    ("call", "print_table"),  # printing the result
]


@pytest.mark.parametrize("kind, name", START_POINTS, ids=[f"{k}-{n}" for k, n in START_POINTS])
def test_ctrl_c_at_each_point_of_the_start(local_repo: Rekkord, kind: str, name: str) -> None:
    argv = [sys.executable, "-c", _DRIVER, kind, name, "-R", str(local_repo.repository),
            "-K", str(local_repo.key_file), "snapshots"]
    env = {**os.environ, "REKKORD_CACHE_DIR": str(local_repo.cache_dir), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 130, result.stderr
    assert result.stderr.splitlines() == ["rekkord: interrupted"]
