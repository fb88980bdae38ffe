"""Which staged files are written past the kernel's page cache (FUSE direct
I/O), and the set-id bits and file capability such a write drops.

Through the page cache the kernel asks the daemon for the file's
security.capability attribute before every write (a file capability, like a
set-user-ID bit, is dropped when the file changes): a second request per
write, which the writer waits for as for the write itself, and one more copy
of the data. Staged files are opened without keep_cache, so that cache is of
little use to them. A direct-I/O write skips both; the kernel then leaves
dropping set-id bits and capabilities to the filesystem, so write() does it
here, the way the kernel does (drop_on_write).

Direct I/O refuses shared writable mappings (the kernel allows them only
with an init flag libfuse 3.14 cannot set). So it is used only for handles
that cannot map the file for writing (opened write-only) and for files the
handle created exclusively, as temporary files are (rsync, mkstemp): a new,
private file that a program maps shared is rare, one opened again
read-write maps as before.
"""

from __future__ import annotations

import os
import stat

from ..staging.inode import Inode, decode_xattrs

CAPABILITY = b"security.capability"


def direct_io(flags: int, created: bool) -> bool:
    """Whether a handle opened (or created) with these flags bypasses the page cache."""
    if flags & os.O_ACCMODE == os.O_WRONLY:
        return True
    return created and bool(flags & os.O_EXCL)


def drop_on_write(node: Inode, uid: int, gid: int) -> tuple[int | None, bool]:
    """What a write by (uid, gid) drops: the new permission bits (None: they
    stay) and whether the file capability goes. As the kernel's
    file_remove_privs(): the set-user-ID bit, and the set-group-ID bit of a
    group-executable file (or of a file of another group), unless the writer
    may keep them (root, for CAP_FSETID); a capability always."""
    mode = None
    if node.mode & (stat.S_ISUID | stat.S_ISGID) and uid != 0:
        kept = node.mode & ~stat.S_ISUID
        if node.mode & stat.S_IXGRP or gid != node.gid:
            kept &= ~stat.S_ISGID
        if kept != node.mode:
            mode = kept
    capability = bool(node.xattrs) and any(name == CAPABILITY for name, _ in decode_xattrs(node.xattrs))
    return mode, capability
