"""Durability of a local repository's writes: what flush() must fsync, and
fsyncs started as objects are written.

A commit of a large staged file published 1 GiB of packs and their indexes
with some 400 fsyncs at the end (0.3-0.5 s, on the commit's critical path),
though most packs had been written seconds earlier. One background thread now
fsyncs each object, and then its folder, as they are written (it waits on the
disk, not on the GIL); flush() is left the few written last, the folders
above, and any that failed in the background (it reports their error).
"""

from __future__ import annotations

import os
import threading
from collections import deque


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Unsynced:
    """Objects and folders written since the last take(); the names a flush
    must fsync. Each object's entry carries the write's number, so an fsync
    that began before a later write of the same name (or folder) does not
    count for it."""

    def __init__(self, root: str) -> None:
        self._root = root
        self._lock = threading.Lock()
        self._objects: dict[str, int] = {}  # written, not known durable -> write number
        self._folders: dict[str, int] = {}  # holding a name written, not known durable -> write number
        self._parents: set[str] = set()  # folders above those, up to the root (made on demand)
        self._queue: deque[tuple[str, int]] = deque()  # objects for the background thread
        self._writes = 0
        self._syncing = False  # the background thread runs

    def written(self, path: str) -> None:
        """An object was written and named (any thread)."""
        folder = os.path.dirname(path)
        with self._lock:
            self._writes += 1
            self._objects[path] = self._folders[folder] = self._writes
            parent = os.path.dirname(folder)  # made on demand, perhaps
            while parent not in self._parents and len(parent) >= len(self._root):
                self._parents.add(parent)
                parent = os.path.dirname(parent)
            self._queue.append((path, self._writes))
            if self._syncing:
                return
            self._syncing = True
        # started per burst of writes, it ends when it has caught up
        threading.Thread(target=self._sync_behind, name="rekkord-sync-behind", daemon=True).start()

    def _sync_behind(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._syncing = False
                    return
                path, number = self._queue.popleft()
                if self._objects.get(path) != number:
                    continue  # a flush took it
                folder = os.path.dirname(path)
                folder_number = self._folders.get(folder)
            try:
                fsync_path(path)
                if folder_number is not None:
                    fsync_path(folder)
            except OSError:
                continue  # flush() tries again, and reports the error
            with self._lock:
                if self._objects.get(path) == number:
                    del self._objects[path]
                if folder_number is not None and self._folders.get(folder) == folder_number:
                    del self._folders[folder]

    def take(self) -> tuple[list[str], list[str]]:
        """For flush(): the objects to fsync, then the folders (those holding
        names, then the ones above them). They count as durable from now on:
        give() them back if the flush fails."""
        with self._lock:
            objects, folders, parents = list(self._objects), list(self._folders), self._parents - set(self._folders)
            self._objects, self._folders, self._parents = {}, {}, set()
            self._queue.clear()
        return objects, folders + sorted(parents, key=len, reverse=True)

    def give(self, objects: list[str], folders: list[str]) -> None:
        """What a failed flush took: the next one syncs it."""
        with self._lock:
            for path in objects:
                self._objects.setdefault(path, 0)
            for folder in folders:
                self._folders.setdefault(folder, 0)

    def idle(self) -> bool:
        """Nothing left for the background thread (tests wait for it)."""
        with self._lock:
            return not self._syncing
