"""The benchmark rows: each is one timed operation, run the same way for every tool.

A row is a function of a Context (one tool, one run) returning a Result.  Rows
declare the rows they need (`requires`): asking for `--only restore_tree` runs
`save_tree` first, untimed in the report.  Adding a row is adding a decorated
function here; the runner, the table and the JSON pick it up.

Groups:
  local    save and restore on a local repository
  mount    reading through `rekkord mount`, `restic mount`, `borg mount`
  staging  rsync into MNT/staging/C + `rekkord commit` (rekkordfs only; the
           ratio compares it with the peers' plain save of the same data)
  retention a history of 20 snapshots, then forget all but the last 5 and free
           the space (rekkordfs forget --prune, restic forget --prune, borg
           prune + compact)
  s3, sftp the local save/restore (and retention) rows on a SeaweedFS server / an sshd
"""

from __future__ import annotations

import functools
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .backends import Backend
from .data import DataSet
from .measure import (
    NotAvailable,
    Run,
    ToolFailure,
    disk_usage,
    peak_rss,
    proc_cpu,
    reset_peak_rss,
    run,
    tree_figures,
    warm,
)
from .tools import Mount, Repo, Snap, Tool, remove_tree


@dataclass
class Result:
    status: str = "ok"  # ok | n/a | FAIL | skipped
    seconds: float | None = None
    bytes: int | None = None  # logical bytes processed (for MB/s)
    rss: int | None = None  # peak RSS in bytes (of the tool's process; of the mount daemon for mount rows)
    repo_disk: int | None = None  # repository size on disk after the row (du -s)
    repo_apparent: int | None = None  # same, apparent size (du -sb)
    cpu: float | None = None  # user + system seconds of the tool's processes (not of a mount daemon)
    load: float | None = None  # 1-minute load average when the row started
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def mbps(self) -> float | None:
        if self.ok and self.bytes and self.seconds:
            return self.bytes / self.seconds / 1e6
        return None


@dataclass
class Row:
    name: str
    label: str
    func: Callable[[Context], Result]
    requires: tuple[str, ...] = ()
    group: str = "local"
    tools: tuple[str, ...] | None = None  # None: every tool
    uses: tuple[str, ...] = ()  # mounts it needs alive (released when no later row uses them)
    compare_to: str | None = None  # ratio against the peers' figures of this row instead
    backend: str = "local"
    feature: str | None = None  # what the tool must support (Tool.supports), else n/a
    compare_size: bool = False  # the repository size after the row is a result too


ROWS: list[Row] = []


def row(name: str, label: str, **kw) -> Callable:
    def register(func: Callable[[Context], Result]) -> Callable:
        ROWS.append(Row(name, label, func, **kw))
        return func
    return register


def rows_by_name() -> dict[str, Row]:
    return {r.name: r for r in ROWS}


# Restored trees are set aside and removed at the end of the run, not between
# rows: this disk's ext4 has no journal, and then a new inode skips every inode
# of its group freed in the last 60-300 s (fs/ext4/ialloc.c, recently_deleted),
# so a restore right after another tool's restored tree was deleted paid up to
# 5 s more system CPU (kernel time in openat) for the same work. Up to
# SET_ASIDE_FILES files are kept; beyond that trees are removed at once.
SET_ASIDE_FILES = 1_000_000


def set_aside(work: Path, tree: Path, files: int) -> None:
    aside = work / "restored"
    kept = sum(int(p.name.split("-", 1)[0]) for p in aside.iterdir()) if aside.exists() else 0
    if kept + files > SET_ASIDE_FILES:
        remove_tree(tree)
        return
    aside.mkdir(exist_ok=True)
    tree.rename(aside / f"{files}-{secrets.token_hex(4)}")


