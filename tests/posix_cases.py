"""The cases of the differential POSIX test (tests/test_posix_staging.py): each
runs the same system calls under a root folder through a Probe (tests/posix_diff.py).
The errors expected are those of Linux on ext4 and tmpfs; the test compares."""

from __future__ import annotations

import os
import subprocess

from .posix_diff import (
    LONG,
    LONGEST,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    UTIME_NOW,
    UTIME_OMIT,
    Probe,
    renameat2,
    utimensat,
)

PAST = (1_000_000_000, 123)  # (seconds, nanoseconds)
PAST_NS = PAST[0] * 1_000_000_000 + PAST[1]


def _create(path: bytes, mode: int = 0o644, flags: int = 0) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | flags, mode))


def _write(path: bytes, data: bytes, offset: int = 0, flags: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | flags)
    try:
        if flags & os.O_APPEND:
            os.write(fd, data)
        else:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def names_over_255_bytes(p: Probe) -> None:
    p.at("create 255", _create, LONGEST)
    p.stat("lstat 255", LONGEST)
    p.at("mkdir", os.mkdir, b"d")
    p.at("create 256", _create, LONG)
    p.at("mkdir 256", os.mkdir, LONG)
    p.at("lstat 256", os.lstat, LONG)
    p.at("chmod 256", os.chmod, LONG, 0o600)
    p.at("chown 256", os.chown, LONG, 1, 1)
    p.at("truncate 256", os.truncate, LONG, 0)
    p.at("unlink 256", os.unlink, LONG)
    p.at("rmdir 256", os.rmdir, LONG)
    p.do("symlink 256", os.symlink, b"target", p.path(LONG))
    p.at("mkfifo 256", os.mkfifo, LONG)
    p.do("link to 256", os.link, p.path(LONGEST), p.path(LONG))
    p.do("link from 256", os.link, p.path(LONG), p.path(b"other"))
    p.do("rename to 256", os.rename, p.path(LONGEST), p.path(LONG))
    p.do("rename from 256", os.rename, p.path(LONG), p.path(b"other"))
    p.at("setxattr 256", os.setxattr, LONG, b"user.x", b"1")
    p.at("create 256 in a folder", _create, b"d/" + LONG)
    p.at("lstat below 256", os.lstat, LONG + b"/x")
    p.do("rename 255", os.rename, p.path(LONGEST), p.path(b"d/" + LONGEST))
    p.stat("lstat 255 renamed", b"d/" + LONGEST)


def folder_link_counts(p: Probe) -> None:
    """2 + subfolders, as folders come, go and move."""
    p.stat("root", b"")
    p.at("mkdir a", os.mkdir, b"a")
    p.stat("root with a", b"")
    p.stat("a", b"a")
    p.at("mkdir a/b", os.mkdir, b"a/b")
    p.at("mkdir a/c", os.mkdir, b"a/c")
    p.at("create a/f", _create, b"a/f")
    p.stat("a with b, c, f", b"a")
    p.do("rename a/b to b", os.rename, p.path(b"a/b"), p.path(b"b"))
    p.stat("a after moving b out", b"a")
    p.stat("root after moving b in", b"")
    p.do("rename b to a/b2", os.rename, p.path(b"b"), p.path(b"a/b2"))
    p.stat("root after moving b out", b"")
    p.stat("a after moving b2 in", b"a")
    p.at("rmdir a/c", os.rmdir, b"a/c")
    p.stat("a after rmdir", b"a")
    p.at("mkdir d", os.mkdir, b"d")
    p.do("rename a/b2 over d", os.rename, p.path(b"a/b2"), p.path(b"d"))
    p.stat("root after rename over d", b"")
    p.stat("a after rename over d", b"a")
    p.at("mkdir x", os.mkdir, b"x")
    p.at("mkdir x/y", os.mkdir, b"x/y")
    p.at("create z", _create, b"z")
    p.do("exchange x/y and z", renameat2, p.path(b"x/y"), p.path(b"z"), RENAME_EXCHANGE)
    p.stat("x after exchange", b"x")
    p.stat("root after exchange", b"")
    p.stat("z after exchange", b"z")
    p.do("rename a within root", os.rename, p.path(b"a"), p.path(b"a2"))
    p.stat("root after rename within", b"")


