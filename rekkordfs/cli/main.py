"""The `rekkord` command: argument parsing and dispatch only."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import TYPE_CHECKING, Callable, NoReturn, Sequence

from rekkordfs.errors import UsageError, find_user_error

if TYPE_CHECKING:
    from rekkordfs.config import Config


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """-C/-R/-K/-j accepted before or after the command name."""
    default = argparse.SUPPRESS if suppress else None
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("common options")
    group.add_argument("-C", "--config_file", metavar="FILE", default=default, help="configuration file")
    group.add_argument("-R", "--repository", metavar="URL", default=default, help="repository URL")
    group.add_argument("-K", "--key_file", metavar="FILE", default=default, help="keyfile")
    group.add_argument("-j", "--threads", metavar="N", type=int, default=default, help="worker threads")
    return parent


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(suppress=True)
    parser = _Parser(
        prog="rekkord",
        description="Deduplicated, encrypted backups with a FUSE view of every snapshot.",
        parents=[_common_options(suppress=False)],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help_text: str, handler: str) -> argparse.ArgumentParser:
        """handler: "module:function", imported when the command runs."""
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(handler=handler)
        return p

    command("init", "create a repository and export its master key (default ./master.key)", "rekkordfs.cli.commands:init")

    p = command("derive", "derive a restricted keyfile from the master key", "rekkordfs.cli.commands:derive")
    p.add_argument("-t", "--type", required=True, metavar="TYPE", help="ReadWrite, WriteOnly or LogOnly")
    p.add_argument("-O", "--output", required=True, metavar="FILE", help="where to write the new keyfile")

    p = command("identify", "print the key ID and type of a keyfile", "rekkordfs.cli.commands:identify")
    p.add_argument("-f", "--format", choices=("plain", "json"), default="plain")

    p = command("save", "save paths as a new snapshot in CHANNEL; prints its ID", "rekkordfs.cli.commands:save")
    p.add_argument("channel", metavar="CHANNEL")
    p.add_argument("paths", metavar="PATH", nargs="+")
    p.add_argument("-f", "--format", choices=("plain", "json"), default="plain")

    p = command("snapshots", "list snapshots", "rekkordfs.cli.commands:snapshots")
    p.add_argument("-c", "--channel", action="append", metavar="CHANNEL", help="only this channel (repeatable)")
    p.add_argument("-f", "--format", choices=("plain", "json"), default="plain")

    p = command("channels", "latest snapshot of each channel", "rekkordfs.cli.commands:channels")
    p.add_argument("-f", "--format", choices=("plain", "json"), default="plain")

    p = command("list", "list the tree of a snapshot", "rekkordfs.cli.commands:list_tree")
    p.add_argument("spec", metavar="ID|CHANNEL[:path]")
    p.add_argument("-r", "--recursive", action="store_true", help="list subdirectories too")
    p.add_argument("-f", "--format", choices=("plain", "json"), default="plain")

    p = command("restore", "restore a snapshot (or a path inside it) to DEST", "rekkordfs.cli.commands:restore")
    p.add_argument("spec", metavar="ID|CHANNEL[:path]")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("-f", "--force", action="store_true", help="restore into a non-empty DEST")
    p.add_argument("--delete", action="store_true", help="delete what DEST holds that the snapshot does not")
    p.add_argument("-n", "--dry-run", action="store_true", help="show what would be done, change nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="print each restored path")

    p = command("check", "verify signatures, structure and optionally every blob", "rekkordfs.cli.commands:check")
    p.add_argument("--read-data", action="store_true", help="decrypt and rehash every stored chunk")

    p = command("mount", "mount the repository (or one snapshot) as a filesystem", "rekkordfs.cli.commands:mount")
    p.add_argument("args", metavar="[ID|CHANNEL[:path]] MNT", nargs="+")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("--channel", action="append", metavar="C", help="only show these channels")
    p.add_argument("--cache-size", metavar="SIZE", default=None, help="on-disk blob cache size (e.g. 2G)")
    p.add_argument("--state-dir", metavar="DIR", default=None, help="where staged data is kept")
    p.add_argument("--refresh", metavar="SECONDS", type=float, default=10.0,
                   help="re-list snapshots at most this often (default 10)")
    p.add_argument("--debug", action="store_true", help="log FUSE requests")

    p = command("commit", "turn a staging tree of a running mount into a snapshot", "rekkordfs.cli.commit:commit")
    p.add_argument("staging", metavar="MNT/staging/CHANNEL")
    p.add_argument("-f", "--format", choices=("plain", "json"), default="plain")
    return parser


def make_config(args: argparse.Namespace) -> Config:
    from rekkordfs.config import load_config

    return load_config(
        config_file=getattr(args, "config_file", None),
        repository=getattr(args, "repository", None),
        key_file=getattr(args, "key_file", None),
        threads=getattr(args, "threads", None),
    )


def _first_of(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_of(inner, kind)
            if found is not None:
                return found
    return None


def _byte_safe_output() -> None:
    """File names are bytes: print those that are not valid UTF-8 as their raw
    bytes (as ls does) instead of failing with UnicodeEncodeError under a
    strict UTF-8 locale."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:  # stderr already uses backslashreplace
        reconfigure(errors="surrogateescape")


def main(argv: Sequence[str] | None = None) -> int:
    _byte_safe_output()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "handler", None):
            parser.print_help(sys.stderr)
            return 2
        return _handler(args.handler)(args, make_config) or 0
    except BaseException as exc:  # noqa: BLE001 - translate everything the user can cause
        return _report(exc)


def _handler(spec: str) -> Callable:
    """Commands import the library when they run: `commit`, which only talks
    to a running mount, needs none of it and starts faster."""
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


def _report(exc: BaseException) -> int:
    if isinstance(exc, SystemExit):
        return int(exc.code or 0)
    user = find_user_error(exc)
    if user is not None:
        print(f"rekkord: error: {user.message}", file=sys.stderr)
        return user.exit_code
    trio = sys.modules.get("trio")  # loaded by every command that can be cancelled
    cancelled = trio is not None and _first_of(exc, trio.Cancelled) is not None
    if _first_of(exc, KeyboardInterrupt) is not None or cancelled:
        print("rekkord: interrupted", file=sys.stderr)
        return 130
    broken = _first_of(exc, BrokenPipeError)
    if broken is not None:
        return 141
    oserror = _first_of(exc, OSError)
    if isinstance(oserror, OSError) and oserror.strerror:
        # filename is an int for calls on a file descriptor (os.fchown, os.setxattr(fd)...)
        named = isinstance(oserror.filename, (str, bytes, os.PathLike))
        where = f" '{os.fsdecode(oserror.filename)}'" if named and oserror.filename else ""
        print(f"rekkord: error: {oserror.strerror}{where}", file=sys.stderr)
        return 1
    raise exc


if __name__ == "__main__":
    sys.exit(main())
