"""What a save includes: the given paths that exist, minus excluded entries,
the contents of tagged cache folders and other filesystems when asked.

The save walker asks a Selection about each entry it meets; this module knows
nothing of repositories.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from .errors import UsageError
from .exclude import Excluder

CACHEDIR_TAG = b"CACHEDIR.TAG"
# The first bytes of a valid tag (https://bford.info/cachedir/)
CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"


@dataclass
class Selection:
    excluder: Excluder = field(default_factory=lambda: Excluder([]))
    exclude_caches: bool = False
    one_file_system: bool = False

    @property
    def filters_entries(self) -> bool:
        """False when every entry is kept: the walker then skips the checks."""
        return bool(self.excluder) or self.exclude_caches or self.one_file_system

    def excluded(self, name: bytes, path: bytes, relative: bytes, is_dir: bool) -> bool:
        return bool(self.excluder) and self.excluder.excluded(name, path, relative, is_dir)


def is_cache_dir(folder: int) -> bool:
    """Whether the open folder holds a CACHEDIR.TAG (a regular file, not
    followed if a symlink) starting with the signature."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(CACHEDIR_TAG, flags, dir_fd=folder)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        head = b""
        while len(head) < len(CACHEDIR_SIGNATURE):
            more = os.read(fd, len(CACHEDIR_SIGNATURE) - len(head))
            if not more:
                break
            head += more
        return head == CACHEDIR_SIGNATURE
    except OSError:
        return False
    finally:
        os.close(fd)


def split_missing(paths: list[str]) -> tuple[list[str], list[str]]:
    """(paths that exist, a "'path': reason" line per path that does not).

    A save of several paths goes on without the missing ones (a warning);
    when none exists there is nothing to save, which is a usage error.
    """
    found: list[str] = []
    missing: list[str] = []
    for raw in paths:
        try:
            os.lstat(raw)
        except OSError as exc:
            missing.append(f"'{raw}': {exc.strerror}")
        else:
            found.append(raw)
    if not found:
        raise UsageError(f"cannot save {'; '.join(missing)}" if len(missing) == 1
                         else f"nothing to save: {'; '.join(missing)}")
    return found, missing
