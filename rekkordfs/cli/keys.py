"""`init`, `derive` and `identify`: repositories and their keyfiles."""

from __future__ import annotations

import argparse
import os

from rekkordfs import keys as keymod
from rekkordfs.errors import KeyFileError
from rekkordfs.keys import Capability, KeyType
from rekkordfs.repository import Repository
from rekkordfs.storage import open_storage

from .common import ConfigMaker, load_keys, quiet
from .interrupt import run_trio
from .output import print_json


def init(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    config = make_config(args)
    key_path = getattr(args, "key_file", None) or "master.key"
    config.require_location()
    master = keymod.new_master()
    keymod.write_keyfile(key_path, master)  # first, so a repository never exists without its key

    async def create() -> Repository:
        storage = open_storage(config)
        try:
            return await Repository.create(storage, master, threads=config.threads)
        finally:
            await storage.aclose()

    try:
        repo = run_trio(create)
    except BaseException:
        os.unlink(key_path)  # the repository was not created: this key opens nothing
        raise
    if args.format == "json":
        print_json({"repository": repo.storage.description, "key_file": key_path, "key_id": master.id_hex,
                    "type": master.kind.label})
    elif not quiet(args):
        print(f"Repository created at {repo.storage.description}")
        print(f"Master key written to {key_path} (ID {master.id_hex}); keep it safe, it cannot be recreated.")
    return 0


def derive(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    config = make_config(args)
    master = load_keys(config)
    kind = KeyType.from_label(args.type)
    if kind == KeyType.MASTER:
        raise KeyFileError("derive creates ReadWrite, WriteOnly or LogOnly keys, not Master keys")
    master.require(Capability.DERIVE)
    derived = keymod.derive(master, kind)
    keymod.write_keyfile(args.output, derived)
    if args.format == "json":
        print_json({"key_file": args.output, "key_id": derived.id_hex, "type": kind.label})
    elif not quiet(args):
        print(f"{kind.label} key written to {args.output} (ID {derived.id_hex})")
    return 0


def identify(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    keys = load_keys(make_config(args))
    if args.format == "json":
        print_json({"id": keys.id_hex, "type": keys.kind.label, "master": keys.master_public.hex()})
    else:
        print(f"Key ID: {keys.id_hex}")
        print(f"Type:   {keys.kind.label}")
    return 0
