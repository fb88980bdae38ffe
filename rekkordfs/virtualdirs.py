"""The mount's own folders above the snapshots: the root, channels/, ids/,
channels/<channel>/ and its `latest` link (they change as snapshots appear)."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable

from .nodes import CHANNELS_INO, IDS_INO, MUTABLE_TIMEOUT, ROOT_INO, Attr, Node, NodeKind, derive_ino
from .snapshotlist import SnapshotList
from .snapshottree import SnapshotTrees

LATEST = b"latest"


class VirtualDirs:
    """Nodes of the virtual folders, built from the snapshot list."""

    def __init__(self, snapshots: SnapshotList, trees: SnapshotTrees, nodes: dict[int, Node]) -> None:
        self.snapshots = snapshots
        self.trees = trees
        self.nodes = nodes  # the view's table of the nodes the kernel holds
        self.extra_root: dict[bytes, Callable[[], Node]] = {}  # e.g. staging/
        self.started_ns = time.time_ns()
        self.uid, self.gid = os.getuid(), os.getgid()

    def virtual_attr(self, ino: int, mode: int = stat.S_IFDIR | 0o755, time_ns: int | None = None) -> Attr:
        moment = self.started_ns if time_ns is None else time_ns
        return Attr(ino, mode, 2 if stat.S_ISDIR(mode) else 1, self.uid, self.gid, 0, moment, moment, moment,
                    timeout=MUTABLE_TIMEOUT)

    def add_permanent(self, ino: int) -> Node:
        node = Node(ino, NodeKind.VIRTUAL_DIR, self.virtual_attr(ino), permanent=True)
        self.nodes[ino] = node
        return node

    def count_links(self) -> None:
        """channels/ and ids/ hold 2 + the folders each holds (after a refresh)."""
        if CHANNELS_INO in self.nodes and IDS_INO in self.nodes:
            self.nodes[CHANNELS_INO].attr.nlink = 2 + len(self.snapshots.channels)
            self.nodes[IDS_INO].attr.nlink = 2 + len(self.snapshots.tags)

    def channel_node(self, channel: str) -> Node:
        names = self.snapshots.channels[channel]
        ino = derive_ino(b"channel", channel.encode())
        attr = self.virtual_attr(ino, time_ns=names[-1][1].time_ns)  # its newest snapshot
        attr.nlink = 2 + len(names)
        node = self.nodes.get(ino)
        if node is None:
            return Node(ino, NodeKind.VIRTUAL_DIR, attr, channel=channel)
        node.attr = attr
        return node

    def latest_node(self, channel: str) -> Node:
        ino = derive_ino(b"latest", channel.encode())
        target = (self.snapshots.latest(channel) or "").encode()
        node = self.nodes.get(ino)
        if node is None:
            node = Node(ino, NodeKind.LATEST, self.virtual_attr(ino, stat.S_IFLNK | 0o777), channel=channel)
        node.attr.size = len(target)
        return node

    def children(self, parent: Node) -> list[tuple[bytes, Node]]:
        """Every entry of a virtual folder (the list refreshed by the caller)."""
        if parent.ino == ROOT_INO:
            items = [(b"channels", self.nodes[CHANNELS_INO]), (b"ids", self.nodes[IDS_INO])]
            items += [(name, make()) for name, make in sorted(self.extra_root.items())]
            return items
        if parent.ino == CHANNELS_INO:
            return [(c.encode(), self.channel_node(c)) for c in self.snapshots.channel_names()]
        if parent.ino == IDS_INO:
            return [(t.id_hex.encode(), self.trees.snapshot_node(t)) for t in self.snapshots.tags]
        channel = parent.channel
        assert channel is not None
        names = self.snapshots.channels.get(channel, [])
        items = [(n.encode(), self.trees.snapshot_node(t)) for n, t in names]
        if names:
            items.append((LATEST, self.latest_node(channel)))
        return items

    def child(self, parent: Node, name: bytes) -> Node | None:
        """The entry called name of a virtual folder, if the list has it."""
        if parent.ino == ROOT_INO:
            if name == b"channels":
                return self.nodes[CHANNELS_INO]
            if name == b"ids":
                return self.nodes[IDS_INO]
            make = self.extra_root.get(name)
            return make() if make else None
        text = os.fsdecode(name)
        if parent.ino == CHANNELS_INO:
            return self.channel_node(text) if text in self.snapshots.channels else None
        if parent.ino == IDS_INO:
            tag = self.snapshots.ids.get(text)
            return self.trees.snapshot_node(tag) if tag else None
        channel = parent.channel
        if channel is None or channel not in self.snapshots.channels:
            return None
        if name == LATEST:
            return self.latest_node(channel)
        tag = self.snapshots.by_name(channel, text)
        return self.trees.snapshot_node(tag) if tag else None
