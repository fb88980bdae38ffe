"""Hooks for tests, inert in normal use.

Stop points: a process stops itself (SIGSTOP) at a named point,
so a test acts (kills a server, kills the process) at a known moment instead
of guessing one with a sleep.

REKKORD_TEST_STOP=POINT[:N] stops the process the N-th time (default: the
first) it reaches POINT. The test sees the process in state 'T' in
/proc/PID/stat, does what it needs, then sends SIGCONT or SIGKILL. Unset (as in
normal use), a stop point costs one comparison.

Points:
  "storage-put"     before each write to the repository storage (each attempt)
  "storage-delete"  before each delete of a repository object
  "publish"         a save or commit whose data is all stored, before its
                    snapshot is published
  "snapshot-tag"    a snapshot record is stored, its tag (the commit point) not yet
  "commit"          a mount starting a commit
  "commit-publish"  a commit whose data and directory records are stored,
                    before it publishes its snapshot
  "staging-write"   a mount receiving a write to a staged file
  "write-behind"    a mount starting a write-behind upload batch

REKKORD_CHECK_INODE_CACHE=1 makes staging trees compare every cached inode row
with the journal (see check_inode_cache()).
"""

from __future__ import annotations

import os
import signal
import threading

_SPEC = os.environ.get("REKKORD_TEST_STOP", "")
_POINT, _, _NTH = _SPEC.partition(":")
_counts: dict[str, int] = {}
_lock = threading.Lock()


def stop_point(name: str) -> None:
    """SIGSTOP this process here if REKKORD_TEST_STOP names this point and time."""
    if name != _POINT:
        return
    with _lock:
        count = _counts[name] = _counts.get(name, 0) + 1
    if count == int(_NTH or 1):
        os.kill(os.getpid(), signal.SIGSTOP)


def check_inode_cache() -> bool:
    """Tests: staging trees check each cached inode row against the journal, so
    a change that bypasses the cache fails. Read when a tree opens (the tests
    set it before they start trees and mounts)."""
    return bool(os.environ.get("REKKORD_CHECK_INODE_CACHE"))