def errors_of_names_and_types(p: Probe) -> None:
    p.at("mkdir e", os.mkdir, b"e")
    p.at("mkdir e/sub", os.mkdir, b"e/sub")
    p.at("create e/file", _create, b"e/file")
    p.at("mkdir o", os.mkdir, b"o")
    p.at("rmdir non-empty", os.rmdir, b"e")
    p.do("rename over non-empty", os.rename, p.path(b"o"), p.path(b"e"))
    p.do("link a folder", os.link, p.path(b"e"), p.path(b"e2"))
    p.at("O_EXCL on existing", _create, b"e/file", 0o644, os.O_EXCL)
    p.at("O_CREAT on existing", _create, b"e/file")
    p.at("unlink a folder", os.unlink, b"e")
    p.at("rmdir a file", os.rmdir, b"e/file")
    p.at("mkdir existing", os.mkdir, b"e")
    p.at("mkdir over a file", os.mkdir, b"e/file")
    p.do("rename file over folder", os.rename, p.path(b"e/file"), p.path(b"o"))
    p.do("rename folder over file", os.rename, p.path(b"o"), p.path(b"e/file"))
    p.do("rename into itself", os.rename, p.path(b"e"), p.path(b"e/sub/x"))
    p.at("readlink a file", os.readlink, b"e/file")
    p.at("truncate a folder", os.truncate, b"e", 0)
    p.at("open a folder for writing", os.open, b"e", os.O_WRONLY)
    p.do("symlink over existing", os.symlink, b"t", p.path(b"e/file"))
    p.at("path through a file", os.lstat, b"e/file/x")
    p.at("create through a file", _create, b"e/file/x")
    p.at("rmdir .", os.rmdir, b"e/.")
    p.at("mkdir in a missing folder", os.mkdir, b"missing/x")
    p.do("link a missing file", os.link, p.path(b"missing"), p.path(b"x"))
    p.do("rename a missing file", os.rename, p.path(b"missing"), p.path(b"x"))
    p.do("noreplace onto existing", renameat2, p.path(b"o"), p.path(b"e"), RENAME_NOREPLACE)
    p.do("exchange with missing", renameat2, p.path(b"o"), p.path(b"missing"), RENAME_EXCHANGE)
    p.at("create h", _create, b"h")
    p.do("link h h2", os.link, p.path(b"h"), p.path(b"h2"))
    p.do("rename onto its own hardlink", os.rename, p.path(b"h"), p.path(b"h2"))
    p.stat("h still there", b"h")
    p.stat("h2 still there", b"h2")
    p.do("link onto existing", os.link, p.path(b"h"), p.path(b"e/file"))
    p.note("listing", sorted(os.listdir(p.root)))


def extended_attributes(p: Probe) -> None:
    p.at("create f", _create, b"f")
    p.at("get missing", os.getxattr, b"f", b"user.none")
    p.at("remove missing", os.removexattr, b"f", b"user.none")
    p.at("set", os.setxattr, b"f", b"user.a", b"1")
    p.at("set with XATTR_CREATE, existing", os.setxattr, b"f", b"user.a", b"2", os.XATTR_CREATE)
    p.at("set with XATTR_REPLACE, missing", os.setxattr, b"f", b"user.b", b"2", os.XATTR_REPLACE)
    p.at("set with XATTR_REPLACE, existing", os.setxattr, b"f", b"user.a", b"3", os.XATTR_REPLACE)
    p.at("get", os.getxattr, b"f", b"user.a")
    p.at("set empty value", os.setxattr, b"f", b"user.empty", b"")
    p.at("get empty value", os.getxattr, b"f", b"user.empty")
    p.at("list", os.listxattr, b"f")
    p.do("symlink s", os.symlink, b"f", p.path(b"s"))
    p.do("user xattr on a symlink", os.setxattr, p.path(b"s"), b"user.a", b"1", follow_symlinks=False)
    p.at("name over 255 bytes", os.setxattr, b"f", b"user." + b"x" * 251, b"1")
    p.at("value of 2000 bytes", os.setxattr, b"f", b"user.big", b"v" * 2000)
    p.at("value over 64 KiB", os.setxattr, b"f", b"user.bigger", b"v" * 65537)
    p.at("remove", os.removexattr, b"f", b"user.a")
    p.at("list after remove", os.listxattr, b"f")


