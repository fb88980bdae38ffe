"""One soak iteration: change a source tree, save it, restore it, rsync it into
the mount's staging area and commit it, with at most one kill or storage fault
planned for the save and one for the mount, then verify everything.

A kill (-9) lands at a stop point (REKKORD_TEST_STOP) or after a random delay
while the operation still runs; the operation is then run again and must
succeed. A fault is injected while the operation is stopped at a storage
write; the operation must then succeed (a blip ridden out) or fail with one
line, and succeed once the storage is whole again.

Unlisted records: a kill between a snapshot's record and its tag leaves a
record no tag names. The soak does not forget it: the operation run again
next (the save, or the commit of the remounted daemon) lists it
(Repository.finish_pending) before `check` runs, so `check` must find none,
and the snapshot it lists must equal the source of the killed operation.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.fsutil import rsync_diff, tree_digest
from tests.mounting import is_mounted

from . import trees
from .checks import Expected, Tally, Verifier, inside, one_line_error, survivors_differ
from .faults import Faults
from .procs import (
    Background,
    Runner,
    Watch,
    daemon_pid,
    kill_mount,
    kill_pid,
    leftovers,
    mount,
    resume,
    unmount,
    wait_stopped_or_ended,
    watch,
)

CHANNELS = ("alpha", "beta", "gamma")
RSYNC_GRACE = 60.0  # seconds an rsync cut off by a killed mount may take to notice
SAVE_POINTS = ("storage-put", "storage-put", "snapshot-tag")
MOUNT_KILL_POINTS = ("staging-write", "staging-write", "write-behind", "storage-put", "commit", "commit-publish",
                     "snapshot-tag")


@dataclass
class Plan:
    kind: str  # "none", "kill" or a fault kind
    point: str = ""  # a stop point, or "delay"
    delay: float = 0.0

    @property
    def stop(self) -> str | None:
        return self.point if self.point and self.point != "delay" else None


class Iteration:
    def __init__(self, index: int, rng: random.Random, work: Path, runner: Runner, faults: Faults,
                 verifier: Verifier, tally: Tally, shape: trees.Shape) -> None:
        self.index = index
        self.rng = rng
        self.work = work
        self.runner = runner
        self.faults = faults
        self.verifier = verifier
        self.tally = tally
        self.shape = shape
        self.channel = rng.choice(CHANNELS)
        self.source = work / "src" / self.channel
        self.mnt = work / "mnt"
        self.state = work / "state"
        self.digest = ""
        self.injected = ""  # where a mount fault landed

    # --- planning ------------------------------------------------------------------------

    def plan(self, phase: str) -> Plan:
        """At most one event per phase; the first two iterations of any run cover
        a kill and a fault in each phase, whatever the seed."""
        if self.index < 2:
            kind = ("kill", "fault")[(self.index + (phase == "mount")) % 2]
        else:
            kind = self.rng.choices(["none", "kill", "fault"], weights=[3, 4, 3])[0]
        if kind == "none":
            return Plan("none")
        if kind == "fault":
            return Plan(self.rng.choice(self.faults.kinds), f"storage-put:{self.nth()}")
        if self.rng.random() < 0.2:
            return Plan("kill", "delay", self.rng.uniform(0.0, 1.5))
        point = self.rng.choice(SAVE_POINTS if phase == "save" else MOUNT_KILL_POINTS)
        if point in ("storage-put", "staging-write", "write-behind"):
            point += f":{self.nth()}"
        return Plan("kill", point)

    def nth(self) -> int:
        """Which passage of a stop point: mostly one a small change reaches (a save
        or a commit writes at least a pack of records, its index, the snapshot
        record and its tag), sometimes a later one of a larger change."""
        return self.rng.randint(1, 4) if self.rng.random() < 0.75 else self.rng.randint(5, 16)

    def record(self, phase: str, plan: Plan, outcome: str) -> None:
        self.tally.event(self.index, phase, plan.kind, plan.point, outcome)

    # --- the iteration ---------------------------------------------------------------------

    def run(self) -> None:
        rng = random.Random(self.rng.random())
        if not self.source.exists() or self.rng.random() < 0.15:
            trees.generate(self.source, rng, self.shape)
        else:
            trees.mutate(self.source, rng)
        self.digest = tree_digest(self.source)
        before = set(self.verifier.listed(self.index) or {})
        saved = self.save(self.plan("save"))
        if saved is not None:
            self.verifier.restore_matches(self.index, saved, against=self.source)
        self.mount_phase(self.plan("mount"))
        self.verifier.after_iteration(self.index, before, self.channel, self.source, self.digest, self.rng)
        self.no_leftovers()

    def expect(self, snapshot_id: str, how: str) -> Expected:
        expected = Expected(snapshot_id, self.channel, str(self.source), self.digest, self.index, how)
        self.verifier.expect(expected)
        return expected

    def failed_in_one_line(self, what: str, result: subprocess.CompletedProcess) -> None:
        problem = one_line_error(result)
        if problem is not None:
            self.tally.differ(self.index, f"{what}: {problem}")

    # --- save ------------------------------------------------------------------------------

    def save(self, plan: Plan) -> Expected | None:
        env = {**(self.faults.env(plan.kind) if plan.kind not in ("none", "kill") else {})}
        if plan.stop:
            env["REKKORD_TEST_STOP"] = plan.stop
        operation = self.runner.start("save", self.channel, str(self.source), **env)
        if plan.kind == "none":
            return self.saved(operation.result(), "save")
        if plan.point == "delay":
            result = watch(operation, Watch(kill_after=plan.delay, victim=lambda: operation.pid))
            self.record("save", plan, "landed" if result.returncode < 0 else "missed: the save ended first")
            return self.saved(result, "save") if result.returncode >= 0 else self.save(Plan("none"))
        if not wait_stopped_or_ended(operation):
            self.record("save", plan, "missed: the save ended before the point")
            return self.saved(operation.result(), "save")
        if plan.kind == "kill":
            kill_pid(operation.pid)
            operation.result()
            self.record("save", plan, "landed")
            return self.save(Plan("none"))
        result = self.fault_while_stopped(operation, plan, "save")
        if result.returncode == 0:
            return self.saved(result, "save through a fault")
        self.failed_in_one_line("save on a broken storage", result)
        return self.save(Plan("none"))

    def fault_while_stopped(self, operation: Background, plan: Plan, phase: str) -> subprocess.CompletedProcess:
        injected = self.faults.inject(plan.kind, self.rng)
        resume(operation.pid)
        self.faults.after_resume(plan.kind, self.rng)
        result = operation.result()
        self.faults.repair()
        outcome = "could not be injected" if not injected else "rode it out" if result.returncode == 0 else \
            "failed, then succeeded"
        self.record(phase, plan, outcome)
        return result

    def saved(self, result: subprocess.CompletedProcess, how: str) -> Expected | None:
        if result.returncode != 0:
            self.tally.differ(self.index, f"save failed: {result.stderr.strip()[-2000:]}")
            return None
        return self.expect(result.stdout.strip().splitlines()[-1], how)

    # --- mount, rsync, commit -------------------------------------------------------------------

    @property
    def staging(self) -> Path:
        return self.mnt / "staging" / self.channel

    def mount_phase(self, plan: Plan) -> None:
        env = self.faults.env(plan.kind) if plan.kind not in ("none", "kill") else {}
        if env:
            self.runner.extra_env.update(env)  # the daemon lives with the short retry budget
        try:
            result = mount(self.runner, self.mnt, self.state, plan.stop)
        finally:
            for name in env:
                self.runner.extra_env.pop(name, None)
        if result.returncode != 0:
            self.tally.differ(self.index, f"mount failed: {result.stderr.strip()}")
            return
        try:
            self.stage_and_commit(plan)
        finally:
            if is_mounted(self.mnt) and not unmount(self.mnt):
                self.tally.differ(self.index, "the mount did not end after fusermount3 -u")
                kill_mount(self.mnt)

    def watch_plan(self, plan: Plan, delay_target: str, operation: str) -> Watch:
        """How to watch `operation` (rsync or commit) for this plan; a delayed
        kill is meant for one of them (delay_target)."""
        if plan.kind == "none":
            return Watch()
        if plan.point == "delay":
            if operation != delay_target:
                return Watch()
            return Watch(kill_after=plan.delay, victim=lambda: daemon_pid(self.mnt))
        if plan.kind == "kill":
            return Watch(armed=lambda: daemon_pid(self.mnt), on_stop=kill_pid)

        def fault(pid: int) -> None:
            injected = self.faults.inject(plan.kind, self.rng)
            resume(pid)
            self.faults.after_resume(plan.kind, self.rng)
            self.injected = f"injected during {operation}" if injected else "could not be injected"

        return Watch(armed=lambda: daemon_pid(self.mnt), on_stop=fault)

    def stage_and_commit(self, plan: Plan) -> None:
        delay_target = self.rng.choice(["rsync", "commit"])
        target = inside(self.staging, str(self.source))
        os.makedirs(target, exist_ok=True)
        rsync = Background.start(["rsync", "-aHAX", "--delete", f"{self.source}/", f"{target}/"], None,
                                 self.work / "logs", "rsync")
        plan_watch = self.watch_plan(plan, delay_target, "rsync")
        plan_watch.grace = RSYNC_GRACE if plan.kind == "kill" else None
        rsynced = watch(rsync, plan_watch)
        if plan_watch.fired and plan.kind == "kill":
            ended = "killed: it hung once the mount was gone" if plan_watch.hung else f"exit {rsynced.returncode}"
            self.record("mount", plan, f"landed during rsync (rsync {ended})")
            return self.after_daemon_killed()
        self.faults.repair()
        if rsynced.returncode != 0:
            self.tally.differ(self.index, f"rsync into staging failed: {rsynced.stderr.strip()[-2000:]}")
            return
        commit_watch = plan_watch if plan_watch.fired else self.watch_plan(plan, delay_target, "commit")
        committed = watch(self.runner.start("commit", "-f", "json", str(self.staging)), commit_watch)
        if commit_watch.fired and plan.kind == "kill":
            self.record("mount", plan, f"landed during commit (commit exit {committed.returncode})")
            if committed.returncode != 0:
                self.failed_in_one_line("commit whose mount was killed", committed)
            return self.after_daemon_killed()
        self.faults.repair()
        fired = bool(plan_watch.fired or commit_watch.fired)
        if not fired and plan.kind != "none":
            self.record("mount", plan, "missed: rsync and commit ended before the point")
        elif fired and plan.kind not in ("none", "kill"):
            ended = "the commit rode it out" if committed.returncode == 0 else "the commit failed, then succeeded"
            self.record("mount", plan, f"{self.injected}; {ended}")
        if committed.returncode != 0:
            if plan.kind in ("none", "kill") or not fired:
                self.tally.differ(self.index, f"commit failed without a fault: {committed.stderr.strip()}")
            else:
                self.failed_in_one_line("commit on a broken storage", committed)
            committed = self.runner.run("commit", "-f", "json", str(self.staging))
        self.committed(committed)

    def committed(self, result: subprocess.CompletedProcess) -> None:
        if result.returncode != 0:
            self.tally.differ(self.index, f"commit failed: {result.stderr.strip()[-2000:]}")
            return
        expected = self.expect(json.loads(result.stdout)["id"], "commit")
        self.verifier.mounted_matches(self.index, expected, self.mnt, self.source)
        diff = rsync_diff(self.source, inside(self.staging, str(self.source)))
        if diff:  # after a commit, staging shows the committed tree
            self.tally.differ(self.index, f"staging after the commit differs from its source:\n{diff[:3000]}")

    def after_daemon_killed(self) -> None:
        """The daemon died mid-way: nothing left, then mount again and finish the job."""
        if not kill_mount(self.mnt):
            self.tally.differ(self.index, "a killed mount left its mount point or a process")
        self.no_leftovers()
        result = mount(self.runner, self.mnt, self.state)
        if result.returncode != 0:
            self.tally.differ(self.index, f"mount after a kill failed: {result.stderr.strip()}")
            return
        lost = survivors_differ(self.source, inside(self.staging, str(self.source)))
        if lost:
            self.tally.differ(self.index, f"files rsync finished before the kill changed: {lost[:10]}")
        self.stage_and_commit(Plan("none"))

    def no_leftovers(self) -> None:
        if is_mounted(self.mnt):
            self.tally.differ(self.index, f"{self.mnt} is still mounted")
        found = leftovers(self.work, exclude=set())
        if found:
            self.tally.differ(self.index, "processes left: " + "; ".join(found))
            for line in found:
                kill_pid(int(line.split(":")[0]))


def clear_generation(work: Path) -> None:
    """A new repository: staged state and sources of the old one go too."""
    for name in ("state", "src", "cache", "scratch"):
        shutil.rmtree(work / name, ignore_errors=True)
