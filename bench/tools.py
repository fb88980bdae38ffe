"""One adapter per backup tool: init, save, restore, mount, with the same shape.

Every tool keeps all its state (keys, caches, config) under its own HOME folder
inside the bench's work folder, so runs never see each other's caches, and a
fresh HOME means a first save really is a first save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .measure import NotAvailable, Run, ToolFailure, exists, find_pids, pid_alive, run, unmount, wait_for

REPO_ROOT = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = 120.0


@dataclass
class Repo:
    """A repository as one tool sees it."""

    name: str
    url: str  # what the tool is given (-R, -r, or borg's REPO)
    size_path: Path | None  # folder whose du is the repository size (None: unknown)
    env: dict[str, str] = field(default_factory=dict)  # credentials for remote backends
    args: list[str] = field(default_factory=list)  # extra options the tool needs for this backend
    key: Path | None = None  # rekkordfs keyfile
    size: Callable[[], tuple[int, int]] | None = None  # (disk, apparent) bytes when not a local folder


@dataclass
class S3Place:
    """A fresh prefix in a bucket of an S3 server."""

    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    prefix: str
    key_id: str
    secret: str


@dataclass
class SFTPPlace:
    """A fresh folder on an SSH server, reachable with a key."""

    host: str
    port: int
    user: str
    path: Path
    keyfile: Path
    fingerprint: str


@dataclass
class Snap:
    ref: str  # the tool's name for the snapshot (ID, short ID, archive name)
    channel: str
    path: Path  # absolute source path saved
    files: int  # logical content, for MB/s of reads
    bytes: int
    origin: Path | None = None  # a data-set folder with the same content (for --verify)


@dataclass
class Mount:
    tool: Tool
    repo: Repo
    mnt: Path
    seconds: float  # time to a usable mount
    pid: int | None  # the process serving the mount (for its RSS)
    proc: subprocess.Popen | None = None
    log: Path | None = None
    setup_cpu: float = 0.0  # CPU seconds of a mount command that daemonized (the daemon's are on top)

    def close(self) -> None:
        unmount(self.mnt)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        elif self.pid is not None:
            if not wait_for(lambda: not pid_alive(self.pid), 30, 0.05):
                os.kill(self.pid, signal.SIGTERM)
                if not wait_for(lambda: not pid_alive(self.pid), 10, 0.05):
                    os.kill(self.pid, signal.SIGKILL)
        unmount(self.mnt)


def rel(path: Path) -> str:
    """An absolute path as the tools store it: without the leading slash."""
    return str(path).lstrip("/")


class Tool:
    name = "?"
    #: what the tool is, whatever the copy: rows restricted to "rekkordfs" run for
    #: every rekkordfs copy (the work tree and each --compare-rev)
    kind = "?"
    #: how its repositories are configured, for the report
    settings = ""

    @classmethod
    def slug(cls) -> str:
        """The name as it goes into paths, URLs and S3 prefixes (no '@')."""
        return cls.name.replace("@", "-at-")

    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["HOME"] = str(self.home)
        env["XDG_CACHE_HOME"] = str(self.home / "cache")
        env["XDG_CONFIG_HOME"] = str(self.home / "config")
        return env

    def env(self, repo: Repo) -> dict[str, str]:
        env = self.base_env()
        env.update(repo.env)
        return env

    def version(self) -> str:
        raise NotImplementedError

    def s3_repo(self, name: str, place: S3Place) -> Repo:
        raise NotAvailable(f"{self.name} cannot use an S3 repository")

    def sftp_repo(self, name: str, place: SFTPPlace) -> Repo:
        raise NotAvailable(f"{self.name} cannot use an SFTP repository")

    def init(self, repo: Repo) -> None:
        raise NotImplementedError

    def save(self, repo: Repo, path: Path, channel: str) -> tuple[Run, str]:
        raise NotImplementedError

    def restore(self, repo: Repo, snap: Snap, dest: Path) -> tuple[Run, Path]:
        """Restores SNAP into DEST; returns the run and where the saved folder's contents landed."""
        raise NotImplementedError

    def mount(self, repo: Repo, mnt: Path, ready: Snap) -> Mount:
        """Mounts REPO on MNT; returns once READY's tree is reachable, with the time it took."""
        raise NotAvailable(f"{self.name} has no mount")

    def supports(self, feature: str) -> bool:
        """Whether this tool (this copy of it) can run the rows that need FEATURE ("retention")."""
        return True

    def forget_prune(self, repo: Repo, keep_last: int) -> list[Run]:
        """Forgets all but the KEEP_LAST newest snapshots and frees what they alone used,
        the tool's documented way; the runs of every command it takes."""
        raise NotAvailable(f"{self.name} cannot forget snapshots")

    def count_snapshots(self, repo: Repo) -> int:
        raise NotImplementedError

    def mount_path(self, mount: Mount, snap: Snap) -> Path:
        """Where SNAP's saved folder is seen in the mount."""
        raise NotImplementedError

    # shared by the foreground mounts (restic, borg)
    def _foreground_mount(self, argv: list[str], repo: Repo, mnt: Path, ready: Path) -> Mount:
        mnt.mkdir(parents=True, exist_ok=True)
        log = self.home / f"mount-{mnt.name}.log"
        with open(log, "wb") as out:
            started = time.perf_counter()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    env=self.env(repo), start_new_session=True)
            ok = wait_for(lambda: exists(ready), MOUNT_TIMEOUT, proc=proc)
            seconds = time.perf_counter() - started
        handle = Mount(self, repo, mnt, seconds, proc.pid, proc, log)
        if not ok:
            handle.close()
            tail = log.read_text(errors="replace").strip().splitlines()[-2:]
            raise ToolFailure(f"{self.name} mount did not become usable: {' | '.join(tail)}")
        return handle


