"""What the soak asserts, and what it counts: every snapshot it expects, each
verified against its source; failures in one line; a clean `check --read-data`;
no mount or process left behind. Differences are collected, never raised: the
soak reports them all at the end and exits non-zero."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.fsutil import rsync_diff, tree_digest

from .procs import Runner


@dataclass
class Expected:
    """A snapshot the repository must keep, and what it must hold."""

    id: str
    channel: str
    source: str  # the source folder (stored under its absolute path)
    digest: str  # tree_digest() of the source when it was taken
    iteration: int
    how: str  # save, commit, or which interrupted operation published it


@dataclass
class Tally:
    iterations: int = 0
    events: list[dict] = field(default_factory=list)  # every kill and fault, planned and what became of it
    differences: list[str] = field(default_factory=list)
    verified: int = 0  # snapshots compared with their source (each time counted)

    def event(self, iteration: int, phase: str, kind: str, point: str, outcome: str) -> None:
        self.events.append({"iteration": iteration, "phase": phase, "kind": kind, "point": point,
                            "outcome": outcome})
        print(f"soak:   {phase}: {kind} at {point}: {outcome}", flush=True)

    def differ(self, iteration: int, text: str) -> None:
        line = f"iteration {iteration}: {text}"
        self.differences.append(line)
        print(f"soak: DIFFERENCE {line}", flush=True)

    def summary(self, backend: str, seed: int, seconds: float) -> str:
        kills = [e for e in self.events if e["kind"] == "kill"]
        faults = [e for e in self.events if e["kind"] != "kill"]
        lines = [f"soak: {self.iterations} iterations on {backend} (seed {seed}) in {seconds / 60:.1f} min",
                 f"  snapshots verified against their source: {self.verified}",
                 f"  kills: {len(kills)} planned; " + _count(kills),
                 f"  faults: {len(faults)} planned; " + _count(faults),
                 f"  differences: {len(self.differences)}"]
        lines += [f"    {line}" for line in self.differences]
        return "\n".join(lines)

    def write(self, path: Path, backend: str, seed: int) -> None:
        path.write_text(json.dumps({"backend": backend, "seed": seed, "iterations": self.iterations,
                                    "verified": self.verified, "events": self.events,
                                    "differences": self.differences}, indent=1))


def _count(events: list[dict]) -> str:
    outcomes = Counter(f"{e['phase']} {e['kind']} at {e['point'].split(':')[0]}: {e['outcome']}" for e in events)
    return "; ".join(f"{text} x{count}" for text, count in sorted(outcomes.items())) or "none"


def one_line_error(result: subprocess.CompletedProcess) -> str | None:
    """None when a failed command said why in one line 'rekkord: error: ...'."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if "Traceback" in result.stderr or len(lines) != 1 or not lines[0].startswith("rekkord: error: "):
        return f"exit {result.returncode} without one error line: {result.stderr.strip()[-2000:]!r}"
    return None


def survivors_differ(source: Path, staged: Path) -> list[str]:
    """After a kill of the mount mid-rsync, and a new mount: every file in
    staging that rsync had finished (renamed into place with the source's size
    and mtime) must hold the source's content; nothing written is lost."""
    problems = []
    staged_b, source_b = os.fsencode(staged), os.fsencode(source)
    for folder, _, names in os.walk(staged_b):
        for name in names:
            path = folder + b"/" + name
            rel = path[len(staged_b):]
            try:
                here, there = os.lstat(path), os.lstat(source_b + rel)
            except OSError:
                continue  # not in the source (any more): rsync --delete will see to it
            if not (stat.S_ISREG(here.st_mode) and stat.S_ISREG(there.st_mode)):
                continue
            if (here.st_size, here.st_mtime_ns) != (there.st_size, there.st_mtime_ns):
                continue  # not finished (or not started) by rsync
            if _digest(path) != _digest(source_b + rel):
                problems.append(rel.decode(errors="backslashreplace"))
    return problems


def _digest(path: bytes) -> bytes:
    digest = hashlib.blake2b()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()


def inside(root: Path, source: str) -> Path:
    """Where a saved source folder is found inside a restored or mounted snapshot."""
    return root / source.lstrip("/")


