"""`rekkord commit`: ask a running mount to commit a staging folder.

The mount does the work; this command only sets and reads extended attributes
of MNT/staging/CHANNEL (see rekkordfs/control.py), so it imports nothing heavy
and starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from typing import TYPE_CHECKING, Callable

from rekkordfs.control import CONTROL_CHANNEL, CONTROL_COMMIT
from rekkordfs.errors import RekkordError, UsageError

from .output import human_size, iso_time, print_json

if TYPE_CHECKING:
    from rekkordfs.config import Config


def commit(args: argparse.Namespace, make_config: Callable[[argparse.Namespace], Config]) -> int:
    """Ask the running mount to commit a staging folder; wait for the snapshot."""
    path = args.staging
    try:
        channel = os.getxattr(path, CONTROL_CHANNEL).decode()
    except OSError:
        raise UsageError(f"'{path}' is not the staging folder of a channel in a rekkord mount "
                         "(expected MNT/staging/CHANNEL)") from None
    token = secrets.token_hex(16).encode()
    try:
        os.setxattr(path, CONTROL_COMMIT, token)
        failure = None
    except OSError as exc:
        failure = exc
    try:
        result = json.loads(os.getxattr(path, CONTROL_COMMIT + b"." + token))
    except (OSError, ValueError):
        reason = failure.strerror if failure else "no answer from the mount"
        raise RekkordError(f"commit of staging/{channel} failed: {reason}") from None
    if "error" in result:
        raise RekkordError(f"commit of staging/{channel} failed: {result['error']}")
    if args.format == "json":
        print_json({
            "id": result["id"], "channel": result["channel"], "time": iso_time(result["time_ns"]),
            "files": result["files"], "size": result["size"], "bytes_new": result["bytes_new"],
            "bytes_stored": result["bytes_stored"], "duration": result["duration"],
        })
    elif getattr(args, "quiet", False):
        print(result["id"])
    else:
        print(f"Files:        {result['files']} ({human_size(result['size'])})")
        print(f"New:          {human_size(result['bytes_new'])}")
        print(f"Stored:       {human_size(result['bytes_stored'])}")
        print(f"Time:         {result['duration']:.2f} s")
        print(result["id"])
    return 0
