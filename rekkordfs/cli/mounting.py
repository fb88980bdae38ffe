"""`mount`: the repository, or one snapshot directory, as a filesystem."""

from __future__ import annotations

import argparse

from rekkordfs.keys import Capability

from .common import ConfigMaker, load_keys, quiet


def mount(args: argparse.Namespace, make_config: ConfigMaker) -> int:
    from rekkordfs.mount import MountOptions, check_mountpoint, daemonize, parse_size, run_foreground

    config = make_config(args)
    keys = load_keys(config)
    config.require_location()
    options = MountOptions(mountpoint=check_mountpoint(args.mountpoint), spec=args.spec,
                           foreground=args.foreground, channels=args.channel or [],
                           refresh_interval=args.refresh, state_dir=args.state_dir, debug=args.debug,
                           quiet=quiet(args))
    if args.cache_size:
        options.cache_size = parse_size(args.cache_size)
    if args.spec is not None:
        keys.require(Capability.READ)
    if args.foreground:
        return run_foreground(config, keys, options)
    return daemonize(config, keys, options)
