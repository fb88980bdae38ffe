"""The mount's inode numbers under staging/: each channel's tree gets a slot in
the high bits, its own inode numbers fill the low ones."""

from __future__ import annotations

import errno

from ..nodes import STAGING_INO
from ..staging import StagingTree

STAGING_BIT = 1 << 62
SLOT_SHIFT = 40
LOCAL_MASK = (1 << SLOT_SHIFT) - 1


class InodeNumbers:
    def __init__(self) -> None:
        self._slots: dict[str, int] = {}
        self._by_slot: dict[int, StagingTree] = {}
        self._next_slot = 0

    @staticmethod
    def owns(ino: int) -> bool:
        return ino == STAGING_INO or bool(ino & STAGING_BIT)

    def add(self, tree: StagingTree) -> None:
        self._next_slot += 1
        slot = self._next_slot  # never reused: inodes of a removed channel must stay unknown
        self._slots[tree.channel] = slot
        self._by_slot[slot] = tree

    def drop(self, tree: StagingTree) -> None:
        del self._by_slot[self._slots.pop(tree.channel)]

    def of(self, tree: StagingTree, local: int) -> int:
        """The mount's number of a tree's inode."""
        return STAGING_BIT | (self._slots[tree.channel] << SLOT_SHIFT) | local

    def split(self, ino: int) -> tuple[StagingTree, int]:
        """The tree and its own inode number."""
        tree = self._by_slot.get((ino & ~STAGING_BIT) >> SLOT_SHIFT)
        if tree is None:
            raise OSError(errno.ENOENT, "stale staging inode")
        return tree, ino & LOCAL_MASK

    def split_dir(self, ino: int) -> tuple[StagingTree, int]:
        """As split(), for a folder whose entries change: staging/ itself holds only channels."""
        if ino == STAGING_INO:
            raise OSError(errno.EPERM, "only channel folders belong here")
        return self.split(ino)
