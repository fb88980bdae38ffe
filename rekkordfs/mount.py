"""Mount orchestration: open the repository, serve FUSE, unmount cleanly.

`serve()` runs in the foreground; `daemonize()` forks first and only lets the
parent exit (with 0) once the child reports the mount usable, or relays its
one-line error. SIGINT and SIGTERM unmount; so does `fusermount3 -u`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from . import fuseloop
from .blobcache import DEFAULT_DISK_BYTES, BlobCache, DiskCache
from .cache import repository_cache_dir
from .config import Config
from .errors import RekkordError, UsageError, find_user_error
from .format import EntryKind
from .fuse import Operations
from .gcquiet import quiet_gc
from .keys import Capability, Keyset
from .repository import Repository, walk_path
from .stagingarea import StagingArea
from .statedir import key_state_folder
from .tuning import MOUNT_GC_THRESHOLDS
from .vfs import SnapshotView

log = logging.getLogger(__name__)

Ready = Callable[[str | None], None]


@dataclass
class MountOptions:
    mountpoint: str
    spec: str | None = None  # ID|CHANNEL[:path] for a single-snapshot mount
    foreground: bool = False
    channels: list[str] = field(default_factory=list)
    cache_size: int = DEFAULT_DISK_BYTES
    refresh_interval: float = 10.0
    state_dir: str | None = None  # staging state; default under the user's state folder
    debug: bool = False
    quiet: bool = False  # no "Mounted on" message


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (value[:-1], value[-1]) if value and value[-1] in units else (value, "")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise UsageError(f"invalid size '{text}' (use e.g. 512M or 2G)") from None


def check_mountpoint(path: str) -> str:
    full = os.path.abspath(path)
    if not os.path.isdir(full):
        raise UsageError(f"mount point '{path}' does not exist or is not a folder")
    return full


def _setup_logging(options: MountOptions, log_file: Path | None) -> None:
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if options.debug else logging.INFO)


async def serve(config: Config, keys: Keyset, options: MountOptions, ready: Ready) -> None:
    """Mount and serve until unmounted; ready(None) once the mount is usable."""
    async with Repository.connect(config, keys) as repo:
        await _serve_repository(repo, options, ready)


async def _serve_repository(repo: Repository, options: MountOptions, ready: Ready) -> None:
    cache_dir = repository_cache_dir(repo.id_hex)
    disk = DiskCache(cache_dir / "blobs", options.cache_size) if repo.storage.remote else None
    blobs = BlobCache(repo, disk=disk)
    view = SnapshotView(repo, blobs, refresh_interval=options.refresh_interval,
                        channels=set(options.channels) or None)
    staging: StagingArea | None = None
    if options.spec is not None:
        name, _, path = options.spec.partition(":")
        tag = await repo.resolve(name)
        snapshot = await repo.load_snapshot(tag)
        entry, _ = await walk_path(repo, snapshot, path)
        if entry.kind != EntryKind.DIRECTORY:
            raise UsageError(f"'{options.spec}' is not a directory; only directories can be mounted")
        view.use_subtree(tag, entry)
    else:
        await view.refresh(force=True)
        if repo.keys.can(Capability.WRITE):
            state = Path(options.state_dir) if options.state_dir else key_state_folder(repo.id_hex, repo.keys.id_hex)
            staging = StagingArea(repo, blobs, view, state, options.mountpoint)

    operations = Operations(view, staging)
    fuse_options = set(pyfuse3.default_options) | {"fsname=rekkord", "subtype=rekkord"}
    if staging is None:
        fuse_options.add("ro")
    if os.geteuid() == 0:
        fuse_options.add("allow_other")  # default_permissions still enforces modes
    if options.debug:
        fuse_options.add("debug")
    try:
        pyfuse3.init(operations, options.mountpoint, fuse_options)
    except RuntimeError as exc:
        raise RekkordError(f"cannot mount on '{options.mountpoint}': {exc}") from None

    if not options.foreground:
        _setup_logging(options, cache_dir / "mount.log")
    try:
        async with trio.open_nursery() as nursery:
            view.start(nursery)
            if staging is not None:
                staging.start(nursery)
            await nursery.start(_unmount_on_signal)  # listening before anything is served
            log.info("mounted %s on %s", repo.storage.description, options.mountpoint)
            ready(None)
            fuseloop.install()  # fewer scheduler rounds per request
            with quiet_gc(MOUNT_GC_THRESHOLDS):  # what exists before serving is never garbage
                await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
        if staging is not None:
            staging.close()
        log.info("unmounted %s", options.mountpoint)


async def _unmount_on_signal(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Started (not start_soon): the request loop may serve many requests
    before yielding (fuseloop.py); until this listens, SIGTERM kills the daemon
    and leaves the mount behind, SIGINT ends it with status 130."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            pyfuse3.terminate()
            return


def run_foreground(config: Config, keys: Keyset, options: MountOptions) -> int:
    def ready(error: str | None) -> None:
        if error is None and not options.quiet:
            print(f"Mounted on {options.mountpoint} (Ctrl-C or 'fusermount3 -u' to unmount)", file=sys.stderr)

    _setup_logging(options, None)
    trio.run(serve, config, keys, options, ready)
    return 0


def daemonize(config: Config, keys: Keyset, options: MountOptions) -> int:
    """Fork; the parent returns 0 once the child's mount is usable."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode("utf-8", "replace").strip()
        if message.startswith("ok"):
            if not options.quiet:
                print(f"Mounted on {options.mountpoint} (unmount with 'fusermount3 -u {options.mountpoint}')")
            return 0
        os.waitpid(pid, 0)
        print(f"rekkord: error: {message or 'the mount process died before the mount was ready'}", file=sys.stderr)
        return 1

    # child: keeps the terminal until the mount is ready (a secret or host key
    # may have to be asked for), then leaves the parent's session
    os.close(read_end)
    reported = False

    def ready(error: str | None) -> None:
        nonlocal reported
        if reported:
            return
        reported = True
        os.write(write_end, b"ok\n" if error is None else error.encode())
        os.close(write_end)
        if error is None:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)

    code = 0
    try:
        trio.run(serve, config, keys, options, ready)
    except BaseException as exc:  # noqa: BLE001 - report whatever stopped us to the parent
        user = find_user_error(exc)
        if user is None:
            log.exception("mount failed")
        ready(user.message if user else f"mount failed: {exc!r}")
        code = 1
    os._exit(code)