class Context:
    """State of one tool during one pass over the selected rows."""

    def __init__(self, tool: Tool, ds: DataSet, work: Path, backends: dict[str, Backend], verify: bool) -> None:
        self.tool = tool
        self.ds = ds
        self.work = work
        self.src = work / "src"  # the one source path every tool saves (so re-saves find their caches)
        self.backends = backends
        self.verify = verify
        self.repos: dict[str, Repo] = {}
        self.snaps: dict[str, list[Snap]] = {}
        self.mounts: dict[str, Mount] = {}

    # source tree

    def set_source(self, origin: Path) -> None:
        """Makes work/src hold ORIGIN's content (rsync, so unchanged files keep their inodes)."""
        self.src.mkdir(parents=True, exist_ok=True)
        r = run(["rsync", "-a", "--delete", f"{origin}/", f"{self.src}/"])
        r.check("rsync of the source")
        warm(self.src)
        os.sync()

    # repositories

    def backend(self, name: str) -> Backend:
        backend = self.backends[name]
        if getattr(backend, "failed", None):
            raise NotAvailable(backend.failed)
        return backend

    def fresh_repo(self, key: str, backend: str) -> Repo:
        old = self.mounts.pop(key, None)
        if old:
            old.close()
        repo = self.backend(backend).repo(self.tool, key.replace(":", "-"))
        self.tool.init(repo)
        self.repos[key] = repo
        self.snaps[key] = []
        return repo

    def repo_size(self, repo: Repo) -> tuple[int | None, int | None]:
        if repo.size is not None:
            return repo.size()
        if repo.size_path is None or not repo.size_path.exists():
            return None, None
        return disk_usage(repo.size_path)

    def save(self, key: str, path: Path, channel: str, origin: Path, files: int, size: int) -> Result:
        repo = self.repos[key]
        warm(path)
        os.sync()
        r, ref = self.tool.save(repo, path, channel)
        self.snaps[key].append(Snap(ref, channel, path, files, size, origin))
        disk, apparent = self.repo_size(repo)
        return Result(seconds=r.seconds, bytes=size, rss=r.rss, repo_disk=disk, repo_apparent=apparent,
                      cpu=r.cpu, extra={"snapshot": ref})

    def restore(self, key: str, snap: Snap) -> Result:
        repo = self.repos[key]
        dest = self.work / "restore" / f"{self.tool.slug()}-{key.replace(':', '-')}"
        remove_tree(dest)
        dest.mkdir(parents=True)
        os.sync()
        r, landed = self.tool.restore(repo, snap, dest)
        files, size = tree_figures(landed)
        result = Result(seconds=r.seconds, bytes=snap.bytes, rss=r.rss, cpu=r.cpu, extra={"snapshot": snap.ref})
        if (files, size) != (snap.files, snap.bytes):
            result.status = "FAIL"
            result.note = f"restored {files} files / {size} bytes, expected {snap.files} / {snap.bytes}"
        elif self.verify:
            self.compare(snap.origin, landed, result)
        set_aside(self.work, dest, files)
        return result

    def compare(self, origin: Path, copy: Path, result: Result) -> None:
        r = run(["diff", "-r", "-q", str(origin), str(copy)])
        if r.rc != 0:
            result.status = "FAIL"
            result.note = f"content differs: {(r.stdout or r.stderr).strip().splitlines()[:2]}"

    # mounts

    def mount(self, key: str) -> Mount:
        if key not in self.mounts:
            if not self.snaps.get(key):
                raise ToolFailure(f"nothing saved in {key}")
            mnt = self.work / "mnt" / f"{self.tool.slug()}-{key.replace(':', '-')}"
            self.mounts[key] = self.tool.mount(self.repos[key], mnt, self.snaps[key][-1])
        return self.mounts[key]

    def release(self, keep: set[str]) -> None:
        for key in [k for k in self.mounts if k not in keep]:
            self.mounts.pop(key).close()

    def through_mount(self, key: str, command: str, size: int | None, snap: Snap | None = None) -> Result:
        """Runs a shell COMMAND over the mounted tree ({} is its path); RSS is the daemon's peak meanwhile."""
        m = self.mount(key)
        snap = snap or self.snaps[key][-1]
        path = self.tool.mount_path(m, snap)
        if m.pid:
            reset_peak_rss(m.pid)
        before = proc_cpu(m.pid)
        r = run(command.format(path=_quote(path)))
        r.check(f"{command.split()[0]} through the {self.tool.name} mount")
        after = proc_cpu(m.pid)
        result = Result(seconds=r.seconds, bytes=size, rss=peak_rss(m.pid) if m.pid else None,
                        cpu=after - before if before is not None and after is not None else None,
                        extra={"output": r.stdout.strip()[-200:], "client_cpu": r.cpu})
        return result

    def close(self) -> None:
        self.release(set())


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"


