"""Local filesystem metadata <-> directory entries (used by save and restore)."""

from __future__ import annotations

import errno
import os
import stat
import struct

from .format import Entry, EntryKind

_KINDS = {
    stat.S_IFREG: EntryKind.FILE,
    stat.S_IFDIR: EntryKind.DIRECTORY,
    stat.S_IFLNK: EntryKind.SYMLINK,
    stat.S_IFIFO: EntryKind.FIFO,
    stat.S_IFCHR: EntryKind.CHAR_DEVICE,
    stat.S_IFBLK: EntryKind.BLOCK_DEVICE,
    stat.S_IFSOCK: EntryKind.SOCKET,
}

FILE_TYPE_BITS = {kind: bits for bits, kind in _KINDS.items()}

# EntryKind members as module names: a member looked up on its class costs a
# few tenths of a microsecond in Python 3.11, and these run per file
_FILE, _SYMLINK = EntryKind.FILE, EntryKind.SYMLINK


def entry_from_stat(name: bytes, st: os.stat_result, folder: int) -> Entry | None:
    """An entry with the metadata of st, that of name in the open folder;
    None for file types we do not store."""
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        return None
    # positional: keywords cost a dataclass's __init__ about a microsecond more, once per file
    is_file = kind == _FILE
    entry = Entry(kind, name, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, st.st_atime_ns,
                  st.st_ctime_ns, st.st_size if is_file else 0, st.st_nlink if is_file else 1)
    if kind == _SYMLINK:
        entry.target = os.readlink(name, dir_fd=folder)
        entry.size = len(entry.target)
    elif kind in (EntryKind.CHAR_DEVICE, EntryKind.BLOCK_DEVICE):
        entry.rdev = st.st_rdev
    return entry


_UNSUPPORTED = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA, errno.EPERM, errno.EACCES, errno.ENOENT}


def read_xattrs(path: bytes | int) -> list[tuple[bytes, bytes]]:
    """Extended attributes of path (not following symlinks), sorted by name;
    of an open file when path is its descriptor (no path to look up again:
    a third of the time of llistxattr(2) on a small file's path)."""
    follow = isinstance(path, int)  # a descriptor is never a symlink's (O_NOFOLLOW)
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return []
        raise
    result = []
    for name in sorted(names):
        try:
            value = os.getxattr(path, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                continue
            raise
        result.append((os.fsencode(name), value))
    return result


# --- POSIX ACLs as extended attributes ---------------------------------------------
#
# A filesystem keeps the access ACL and the mode bits in step: setting the ACL
# sets the owner, group (the mask, when there is one) and other bits, and
# chmod rewrites those ACL entries. The staging area stores ACLs as plain
# extended attributes, so it does the same by hand.

ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")

_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x04, 0x10, 0x20


def _acl_entries(value: bytes) -> list[tuple[int, int, int]] | None:
    if len(value) < _ACL_HEADER.size or (len(value) - _ACL_HEADER.size) % _ACL_ENTRY.size:
        return None
    return list(_ACL_ENTRY.iter_unpack(value[_ACL_HEADER.size:]))


def xattr_refusal(name: bytes, value: bytes) -> int | None:
    """The errno a local filesystem answers when setting this attribute, or None:
    names outside the namespaces Linux knows (EOPNOTSUPP), malformed ACLs (EINVAL)."""
    if name in (ACL_ACCESS, ACL_DEFAULT):
        return None if _acl_entries(value) is not None else errno.EINVAL
    if name in XATTR_NAMESPACES:
        return errno.EINVAL  # a namespace without a name
    if not name.startswith(XATTR_NAMESPACES):
        return errno.EOPNOTSUPP
    return None


def mode_from_acl(mode: int, value: bytes) -> int:
    """The permission bits an access ACL implies (set-id and sticky bits kept)."""
    entries = _acl_entries(value)
    if entries is None:
        return mode
    perms = {tag: perm & 7 for tag, perm, _ in entries}
    group = perms.get(_ACL_MASK, perms.get(_ACL_GROUP_OBJ, (mode >> 3) & 7))
    return (mode & 0o7000) | (perms.get(_ACL_USER_OBJ, (mode >> 6) & 7) << 6) | (group << 3) | \
        perms.get(_ACL_OTHER, mode & 7)


def acl_after_chmod(value: bytes, mode: int) -> bytes:
    """An access ACL rewritten for new permission bits, as chmod does."""
    entries = _acl_entries(value)
    if entries is None:
        return value
    has_mask = any(tag == _ACL_MASK for tag, _, _ in entries)
    bits = {_ACL_USER_OBJ: (mode >> 6) & 7, _ACL_OTHER: mode & 7,
            (_ACL_MASK if has_mask else _ACL_GROUP_OBJ): (mode >> 3) & 7}
    out = bytearray(value[:_ACL_HEADER.size])
    for tag, perm, qualifier in entries:
        out += _ACL_ENTRY.pack(tag, bits.get(tag, perm), qualifier)
    return bytes(out)
