"""A commit's view of a staging tree: captured in one step (frozen content
included), released when the commit ends, made the new base when it succeeds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..format import ChunkRef, EntryKind, Snapshot, encode_chunks
from .content import ContentStore
from .inode import COLUMNS, ROOT, Content, Inode, inode_from_row
from .journal import Journal
from .uploads import Uploads


@dataclass
class Capture:
    """The tree as it was when a commit began (see Capturer.capture)."""

    inodes: dict[int, Inode]
    children: dict[int, list[tuple[bytes, int]]]  # expanded directories only
    frozen: dict[int, Path]  # files whose content must be uploaded from these paths
    inline: list[int]  # files whose content must be uploaded from the journal (captured_content())
    uploaded: dict[int, list[ChunkRef]]  # files whose write-behind upload matches the captured content
    versions: dict[int, int]
    sequence: int
    max_link_id: int
    stored_files: int = 0  # files (and their bytes) in directories never expanded,
    stored_size: int = 0  # which the commit does not walk


class Capturer:
    def __init__(self, journal: Journal, content: ContentStore, uploads: Uploads,
                 open_files: dict[int, int]) -> None:
        self.journal = journal
        self.content = content
        self.uploads = uploads
        self.open_files = open_files  # the kernel's, kept up to date by names.Namespace

    def capture(self, is_durable: Callable[[list[ChunkRef]], bool]) -> Capture:
        """The whole tree as it is now, for a commit; must not await.

        Files whose content is local and not yet uploaded are frozen: a link to
        their data file is kept for the commit, and a write that comes later goes
        to a copy (see ContentStore.unfreeze); inline content is kept in memory
        before it changes. So the commit sees exactly this moment, which the
        journal holds durably (the open batch is committed first).
        """
        self.journal.flush()
        db = self.journal.db
        inodes = {row[0]: inode_from_row(row) for row in db.execute(f"SELECT {COLUMNS} FROM inodes")}
        children: dict[int, list[tuple[bytes, int]]] = {}
        for parent, name, ino in db.execute("SELECT parent, name, ino FROM dentries ORDER BY parent, name"):
            children.setdefault(parent, []).append((name, ino))
        reachable = _reachable(children)
        inodes = {ino: node for ino, node in inodes.items() if ino in reachable}
        frozen: dict[int, Path] = {}
        inline: list[int] = []
        uploaded: dict[int, list[ChunkRef]] = {}
        versions: dict[int, int] = {}
        for ino, node in inodes.items():
            if node.kind != EntryKind.FILE or not node.local:
                continue
            versions[ino] = self.uploads.version(ino)
            done = self.uploads.result(ino, versions[ino])
            if done is not None and is_durable(done):
                uploaded[ino] = done
            elif node.local == Content.INLINE:
                inline.append(ino)
                self.content.freeze_inline(ino)
            else:
                frozen[ino] = self.content.freeze(ino, self.journal.sequence)
        max_link_id = int(self.journal.meta("max_link_id", 0) or 0)
        stored = (int(self.journal.meta("stored_files", 0)), int(self.journal.meta("stored_size", 0)))
        return Capture(inodes, children, frozen, inline, uploaded, versions, self.journal.sequence, max_link_id,
                       *stored)

    def release(self, capture: Capture) -> None:
        self.content.release(capture.frozen, capture.inline)

    def committed(self, capture: Capture, snapshot_id: bytes, snapshot: Snapshot,
                  contents: dict[int, list[ChunkRef]], link_ids: dict[int, int]) -> list[str]:
        """After a successful commit: what it stored becomes the new base.

        Returns the data files no longer needed, for the caller to delete
        (off the event loop; a crash before that leaves them to recovery)."""
        clean_files = [ino for ino in contents
                       if self.uploads.version(ino) == capture.versions.get(ino) and not self.open_files.get(ino)]
        db = self.journal.db
        with self.journal.transaction():
            # others were written again since, or may still be: they stay local
            db.executemany(
                "UPDATE inodes SET local = ?, chunks = ?, size = ? WHERE ino = ? AND local != ?",
                [(Content.STORED, encode_chunks(contents[ino]), sum(c.size for c in contents[ino]), ino,
                  Content.STORED) for ino in clean_files])
            db.executemany("DELETE FROM inline WHERE ino = ?", [(ino,) for ino in clean_files])
            self.journal.freed()
            db.executemany("UPDATE inodes SET link_id = ? WHERE ino = ?",
                           [(link_id, ino) for ino, link_id in link_ids.items()])
            self.journal.forget_rows()
            self.journal.set_meta("base", snapshot_id)
            self.journal.set_meta("max_link_id", snapshot.max_link_id)
            self.journal.set_dirty(self.journal.sequence != capture.sequence)
        self.journal.flush()  # before the caller deletes the data files it no longer needs
        for ino in clean_files:
            self.uploads.committed(ino)
        for ino in set(contents) - set(clean_files):  # still local: the next commit reuses this upload
            self.uploads.record(ino, capture.versions[ino], contents[ino])
        self.release(capture)
        return [self.content.data_path(ino) for ino in clean_files
                if capture.inodes[ino].local == Content.DATA_FILE]


def _reachable(children: dict[int, list[tuple[bytes, int]]]) -> set[int]:
    seen = {ROOT}
    stack = [ROOT]
    while stack:
        for _, ino in children.get(stack.pop(), ()):
            if ino not in seen:
                seen.add(ino)
                stack.append(ino)
    return seen