class Verifier:
    def __init__(self, runner: Runner, scratch: Path, tally: Tally) -> None:
        self.runner = runner
        self.scratch = scratch
        self.tally = tally
        self.expected: dict[str, Expected] = {}

    def listed(self, iteration: int) -> dict[str, str] | None:
        """Snapshot ID -> channel, as `snapshots` lists them."""
        result = self.runner.run("snapshots", "-f", "json")
        if result.returncode != 0:
            self.tally.differ(iteration, f"snapshots failed: {result.stderr.strip()}")
            return None
        document = json.loads(result.stdout)
        items = document["snapshots"] if isinstance(document, dict) else document
        return {item["id"]: item["channel"] for item in items}

    def restore_matches(self, iteration: int, expected: Expected, against: Path | None = None) -> bool:
        """Restore the snapshot's source folder; compare with the source (rsync)
        or, for an older one whose source has changed since, with its digest."""
        dest = self.scratch / f"restore-{expected.id[:12]}"
        shutil.rmtree(dest, ignore_errors=True)
        result = self.runner.run("restore", f"{expected.id}:{expected.source}", str(dest))
        try:
            if result.returncode != 0:
                self.tally.differ(iteration, f"restore of {expected.id} ({expected.how}, iteration "
                                             f"{expected.iteration}) failed: {result.stderr.strip()}")
                return False
            if against is not None:
                diff = rsync_diff(against, dest)
                if diff:
                    self.tally.differ(iteration, f"snapshot {expected.id} ({expected.how}) differs from its "
                                                 f"source:\n{diff[:3000]}")
                    return False
            elif tree_digest(dest) != expected.digest:
                self.tally.differ(iteration, f"snapshot {expected.id} ({expected.how}, iteration "
                                             f"{expected.iteration}) no longer restores its source")
                return False
            self.tally.verified += 1
            return True
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    def mounted_matches(self, iteration: int, expected: Expected, mnt: Path, source: Path) -> bool:
        diff = rsync_diff(source, inside(mnt / "ids" / expected.id, expected.source))
        if diff:
            self.tally.differ(iteration, f"snapshot {expected.id} ({expected.how}) through the mount differs "
                                         f"from its source:\n{diff[:3000]}")
            return False
        self.tally.verified += 1
        return True

    def expect(self, expected: Expected) -> None:
        self.expected[expected.id] = expected

    def after_iteration(self, iteration: int, before: set[str], channel: str, source: Path, digest: str,
                        rng: random.Random) -> None:
        """Nothing lost; whatever interrupted operations published is exact;
        the repository checks clean; one older snapshot still restores."""
        listed = self.listed(iteration)
        if listed is None:
            return
        for snapshot_id, expected in self.expected.items():
            if snapshot_id not in listed:
                self.tally.differ(iteration, f"snapshot {snapshot_id} ({expected.how}, iteration "
                                             f"{expected.iteration}) is no longer listed")
        for snapshot_id in sorted(set(listed) - set(self.expected) - before):
            # published by an operation of this iteration that was killed or failed
            # after its record (the next writer listed it): it must be this source
            found = Expected(snapshot_id, listed[snapshot_id], str(source), digest, iteration,
                             "published by an interrupted operation")
            if found.channel != channel:
                self.tally.differ(iteration, f"unexpected snapshot {snapshot_id} in channel {found.channel}")
                continue
            if self.restore_matches(iteration, found, against=source):
                self.expect(found)
        for snapshot_id in sorted(set(listed) & before - set(self.expected)):
            self.tally.differ(iteration, f"snapshot {snapshot_id} is listed but was never expected")
        checked = self.runner.run("check", "--read-data", "-q")
        if checked.returncode != 0:
            self.tally.differ(iteration, f"check --read-data: {(checked.stdout + checked.stderr).strip()[-3000:]}")
        older = [e for e in self.expected.values() if e.iteration < iteration]
        if older:
            self.restore_matches(iteration, rng.choice(older))

    def verify_all(self, iteration: int) -> None:
        for expected in list(self.expected.values()):
            self.restore_matches(iteration, expected)