# --- save and restore (per backend) --------------------------------------------------

def _tree_key(backend: str) -> str:
    return f"{backend}:tree"


def _big_key(backend: str) -> str:
    return f"{backend}:big"


def save_tree(ctx: Context, backend: str = "local") -> Result:
    key = _tree_key(backend)
    ctx.fresh_repo(key, backend)
    ctx.set_source(ctx.ds.tree)
    return ctx.save(key, ctx.src, "tree", ctx.ds.tree, ctx.ds.tree_files, ctx.ds.tree_bytes)


def save_unchanged(ctx: Context, backend: str = "local") -> Result:
    last = ctx.snaps[_tree_key(backend)][-1]
    return ctx.save(_tree_key(backend), ctx.src, "tree", last.origin, last.files, last.bytes)


def save_changed(ctx: Context, backend: str = "local") -> Result:
    ctx.set_source(ctx.ds.tree_changed)
    return ctx.save(_tree_key(backend), ctx.src, "tree", ctx.ds.tree_changed, ctx.ds.tree_files,
                    ctx.ds.changed_tree_bytes)


def restore_tree(ctx: Context, backend: str = "local") -> Result:
    return ctx.restore(_tree_key(backend), ctx.snaps[_tree_key(backend)][0])


def save_big(ctx: Context, backend: str = "local") -> Result:
    key = _big_key(backend)
    ctx.fresh_repo(key, backend)
    return ctx.save(key, ctx.ds.big.parent, "big", ctx.ds.big.parent, 1, ctx.ds.big_bytes)


def restore_big(ctx: Context, backend: str = "local") -> Result:
    return ctx.restore(_big_key(backend), ctx.snaps[_big_key(backend)][0])


SAVE_RESTORE = [
    ("save_tree", "first save of the tree", save_tree, ()),
    ("save_unchanged", "re-save, tree unchanged", save_unchanged, ("save_tree",)),
    ("save_changed", "re-save, 1% of files changed", save_changed, ("save_tree",)),
    ("restore_tree", "restore of the tree", restore_tree, ("save_tree",)),
    ("save_big", "first save of the 1 GiB file", save_big, ()),
    ("restore_big", "restore of the 1 GiB file", restore_big, ("save_big",)),
]


def _register_save_restore(backend: str, only: set[str] | None = None) -> None:
    prefix = "" if backend == "local" else f"{backend}_"
    for name, label, func, requires in SAVE_RESTORE:
        if only is not None and name not in only:
            continue
        where = "" if backend == "local" else f" [{backend}]"
        ROWS.append(Row(prefix + name, label + where, functools.partial(func, backend=backend),
                        tuple(prefix + r for r in requires), group=backend, backend=backend))


_register_save_restore("local", {"save_tree", "save_unchanged", "save_changed", "restore_tree"})


# --- mount: the tree -----------------------------------------------------------------

@row("mount_ready", "mount: time to a usable mount", requires=("save_tree",), group="mount", uses=("local:tree",))
def mount_ready(ctx: Context) -> Result:
    m = ctx.mount("local:tree")
    daemon = proc_cpu(m.pid)
    return Result(seconds=m.seconds, rss=peak_rss(m.pid) if m.pid else None,
                  cpu=m.setup_cpu + daemon if daemon is not None else None)


@row("mount_find", "mount: find | wc -l over the tree", requires=("mount_ready",), group="mount",
     uses=("local:tree",))
def mount_find(ctx: Context) -> Result:
    snap = ctx.snaps["local:tree"][-1]
    result = ctx.through_mount("local:tree", "find {path} | wc -l", None)
    expected = snap.files + ctx.ds.tree_dirs
    seen = int(result.extra["output"] or 0)
    if seen != expected:
        result.status, result.note = "FAIL", f"find listed {seen} entries, expected {expected}"
    return result


