"""Helpers shared by the end-to-end tests: tree comparison, digests, error checks."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path


def rsync_diff(src: str | Path, dest: str | Path, *extra: str, checksum: bool = True) -> str:
    """What `rsync -aHAXnci --delete SRC/ DEST/` would change: empty when both trees are equal.

    -a compares types, modes, owners, symlink targets and mtimes, -H hardlinks,
    -A ACLs, -X extended attributes, -c contents. rsync ignores nanoseconds
    unless --modify-window is negative, so that is added: times must match to
    the nanosecond.
    """
    flags = "-aHAXnci" if checksum else "-aHAXni"
    extra = ("--modify-window=-1", *extra)
    src_s, dest_s = os.fsdecode(src), os.fsdecode(dest)
    if os.path.isdir(src_s) and not os.path.islink(src_s):
        src_s, dest_s = src_s.rstrip("/") + "/", dest_s.rstrip("/") + "/"
    result = subprocess.run(["rsync", flags, "--delete", *extra, src_s, dest_s], capture_output=True)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        return f"rsync exited with {result.returncode}: " + output.decode(errors="backslashreplace")
    return output.decode(errors="backslashreplace")


def tree_digest(root: str | Path) -> str:
    """A digest of everything under root: names, types, modes, owners, mtimes, sizes,
    contents, symlink targets, xattrs and hardlink structure. Never follows symlinks."""
    root_b = os.fsencode(root)
    digest = hashlib.sha256()
    inodes: dict[tuple[int, int], bytes] = {}

    def visit(path: bytes, rel: bytes) -> None:
        st = os.lstat(path)
        digest.update(b"\0" + rel + b"\0")
        digest.update(repr((stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                            st.st_mtime_ns)).encode())
        try:
            names = sorted(os.listxattr(path, follow_symlinks=False))
        except OSError:
            names = []
        for name in names:
            digest.update(name.encode() + b"=" + os.getxattr(path, name, follow_symlinks=False))
        if stat.S_ISLNK(st.st_mode):
            digest.update(b"->" + os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            digest.update(repr(st.st_size).encode())
            first = inodes.setdefault((st.st_dev, st.st_ino), rel)
            if first != rel:
                digest.update(b"=link=" + first)
            else:
                with open(path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
        elif stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                visit(path + b"/" + name, rel + b"/" + name)

    if not os.path.lexists(root_b):
        return "absent"
    visit(root_b, b"")
    return digest.hexdigest()


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """A failed command: non-zero exit, exactly one stderr line 'rekkord: error: ...'."""
    stderr = result.stderr if isinstance(result.stderr, str) else result.stderr.decode(errors="replace")
    assert result.returncode != 0, f"expected a failure, got exit 0\n{result.stdout}\n{stderr}"
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("rekkord: error: "), lines[0]
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), f"{fragment!r} not in {lines[0]!r}"
    return lines[0]
