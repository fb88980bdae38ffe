"""What several commands share: messages on stderr, keys, snapshot names."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from rekkordfs.errors import UsageError

if TYPE_CHECKING:
    from rekkordfs.config import Config
    from rekkordfs.keys import Keyset

ConfigMaker = Callable[[argparse.Namespace], "Config"]

_lines_lock = threading.Lock()


def write_line(stream, text: str) -> None:  # noqa: ANN001 - a text stream
    """One whole line, callable from worker threads: print() writes the text and
    the newline separately, so two threads could interleave them on one line."""
    with _lines_lock:
        stream.write(f"{text}\n")
        stream.flush()


def warn(message: str) -> None:
    write_line(sys.stderr, f"rekkord: warning: {message}")


def load_keys(config: Config) -> Keyset:
    from rekkordfs import keys

    return keys.load_keyfile(config.require_key_file())


def split_spec(spec: str) -> tuple[str, str]:
    """SNAPSHOT[:PATH] -> (snapshot or channel, path inside it)."""
    name, _, path = spec.partition(":")
    if not name:
        raise UsageError(f"'{spec}' names no snapshot or channel")
    return name, path


def quiet(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "quiet", False))


def verbose(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "verbose", False))
