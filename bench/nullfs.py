"""A pyfuse3 filesystem that does the least it can: names and attributes in
dicts, file content dropped. `rsync` into it measures what the FUSE layer the
mount is built on (pyfuse3 + trio, one Python thread) costs by itself, the
floor under the staging rows.

    python -m bench.nullfs MNT     (foreground; fusermount3 -u MNT to stop)
"""

from __future__ import annotations

import errno
import stat
import sys
import time

import pyfuse3
import trio

TIMEOUT = 30.0  # as the staging tree's: the kernel caches names and attributes


class _Node:
    __slots__ = ("ino", "mode", "uid", "gid", "size", "atime", "mtime", "ctime", "nlink", "children")

    def __init__(self, ino: int, mode: int, uid: int = 0, gid: int = 0) -> None:
        now = time.time_ns()
        self.ino, self.mode, self.uid, self.gid, self.size = ino, mode, uid, gid, 0
        self.atime = self.mtime = self.ctime = now
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.children: dict[bytes, int] | None = {} if stat.S_ISDIR(mode) else None


class NullFS(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.nodes = {pyfuse3.ROOT_INODE: _Node(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755)}
        self.next_ino = pyfuse3.ROOT_INODE + 1

    def _attr(self, node: _Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino, attr.st_mode, attr.st_nlink = node.ino, node.mode, node.nlink
        attr.st_uid, attr.st_gid, attr.st_size = node.uid, node.gid, node.size
        attr.st_atime_ns, attr.st_mtime_ns, attr.st_ctime_ns = node.atime, node.mtime, node.ctime
        attr.st_blksize, attr.st_blocks = 4096, (node.size + 511) // 512
        attr.entry_timeout = attr.attr_timeout = TIMEOUT
        return attr

    def _new(self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> _Node:
        node = _Node(self.next_ino, mode, ctx.uid, ctx.gid)
        self.next_ino += 1
        self.nodes[node.ino] = node
        self.nodes[parent].children[name] = node.ino  # type: ignore[index]
        return node

    async def lookup(self, parent_inode, name, ctx=None):
        ino = self.nodes[parent_inode].children.get(name)  # type: ignore[union-attr]
        if ino is None:
            missing = pyfuse3.EntryAttributes()
            missing.st_ino, missing.entry_timeout = 0, TIMEOUT
            return missing
        return self._attr(self.nodes[ino])

    async def forget(self, inode_list):
        pass

    async def getattr(self, inode, ctx=None):
        return self._attr(self.nodes[inode])

    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self.nodes[inode]
        if fields.update_mode:
            node.mode = (node.mode & ~0o7777) | (attr.st_mode & 0o7777)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_size:
            node.size = attr.st_size
        if fields.update_atime:
            node.atime = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime = attr.st_mtime_ns
        node.ctime = time.time_ns()
        return self._attr(node)

    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._attr(self._new(parent_inode, name, stat.S_IFDIR | (mode & 0o7777), ctx))

    async def create(self, parent_inode, name, mode, flags, ctx):
        node = self._new(parent_inode, name, stat.S_IFREG | (mode & 0o7777), ctx)
        return pyfuse3.FileInfo(fh=node.ino), self._attr(node)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode)

    async def write(self, fh, off, buf):
        node = self.nodes[fh]
        node.size = max(node.size, off + len(buf))
        node.mtime = time.time_ns()
        return len(buf)

    async def read(self, fh, off, size):
        return bytes(max(0, min(size, self.nodes[fh].size - off)))

    async def release(self, fh):
        pass

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        ino = self.nodes[parent_inode_old].children.pop(name_old)  # type: ignore[union-attr]
        self.nodes[parent_inode_new].children[name_new] = ino  # type: ignore[index]

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode, ctx):
        return []

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        entries = sorted(self.nodes[fh].children.items())  # type: ignore[union-attr]
        for index, (name, ino) in enumerate(entries[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, name, self._attr(self.nodes[ino]), index + 1):
                break

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_blocks = out.f_bfree = out.f_bavail = 1 << 30
        out.f_files = out.f_ffree = out.f_favail = 1 << 20
        out.f_namemax = 255
        return out


def main() -> None:
    # the mount's options (see rekkordfs/mount.py): permissions checked by the kernel
    options = set(pyfuse3.default_options) | {"fsname=nullfs", "allow_other"}
    pyfuse3.init(NullFS(), sys.argv[1], options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main()