def times(p: Probe) -> None:
    p.at("create f", _create, b"f")
    p.do("set both", utimensat, p.path(b"f"), PAST, PAST)
    p.do("atime now, mtime omitted", utimensat, p.path(b"f"), (0, UTIME_NOW), (0, UTIME_OMIT))
    st = os.lstat(p.path(b"f"))
    p.note("atime moved", st.st_atime_ns > PAST_NS)
    p.note("mtime kept", st.st_mtime_ns == PAST_NS)
    p.do("set both again", utimensat, p.path(b"f"), PAST, PAST)
    p.do("atime omitted, mtime now", utimensat, p.path(b"f"), (0, UTIME_OMIT), (0, UTIME_NOW))
    st = os.lstat(p.path(b"f"))
    p.note("atime kept", st.st_atime_ns == PAST_NS)
    p.note("mtime moved", st.st_mtime_ns > PAST_NS)
    p.do("set both again", utimensat, p.path(b"f"), PAST, PAST)
    p.at("chmod", os.chmod, b"f", 0o600)
    p.note("chmod keeps mtime", os.lstat(p.path(b"f")).st_mtime_ns == PAST_NS)
    p.at("write", _write, b"f", b"data")
    p.note("write moves mtime", os.lstat(p.path(b"f")).st_mtime_ns > PAST_NS)
    p.at("mkdir d", os.mkdir, b"d")
    p.do("set folder times", utimensat, p.path(b"d"), PAST, PAST)
    p.at("create d/x", _create, b"d/x")
    p.note("create moves the folder's mtime", os.lstat(p.path(b"d")).st_mtime_ns > PAST_NS)
    p.do("set folder times again", utimensat, p.path(b"d"), PAST, PAST)
    p.do("set file times", utimensat, p.path(b"d/x"), PAST, PAST)
    p.do("rename d/x", os.rename, p.path(b"d/x"), p.path(b"d/y"))
    p.note("rename moves the folder's mtime", os.lstat(p.path(b"d")).st_mtime_ns > PAST_NS)
    p.note("rename keeps the file's mtime", os.lstat(p.path(b"d/y")).st_mtime_ns == PAST_NS)
    p.do("symlink", os.symlink, b"target", p.path(b"s"))
    p.do("symlink times", utimensat_nofollow, p.path(b"s"))
    p.note("symlink mtime set", os.lstat(p.path(b"s")).st_mtime_ns == PAST_NS)


def utimensat_nofollow(path: bytes) -> None:
    os.utime(path, ns=(PAST_NS, PAST_NS), follow_symlinks=False)


def sizes_and_holes(p: Probe) -> None:
    p.at("create empty", _create, b"empty")
    p.stat("empty", b"empty", "size", "blocks")
    p.at("create small", _create, b"small")
    p.at("write small", _write, b"small", b"x" * 1000)
    p.stat("small", b"small", "size", "allocated")
    p.at("create sparse", _create, b"sparse")
    p.at("write after a hole", _write, b"sparse", b"end", 10 << 20)
    p.stat("sparse", b"sparse", "size", "sparse")
    p.at("create extended", _create, b"extended")
    p.at("truncate to extend", os.truncate, b"extended", 5 << 20)
    p.stat("extended", b"extended", "size", "sparse")
    p.at("append", _write, b"small", b"tail", 0, os.O_APPEND)
    p.stat("small after append", b"small", "size")
    p.note("appended at the end", open(p.path(b"small"), "rb").read()[-5:])
    p.at("open with O_TRUNC", _write, b"small", b"", 0, os.O_TRUNC)
    p.stat("small after O_TRUNC", b"small", "size")
    p.do("symlink", os.symlink, b"t" * 100, p.path(b"s"))
    p.stat("symlink", b"s", "type", "size")
    p.do("symlink of 4095 bytes", os.symlink, b"t" * 4095, p.path(b"s2"))
    p.do("symlink of 4096 bytes", os.symlink, b"t" * 4096, p.path(b"s3"))
    p.note("namemax", os.statvfs(p.root).f_namemax)


def modes_and_owners(p: Probe) -> None:
    old = os.umask(0)
    try:
        p.at("create 4755", _create, b"suid", 0o4755)
        p.stat("suid", b"suid")
        p.at("chown clears set-user-ID", os.chown, b"suid", 1000, 1000)
        p.stat("suid after chown", b"suid", "mode", "uid", "gid")
        p.at("mkdir 2775", os.mkdir, b"g", 0o2775)
        p.at("chown g", os.chown, b"g", 0, 1234)
        p.at("create inside", _create, b"g/f")
        p.stat("inherits the group", b"g/f", "mode", "gid")
        p.at("mkdir inside", os.mkdir, b"g/d", 0o755)
        p.stat("inherits set-group-ID", b"g/d", "mode", "gid")
        p.at("chmod 7777", os.chmod, b"g/f", 0o7777)
        p.stat("all bits", b"g/f", "mode")
        p.at("mkfifo", os.mkfifo, b"fifo", 0o640)
        p.stat("fifo", b"fifo")
        p.at("mknod", os.mknod, b"dev", 0o020600, os.makedev(1, 3))
        p.stat("device", b"dev", "type", "mode", "rdev")
    finally:
        os.umask(old)


