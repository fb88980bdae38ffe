"""`rekkord commit`: ask a running mount to commit a staging folder.

The mount does the work; this command only sets and reads extended attributes
of MNT/staging/CHANNEL (see rekkordfs/control.py), so it imports nothing heavy
and starts fast.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from rekkordfs.control import CONTROL_CHANNEL, CONTROL_COMMIT, CommitReply
from rekkordfs.errors import RekkordError, UsageError

from .output import human_size, iso_time, print_json

if TYPE_CHECKING:
    from rekkordfs.config import Config


# What a FUSE mount answers once its process is gone: ECONNABORTED to the
# requests it was serving, ENOTCONN to every later one (until unmounted).
MOUNT_GONE = (errno.ENOTCONN, errno.ECONNABORTED)


def commit(args: argparse.Namespace, make_config: Callable[[argparse.Namespace], Config]) -> int:
    """Ask the running mount to commit a staging folder; wait for the snapshot."""
    path = args.staging
    try:
        channel = os.getxattr(path, CONTROL_CHANNEL).decode()
    except OSError as exc:
        raise _not_a_staging_folder(path, exc) from None
    token = secrets.token_hex(16).encode()
    try:
        os.setxattr(path, CONTROL_COMMIT, token)
        failure = None
    except OSError as exc:
        failure = exc
    try:
        reply = CommitReply.decode(os.getxattr(path, CONTROL_COMMIT + b"." + token))
    except (OSError, ValueError) as exc:
        if any(isinstance(e, OSError) and e.errno in MOUNT_GONE for e in (failure, exc)):
            mnt = _mount_point(path)
            raise RekkordError(f"commit of staging/{channel} failed: the mount at '{mnt}' went away during the "
                               f"commit; {_remount(mnt)}, then commit again (staged data is kept)") from None
        reason = failure.strerror if failure else "no answer from the mount"
        raise RekkordError(f"commit of staging/{channel} failed: {reason}") from None
    if reply.error is not None:
        raise RekkordError(f"commit of staging/{channel} failed: {reply.error}")
    if args.format == "json":
        print_json({
            "id": reply.id, "channel": reply.channel, "time": iso_time(reply.time_ns), "files": reply.files,
            "size": reply.size, "bytes_new": reply.bytes_new, "bytes_stored": reply.bytes_stored,
            "duration": reply.duration,
        })
    elif getattr(args, "quiet", False):
        print(reply.id)
    else:
        print(f"Files:        {reply.files} ({human_size(reply.size)})")
        print(f"New:          {human_size(reply.bytes_new)}")
        print(f"Stored:       {human_size(reply.bytes_stored)}")
        print(f"Time:         {reply.duration:.2f} s")
        print(reply.id)
    return 0


def _not_a_staging_folder(path: str, exc: OSError) -> RekkordError:
    """Why path cannot take a commit: a mount whose process is gone, no mount
    at all where MNT/staging/CHANNEL says one should be, or a wrong path."""
    if exc.errno in MOUNT_GONE:
        mnt = _mount_point(path)
        return RekkordError(f"the mount at '{mnt}' is not running (its process is gone); "
                            f"{_remount(mnt)}, then commit again (staged data is kept)")
    full = os.path.normpath(os.path.abspath(path))
    mnt = os.path.dirname(os.path.dirname(full))
    if os.path.basename(os.path.dirname(full)) == "staging" and _mount_point(full) != mnt:
        return RekkordError(f"no rekkord mount is running at '{mnt}'; mount it with 'rekkord mount {mnt}', "
                            f"then commit again (staged data is kept)")
    return UsageError(f"'{path}' is not the staging folder of a channel in a rekkord mount "
                      "(expected MNT/staging/CHANNEL)")


def _remount(mnt: str) -> str:
    return f"unmount it with 'fusermount3 -u {mnt}' and mount it again with 'rekkord mount {mnt}'"


def _mount_point(path: str) -> str:
    """The mount point path lives under (from /proc/self/mounts: os.path.ismount
    cannot stat the root of a mount whose process is gone)."""
    full = os.path.normpath(os.path.abspath(path))
    best = "/"
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 2:
                    continue
                # spaces, tabs and backslashes in mount points are written as octal escapes
                target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
                if (full == target or full.startswith(target.rstrip("/") + "/")) and len(target) > len(best):
                    best = target
    except OSError:
        pass
    return best