class Rekkordfs(Tool):
    name = "rekkordfs"
    kind = "rekkordfs"
    settings = ("its defaults (zstd, keyed CDC); REKKORD_CACHE_DIR under the bench; "
                "bytecode cached (PYTHONPYCACHEPREFIX)")

    #: a frozen copy of rekkordfs/ (and cli/ where the revision has it) extracted at a
    #: commit, run with the project venv (so the code cannot change under a long run):
    #: (folder, short SHA); None: the work tree. Set on this class by --rekkordfs-rev,
    #: on a subclass per revision by --compare-rev (see at()).
    frozen: tuple[Path, str] | None = None

    @property
    def exe(self) -> list[str]:
        if self.frozen is not None:
            # revisions before the CLI moved into the package had it at top level
            module = "rekkordfs.cli.main" if (self.frozen[0] / "rekkordfs" / "cli").is_dir() else "cli.main"
            return [str(REPO_ROOT / ".venv" / "bin" / "python"), "-P", "-m", module]  # -P: not the cwd
        return [str(REPO_ROOT / ".venv" / "bin" / "rekkord")]

    @staticmethod
    def extract(rev: str, work: Path) -> tuple[Path, str]:
        """Extracts rekkordfs/ (and cli/, where REV still has it) at REV under WORK, once
        per commit; returns (folder, short SHA)."""
        sha = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", f"{rev}^{{commit}}"],
                             capture_output=True, text=True)
        if sha.returncode != 0:
            raise ValueError(f"not a commit: {rev!r} ({sha.stderr.strip()})")
        sha = sha.stdout.strip()
        dest = work / f"rekkordfs-{sha}"
        if not (dest / "rekkordfs" / "__init__.py").exists():
            remove_tree(dest)
            dest.mkdir(parents=True)
            has_cli = subprocess.run(["git", "-C", str(REPO_ROOT), "cat-file", "-e", f"{sha}:cli"],
                                     capture_output=True).returncode == 0
            archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", sha, "rekkordfs",
                                      *(["cli"] if has_cli else [])],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return dest, sha

    @classmethod
    def freeze(cls, rev: str, work: Path) -> str:
        """--rekkordfs-rev: the tool named "rekkordfs" runs REV's copy instead of the work tree."""
        cls.frozen = cls.extract(rev, work)
        return cls.frozen[1]

    @classmethod
    def at(cls, rev: str, work: Path) -> type[Rekkordfs]:
        """--compare-rev: another tool, "rekkordfs@SHA", running REV's copy beside "rekkordfs"
        (its own HOME, caches, keys and repositories, like any other tool)."""
        frozen = cls.extract(rev, work)
        return type(f"Rekkordfs_{frozen[1]}", (Rekkordfs,), {"name": f"rekkordfs@{frozen[1]}", "frozen": frozen})

    def source(self) -> Path:
        """The folder whose rekkordfs/ (and cli/) this copy runs."""
        return self.frozen[0] if self.frozen is not None else REPO_ROOT

    def compile(self) -> None:
        """Compiles the copy's bytecode into the bench's PYTHONPYCACHEPREFIX before any row,
        so no copy pays for compiling itself in a timed row (the work tree usually has its
        bytecode from earlier runs; a fresh frozen copy would not)."""
        folders = [self.source() / "rekkordfs"]
        if (self.source() / "cli").is_dir():
            folders.append(self.source() / "cli")
        subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "python"), "-m", "compileall", "-q",
                        *map(str, folders)], env=self.base_env(), check=True,
                       stdout=subprocess.DEVNULL)

    def base_env(self) -> dict[str, str]:
        env = super().base_env()
        env["REKKORD_CACHE_DIR"] = str(self.home / "rekkord-cache")
        # An installed rekkordfs has its bytecode compiled, as Debian's borg has; the
        # editable install under PYTHONDONTWRITEBYTECODE=1 would recompile the project
        # at every start. Keep the bytecode under the bench's work folder (WORK/pycache),
        # never in the source tree.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(self.home.parent.parent / "pycache")
        if self.frozen is not None:
            env["PYTHONPATH"] = str(self.frozen[0])  # ahead of the editable install
        for name in ("REKKORD_CONFIG_FILE", "REKKORD_REPOSITORY", "REKKORD_KEYFILE"):
            env.pop(name, None)
        return env

    def version(self) -> str:
        out = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "python"), "-c",
                              "import rekkordfs; print(getattr(rekkordfs, '__version__', '?'))"],
                             capture_output=True, text=True, env=self.base_env())
        if self.frozen is not None:
            # the last commit that changed the code, when REV is a later one (e.g. a docs commit)
            code = subprocess.run(["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h", self.frozen[1], "--",
                                   "rekkordfs", "cli"], capture_output=True, text=True).stdout.strip()
            same = "" if not code or self.frozen[1].startswith(code) or code.startswith(self.frozen[1]) \
                else f", code of {code}"
            return f"rekkordfs {out.stdout.strip()} ({self.frozen[1]}{same}, frozen copy)"
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "rekkordfs"],
                               capture_output=True, text=True).stdout.strip()
        if dirty:
            commit += " + uncommitted changes"
        return f"rekkordfs {out.stdout.strip()} ({commit})"

    def _cmd(self, repo: Repo, *args: str) -> list[str]:
        return [*self.exe, "-R", repo.url, "-K", str(repo.key), *repo.args, *args]

    def s3_repo(self, name: str, place: S3Place) -> Repo:
        return Repo(name, f"{place.endpoint}/{place.bucket}/{place.prefix}", None,
                    env={"AWS_ACCESS_KEY_ID": place.key_id, "AWS_SECRET_ACCESS_KEY": place.secret})

    def sftp_repo(self, name: str, place: SFTPPlace) -> Repo:
        return Repo(name, f"sftp://{place.user}@{place.host}:{place.port}{place.path}", place.path,
                    env={"SSH_KEYFILE": str(place.keyfile), "SSH_FINGERPRINT": place.fingerprint})

    def init(self, repo: Repo) -> None:
        repo.key = self.home / f"{repo.name}.key"
        repo.key.unlink(missing_ok=True)
        run([*self.exe, "-R", repo.url, *repo.args, "init", "-K", str(repo.key)],
            env=self.env(repo)).check("rekkord init")

    def save(self, repo: Repo, path: Path, channel: str) -> tuple[Run, str]:
        r = run(self._cmd(repo, "save", channel, str(path)), env=self.env(repo)).check("rekkord save")
        lines = r.stdout.strip().splitlines()
        if not lines or not re.fullmatch(r"[0-9a-f]{16,}", lines[-1].strip()):
            raise ToolFailure(f"rekkord save printed no snapshot ID: {r.stdout[-200:]!r}")
        return r, lines[-1].strip()

    def restore(self, repo: Repo, snap: Snap, dest: Path) -> tuple[Run, Path]:
        r = run(self._cmd(repo, "restore", f"{snap.ref}:{snap.path}", str(dest)), env=self.env(repo))
        return r.check("rekkord restore"), dest

    def mount(self, repo: Repo, mnt: Path, ready: Snap) -> Mount:
        """`rekkord mount MNT` daemonizes once the mount is usable (exit 0)."""
        mnt.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        r = run(self._cmd(repo, "mount", str(mnt)), env=self.env(repo), timeout=MOUNT_TIMEOUT)
        if r.rc != 0:
            unmount(mnt)
            message = (r.stderr.strip() or r.stdout.strip() or f"exit {r.rc}").splitlines()[-1]
            raise NotAvailable(f"rekkord mount failed: {message}")
        target = mnt / "channels" / ready.channel / "latest"
        ok = wait_for(lambda: exists(target), MOUNT_TIMEOUT)
        seconds = time.perf_counter() - started
        pids = [p for p in find_pids("mount", str(mnt)) if p != os.getpid()]
        handle = Mount(self, repo, mnt, seconds, max(pids) if pids else None, setup_cpu=r.cpu)
        if not ok:
            handle.close()
            raise ToolFailure(f"rekkord mount exited 0 but {target} does not exist")
        return handle

    def mount_path(self, mount: Mount, snap: Snap) -> Path:
        return mount.mnt / "channels" / snap.channel / "latest" / rel(snap.path)

    _features: dict[tuple[str, str], bool] = {}

    def supports(self, feature: str) -> bool:
        if feature != "retention":
            return True
        key = (self.name, feature)
        if key not in Rekkordfs._features:  # revisions before forget and prune (e.g. 4326053) lack them
            r = run([*self.exe, "forget", "--help"], env=self.base_env())
            Rekkordfs._features[key] = r.rc == 0
        return Rekkordfs._features[key]

    def forget_prune(self, repo: Repo, keep_last: int) -> list[Run]:
        # --grace 0: the bench knows no backup is running, so prune deletes what it
        # finds unused at once, as restic's and borg's prunes do (the default, 1d,
        # would only condemn it, to be deleted by a prune a day later)
        r = run(self._cmd(repo, "forget", "--keep-last", str(keep_last), "--prune", "--grace", "0"),
                env=self.env(repo))
        return [r.check("rekkord forget --prune")]

    def count_snapshots(self, repo: Repo) -> int:
        r = run(self._cmd(repo, "snapshots", "-f", "json"), env=self.env(repo)).check("rekkord snapshots")
        doc = json.loads(r.stdout)
        return len(doc["snapshots"] if isinstance(doc, dict) else doc)


