"""The folder where a mount keeps its staged data, one per repository and key.

    <state root>/<repository id>/key-<key id>/    by default (cache.default_state_dir)
        lock          held (flock) by the mount using the folder; names its mount point
        owner         the repository and key the folder belongs to
        <channel>/    one staging tree per channel (staging.py)

Keys see different things: trees seeded from snapshots need a key that can
read them, which a WriteOnly key cannot, so every key has its own folder. A
folder given with --state-dir is used as it is, and refused to any key other
than the one that first used it (its `owner` file says which).

Before keys had folders of their own, trees lay directly in
`<repository id>/`. Those are moved into the folder of the first key that
mounts and can use them (any key that can read; a WriteOnly key only trees
that hold no folder of a stored snapshot), so nothing staged is lost.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
from pathlib import Path

from .cache import default_state_dir
from .errors import UsageError
from .keys import Capability, Keyset

log = logging.getLogger(__name__)

LOCK = "lock"
OWNER = "owner"
TREE_DB = "tree.db"  # what makes a folder a staging tree (staging.py)


def key_state_folder(repo_id: str, key_id: str) -> Path:
    """The default state folder of one key of one repository."""
    return default_state_dir() / repo_id / f"key-{key_id}"


def lock_state_folder(folder: Path, mountpoint: str | None) -> int:
    """One mount at a time per state folder (the journals are not shared).
    The lock file names the mount point, so a second mount can say where the
    first one is. Returns the descriptor holding the lock."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        if holder is not None:
            where, pid = holder
            raise UsageError(f"this repository is already mounted on '{where}' with this key (process {pid}); "
                             f"unmount it first ('fusermount3 -u {where}'), or give this mount its own "
                             "--state-dir") from None
        raise UsageError(f"the staging state folder '{folder}' is in use by another mount of this repository "
                         "(unmount it, or give this one its own --state-dir)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"mountpoint": mountpoint, "pid": os.getpid()}).encode() + b"\n", 0)
    return fd


def _read_holder(fd: int) -> tuple[str, int] | None:
    try:
        holder = json.loads(os.pread(fd, 65536, 0))
        where, pid = holder["mountpoint"], holder["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an older version's lock, or one being written
    return (where, pid) if isinstance(where, str) and isinstance(pid, int) else None


def prepare_state_folder(folder: Path, keys: Keyset, repo_id: str) -> None:
    """Make folder (locked by the caller) this key's: move in the trees an
    older version left for the whole repository, then check or write its owner."""
    if folder == key_state_folder(repo_id, keys.id_hex):
        _adopt_old_trees(folder.parent, folder, keys)
    _claim(folder, keys, repo_id)


def _trees(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if (p / TREE_DB).is_file())


def _needs_reader(tree: Path) -> bool:
    """Whether a tree still holds folders of the snapshot it was seeded from
    (expanded only by reading them); unknown counts as yes."""
    try:
        db = sqlite3.connect(f"file:{tree / TREE_DB}?mode=ro", uri=True)
        try:
            return db.execute("SELECT 1 FROM inodes WHERE dir_ref IS NOT NULL LIMIT 1").fetchone() is not None
        finally:
            db.close()
    except sqlite3.Error:
        return True


def _usable(tree: Path, keys: Keyset) -> bool:
    return keys.can(Capability.READ) or not _needs_reader(tree)


def _adopt_old_trees(old: Path, folder: Path, keys: Keyset) -> None:
    trees = _trees(old)
    if not trees:
        return
    fd = os.open(old / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("staged trees in '%s' are in use by a mount of an older version; left there", old)
            return
        for tree in _trees(old):
            if not _usable(tree, keys):
                log.warning("staging/%s in '%s' was seeded from snapshots this %s key cannot read; left "
                            "there for a key that can read", tree.name, old, keys.kind.label)
            elif (folder / tree.name).exists():
                log.warning("staging/%s in '%s' not moved: this key has a tree of that name", tree.name, old)
            else:
                os.rename(tree, folder / tree.name)
                log.info("staging/%s moved from '%s' into this key's state folder", tree.name, old)
    finally:
        os.close(fd)


def _claim(folder: Path, keys: Keyset, repo_id: str) -> None:
    path = folder / OWNER
    try:
        owner = json.loads(path.read_text())
        owner_repo, owner_key, owner_type = owner["repository"], owner["key"], owner.get("type", "?")
    except FileNotFoundError:
        owner = None
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"the staging state folder '{folder}' has a damaged '{OWNER}' file; "
                         "give this mount another --state-dir") from None
    if owner is not None:
        if owner_repo != repo_id:
            raise UsageError(f"the staging state folder '{folder}' belongs to another repository "
                             f"({owner_repo}); give this mount its own --state-dir")
        if owner_key != keys.id_hex:
            raise UsageError(f"the staging state folder '{folder}' belongs to another key ({owner_type} key "
                             f"{owner_key}); mount with that key, or give this mount its own --state-dir")
        return
    unusable = [tree.name for tree in _trees(folder) if not _usable(tree, keys)]
    if unusable:
        raise UsageError(f"the staging state folder '{folder}' holds staged trees seeded from snapshots a "
                         f"{keys.kind.label} key cannot read (staging/{unusable[0]}); mount it with the key "
                         "that staged them, or give this mount its own --state-dir")
    temp = folder / f".{OWNER}.tmp"
    temp.write_text(json.dumps({"repository": repo_id, "key": keys.id_hex, "type": keys.kind.label}) + "\n")
    os.replace(temp, path)
