"""The channels of staging/: one StagingTree each, opened (and seeded from the
channel's latest snapshot) on first use, following newer snapshots while
clean, started by `mkdir staging/NEW` and removed by rmdir."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..blobcache import BlobCache
from ..errors import RekkordError, UsageError
from ..format import validate_channel
from ..repository import Repository
from ..staging import ROOT, StagingTree
from ..vfs import SnapshotView
from ..writebehind import WriteBehind
from .inodes import InodeNumbers

log = logging.getLogger(__name__)


class Channels:
    def __init__(self, repo: Repository, blobs: BlobCache | None, view: SnapshotView, state_dir: Path,
                 behind: WriteBehind, numbers: InodeNumbers) -> None:
        self.repo = repo
        self.blobs = blobs  # None: the key cannot read stored data (WriteOnly)
        self.view = view
        self.state_dir = state_dir
        self.behind = behind
        self.numbers = numbers
        self.trees: dict[str, StagingTree] = {}
        self.on_open: Callable[[StagingTree], None] = lambda tree: None  # each tree opened from now on

    def close(self) -> None:
        for tree in self.trees.values():
            tree.close()

    def _state_names(self) -> set[str]:
        return {p.name for p in self.state_dir.iterdir() if (p / "tree.db").exists()}

    def exists(self, channel: str) -> bool:
        return channel in self.trees or channel in self._state_names() or channel in self.view.channel_names()

    async def names(self) -> list[str]:
        await self.view.refresh()
        return sorted(self.known())

    def known(self) -> set[str]:
        """Channels as last listed (no listing of the repository here)."""
        return set(self.view.channel_names()) | self._state_names() | set(self.trees)

    async def tree(self, channel: str, create: bool = False) -> StagingTree:
        """The staging tree of a channel, opened (and seeded) on first use."""
        tree = self.trees.get(channel)
        if tree is None:
            exists = channel in self._state_names()
            if not exists and not create and channel not in self.view.channel_names():
                raise OSError(errno.ENOENT, "no such channel")
            tree = StagingTree(self.state_dir / channel, channel, self.blobs)
            self.numbers.add(tree)
            self.trees[channel] = tree
            self.behind.add_channel(channel)
            self.on_open(tree)
            if not exists:
                try:
                    await self._follow_latest(tree, force=True)
                except OSError:
                    self._forget(tree)  # retried on the next use; other channels are unaffected
                    shutil.rmtree(tree.folder, ignore_errors=True)
                    raise
                return tree
        # a clean tree follows newer snapshots, also one opened from the state
        # folder (committed meanwhile by another key or machine)
        try:
            await self._follow_latest(tree)
        except OSError:
            pass  # logged; the tree stays on the base it has
        return tree

    async def named(self, name: bytes, create: bool = False) -> StagingTree:
        """The tree of a channel named by a file name under staging/."""
        channel = os.fsdecode(name)
        try:
            validate_channel(channel)
        except UsageError:
            raise OSError(errno.EINVAL, "not a valid channel name") from None
        return await self.tree(channel, create)

    def _forget(self, tree: StagingTree) -> None:
        tree.close()
        del self.trees[tree.channel]
        self.behind.drop_channel(tree.channel)
        self.numbers.drop(tree)

    async def _follow_latest(self, tree: StagingTree, force: bool = False) -> None:
        """A clean tree shows the channel's newest snapshot (unless the kernel holds
        inodes of it: their numbers would change under it)."""
        if self.blobs is None or (tree.dirty and not force):
            return
        latest = self.view.latest_tag(tree.channel)
        if latest is None or latest.snapshot_id == tree.base:
            return
        if not force and any(ino != ROOT for ino in tree.lookups):
            return
        try:
            snapshot = await self.repo.load_snapshot(latest)
        except RekkordError as exc:
            log.error("staging/%s: cannot start from snapshot %s: %s", tree.channel, latest.id_hex, exc.message)
            raise OSError(errno.EIO, "the channel's latest snapshot is unreadable") from None
        tree.seed(latest.snapshot_id, snapshot)

    async def remove(self, name: bytes) -> None:
        """rmdir staging/NEW: drop the empty staging tree of a channel without snapshots."""
        tree = await self.named(name)
        if await tree.listdir(ROOT):
            raise OSError(errno.ENOTEMPTY, "staging tree is not empty")
        if tree.channel in self.view.channel_names():
            raise OSError(errno.EBUSY, "the staging folder of a channel with snapshots stays")
        if tree.lookups.get(ROOT, 0) > 1 or tree.open_files:
            raise OSError(errno.EBUSY, "in use")
        self._forget(tree)
        shutil.rmtree(tree.folder)
