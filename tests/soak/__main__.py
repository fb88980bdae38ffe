"""scripts/soak N [--backend local|s3|sftp] [--seed S]: see tests/soak/loop.py
and docs/testing.md. Prints a summary; exits 1 on any difference."""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.servers import BUCKET, new_location, openssh_server, seaweedfs

from . import trees
from .checks import Tally, Verifier
from .faults import Faults, LocalDisk, ServerDown
from .loop import Iteration, clear_generation
from .procs import Hang, Runner, kill_mount, leftovers


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/soak", description="random trees, kills and storage faults")
    parser.add_argument("iterations", type=int)
    parser.add_argument("--backend", choices=("local", "s3", "sftp"), default="local")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--generation", type=int, default=20,
                        help="iterations per repository before a fresh one (default 20)")
    parser.add_argument("--max-mib", type=int, default=48, help="content of a fresh tree at most (default 48)")
    parser.add_argument("--entries", type=int, default=400, help="entries of a fresh tree at most (default 400)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a new one in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--disk", default="3g", help="size of the tmpfs holding a local repository")
    return parser.parse_args(argv)


@contextlib.contextmanager
def backend(name: str, work: Path, disk: str) -> Iterator[tuple[Faults, Callable[[], list[str]]]]:
    """The faults of the backend, and a function making a fresh repository location
    (returns the options that name it: -R, or -C with a config file)."""
    if name == "local":
        faults = LocalDisk(work / "repo-disk", disk)
        faults.setup()
        counter = iter(range(1 << 30))

        def fresh() -> list[str]:
            path = faults.folder / f"repo-{next(counter)}"
            for old in faults.folder.glob("repo-*"):
                shutil.rmtree(old, ignore_errors=True)
            return ["-R", str(path)]

        try:
            yield faults, fresh
        finally:
            faults.teardown()
        return
    servers = seaweedfs(buckets=(BUCKET,)) if name == "s3" else openssh_server()
    with servers as server:
        down = ServerDown(server)

        def fresh_remote() -> list[str]:
            location = new_location(name, work, s3=server if name == "s3" else None,
                                    ssh=server if name == "sftp" else None)
            return ["-C", str(location.config_file(work / f"rekkord-{name}.ini"))]

        try:
            yield down, fresh_remote
        finally:
            down.repair()


def new_generation(work: Path, options: list[str], tally: Tally) -> tuple[Runner, Verifier]:
    clear_generation(work)
    for name in ("cache", "scratch", "logs"):
        (work / name).mkdir(parents=True, exist_ok=True)
    key = work / "master.key"
    key.unlink(missing_ok=True)
    runner = Runner(sys.executable, work / "cache", [*options, "-K", str(key)], work / "logs")
    result = runner.run("init")
    if result.returncode != 0:
        raise RuntimeError(f"init failed: {result.stderr.strip()}")
    return runner, Verifier(runner, work / "scratch", tally)


def _stop(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    args = parse(argv)
    # `timeout` and service managers stop with SIGTERM: clean up (mounts, tmpfs, servers) and
    # print the summary as for Ctrl-C
    signal.signal(signal.SIGTERM, _stop)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    work = args.work or Path(tempfile.mkdtemp(prefix="rekkord-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"soak: {args.iterations} iterations on {args.backend}, seed {seed}, working in {work}", flush=True)
    rng = random.Random(seed)
    tally = Tally()
    shape = trees.Shape(max_bytes=args.max_mib << 20, max_entries=args.entries)
    started = time.monotonic()
    try:
        with backend(args.backend, work, args.disk) as (faults, fresh):
            runner = verifier = None
            for index in range(args.iterations):
                if runner is None or index % args.generation == 0:
                    if verifier is not None:
                        verifier.verify_all(index - 1)
                    runner, verifier = new_generation(work, fresh(), tally)
                print(f"soak: iteration {index + 1}/{args.iterations} ({(time.monotonic() - started) / 60:.1f} min)",
                      flush=True)
                errors = len(tally.differences)
                try:
                    Iteration(index, rng, work, runner, faults, verifier, tally, shape).run()
                except (Hang, Exception) as exc:  # noqa: BLE001 - recorded as a difference, the soak goes on
                    tally.differ(index, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}")
                    faults.repair()
                    kill_mount(work / "mnt")
                tally.iterations += 1
                if len(tally.differences) > errors:
                    runner = None  # the next iteration starts on a fresh repository
            if verifier is not None and runner is not None:
                verifier.verify_all(args.iterations - 1)
    finally:
        kill_mount(work / "mnt")
        left = leftovers(work, exclude=set())
        if left:
            tally.differ(args.iterations, "processes left at the end: " + "; ".join(left))
        tally.write(work / "report.json", args.backend, seed)
        print(tally.summary(args.backend, seed, time.monotonic() - started), flush=True)
        print(f"soak: report in {work / 'report.json'}", flush=True)
        if not args.keep and not tally.differences:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if tally.differences else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the summary is printed already
        sys.exit(130)
