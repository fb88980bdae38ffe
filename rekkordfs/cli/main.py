"""The `rekkord` command: argument parsing and dispatch only.

Ctrl-C is handled as interrupt.py describes: until a command's handler runs
(imports, argument parsing, loading the handler's modules) and once it is
done, SIGINT ends the process at once with one line; while the handler runs
it raises KeyboardInterrupt (so a prompt puts the terminal back), and inside
trio.run it cancels the run. This module imports at load time only modules
the interpreter has loaded already, so the first handler is in place before
any real work starts. (Before this module runs, CPython itself is starting:
see docs/operations.md.)
"""

from __future__ import annotations

import os
import sys

from . import interrupt

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs milliseconds before main() runs
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence

    from rekkordfs.config import Config


def main(argv: Sequence[str] | None = None) -> int:
    interrupt.exit_at_once()
    interrupt.remember_terminal()
    _byte_safe_output()
    try:
        from .parser import build_parser

        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "handler", None):
            parser.print_help(sys.stderr)
            return 2
        handler = _handler(args.handler)
        interrupt.raise_keyboard_interrupt()
        try:
            return handler(args, make_config) or 0
        finally:
            interrupt.exit_at_once()
            _skip_last_collection()
    except BaseException as exc:  # noqa: BLE001 - translate everything the user can cause
        interrupt.exit_at_once()
        return _report(exc)


def _skip_last_collection() -> None:
    """The command is done and the process ends: the collection the interpreter
    runs while it shuts down would walk every object still alive (a restore's
    tree, the caches) to free memory that the exit frees anyway,
    0.1-0.3 s after a restore from S3. Frozen objects are left out of it (their
    files and sockets are still closed as their references go)."""
    import gc

    gc.freeze()


def make_config(args: argparse.Namespace) -> Config:
    from rekkordfs.config import load_config

    return load_config(
        config_file=getattr(args, "config_file", None),
        repository=getattr(args, "repository", None),
        key_file=getattr(args, "key_file", None),
        threads=getattr(args, "threads", None),
    )


def _handler(spec: str) -> Callable:
    """Commands import the library when they run: `commit`, which only talks
    to a running mount, needs none of it and starts faster."""
    import importlib

    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


def _byte_safe_output() -> None:
    """File names are bytes: print those that are not valid UTF-8 as their raw
    bytes (as ls does) instead of failing with UnicodeEncodeError under a
    strict UTF-8 locale."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:  # stderr already uses backslashreplace
        reconfigure(errors="surrogateescape")


def _report(exc: BaseException) -> int:
    """The exit status for exc, after one line on stderr; unknown errors are
    bugs and keep their traceback."""
    from rekkordfs.errors import find_user_error, first_of

    if isinstance(exc, SystemExit):
        return int(exc.code or 0)
    trio = sys.modules.get("trio")  # loaded by every command that can be cancelled
    cancelled = trio is not None and first_of(exc, trio.Cancelled) is not None
    if first_of(exc, KeyboardInterrupt) is not None or cancelled:
        # worker threads still busy are not waited for: they only ever write
        # objects whole, or files a rerun redoes
        interrupt.exit_now()
    user = find_user_error(exc)
    if user is not None:
        print(f"rekkord: error: {user.message}", file=sys.stderr)
        return user.exit_code
    broken = first_of(exc, BrokenPipeError)
    if broken is not None:
        return 141
    database = _local_database_error(exc)
    if database is not None:
        print(f"rekkord: error: {database}", file=sys.stderr)
        return 1
    oserror = first_of(exc, OSError)
    if isinstance(oserror, OSError) and oserror.strerror:
        # filename is an int for calls on a file descriptor (os.fchown, os.setxattr(fd)...)
        named = isinstance(oserror.filename, (str, bytes, os.PathLike))
        where = f" '{os.fsdecode(oserror.filename)}'" if named and oserror.filename else ""
        print(f"rekkord: error: {oserror.strerror}{where}", file=sys.stderr)
        return 1
    raise exc


def _local_database_error(exc: BaseException) -> str | None:
    """One line for a failure of the local cache's SQLite database (the only
    one the commands open), naming a full disk as such."""
    from rekkordfs.errors import first_of

    sqlite3 = sys.modules.get("sqlite3")
    failure = first_of(exc, sqlite3.Error) if sqlite3 is not None else None
    if failure is None:
        return None
    cache = sys.modules.get("rekkordfs.cache")
    where = f" '{cache.default_cache_root()}'" if cache is not None else ""
    if getattr(failure, "sqlite_errorname", "") == "SQLITE_FULL":
        return f"no space left on device for the local cache{where}"
    return f"local cache{where} failed: {failure}"


if __name__ == "__main__":
    sys.exit(main())
