"""A small differential harness: the same system calls on a local folder and on
a folder of the mount's staging area, outcome by outcome.

A case is a function of a Probe: every step it takes records a label and an
outcome (the errno name of a failure, or a normalised result), so two runs of
one case compare as two lists. What a filesystem may choose freely (inode
numbers, directory sizes, exact times) is never recorded; what POSIX says
(errors, link counts, modes, which times change) is.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable
from typing import Any

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
LONG = b"n" * 256  # one byte over NAME_MAX
LONGEST = b"m" * 255


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(result: int) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def utimensat(path: bytes, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(2) with (seconds, nanoseconds) pairs, UTIME_NOW/UTIME_OMIT allowed."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(libc.utimensat(AT_FDCWD, path, times, 0))


def renameat2(old: bytes, new: bytes, flags: int) -> None:
    _check(libc.renameat2(AT_FDCWD, old, AT_FDCWD, new, flags))


class Probe:
    """Runs steps under root and records their outcomes."""

    def __init__(self, root: bytes) -> None:
        self.root = root
        self.results: list[tuple[str, Any]] = []

    def path(self, rel: bytes) -> bytes:
        return self.root + b"/" + rel if rel else self.root

    def do(self, label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run fn(*args); record 'ok' (or what it returns, normalised) or the errno name."""
        try:
            value = fn(*args, **kwargs)
        except OSError as exc:
            self.results.append((label, errno.errorcode.get(exc.errno or 0, str(exc.errno))))
            return None
        self.results.append((label, _normal(value)))
        return value

    def at(self, label: str, fn: Callable[..., Any], rel: bytes, *args: Any, **kwargs: Any) -> Any:
        return self.do(label, fn, self.path(rel), *args, **kwargs)

    def stat(self, label: str, rel: bytes, *fields: str) -> os.stat_result | None:
        """Record chosen fields of lstat (default: type, mode, link count)."""
        try:
            st = os.lstat(self.path(rel))
        except OSError as exc:
            self.results.append((label, errno.errorcode[exc.errno]))
            return None
        names = fields or ("type", "mode", "nlink")
        self.results.append((label, {name: _field(st, name) for name in names}))
        return st

    def note(self, label: str, value: Any) -> None:
        self.results.append((label, value))


def _normal(value: Any) -> Any:
    if value is None or isinstance(value, (int, bytes, str, bool)):
        return "ok" if value is None else value
    if isinstance(value, (list, tuple)):
        return sorted(value) if all(isinstance(v, (bytes, str)) for v in value) else list(value)
    return "ok"


def _field(st: os.stat_result, name: str) -> Any:
    if name == "type":
        return stat.S_IFMT(st.st_mode)
    if name == "mode":
        return stat.S_IMODE(st.st_mode)
    if name == "sparse":  # fewer blocks allocated than the size needs
        return st.st_blocks * 512 < st.st_size
    if name == "allocated":  # at least the size in blocks (st_blocks counts 512-byte units)
        return st.st_blocks * 512 >= st.st_size
    return getattr(st, "st_" + name)


def run(case: Callable[[Probe], None], root: bytes) -> list[tuple[str, Any]]:
    os.mkdir(root)
    probe = Probe(root)
    case(probe)
    return probe.results


def compare(expected: list[tuple[str, Any]], actual: list[tuple[str, Any]]) -> list[str]:
    """Steps whose outcome differs: 'label: local X, staging Y'."""
    problems = []
    for (label, want), (_, got) in zip(expected, actual):
        if want != got:
            problems.append(f"{label}: local {want!r}, staging {got!r}")
    if len(expected) != len(actual):
        problems.append(f"{len(expected)} steps locally, {len(actual)} in staging")
    return problems
