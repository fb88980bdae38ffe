"""Commits of staging trees, asked for by `rekkord commit` through an extended
attribute of the channel's folder (control.py), their replies kept for it to
read, one commit of a channel at a time."""

from __future__ import annotations

import errno
import logging

import trio

from ..commit import CommitResult, Committer
from ..control import CONTROL_COMMIT, CommitReply
from ..errors import RekkordError
from ..repository import Repository
from ..staging import StagingTree, remove_files
from ..testhooks import stop_point
from ..vfs import SnapshotView
from ..writebehind import WriteBehind
from .channels import Channels

log = logging.getLogger(__name__)

RESULTS_KEPT = 64  # replies are read right away; keep only recent ones


class Commits:
    def __init__(self, repo: Repository, view: SnapshotView, channels: Channels, behind: WriteBehind) -> None:
        self.repo = repo
        self.view = view
        self.channels = channels
        self.behind = behind
        self.nursery: trio.Nursery | None = None  # where a commit's garbage is removed
        self._locks: dict[str, trio.Lock] = {}
        self._results: dict[bytes, bytes] = {}

    def reply(self, name: bytes) -> bytes | None:
        """The reply to a commit, if `name` is the attribute that asks for it."""
        if not name.startswith(CONTROL_COMMIT + b"."):
            return None
        result = self._results.get(name[len(CONTROL_COMMIT) + 1:])
        if result is None:
            raise OSError(errno.ENODATA, "no such commit")
        return result

    async def request(self, tree: StagingTree, token: bytes) -> None:
        """`rekkord commit`: commit the tree, its reply kept under token."""
        if not token or len(token) > 64:
            raise OSError(errno.EINVAL, "bad commit token")
        while len(self._results) >= RESULTS_KEPT:
            del self._results[next(iter(self._results))]
        stop_point("commit")
        try:
            result = await self.commit(tree.channel)
        except RekkordError as exc:
            log.error("commit of staging/%s failed: %s", tree.channel, exc.message)
            self._results[token] = CommitReply(error=exc.message).encode()
            raise OSError(errno.EIO, exc.message) from None
        self._results[token] = CommitReply(
            id=result.tag.id_hex, channel=result.tag.channel, time_ns=result.tag.time_ns, files=result.files,
            size=result.size, bytes_new=result.bytes_new, bytes_stored=result.bytes_stored,
            duration=round(result.duration, 3)).encode()

    async def commit(self, channel: str) -> CommitResult:
        lock = self._locks.setdefault(channel, trio.Lock())
        async with lock:
            tree = await self.channels.tree(channel)
            await self.behind.learn_stored(again=True)
            committer = Committer(self.repo, tree, self.behind.uploader(channel))
            self.behind.commit_started()
            try:
                result = await committer.run()
            finally:
                self.behind.commit_ended()
        if committer.garbage and self.nursery is not None:  # deleting thousands of files need not delay the reply
            self.nursery.start_soon(trio.to_thread.run_sync, remove_files, committer.garbage)
        log.info("committed staging/%s as snapshot %s", channel, result.tag.id_hex)
        await self.view.refresh(force=True)
        return result