@row("mount_du", "mount: du -s of the tree", requires=("mount_ready",), group="mount", uses=("local:tree",))
def mount_du(ctx: Context) -> Result:
    return ctx.through_mount("local:tree", "du -s {path}", None)


@row("mount_catall", "mount: cat every file of the tree", requires=("mount_ready",), group="mount",
     uses=("local:tree",))
def mount_catall(ctx: Context) -> Result:
    snap = ctx.snaps["local:tree"][-1]
    result = ctx.through_mount("local:tree", "find {path} -type f -print0 | xargs -0 cat > /dev/null", snap.bytes)
    if ctx.verify:
        ctx.compare(snap.origin, ctx.tool.mount_path(ctx.mount("local:tree"), snap), result)
    return result


# --- save/restore of the 1 GiB file (after the tree's mount rows, so that mount is released) ---

_register_save_restore("local", {"save_big", "restore_big"})


# --- mount: the 1 GiB file -------------------------------------------------------------

def _cat_big(ctx: Context) -> Result:
    snap = ctx.snaps["local:big"][-1]
    return ctx.through_mount("local:big", f"cat {{path}}/{ctx.ds.big.name} > /dev/null", snap.bytes)


@row("mount_cat_big1", "mount: first cat of the 1 GiB file", requires=("save_big",), group="mount",
     uses=("local:big",))
def mount_cat_big1(ctx: Context) -> Result:
    ctx.mount("local:big")  # mounting is not part of this row
    return _cat_big(ctx)


@row("mount_cat_big2", "mount: second cat of the 1 GiB file", requires=("mount_cat_big1",), group="mount",
     uses=("local:big",))
def mount_cat_big2(ctx: Context) -> Result:
    return _cat_big(ctx)


# --- staging (rekkordfs only) ----------------------------------------------------------

def _stage(ctx: Context, origin: Path, channel: str, files: int, size: int, new_channel: bool,
           key: str = "local:staging") -> Result:
    """rsync ORIGIN into MNT/staging/CHANNEL, then `rekkord commit`; both timed.
    The daemon's peak RSS (VmHWM, reset before the rsync) is read before the
    mount goes: it is the figure with every file staged."""
    if key not in ctx.mounts:
        repo = ctx.fresh_repo(key, "local")
        mnt = ctx.work / "mnt" / f"{ctx.tool.slug()}-{key.split(':')[1]}"
        ctx.mounts[key] = _mount_empty(ctx, repo, mnt)
    m = ctx.mounts[key]
    staging = m.mnt / "staging" / channel
    warm(origin)
    os.sync()
    if m.pid:
        reset_peak_rss(m.pid)
    daemon_before = proc_cpu(m.pid)
    runs: list[Run] = []
    if new_channel:
        os.mkdir(staging)
    runs.append(run(["rsync", "-a", "--delete", f"{origin}/", f"{staging}/"]).check("rsync into staging"))
    daemon_mid = proc_cpu(m.pid)
    repo = ctx.repos[key]
    runs.append(run([*ctx.tool.exe, "-R", repo.url, "-K", str(repo.key), "commit", str(staging)],
                    env=ctx.tool.env(repo)).check("rekkord commit"))
    daemon_after = proc_cpu(m.pid)
    seconds = sum(r.seconds for r in runs)
    ref = runs[-1].stdout.strip().splitlines()[-1] if runs[-1].stdout.strip() else "?"
    ctx.snaps.setdefault(key, []).append(Snap(ref, channel, staging, files, size, origin))
    disk, apparent = ctx.repo_size(repo)
    daemon = peak_rss(m.pid) if m.pid else None
    cpu = sum(r.cpu for r in runs)
    extra = {"snapshot": ref, "rsync_seconds": runs[0].seconds, "commit_seconds": runs[1].seconds,
             "daemon_rss": daemon}
    if None not in (daemon_before, daemon_mid, daemon_after):
        cpu += daemon_after - daemon_before
        extra.update(daemon_cpu_rsync=daemon_mid - daemon_before, daemon_cpu_commit=daemon_after - daemon_mid)
    result = Result(seconds=seconds, bytes=size, rss=max([r.rss for r in runs] + [daemon or 0]),
                    repo_disk=disk, repo_apparent=apparent, cpu=cpu, extra=extra)
    if ctx.verify:
        ctx.compare(origin, m.mnt / "channels" / channel / "latest", result)
    return result