class Restic(Tool):
    name = "restic"
    kind = "restic"
    settings = "repository version 2, compression auto (zstd), --cache-dir under the bench"
    password = "rekkordfs-bench"

    def env(self, repo: Repo) -> dict[str, str]:
        env = super().env(repo)
        env["RESTIC_PASSWORD"] = self.password
        env.pop("RESTIC_REPOSITORY", None)
        return env

    def version(self) -> str:
        return subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.split(" compiled")[0]

    def _cmd(self, repo: Repo, *args: str) -> list[str]:
        return ["restic", "-r", repo.url, "--cache-dir", str(self.home / "restic-cache"), *repo.args, *args]

    def s3_repo(self, name: str, place: S3Place) -> Repo:
        return Repo(name, f"s3:{place.endpoint}/{place.bucket}/{place.prefix}", None,
                    env={"AWS_ACCESS_KEY_ID": place.key_id, "AWS_SECRET_ACCESS_KEY": place.secret})

    def sftp_repo(self, name: str, place: SFTPPlace) -> Repo:
        ssh = (f"ssh -p {place.port} -i {place.keyfile} -o StrictHostKeyChecking=no "
               f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR {place.user}@{place.host} -s sftp")
        return Repo(name, f"sftp:{place.user}@{place.host}:{place.path}", place.path,
                    args=["-o", f"sftp.command={ssh}"])

    def init(self, repo: Repo) -> None:
        run(self._cmd(repo, "init"), env=self.env(repo)).check("restic init")

    def save(self, repo: Repo, path: Path, channel: str) -> tuple[Run, str]:
        r = run(self._cmd(repo, "backup", "--tag", channel, str(path)), env=self.env(repo)).check("restic backup")
        found = re.search(r"snapshot ([0-9a-f]+) saved", r.stdout)
        if not found:
            raise ToolFailure(f"restic backup printed no snapshot ID: {r.stdout[-200:]!r}")
        return r, found.group(1)

    def restore(self, repo: Repo, snap: Snap, dest: Path) -> tuple[Run, Path]:
        # restic 0.14 has no ID:subfolder; it restores the absolute path under DEST
        r = run(self._cmd(repo, "restore", snap.ref, "--target", str(dest)), env=self.env(repo))
        return r.check("restic restore"), dest / rel(snap.path)

    def mount(self, repo: Repo, mnt: Path, ready: Snap) -> Mount:
        # foreground; usable once the snapshot's directory can be looked up
        return self._foreground_mount(self._cmd(repo, "mount", str(mnt)), repo, mnt,
                                      mnt / "ids" / ready.ref)

    def mount_path(self, mount: Mount, snap: Snap) -> Path:
        return mount.mnt / "ids" / snap.ref / rel(snap.path)

    def forget_prune(self, repo: Repo, keep_last: int) -> list[Run]:
        # its defaults: snapshots grouped by host and paths (one group here), prune
        # repacks until at most 5% of the repository is unused (--max-unused 5%)
        r = run(self._cmd(repo, "forget", "--keep-last", str(keep_last), "--prune"), env=self.env(repo))
        return [r.check("restic forget --prune")]

    def count_snapshots(self, repo: Repo) -> int:
        r = run(self._cmd(repo, "snapshots", "--json"), env=self.env(repo)).check("restic snapshots")
        return len(json.loads(r.stdout) or [])


class Borg(Tool):
    name = "borg"
    kind = "borg"
    encryption = "repokey-blake2"
    settings = "borg init -e repokey-blake2, default compression (lz4), default chunker, BORG_BASE_DIR under the bench"
    password = "rekkordfs-bench"

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.counter = 0

    def env(self, repo: Repo) -> dict[str, str]:
        env = super().env(repo)
        env["BORG_PASSPHRASE"] = self.password
        env["BORG_BASE_DIR"] = str(self.home / "borg-base")
        env["BORG_RELOCATED_REPO_ACCESS_IS_OK"] = "yes"
        env.pop("BORG_REPO", None)
        return env

    def version(self) -> str:
        return subprocess.run(["borg", "--version"], capture_output=True, text=True).stdout.strip()

    def sftp_repo(self, name: str, place: SFTPPlace) -> Repo:
        # borg speaks its own protocol over ssh (`borg serve` on the server), not SFTP
        rsh = (f"ssh -i {place.keyfile} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
               f"-o LogLevel=ERROR")
        return Repo(name, f"ssh://{place.user}@{place.host}:{place.port}{place.path}", place.path,
                    env={"BORG_RSH": rsh})

    def init(self, repo: Repo) -> None:
        run(["borg", "init", "-e", self.encryption, repo.url], env=self.env(repo)).check("borg init")

    def save(self, repo: Repo, path: Path, channel: str) -> tuple[Run, str]:
        self.counter += 1
        archive = f"{channel}-{self.counter}"
        r = run(["borg", "create", f"{repo.url}::{archive}", str(path)], env=self.env(repo))
        return r.check("borg create"), archive

    def restore(self, repo: Repo, snap: Snap, dest: Path) -> tuple[Run, Path]:
        parts = rel(snap.path).split("/")
        r = run(["borg", "extract", "--strip-components", str(len(parts)), f"{repo.url}::{snap.ref}",
                 rel(snap.path)], env=self.env(repo), cwd=dest)
        return r.check("borg extract"), dest

    def mount(self, repo: Repo, mnt: Path, ready: Snap) -> Mount:
        # the whole repository, like the other two; -f keeps it in the foreground
        return self._foreground_mount(["borg", "mount", "-f", repo.url, str(mnt)], repo, mnt,
                                      mnt / ready.ref)

    def mount_path(self, mount: Mount, snap: Snap) -> Path:
        return mount.mnt / snap.ref / rel(snap.path)

    def forget_prune(self, repo: Repo, keep_last: int) -> list[Run]:
        # borg 1.2: prune removes archives (and their chunks' references); compact
        # frees the space, rewriting segments with more than 10% unused (its default)
        prune = run(["borg", "prune", "--keep-last", str(keep_last), repo.url], env=self.env(repo))
        prune.check("borg prune")
        compact = run(["borg", "compact", repo.url], env=self.env(repo))
        return [prune, compact.check("borg compact")]

    def count_snapshots(self, repo: Repo) -> int:
        r = run(["borg", "list", "--short", repo.url], env=self.env(repo)).check("borg list")
        return len(r.stdout.split())


TOOLS: dict[str, type[Tool]] = {cls.name: cls for cls in (Rekkordfs, Restic, Borg)}
PEERS = ("restic", "borg")


def add_revision(rev: str, work: Path) -> str:
    """Registers the tool "rekkordfs@SHA" (rekkordfs as committed at REV, a frozen copy
    under WORK) and returns its name: --compare-rev REV, or --tools rekkordfs@REV."""
    cls = Rekkordfs.at(rev, work)
    TOOLS[cls.name] = cls
    return cls.name


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            subprocess.run(["rm", "-rf", str(path)])
