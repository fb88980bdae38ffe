"""A restored small file is created with its final permission bits when the
umask keeps them all, and its chown and chmod are skipped when they would
change nothing (destination.NewFiles): whatever the umask, the folder's
set-group-ID bit or a default ACL, the restored modes, owners and groups
are the snapshot's exactly. Runs as root, as the whole suite does.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import Rekkord
from tests.fsutil import rsync_diff

# (name, mode, uid, gid): bits the umask strips, set-id and sticky bits, no
# bits at all, owners and groups other than the restoring process's
FILES = [
    ("plain", 0o644, 0, 0),
    ("group-write", 0o664, 0, 0),
    ("all", 0o777, 0, 0),
    ("private", 0o600, 0, 0),
    ("none", 0o000, 0, 0),
    ("read-only", 0o444, 0, 0),
    ("setuid", 0o4755, 0, 0),
    ("setgid", 0o2750, 0, 4321),
    ("sticky", 0o1644, 0, 0),
    ("owned", 0o644, 1234, 5678),
    ("other-group", 0o640, 0, 4321),
]


def _make_tree(root: Path) -> None:
    for folder in ("", "sub", "sub/deeper"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, mode, uid, gid in FILES:
            path = root / folder / name
            path.write_bytes(name.encode() * 10)
            os.chown(path, uid, gid)
            os.chmod(path, mode)  # after chown, which clears set-id bits


def _modes(root: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p.relative_to(root)): (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            for p in sorted(root.rglob("*")) if p.is_file() for st in [p.lstat()]}


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)  # the restore, a child process, inherits it
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def saved(local_repo: Rekkord, tmp_path: Path) -> tuple[Rekkord, Path]:
    src = tmp_path / "src"
    _make_tree(src)
    local_repo.save("modes", str(src))
    return local_repo, src


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o000, 0o777])
def test_modes_owners_and_groups_whatever_the_umask(saved: tuple[Rekkord, Path], tmp_path: Path,
                                                    mask: int) -> None:
    rekkord, src = saved
    dest = tmp_path / "dest"
    with _umask(mask):
        rekkord("restore", f"modes:{src}", str(dest))
    assert _modes(dest) == _modes(src)
    assert rsync_diff(src, dest) == ""


def test_a_set_group_id_folder_does_not_lend_its_group(saved: tuple[Rekkord, Path], tmp_path: Path) -> None:
    """Files created in a folder with the set-group-ID bit get the folder's
    group, not the process's: the chown must not be skipped then."""
    rekkord, src = saved
    dest = tmp_path / "dest"
    dest.mkdir()
    os.chown(dest, 0, 999)
    os.chmod(dest, 0o2775)
    rekkord("restore", f"modes:{src}", str(dest))
    assert _modes(dest) == _modes(src)


def test_a_default_acl_does_not_change_the_modes(saved: tuple[Rekkord, Path], tmp_path: Path) -> None:
    """A folder's default ACL masks a new file's mode in place of the umask:
    the chmod must not be skipped then."""
    rekkord, src = saved
    dest = tmp_path / "dest"
    dest.mkdir()
    # user::rwx group::--- other::--- (version 2, then tag, permissions, ID per entry)
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
                                          for tag, perm in ((0x01, 7), (0x04, 0), (0x20, 0)))
    try:
        os.setxattr(dest, "system.posix_acl_default", acl)
    except OSError as exc:
        pytest.skip(f"no default ACLs here: {exc.strerror}")
    probe = dest / "probe"
    probe.touch(0o644)
    assert stat.S_IMODE(probe.stat().st_mode) == 0o600  # the ACL, not the umask, decided
    probe.unlink()
    rekkord("restore", f"modes:{src}", str(dest))
    assert _modes(dest) == _modes(src)


def test_a_folder_whose_acl_cannot_be_read_leaves_the_mode_to_chmod(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A destination that answers getxattr with an error other than "no such
    attribute" or "not supported" (EACCES from a security module, EIO) does
    not fail the restore: the umask is taken as unknown, so chmod sets the mode."""
    import errno

    from rekkordfs import destination

    def refuse(*_args: object, **_kwargs: object) -> bytes:
        raise OSError(errno.EACCES, "refused")

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        new_files = destination.NewFiles()
        assert new_files.folder(fd)[1] is not None  # a plain folder: the umask is known
        monkeypatch.setattr(destination.os, "getxattr", refuse)
        assert new_files.folder(fd) == (os.getegid(), None)
    finally:
        os.close(fd)
