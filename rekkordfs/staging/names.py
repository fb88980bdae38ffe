"""The names of a staging tree: directory entries (lookup, list, create, link,
unlink, rmdir, rename) and the kernel's references, which keep an inode whose
last name is gone alive until it is forgotten and closed."""

from __future__ import annotations

import errno
import sqlite3
import stat
from collections.abc import Callable

from ..errors import errno_error
from ..format import EntryKind
from ..nodes import NAME_MAX
from .content import ContentStore
from .copyonwrite import CopyOnWrite
from .inode import COLUMNS, ROOT, Content, Inode, inode_from_row
from .journal import Journal

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class Namespace:
    def __init__(self, journal: Journal, cow: CopyOnWrite, content: ContentStore, clock: Callable[[], int]) -> None:
        self.journal = journal
        self.db = journal.db
        self.cow = cow
        self.content = content
        self.clock = clock
        self.lookups: dict[int, int] = {}  # kernel references, for deferred deletion
        self.open_files: dict[int, int] = {}

    # --- reading -----------------------------------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> Inode:
        node = await self.find(parent, name)
        if node is None:
            raise errno_error(errno.ENOENT)
        return node

    async def find(self, parent: int, name: bytes) -> Inode | None:
        """lookup() that answers None for a missing name (rsync asks for many:
        no exception on that path)."""
        await self.cow.expand(parent)
        ino = self._child(parent, name)
        return None if ino is None else self.journal.get(ino)

    async def listdir(self, parent: int) -> list[tuple[bytes, Inode]]:
        await self.cow.expand(parent)
        self.journal.write_rows()
        rows = self.db.execute(
            f"SELECT d.name, {', '.join('i.' + c.strip() for c in COLUMNS.split(','))} FROM dentries d "
            "JOIN inodes i ON i.ino = d.ino WHERE d.parent = ? ORDER BY d.name", (parent,)).fetchall()
        return [(row[0], inode_from_row(row[1:])) for row in rows]

    def _child(self, parent: int, name: bytes) -> int | None:
        row = self.db.execute("SELECT ino FROM dentries WHERE parent = ? AND name = ?", (parent, name)).fetchone()
        return row[0] if row else None

    def _two_children(self, first: tuple[int, bytes], second: tuple[int, bytes]) -> tuple[int | None, int | None]:
        """_child() of two names in one statement (a rename looks up both)."""
        found = {(parent, name): ino for parent, name, ino in self.db.execute(
            "SELECT parent, name, ino FROM dentries WHERE parent = ? AND name = ? OR parent = ? AND name = ?",
            (*first, *second))}
        return found.get(first), found.get(second)

    def _has_children(self, ino: int) -> bool:
        return self.db.execute("SELECT 1 FROM dentries WHERE parent = ? LIMIT 1", (ino,)).fetchone() is not None

    def _is_ancestor(self, ancestor: int, ino: int) -> bool:
        """True when ancestor is ino or one of its parent directories."""
        current = ino
        while current != ROOT:
            if current == ancestor:
                return True
            row = self.db.execute("SELECT parent FROM dentries WHERE ino = ? LIMIT 1", (current,)).fetchone()
            if row is None:
                return False
            current = row[0]
        return ancestor == ROOT

    # --- creating and removing entries ---------------------------------------------------

    @staticmethod
    def _check_name(name: bytes) -> None:
        if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
            raise errno_error(errno.EINVAL)
        if len(name) > NAME_MAX:
            raise errno_error(errno.ENAMETOOLONG)

    async def create(self, parent: int, name: bytes, kind: EntryKind, mode: int, uid: int, gid: int,
                     rdev: int = 0, target: bytes | None = None) -> Inode:
        self._check_name(name)
        parent_node = await self.cow.expand(parent)
        now = self.clock()
        if parent_node.mode & stat.S_ISGID:  # BSD group semantics of set-group-ID directories
            gid = parent_node.gid
            if kind == EntryKind.DIRECTORY:
                mode |= stat.S_ISGID
        with self.journal.transaction():
            node = self.journal.add_inode(
                kind, mode & 0o7777, uid, gid, now, size=len(target) if target is not None else 0, rdev=rdev,
                nlink=2 if kind == EntryKind.DIRECTORY else 1, target=target,
                local=Content.INLINE if kind == EntryKind.FILE else Content.STORED)
            ino = node.ino
            if kind == EntryKind.FILE:
                self.db.execute("INSERT INTO inline (ino, data) VALUES (?, ?)", (ino, b""))
            try:  # the name's primary key says whether it exists: no look-up first (one per file rsync writes)
                self.db.execute("INSERT INTO dentries (parent, name, ino) VALUES (?, ?, ?)", (parent, name, ino))
            except sqlite3.IntegrityError:
                raise errno_error(errno.EEXIST) from None  # the transaction undoes the new inode
            self._touch_dir(parent, now)
            if kind == EntryKind.DIRECTORY:
                self._add_links(parent, 1)
            self.journal.changed()
        if kind == EntryKind.FILE:
            self.content.changed(ino)
        return self.journal.get(ino)

    def _touch_dir(self, ino: int, now: int) -> None:
        self.journal.change(ino, mtime_ns=now, ctime_ns=now)

    def _add_links(self, folder: int, delta: int) -> None:
        """A folder gained or lost subfolders: its link count is 2 + their number
        (inside a transaction; folders are expanded before their entries change)."""
        if delta:
            self.journal.change(folder, nlink=self.journal.get(folder).nlink + delta)

    async def link(self, ino: int, parent: int, name: bytes) -> Inode:
        self._check_name(name)
        node = self.journal.get(ino)
        if node.is_dir:
            raise errno_error(errno.EPERM)
        await self.cow.own_links(ino)
        await self.cow.expand(parent)
        if self._child(parent, name) is not None:
            raise errno_error(errno.EEXIST)
        now = self.clock()
        with self.journal.transaction():
            self.db.execute("INSERT INTO dentries (parent, name, ino) VALUES (?, ?, ?)", (parent, name, ino))
            self.journal.change(ino, nlink=self.journal.get(ino).nlink + 1, ctime_ns=now)
            self._touch_dir(parent, now)
            self.journal.changed()
        return self.journal.get(ino)

    async def unlink(self, parent: int, name: bytes) -> None:
        await self.cow.expand(parent)
        ino = self._child(parent, name)
        if ino is None:
            raise errno_error(errno.ENOENT)
        if self.journal.get(ino).is_dir:
            raise errno_error(errno.EISDIR)
        await self.cow.own_links(ino)
        self.journal.freeing(lambda: self._remove_entry(parent, name, ino, changed=True))

    async def rmdir(self, parent: int, name: bytes) -> None:
        await self.cow.expand(parent)
        ino = self._child(parent, name)
        if ino is None:
            raise errno_error(errno.ENOENT)
        if not self.journal.get(ino).is_dir:
            raise errno_error(errno.ENOTDIR)
        await self.cow.expand(ino)
        if self._has_children(ino):
            raise errno_error(errno.ENOTEMPTY)
        self.journal.freeing(lambda: self._remove_entry(parent, name, ino, changed=True))

    def _remove_entry(self, parent: int, name: bytes, ino: int, changed: bool) -> None:
        """Inside a transaction: drop one entry; the inode goes with its last link.
        changed: count it as a change of the tree (rename() counts its own)."""
        now = self.clock()
        self.db.execute("DELETE FROM dentries WHERE parent = ? AND name = ?", (parent, name))
        self._touch_dir(parent, now)
        node = self.journal.get(ino)
        if node.is_dir:
            self._add_links(parent, -1)
        links = 0 if node.is_dir else node.nlink - 1
        if links > 0:
            self.journal.change(ino, nlink=links, ctime_ns=now)
        else:
            self.journal.change(ino, nlink=0, ctime_ns=now)
            self._maybe_delete(ino)
        if changed:
            self.journal.changed()

    def _maybe_delete(self, ino: int) -> None:
        """Delete an unlinked inode once neither the kernel nor an open file holds it."""
        if self.lookups.get(ino) or self.open_files.get(ino):
            return
        try:
            node = self.journal.get(ino)
        except OSError:
            return  # deleted already
        if node.nlink > 0 or ino == ROOT:
            return
        content = node.local
        if content == Content.INLINE:
            self.content.delete_inline(ino)
        self.journal.delete_inode(ino, content)  # its data file goes once the transaction is committed

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                     flags: int = 0) -> None:
        self._check_name(new_name)
        await self.cow.expand(old_parent)
        await self.cow.expand(new_parent)
        moved, target = self._two_children((old_parent, old_name), (new_parent, new_name))
        if moved is None:
            raise errno_error(errno.ENOENT)
        if flags & RENAME_NOREPLACE and target is not None:
            raise errno_error(errno.EEXIST)
        exchange = bool(flags & RENAME_EXCHANGE)
        if exchange and target is None:
            raise errno_error(errno.ENOENT)
        if moved == target:
            return  # two links of one inode: POSIX says do nothing
        moved_is_dir = self.journal.get(moved).is_dir
        if moved_is_dir and self._is_ancestor(moved, new_parent):
            raise errno_error(errno.EINVAL)
        if exchange:
            assert target is not None
            if self.journal.get(target).is_dir and self._is_ancestor(target, old_parent):
                raise errno_error(errno.EINVAL)
        elif target is not None:
            await self._check_replaceable(moved_is_dir, target)
        now = self.clock()
        # folders moving to another parent carry one link of that parent with them
        swapped_is_dir = exchange and target is not None and self.journal.get(target).is_dir
        moving = int(moved_is_dir) - int(swapped_is_dir) if old_parent != new_parent else 0

        def apply() -> None:
            if exchange:
                assert target is not None
                self.db.execute("UPDATE dentries SET ino = ? WHERE parent = ? AND name = ?",
                                (target, old_parent, old_name))
                self.db.execute("UPDATE dentries SET ino = ? WHERE parent = ? AND name = ?",
                                (moved, new_parent, new_name))
                self.journal.change(moved, ctime_ns=now)
                self.journal.change(target, ctime_ns=now)
            else:
                if target is not None:
                    self._remove_entry(new_parent, new_name, target, changed=False)
                self.db.execute("UPDATE dentries SET parent = ?, name = ? WHERE parent = ? AND name = ?",
                                (new_parent, new_name, old_parent, old_name))
                self.journal.change(moved, ctime_ns=now)
            self._add_links(old_parent, -moving)
            self._add_links(new_parent, moving)
            self._touch_dir(old_parent, now)
            if new_parent != old_parent:
                self._touch_dir(new_parent, now)
            self.journal.changed()

        # a plain move is one statement (rows change in memory): no SAVEPOINT needed
        self.journal.freeing(apply, alone=target is None and not exchange)

    async def _check_replaceable(self, moved_is_dir: bool, target: int) -> None:
        """rename() over an existing entry: same kind, an empty folder, and a
        hardlink group owned before one of its names goes."""
        target_node = self.journal.get(target)
        if moved_is_dir and not target_node.is_dir:
            raise errno_error(errno.ENOTDIR)
        if not moved_is_dir and target_node.is_dir:
            raise errno_error(errno.EISDIR)
        if target_node.is_dir:
            await self.cow.expand(target)
            if self._has_children(target):
                raise errno_error(errno.ENOTEMPTY)
        await self.cow.own_links(target)

    # --- kernel references ------------------------------------------------------------------

    def remember(self, ino: int) -> None:
        self.lookups[ino] = self.lookups.get(ino, 0) + 1

    def forget(self, ino: int, count: int) -> None:
        left = self.lookups.get(ino, 0) - count
        if left > 0:
            self.lookups[ino] = left
            return
        self.lookups.pop(ino, None)
        try:
            unlinked = self.journal.get(ino).nlink == 0
        except OSError:
            return
        if unlinked:
            self.journal.freeing(lambda: self._maybe_delete(ino))

    def opened(self, ino: int) -> None:
        self.open_files[ino] = self.open_files.get(ino, 0) + 1

    def released(self, ino: int) -> None:
        left = self.open_files.get(ino, 0) - 1
        if left > 0:
            self.open_files[ino] = left
            return
        self.open_files.pop(ino, None)
        if self.journal.get(ino).nlink == 0:
            self.journal.freeing(lambda: self._maybe_delete(ino))