def open_files(p: Probe) -> None:
    """Unlinked and renamed while open; writes through a shared mapping."""
    old = os.umask(0o022)
    try:
        p.at("create with 0777 under umask 022", _create, b"u", 0o777)
        p.stat("umask applied", b"u")
        p.at("mkdir with 0777 under umask 022", os.mkdir, b"ud", 0o777)
        p.stat("umask applied to a folder", b"ud")
    finally:
        os.umask(old)
    fd = os.open(p.path(b"f"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        p.do("write", os.write, fd, b"hello")
        p.at("rename while open", os.rename, b"f", p.path(b"g"))
        p.at("unlink while open", os.unlink, b"g")
        p.note("link count of the open, unlinked file", os.fstat(fd).st_nlink)
        p.do("write after unlink", os.pwrite, fd, b" world", 5)
        p.do("read after unlink", os.pread, fd, 100, 0)
        p.do("ftruncate after unlink", os.ftruncate, fd, 3)
        p.note("size after ftruncate", os.fstat(fd).st_size)
        p.note("listing", sorted(os.listdir(p.root)))
    finally:
        os.close(fd)
    import mmap
    p.at("create m", _create, b"m")
    p.at("size m", os.truncate, b"m", 8192)
    fd = os.open(p.path(b"m"), os.O_RDWR)
    try:
        with mmap.mmap(fd, 8192) as mapped:
            mapped[100:105] = b"MMAP!"
            mapped.flush()
    finally:
        os.close(fd)
    p.note("written through a mapping", open(p.path(b"m"), "rb").read()[98:107])


def less_common_calls(p: Probe) -> None:
    """Calls the FUSE library in use does not pass on (see docs/mount.md)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    p.at("create f", _create, b"f")
    fd = os.open(p.path(b"f"), os.O_RDWR)
    try:
        def fallocate(mode: int, offset: int, length: int) -> None:
            if libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
        p.do("fallocate", fallocate, 0, 0, 1 << 20)
        p.do("write after a hole", os.pwrite, fd, b"x", 3 << 20)
        p.do("SEEK_DATA from 0", os.lseek, fd, 0, os.SEEK_DATA)
        p.do("SEEK_HOLE from 0", os.lseek, fd, 0, os.SEEK_HOLE)
    finally:
        os.close(fd)
    p.do("O_TMPFILE", lambda: os.close(os.open(p.root, os.O_TMPFILE | os.O_RDWR, 0o600)))
    p.at("trusted xattr", os.setxattr, b"f", b"trusted.x", b"1")
    p.at("security xattr", os.setxattr, b"f", b"security.x", b"1")
    p.at("xattr of no namespace", os.setxattr, b"f", b"nonamespace", b"1")
    p.at("unknown system xattr", os.setxattr, b"f", b"system.unknown", b"1")
    p.at("namespace alone", os.setxattr, b"f", b"user.", b"1")
    p.at("malformed ACL", os.setxattr, b"f", b"system.posix_acl_access", b"\x02\x00\x00\x00\x01")
    p.at("mkdir d", os.mkdir, b"d")
    p.stat("folder size", b"d", "size")
    p.stat("block size", b"f", "blksize")
    listing = subprocess.run(["ls", "-a", p.path(b"d")], capture_output=True, check=True).stdout.split()
    p.note("ls -a of an empty folder", listing)
    p.do("set an old atime", utimensat, p.path(b"f"), PAST, (0, UTIME_OMIT))
    with open(p.path(b"f"), "rb") as handle:
        handle.read()
    p.note("reading moves an old atime (relatime)", os.lstat(p.path(b"f")).st_atime_ns > PAST_NS)


CASES = [names_over_255_bytes, folder_link_counts, errors_of_names_and_types, extended_attributes, times,
         sizes_and_holes, modes_and_owners, open_files, less_common_calls]
