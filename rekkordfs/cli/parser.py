"""The `rekkord` argument parser: every command, the options it uses, its help.

One option style: long options with dashes; the spellings of Rekkord's own
documentation (`--config_file`, `--key_file`) are accepted as hidden aliases.
A letter means the same in every command: -f is --format, -n --dry-run,
-v --verbose, -q --quiet. The common options (-C -R -K -j -q -v) may come
before or after the command name.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

from rekkordfs import __version__
from rekkordfs.errors import UsageError

# Handlers are "module:function", imported only when the command runs, so
# `rekkord --help` and `rekkord commit` load none of the library.
_CLI = "rekkordfs.cli"

SHELLS = ("bash", "zsh")
FORMATS = ("plain", "json")
KEY_TYPES = ("ReadWrite", "WriteOnly", "LogOnly")


class _Formatter(argparse.HelpFormatter):
    """Descriptions are wrapped; lines that start with spaces (the examples) are kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        return "\n".join(line if line.startswith(" ") or not line
                         else textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent,
                                            break_on_hyphens=False)
                         for line in text.splitlines())


class Parser(argparse.ArgumentParser):
    """Usage errors are one line and exit 2 (see main._report), never argparse's usage dump."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # an abbreviation today is an ambiguity tomorrow
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


class Common:
    """Which common options a command uses. (A plain class: dataclasses would
    cost `rekkord --help` the import of inspect and more.)"""

    def __init__(self, config: bool = True, repository: bool = True, key: bool = True, threads: bool = True,
                 quiet: bool = False, verbose: bool = False) -> None:
        self.config = config  # -C
        self.repository = repository  # -R
        self.key = key  # -K
        self.threads = threads  # -j
        self.quiet = quiet  # -q
        self.verbose = verbose  # -v


NO_COMMON = Common(config=False, repository=False, key=False, threads=False)
ALL_COMMON = Common()


def _add_common(parser: argparse.ArgumentParser, uses: Common, top: bool,
                key_help: str = "keyfile to use") -> None:
    """The common options; after the command name their defaults are SUPPRESS,
    so they never undo what was given before it."""
    default = None if top else argparse.SUPPRESS
    flag_default = False if top else argparse.SUPPRESS
    group = parser.add_argument_group("common options (before or after the command name)")
    if uses.config:
        group.add_argument("-C", "--config-file", dest="config_file", metavar="FILE", default=default,
                           help="configuration file (default: REKKORD_CONFIG_FILE, ~/.config/rekkord/rekkord.ini)")
        group.add_argument("--config_file", dest="config_file", default=default, help=argparse.SUPPRESS)
    if uses.repository:
        group.add_argument("-R", "--repository", metavar="URL", default=default,
                           help="repository URL (default: REKKORD_REPOSITORY, or URL in the config file)")
    if uses.key:
        group.add_argument("-K", "--key-file", dest="key_file", metavar="FILE", default=default, help=key_help)
        group.add_argument("--key_file", dest="key_file", default=default, help=argparse.SUPPRESS)
    if uses.threads:
        group.add_argument("-j", "--threads", metavar="N", type=int, default=default,
                           help="worker threads (default: the number of CPUs)")
    if uses.quiet:
        group.add_argument("-q", "--quiet", action="store_true", default=flag_default,
                           help="no progress or summary: only errors, warnings and the result")
    if uses.verbose:
        group.add_argument("-v", "--verbose", action="store_true", default=flag_default,
                           help="list each path" if not top else "list each path (save, restore)")


def _format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--format", choices=FORMATS, default="plain",
                        help="output format: plain (default) or json")


def _dry_run_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("-n", "--dry-run", action="store_true", help=help_text)


def _prune_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grace", metavar="DURATION", default=None,
                        help="how long a backup may have been running and still be safe (default 1d; 0 deletes "
                             "at once: only when no backup is running)")
    parser.add_argument("--repack-below", metavar="FRACTION", type=float, default=None,
                        help="rewrite packs used for less than this share of their bytes (default 0.9)")


# add_parser for one command, with its common options and example (see build_parser)
Command = Callable[..., argparse.ArgumentParser]


def build_parser() -> Parser:
    parser = Parser(
        prog="rekkord",
        description="Deduplicated, encrypted backups with a FUSE view of every snapshot.",
        epilog="Run 'rekkord COMMAND --help' for the options of a command. "
               "Documentation: docs/operations.md.",
    )
    parser.add_argument("--version", action="version", version=f"rekkord (rekkordfs) {__version__}")
    _add_common(parser, Common(quiet=True, verbose=True), top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser, title="commands")

    def command(name: str, summary: str, handler: str, example: str, uses: Common = ALL_COMMON,
                key_help: str = "keyfile to use", description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=description or summary,
                           epilog="example:\n" + "\n".join(f"  {line}" for line in example.splitlines()))
        _add_common(p, uses, top=False, key_help=key_help)
        p.set_defaults(handler=handler)
        return p

    _key_commands(command)
    _save_command(command)
    _listing_commands(command)
    _restore_and_check_commands(command)
    _retention_commands(command)
    _mount_commands(command)
    return parser


def _key_commands(command: Command) -> None:
    """Init, derive, identify."""
    p = command("init", "create a repository and write its master key", f"{_CLI}.keys:init",
                "rekkord -C /etc/rekkord/rekkord.ini init --key-file /root/master.key",
                uses=Common(quiet=True), key_help="where to write the master key (default: ./master.key)",
                description="Create a repository at the configured location and write a new random master "
                            "key (mode 0600, never overwriting a file). Keep it safe: it cannot be recreated.")
    _format_option(p)

    p = command("derive", "write a restricted keyfile derived from the master key", f"{_CLI}.keys:derive",
                "rekkord derive -K master.key -t WriteOnly -O write.key",
                uses=Common(repository=False, threads=False, quiet=True), key_help="the master key")
    kind = p.add_argument("-t", "--type", required=True, metavar="TYPE", help=f"one of {', '.join(KEY_TYPES)}")
    kind.completions = KEY_TYPES  # type: ignore[attr-defined]  # any case is accepted, so no argparse choices
    p.add_argument("-O", "--output", required=True, metavar="FILE", help="where to write the new keyfile")
    _format_option(p)

    p = command("identify", "print the ID and type of a keyfile", f"{_CLI}.keys:identify",
                "rekkord -K write.key identify", uses=Common(repository=False, threads=False))
    _format_option(p)


def _save_command(command: Command) -> None:
    """Save."""
    p = command("save", "save paths as a new snapshot of CHANNEL; prints its ID", f"{_CLI}.save:save",
                "rekkord save laptop /home/me /etc --exclude '*.tmp' --exclude-caches\n"
                "pg_dump mydb | rekkord save db - --stdin-filename mydb.sql",
                uses=Common(quiet=True, verbose=True),
                description="Save each PATH (stored under its absolute path) as one new snapshot of CHANNEL, "
                            "and print the snapshot ID as the last line. PATH '-' with --stdin-filename NAME "
                            "saves standard input as the file NAME at the root of the snapshot.")
    p.add_argument("channel", metavar="CHANNEL", help="the series of snapshots this one belongs to")
    p.add_argument("paths", metavar="PATH", nargs="+", help="files and folders to save, or '-' for standard input")
    p.add_argument("-e", "--exclude", action="append", default=[], metavar="PATTERN",
                   help="leave out what matches PATTERN (repeatable; syntax in docs/operations.md)")
    p.add_argument("--exclude-file", action="append", default=[], metavar="FILE",
                   help="read exclude patterns from FILE, one per line (repeatable)")
    p.add_argument("--exclude-caches", action="store_true",
                   help="leave out the contents of folders holding a valid CACHEDIR.TAG (the tag is kept)")
    p.add_argument("-x", "--one-file-system", action="store_true",
                   help="do not descend into other filesystems below each PATH")
    p.add_argument("--stdin-filename", metavar="NAME", help="with PATH '-': save standard input as the file NAME")
    _dry_run_option(p, "walk the paths and report what would be read; write nothing")
    _format_option(p)


def _listing_commands(command: Command) -> None:
    """Snapshots, channels, list, diff, dump, find, stats."""
    p = command("snapshots", "list snapshots, oldest first", f"{_CLI}.listing:snapshots",
                "rekkord -K master.key snapshots -c laptop -f json")
    p.add_argument("-c", "--channel", action="append", metavar="CHANNEL", help="only this channel (repeatable)")
    _format_option(p)

    p = command("channels", "the latest snapshot of each channel", f"{_CLI}.listing:channels",
                "rekkord -K master.key channels")
    _format_option(p)

    p = command("list", "list a directory of a snapshot", f"{_CLI}.listing:list_tree",
                "rekkord -K master.key list laptop:/home/me -r")
    p.add_argument("spec", metavar="SNAPSHOT[:PATH]", help="snapshot ID, ID prefix (8+ hex digits) or channel")
    p.add_argument("-r", "--recursive", action="store_true", help="list subdirectories too")
    _format_option(p)

    p = command("diff", "what was added, removed and changed between two snapshots", f"{_CLI}.diff:diff",
                "rekkord -K master.key diff laptop-old-id laptop\n"
                "rekkord -K master.key diff 3f2a9c1e:/home/me laptop:/home/me -f json",
                uses=Common(quiet=True),
                description="List the paths added (+), removed (-) and changed between snapshot A and snapshot "
                            "B (or a folder of each): M content, U metadata only (mode, owner, time, xattrs), "
                            "T type. Folders equal in both are skipped without being read.")
    p.add_argument("old", metavar="A", help="SNAPSHOT[:PATH]: the older side")
    p.add_argument("new", metavar="B", help="SNAPSHOT[:PATH]: the newer side")
    _format_option(p)

    p = command("dump", "write a file of a snapshot to standard output, or a folder as a tar archive",
                f"{_CLI}.dump:dump",
                "rekkord -K master.key dump laptop:/home/me/notes.txt > notes.txt\n"
                "rekkord -K master.key dump laptop:/home/me | tar -x -C /tmp/me",
                description="Write the file SNAPSHOT:PATH to standard output as it is, or the folder "
                            "SNAPSHOT[:PATH] as a tar archive (PAX format: modes, owners, nanosecond times, "
                            "symlinks, hardlinks, devices, extended attributes, any file name).")
    p.add_argument("spec", metavar="SNAPSHOT[:PATH]", help="snapshot ID, ID prefix (8+ hex digits) or channel")

    p = command("find", "which snapshots hold a path matching a pattern", f"{_CLI}.find:find",
                "rekkord -K master.key find '*.pdf'\n"
                "rekkord -K master.key find '/home/*/notes.txt' -c laptop -f json",
                uses=Common(quiet=True),
                description="Search every snapshot (or those of the --channel given) for paths matching "
                            "PATTERN, with the syntax of save's --exclude: a pattern without '/' matches a name "
                            "at any depth, one with '/' the path from the snapshot's root; a trailing '/' "
                            "matches folders only.")
    p.add_argument("patterns", metavar="PATTERN", nargs="+", help="glob pattern (several: any of them)")
    p.add_argument("-c", "--channel", action="append", metavar="CHANNEL", help="only this channel (repeatable)")
    _format_option(p)

    p = command("stats", "sizes of the repository: logical, distinct and stored, dedup ratio, packs",
                f"{_CLI}.stats:stats", "rekkord -K master.key stats\nrekkord -K audit.key stats -f json",
                description="Number of snapshots and channels, their logical size, the size of the distinct "
                            "data they refer to (keys that can read), the bytes stored in packs, the ratios, "
                            "and per channel its snapshots, latest and logical size.")
    _format_option(p)


def _restore_and_check_commands(command: Command) -> None:
    """Restore, check."""
    p = command("restore", "restore a snapshot, or a path inside it, to DEST", f"{_CLI}.restore:restore",
                "rekkord -K master.key restore laptop:/home/me /tmp/me\n"
                "rekkord -K master.key restore -n --delete laptop:/home/me /home/me",
                uses=Common(quiet=True, verbose=True))
    p.add_argument("spec", metavar="SNAPSHOT[:PATH]", help="snapshot ID, ID prefix (8+ hex digits) or channel")
    p.add_argument("dest", metavar="DEST", help="folder to restore into (a file restores as DEST itself)")
    p.add_argument("--force", action="store_true", help="restore into a non-empty DEST, or over an existing file")
    p.add_argument("--delete", action="store_true", help="delete what DEST holds that the snapshot does not")
    _dry_run_option(p, "show what would be restored and deleted; change nothing")
    _format_option(p)

    p = command("check", "verify signatures, structure and optionally every chunk", f"{_CLI}.check:check",
                "rekkord -K master.key check --read-data\nrekkord -K master.key check --read-data-subset 1/7",
                uses=Common(quiet=True))
    read = p.add_mutually_exclusive_group()
    read.add_argument("--read-data", action="store_true", help="also download, decrypt and rehash every chunk")
    read.add_argument("--read-data-subset", metavar="N%|N/M",
                      help="the same for some packs only: N%% of them at random, or group N of M (by pack ID)")
    _format_option(p)


def _retention_commands(command: Command) -> None:
    """Forget, prune."""
    p = command("forget", "remove snapshots from the listings, by ID or by policy", f"{_CLI}.retention:forget",
                "rekkord -K master.key forget --keep-daily 7 --keep-weekly 5 --keep-monthly 12 --prune\n"
                "rekkord -K master.key forget 3f2a9c1e 77d0e2b4\n"
                "rekkord -K master.key forget -n --keep-last 10 -c laptop",
                uses=Common(quiet=True),
                description="Remove the snapshots given by ID, or those no --keep-* rule keeps (each channel on its "
                            "own; a channel's newest snapshot is always kept). Their data stays until a prune finds "
                            "that nothing needs it: add --prune to run one. Needs a Master or ReadWrite key.")
    p.add_argument("ids", metavar="ID", nargs="*", help="snapshot IDs or ID prefixes (8+ hex digits)")
    p.add_argument("-c", "--channel", action="append", metavar="CHANNEL",
                   help="apply the rules to this channel only (repeatable; default: every channel)")
    p.add_argument("--keep-last", type=int, metavar="N", help="keep the N newest snapshots")
    for rule, period in (("hourly", "hours"), ("daily", "days"), ("weekly", "ISO weeks"), ("monthly", "months"),
                         ("yearly", "years")):
        p.add_argument(f"--keep-{rule}", type=int, metavar="N",
                       help=f"keep the newest snapshot of each of the N latest {period} that have one (UTC)")
    p.add_argument("--keep-within", metavar="DURATION",
                   help="keep every snapshot at most DURATION older than the channel's newest (e.g. 30d, 6m, 1y)")
    p.add_argument("--prune", action="store_true", help="then prune (see 'rekkord prune --help')")
    _prune_options(p)
    _dry_run_option(p, "show what would be kept and removed (and pruned); change nothing")
    _format_option(p)

    p = command("prune", "delete the data no snapshot needs, and repack mostly unused packs", f"{_CLI}.retention:prune",
                "rekkord -K master.key prune\n"
                "rekkord -K master.key prune --grace 0   # only when no backup is running",
                uses=Common(quiet=True),
                description="Delete what no snapshot needs, while backups keep running: data found unused is first "
                            "condemned, and deleted by a later prune once the grace period is over (unless a backup "
                            "started using it meanwhile). Packs used for less than --repack-below of their size are "
                            "rewritten. Needs a Master or ReadWrite key, and storage credentials that may delete.")
    _prune_options(p)
    _dry_run_option(p, "show what would be deleted, repacked and condemned; change nothing")
    _format_option(p)


def _mount_commands(command: Command) -> None:
    """Mount, commit, completion."""
    p = command("mount", "mount the repository (or one snapshot directory) as a filesystem",
                f"{_CLI}.mounting:mount",
                "rekkord -K master.key mount /mnt/backup\n"
                "rekkord -K master.key mount laptop:/home/me /mnt/me",
                uses=Common(quiet=True),
                description="Mount the whole repository on MNT (channels/, ids/ and a writable staging/), "
                            "or only the directory SNAPSHOT[:PATH], read-only.")
    p.add_argument("spec", metavar="SNAPSHOT[:PATH]", nargs="?", help="mount only this snapshot directory")
    p.add_argument("mountpoint", metavar="MNT")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground; Ctrl-C unmounts")
    p.add_argument("--channel", action="append", metavar="C", help="only show these channels (repeatable)")
    p.add_argument("--cache-size", metavar="SIZE", default=None, help="on-disk blob cache size (e.g. 2G)")
    p.add_argument("--state-dir", metavar="DIR", default=None, help="where staged data is kept")
    p.add_argument("--refresh", metavar="SECONDS", type=float, default=10.0,
                   help="re-list snapshots at most this often (default 10)")
    p.add_argument("--debug", action="store_true", help="log FUSE requests")

    p = command("commit", "turn a staging folder of a running mount into a snapshot; prints its ID",
                f"{_CLI}.commit:commit", "rekkord commit /mnt/backup/staging/laptop",
                uses=Common(config=False, repository=False, key=False, threads=False, quiet=True),
                description="Ask the running mount to commit MNT/staging/CHANNEL as a new snapshot of CHANNEL "
                            "(the mount holds the repository and key: none is needed here).")
    p.add_argument("staging", metavar="MNT/staging/CHANNEL", help="the staging folder of a channel in a running mount")
    _format_option(p)

    p = command("completion", "print a shell completion script (bash or zsh)", f"{_CLI}.completion:completion",
                "source <(rekkord completion bash)        # in ~/.bashrc\n"
                "rekkord completion zsh > ~/.zfunc/_rekkord   # with ~/.zfunc in fpath",
                uses=NO_COMMON)
    p.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash or zsh")