def _mount_empty(ctx: Context, repo: Repo, mnt: Path) -> Mount:
    """Mounts a repository that holds no snapshot yet (usable once staging/ exists)."""
    from .measure import exists, find_pids, is_mount, unmount, wait_for

    mnt.mkdir(parents=True, exist_ok=True)
    tool = ctx.tool
    r = run([*tool.exe, "-R", repo.url, "-K", str(repo.key), "mount", str(mnt)], env=tool.env(repo))
    if r.rc != 0:
        unmount(mnt)
        raise NotAvailable(f"rekkord mount failed: {(r.stderr.strip() or f'exit {r.rc}').splitlines()[-1]}")
    # `rekkord mount` returns once the mount is usable: no staging/ then means no staging support
    if not wait_for(lambda: exists(mnt / "staging"), 2 if is_mount(mnt) else 60):
        unmount(mnt)
        raise NotAvailable("rekkord mount has no staging/ yet")
    pids = find_pids("mount", str(mnt))
    return Mount(tool, repo, mnt, r.seconds, max(pids) if pids else None)


@row("staging_tree", "staging: rsync tree in + commit", group="staging", tools=("rekkordfs",),
     uses=("local:staging",), compare_to="save_tree")
def staging_tree(ctx: Context) -> Result:
    return _stage(ctx, ctx.ds.tree, "tree", ctx.ds.tree_files, ctx.ds.tree_bytes, new_channel=True)


@row("staging_changed", "staging: rsync 1% change + commit", requires=("staging_tree",), group="staging",
     tools=("rekkordfs",), uses=("local:staging",), compare_to="save_changed")
def staging_changed(ctx: Context) -> Result:
    return _stage(ctx, ctx.ds.tree_changed, "tree", ctx.ds.tree_files, ctx.ds.changed_tree_bytes, new_channel=False)


@row("staging_big", "staging: rsync 1 GiB file in + commit", group="staging", tools=("rekkordfs",),
     uses=("local:staging",), compare_to="save_big")
def staging_big(ctx: Context) -> Result:
    return _stage(ctx, ctx.ds.big.parent, "big", 1, ctx.ds.big_bytes, new_channel=True)


@row("staging_floor", "floor: rsync tree into a pyfuse3 fs that keeps nothing", group="staging",
     tools=("rekkordfs",), compare_to="save_tree")
def staging_floor(ctx: Context) -> Result:
    """What the FUSE layer alone costs `rsync -a` of the tree (bench/nullfs.py):
    no staging row can be faster than this on the same machine."""
    return _floor(ctx, ctx.ds.tree, ctx.ds.tree_bytes)


