"""Builders of source trees with every case a backup must get right."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

NS_TIME = 1_234_567_890_123_456_789  # a timestamp with every nanosecond digit set


def _write(path: Path, data: bytes, mode: int | None = None) -> Path:
    path.write_bytes(data)
    if mode is not None:
        os.chmod(path, mode)
    return path


def make_awkward_tree(root: Path, seed: int = 1, big_sparse: bool = False) -> Path:
    """Regular files of many sizes, nested and empty dirs, symlinks (relative,
    absolute, dangling), hardlinks within and across dirs, unusual modes and
    owners, ns timestamps, xattrs and a POSIX ACL, empty and sparse files,
    a fifo and names made of arbitrary bytes. Returns root."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    broot = os.fsencode(root)

    _write(root / "empty", b"")
    _write(root / "small.txt", b"hello world\n" * 10)
    _write(root / "random-3M.bin", rng.randbytes(3 << 20))
    text = b"".join(b"line %d of a compressible text file\n" % i for i in range(300_000))
    _write(root / "text-10M.txt", text)
    _write(root / "exec.sh", b"#!/bin/sh\necho hi\n", 0o755)
    _write(root / "setuid", b"suid", 0o4755)
    _write(root / "no-perms", b"secret", 0o000)

    deep = root / "a" / "b" / "c" / "d" / "e"
    deep.mkdir(parents=True)
    _write(deep / "deep.txt", b"deep\n")
    (root / "empty-dir").mkdir()
    sticky = root / "sticky"
    sticky.mkdir()
    _write(sticky / "inside", b"x")
    os.chmod(sticky, 0o1777)
    setgid = root / "setgid-dir"
    setgid.mkdir()
    os.chmod(setgid, 0o2775)

    # symlinks
    os.symlink("small.txt", root / "link-relative")
    os.symlink("/etc/hostname", root / "link-absolute")
    os.symlink("does/not/exist", root / "link-dangling")
    os.symlink("a/b", root / "link-to-dir")

    # hardlinks: within a dir and across dirs
    _write(root / "hard-1", b"shared inode content\n" * 100)
    os.link(root / "hard-1", root / "hard-2")
    os.link(root / "hard-1", deep / "hard-3")

    # owners (we run as root)
    owned = _write(root / "owned", b"owned by someone else")
    os.chown(owned, 1234, 5678)
    os.lchown(root / "link-relative", 4321, 8765)
    os.chown(root / "a" / "b", 65534, 65534)

    # xattrs and an ACL
    os.setxattr(root / "small.txt", "user.comment", b"\x00\xffbinary value")
    os.setxattr(root / "small.txt", "user.empty", b"")
    os.setxattr(root / "a", "user.on-dir", b"dir attr")
    subprocess.run(["setfacl", "-m", "u:1234:rwx,g:5678:r", str(root / "exec.sh")], check=True)

    # sparse: a hole, some data, a hole
    with open(root / "sparse", "wb") as handle:
        handle.seek(20 << 20)
        handle.write(b"data in the middle")
        handle.truncate(40 << 20)
    if big_sparse:
        with open(root / "big-sparse-5G", "wb") as handle:
            handle.seek((4 << 30) + 12345)
            handle.write(b"beyond 4 GiB")
            handle.truncate(5 << 30)

    os.mkfifo(root / "fifo")

    # names with any bytes but '/' and NUL
    for name in (b"\xff\xfe not utf-8", b"new\nline", b"  spaces  ", b"-leading-dash", "ünïcødé ✓".encode(),
                 b"x" * 255, b"tab\there", b"*?[glob]"):
        with open(broot + b"/" + name, "wb") as handle:
            handle.write(name)

    # nanosecond times, set bottom-up so directory times stick
    for dirpath, dirnames, filenames in os.walk(broot, topdown=False):
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            os.utime(path, ns=(NS_TIME + rng.randrange(10**9), NS_TIME - rng.randrange(10**12)),
                     follow_symlinks=False)
        os.utime(dirpath, ns=(NS_TIME, NS_TIME + 7))
    return root


def make_wide_dir(root: Path, count: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        fd = os.open(root / f"f{i:06d}", os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)
    return root


def make_random_files(root: Path, count: int, max_size: int, seed: int, width: int = 3) -> dict[bytes, bytes]:
    """count files of 1 to max_size random bytes in root (made here), named
    f000... (width digits); returns name -> content."""
    root.mkdir()
    rng = random.Random(seed)
    contents = {f"f{i:0{width}}".encode(): rng.randbytes(rng.randrange(1, max_size)) for i in range(count)}
    for name, data in contents.items():
        (root / os.fsdecode(name)).write_bytes(data)
    return contents


def rsync_differences(src: Path | str, dest: Path | str) -> str:
    """What `rsync -aHAXnci --delete` would change: empty when trees are equal."""
    result = subprocess.run(["rsync", "-aHAXnci", "--delete", f"{src}/", f"{dest}/"],
                            capture_output=True, text=True, errors="replace")
    assert result.returncode == 0, result.stderr
    return result.stdout
