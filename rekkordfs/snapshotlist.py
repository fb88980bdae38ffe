"""The mount's list of snapshots: which exist, by channel and by ID, and each
one's folder name (re-listed at most once per refresh interval)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import trio

from .format import Tag
from .keys import Capability
from .repository import Repository

log = logging.getLogger(__name__)


def snapshot_dir_name(time_ns: int) -> str:
    return datetime.fromtimestamp(time_ns // 1_000_000_000, tz=UTC).strftime("%Y-%m-%d_%H-%M-%S")


class SnapshotList:
    """The snapshots the mount shows, as of the last listing."""

    def __init__(self, repo: Repository, refresh_interval: float, channels: set[str] | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.repo = repo
        self.refresh_interval = refresh_interval
        self.channel_filter = channels
        self.clock = clock
        self.can_read = repo.keys.can(Capability.READ)
        self.tags: list[Tag] = []
        self.channels: dict[str, list[tuple[str, Tag]]] = {}  # channel -> (folder name, tag), oldest first
        self.ids: dict[str, Tag] = {}
        self._refreshed_at: float | None = None
        self._lock = trio.Lock()
        self._warned: set[str] = set()  # problems already logged (each refresh meets them again)

    def _fresh(self) -> bool:
        return self._refreshed_at is not None and self.clock() - self._refreshed_at < self.refresh_interval

    def refresh_due(self) -> bool:
        # Unknown names must not turn every failed lookup into a LIST request.
        return self._refreshed_at is None or self.clock() - self._refreshed_at >= 1.0

    async def refresh(self, force: bool = False) -> bool:
        """Re-list snapshots if the last listing is older than the interval;
        True when it did."""
        if not force and self._fresh():
            return False  # the common case, without taking the lock
        async with self._lock:
            now = self.clock()
            if not force and self._fresh():
                return False
            tags: list[Tag] = []
            if self.repo.keys.can(Capability.LIST):
                tags = await self.repo.list_tags(warn=self.warn_once)
            if self.channel_filter:
                tags = [t for t in tags if t.channel in self.channel_filter]
            if self.can_read:
                # `latest` is the newest snapshot whose record matches its tag: load
                # each channel's newest records until one does (once per snapshot)
                by_channel: dict[str, list[Tag]] = {}
                for tag in tags:
                    by_channel.setdefault(tag.channel, []).append(tag)
                for channel_tags in by_channel.values():
                    await self.repo.newest_usable(channel_tags, warn=self.warn_once)
                tags = [t for t in tags if t.snapshot_id not in self.repo.unusable]
            channels: dict[str, list[tuple[str, Tag]]] = {}
            for tag in tags:  # oldest first: same-second names get _2, _3...
                names = channels.setdefault(tag.channel, [])
                base = snapshot_dir_name(tag.time_ns)
                name, counter = base, 1
                while any(n == name for n, _ in names):
                    counter += 1
                    name = f"{base}_{counter}"
                names.append((name, tag))
            self.tags = tags
            self.channels = channels
            self.ids = {t.id_hex: t for t in tags}
            self._refreshed_at = now
            return True

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    def channel_names(self) -> list[str]:
        return sorted(self.channels)

    def latest(self, channel: str) -> str | None:
        names = self.channels.get(channel)
        return names[-1][0] if names else None

    def latest_tag(self, channel: str) -> Tag | None:
        names = self.channels.get(channel)
        return names[-1][1] if names else None

    def by_name(self, channel: str, name: str) -> Tag | None:
        for snap_name, tag in self.channels.get(channel, []):
            if snap_name == name:
                return tag
        return None
