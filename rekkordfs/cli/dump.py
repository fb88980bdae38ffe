"""`dump SNAPSHOT:PATH`: a file to standard output, a folder as a tar stream."""

from __future__ import annotations

import argparse
import os
import sys

from rekkordfs.dump import TarDumper, dump_file
from rekkordfs.errors import UsageError, first_of
from rekkordfs.format import EntryKind
from rekkordfs.keys import Capability
from rekkordfs.repository import Repository, walk_path

from .common import ConfigMaker, load_keys, split_spec, warn
from .interrupt import run_trio


def dump(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    config = make_config(args)
    keys = load_keys(config)
    keys.require(Capability.READ)
    name, path = split_spec(args.spec)
    out = sys.stdout.buffer
    skipped: list[str] = []

    async def run() -> None:
        async with Repository.connect(config, keys) as repo:
            tag = await repo.resolve(name)
            entry, has_metadata = await walk_path(repo, await repo.load_snapshot(tag), path)
            if entry.kind == EntryKind.FILE:
                await dump_file(repo, entry, out, path)
            elif entry.kind == EntryKind.DIRECTORY:
                if out.isatty():
                    raise UsageError(f"'{args.spec}' is a folder: its tar archive would go to the terminal; "
                                     "redirect it to a file or a pipe ('> archive.tar', '| tar -x')")
                stats = await TarDumper(repo, out, warn, f"snapshot {tag.id_hex}").run(entry, has_metadata)
                skipped.extend(stats.skipped)
            else:
                raise UsageError(f"'{args.spec}' is a {entry.kind.name.lower().replace('_', ' ')}, "
                                 "not a file or a folder: nothing to dump")

    try:
        run_trio(run)
    except BaseException as exc:
        if first_of(exc, BrokenPipeError) is not None:
            # the reader went away (`| head`): nothing left for the interpreter
            # to flush into the closed pipe at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise
    return 3 if skipped else 0