def _floor(ctx: Context, origin: Path, size: int) -> Result:
    """rsync -a of ORIGIN into bench/nullfs.py, timed."""
    from .measure import is_mount, unmount, wait_for

    mnt = ctx.work / "mnt" / "nullfs"
    mnt.mkdir(parents=True, exist_ok=True)
    unmount(mnt)
    server = subprocess.Popen([sys.executable, "-m", "bench.nullfs", str(mnt)], cwd=Path(__file__).parent.parent,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if not wait_for(lambda: is_mount(mnt), 30, proc=server):
            raise ToolFailure(f"bench/nullfs.py did not mount: {server.communicate(timeout=5)[1].decode().strip()}")
        warm(origin)
        before = proc_cpu(server.pid)
        r = run(["rsync", "-a", f"{origin}/", f"{mnt}/tree/"]).check("rsync into nullfs")
        after = proc_cpu(server.pid)
    finally:
        unmount(mnt)
        server.wait(timeout=30)
    cpu = r.cpu + (after - before if None not in (before, after) else 0)
    return Result(seconds=r.seconds, bytes=size, rss=r.rss, cpu=cpu,
                  extra={"daemon_cpu": after - before if None not in (before, after) else None})


# --- retention: 20 snapshots, forget all but the last 5, free the space ------------------

HISTORY_KEEP = 5


def _history_key(backend: str) -> str:
    return f"{backend}:history"


def retention_history(ctx: Context, backend: str = "local") -> Result:
    """Saves the data set's history (data.generate_history: 20 versions of the tree, 1% of
    the files changed from one to the next) as 20 snapshots of one channel in a fresh
    repository, each version rsynced to the one source path first. The time is the sum of
    the 20 saves: this row exists for the next one, its time is a by-product."""
    key = _history_key(backend)
    ctx.fresh_repo(key, backend)
    saves = []
    for folder, size in ctx.ds.history:
        ctx.set_source(folder)
        saves.append(ctx.save(key, ctx.src, "history", folder, ctx.ds.tree_files, size))
    return Result(seconds=sum(r.seconds for r in saves), rss=max(r.rss for r in saves),
                  cpu=sum(r.cpu for r in saves), repo_disk=saves[-1].repo_disk,
                  repo_apparent=saves[-1].repo_apparent,
                  extra={"saves": len(saves), "save_seconds": [round(r.seconds, 3) for r in saves]})


def retention_prune(ctx: Context, backend: str = "local") -> Result:
    """Forgets all but the 5 newest of the 20 snapshots and frees what only the others
    used, each tool its own way (Tool.forget_prune): timed as a whole; the repository's
    size after is the other result. Afterwards (untimed) the tool must list exactly 5
    snapshots; with --verify the oldest kept one is restored and compared."""
    key = _history_key(backend)
    repo = ctx.repos[key]
    before = ctx.repo_size(repo)
    os.sync()
    runs = ctx.tool.forget_prune(repo, HISTORY_KEEP)
    disk, apparent = ctx.repo_size(repo)
    result = Result(seconds=sum(r.seconds for r in runs), rss=max(r.rss for r in runs),
                    cpu=sum(r.cpu for r in runs), repo_disk=disk, repo_apparent=apparent,
                    extra={"command_seconds": [round(r.seconds, 3) for r in runs],
                           "repo_disk_before": before[0], "repo_apparent_before": before[1]})
    left = ctx.tool.count_snapshots(repo)
    if left != HISTORY_KEEP:
        result.status, result.note = "FAIL", f"{left} snapshots left, expected {HISTORY_KEEP}"
    elif ctx.verify:
        kept = ctx.restore(key, ctx.snaps[key][-HISTORY_KEEP])
        if not kept.ok:
            result.status, result.note = "FAIL", f"oldest kept snapshot: {kept.note}"
    return result


def _register_retention(backend: str) -> None:
    prefix = "" if backend == "local" else f"{backend}_"
    where = "" if backend == "local" else f" [{backend}]"
    ROWS.append(Row(prefix + "retention_history", "retention: 20 saves, 1% changed each (sum)" + where,
                    functools.partial(retention_history, backend=backend),
                    group="retention" if backend == "local" else backend, backend=backend, feature="retention"))
    ROWS.append(Row(prefix + "retention_prune", "retention: forget all but 5 + prune (rekkordfs: --grace 0)" + where,
                    functools.partial(retention_prune, backend=backend), (prefix + "retention_history",),
                    group="retention" if backend == "local" else backend, backend=backend, feature="retention",
                    compare_size=True))


_register_retention("local")


# --- scale: many small files (--scale [N]; data.generate_scale) ---------------------------
# Every tool saves the data set's folder itself (the same absolute path for all, and
# no change row needs a copy); 100,000 files by default, --scale 10000 for growth.

SCALE_KEY = "local:scale"


def _scale(ctx: Context):
    if ctx.ds.scale is None:
        raise NotAvailable("no scale data set (run with --scale)")
    return ctx.ds.scale


@row("scale_rsync", "scale: rsync -a of the small files into a local folder (floor)", group="scale",
     tools=("rekkordfs",), compare_to="scale_save")
def scale_rsync(ctx: Context) -> Result:
    """What copying the tree costs on this disk, whatever the tool: the floor the
    staging rows of the scale tree are held against."""
    scale = _scale(ctx)
    dest = ctx.work / "rsync-scale"
    remove_tree(dest)
    warm(scale.tree)
    os.sync()
    r = run(["rsync", "-a", f"{scale.tree}/", f"{dest}/"]).check("rsync of the scale tree")
    files, size = tree_figures(dest)
    result = Result(seconds=r.seconds, bytes=scale.bytes, rss=r.rss, cpu=r.cpu)
    if (files, size) != (scale.files, scale.bytes):
        result.status, result.note = "FAIL", f"copied {files} files / {size} bytes"
    set_aside(ctx.work, dest, files)
    os.sync()
    return result


@row("scale_save", "scale: first save of the small files", group="scale")
def scale_save(ctx: Context) -> Result:
    scale = _scale(ctx)
    ctx.fresh_repo(SCALE_KEY, "local")
    return ctx.save(SCALE_KEY, scale.tree, "scale", scale.tree, scale.files, scale.bytes)


@row("scale_unchanged", "scale: re-save, small files unchanged", requires=("scale_save",), group="scale")
def scale_unchanged(ctx: Context) -> Result:
    scale = _scale(ctx)
    return ctx.save(SCALE_KEY, scale.tree, "scale", scale.tree, scale.files, scale.bytes)


@row("scale_restore", "scale: restore of the small files", requires=("scale_save",), group="scale")
def scale_restore(ctx: Context) -> Result:
    return ctx.restore(SCALE_KEY, ctx.snaps[SCALE_KEY][0])


@row("scale_mount_find", "scale: mount, find | wc -l over the small files", requires=("scale_save",),
     group="scale", uses=(SCALE_KEY,))
def scale_mount_find(ctx: Context) -> Result:
    scale = _scale(ctx)
    ctx.mount(SCALE_KEY)  # mounting is not part of this row
    result = ctx.through_mount(SCALE_KEY, "find {path} | wc -l", None)
    expected = scale.files + scale.dirs + 1  # find lists the root too
    seen = int(result.extra["output"] or 0)
    if seen != expected:
        result.status, result.note = "FAIL", f"find listed {seen} entries, expected {expected}"
    return result


@row("scale_mount_catall", "scale: mount, cat every small file", requires=("scale_save",), group="scale",
     uses=(SCALE_KEY,))
def scale_mount_catall(ctx: Context) -> Result:
    scale = _scale(ctx)
    ctx.mount(SCALE_KEY)
    snap = ctx.snaps[SCALE_KEY][-1]
    result = ctx.through_mount(SCALE_KEY, "find {path} -type f -print0 | xargs -0 cat > /dev/null", scale.bytes)
    if ctx.verify:
        ctx.compare(snap.origin, ctx.tool.mount_path(ctx.mount(SCALE_KEY), snap), result)
    return result


@row("scale_staging", "scale: rsync small files into staging + commit", group="scale", tools=("rekkordfs",),
     uses=("local:scale-staging",), compare_to="scale_save")
def scale_staging(ctx: Context) -> Result:
    """extra: rsync_seconds and commit_seconds (the commit's own time, against
    scale_save), daemon_rss (the staging daemon's peak with every file staged)."""
    scale = _scale(ctx)
    return _stage(ctx, scale.tree, "scale", scale.files, scale.bytes, new_channel=True, key="local:scale-staging")


@row("scale_floor", "scale: rsync small files into a pyfuse3 fs that keeps nothing", group="scale",
     tools=("rekkordfs",), compare_to="scale_save")
def scale_floor(ctx: Context) -> Result:
    scale = _scale(ctx)
    return _floor(ctx, scale.tree, scale.bytes)


# --- S3 and SFTP: the same save/restore and retention rows on a server ------------------

for _backend in ("s3", "sftp"):
    _register_save_restore(_backend)
    _register_retention(_backend)
