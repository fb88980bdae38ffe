"""Small files of a restore grouped into batches (one thread hop or worker
process message each, and from a server one read per pack the batch touches).

From a server, files are grouped by the pack that stores them: the walk meets
the files of many folders at once, and a batch in walk order needed ranges of
a dozen packs (a request each, with gaps read for nothing), where a batch of
one pack's files needs one. A pack's group is sent once it makes a batch; the
rest wait for the end of the walk, when they go out together in pack order.
What waits is bounded: past `hold` files or bytes the largest group goes.
From a local disk every file goes in one group (reads cost no round trip),
sent in walk order.
"""

from __future__ import annotations

from .restorewrite import FileJob


class Batcher:
    def __init__(self, files: int, size: int, by_pack: bool, hold_files: int = 0, hold_bytes: int = 0) -> None:
        self.files = files  # a batch: at most this many files...
        self.size = size  # ...and about this many bytes
        self.by_pack = by_pack
        self.hold_files = max(hold_files, files)  # what may wait in all groups together
        self.hold_bytes = max(hold_bytes, size)
        self._groups: dict[bytes, list[FileJob]] = {}
        self._sizes: dict[bytes, int] = {}
        self._held_files = 0
        self._held_bytes = 0

    def add(self, job: FileJob) -> list[list[FileJob]]:
        """Take a small file; the batches now ready to send."""
        key = job.chunks[0].location.pack if self.by_pack and job.chunks else b""
        group = self._groups.setdefault(key, [])
        group.append(job)
        self._sizes[key] = self._sizes.get(key, 0) + job.entry.size
        self._held_files += 1
        self._held_bytes += job.entry.size
        if len(group) >= self.files or self._sizes[key] >= self.size:
            return [self._take(key)]
        ready = []
        while self._held_files > self.hold_files or self._held_bytes > self.hold_bytes:
            ready.append(self._take(max(self._groups, key=lambda k: len(self._groups[k]))))
        return ready

    def flush(self) -> list[list[FileJob]]:
        """Everything still waiting, in pack order, cut into batches."""
        batches: list[list[FileJob]] = []
        batch: list[FileJob] = []
        size = 0
        for key in sorted(self._groups):
            for job in self._take(key):
                batch.append(job)
                size += job.entry.size
                if len(batch) >= self.files or size >= self.size:
                    batches.append(batch)
                    batch, size = [], 0
        if batch:
            batches.append(batch)
        return batches

    def _take(self, key: bytes) -> list[FileJob]:
        group = self._groups.pop(key)
        self._held_files -= len(group)
        self._held_bytes -= self._sizes.pop(key)
        return group
