"""The walking half of `save`: a thread that lists the chosen folders
(honouring excludes and --one-file-system), reads each entry's metadata,
reuses the stat cache for unchanged files, and hands folders and file jobs to
the save session (save.py) in order, a bounded lead ahead of it.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .cache import StatKey, stat_key
from .errors import UsageError
from .format import ChunkRef, Entry, EntryKind
from .fsmeta import entry_from_stat, read_xattrs
from .localfiles import FolderRef, open_folder
from .repository import Repository
from .selection import CACHEDIR_TAG, Selection, is_cache_dir
from .tasks import ReceiverGone
from .tuning import SMALL_FILE

if TYPE_CHECKING:
    from .save import SaveStats

# EntryKind members as module names: a member looked up on its class costs a
# few tenths of a microsecond in Python 3.11, and these run per file
_FILE, _DIRECTORY = EntryKind.FILE, EntryKind.DIRECTORY
_PROC_FD = os.path.isdir(b"/proc/self/fd")  # names in an open folder, for the calls without dir_fd


class DirNode:
    __slots__ = ("path", "entry", "parent", "children", "pending", "skipped", "ident")

    def __init__(self, path: bytes, entry: Entry | None, parent: DirNode | None,
                 ident: tuple[int, int] = (-1, -1)) -> None:
        self.path = path
        self.entry = entry  # None for the snapshot root
        self.parent = parent
        self.children: list[Entry] = []
        self.pending = 0  # file jobs and subdirectories not finished yet
        self.skipped: set[bytes] = set()
        # (st_dev, st_ino) of the folder by its parent's listing (the root's:
        # Walker.run()): it is listed and its files read only if it is still that one
        self.ident = ident

    @property
    def folder(self) -> FolderRef:
        return (self.path, *self.ident)


@dataclass(slots=True)  # one per file to read: slots make it smaller and quicker to build
class FileJob:
    node: DirNode
    entry: Entry
    path: bytes
    key: StatKey
    first: Entry | None = None  # set for a later hardlink of an inode another job reads

    @property
    def primary(self) -> bool:
        return self.first is None


@dataclass
class Listing:
    node: DirNode
    jobs: list[FileJob] = field(default_factory=list)


def normalize_paths(paths: list[str]) -> list[bytes]:
    """Absolute, normalized, existing paths with those inside another one dropped."""
    result: list[bytes] = []
    for raw in paths:
        path = os.path.normpath(os.path.abspath(os.fsencode(raw)))
        try:
            os.lstat(path)
        except OSError as exc:
            raise UsageError(f"cannot save '{raw}': {exc.strerror}") from None
        result.append(path)
    result = sorted(set(result))
    kept: list[bytes] = []
    for path in result:
        if not any(path == k or path.startswith(k.rstrip(b"/") + b"/") for k in kept):
            kept.append(path)
    return kept


class Lead:
    """How many files the walker may have queued that are not saved yet: each
    holds its entry, job and path, and a walker that lists a whole tree of small
    files before the workers catch up holds them all (memory grew with the
    tree). The walker's thread waits; close() (the pipeline stopped) wakes it
    for good, and it ends with ReceiverGone."""

    def __init__(self, limit: int) -> None:
        self._cond = threading.Condition()
        self._limit = limit
        self._queued = 0
        self._closed = False
        self._waiting = False  # the walker waits for the queue to drain to _resume

    @property
    def _resume(self) -> int:
        # a waiting walker is woken once a quarter of its lead is free, not at
        # every finished batch: each wake-up is a GIL hand-over
        return self._limit - self._limit // 4

    def take(self, files: int) -> None:
        """Walker thread: room for a listing of this many files to read."""
        if not files:
            return
        with self._cond:
            if self._queued >= self._limit:
                self._waiting = True
                while self._queued > self._resume and not self._closed:
                    self._cond.wait()
                self._waiting = False
            if self._closed:
                raise ReceiverGone()
            self._queued += files

    def done(self, files: int = 1) -> None:
        """Loop side: queued files are finished (a batch's at once: one wake-up)."""
        with self._cond:
            self._queued -= files
            if self._waiting and self._queued <= self._resume:
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Walker:
    """Runs in a thread: lists directories and emits Listings in depth-first order,
    leaving out what the selection excludes."""

    def __init__(self, paths: list[bytes], repo: Repository, emit: Callable[[Listing], None],
                 skip: Callable[[str], None], stats: SaveStats, uses: set[bytes],
                 selection: Selection | None = None, report: Callable[[bytes], None] | None = None,
                 lead: Lead | None = None) -> None:
        self.paths = paths
        self.lead = lead
        self.repo = repo
        self.uses = uses  # packs the snapshot refers to (cached files' chunks are added here)
        self.emit = emit
        self.skip = skip  # reports something left out of the snapshot
        self.stats = stats
        self.selection = selection or Selection()
        self.report = report  # told each path that goes into the snapshot (save -v)
        self._next_link_id = 1
        # (dev, ino) -> (link_id, entry of the first occurrence, job or None if cached)
        self._links: dict[tuple[int, int], tuple[int, Entry, FileJob | None]] = {}
        self._cached: dict[bytes, tuple[bytes, list[ChunkRef]] | None] = {}  # this folder's stat-cache rows
        # decided once: the save stores its own rows as it goes, and never looks those up
        self._lookups = repo.cache.has_stats()
        self._reads_all = not self._lookups  # every file with content is read: none is reused

    @property
    def max_link_id(self) -> int:
        return self._next_link_id - 1

    def run(self, root: DirNode) -> None:
        st = os.stat(b"/")
        root.ident = (st.st_dev, st.st_ino)
        if b"/" in self.paths:
            self._scan_tree(root)
            return
        trie: dict = {}
        for path in self.paths:
            node = trie
            parts = path.split(b"/")[1:]
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if node is None:
                    break
            else:
                node[parts[-1]] = None  # None marks a path saved in full
        self._scan_virtual(root, trie)

    def _scan_virtual(self, node: DirNode, trie: dict) -> None:
        listing = Listing(node)
        full: list[DirNode] = []
        partial: list[tuple[DirNode, dict]] = []
        folder = self._open(node)
        try:
            for name in sorted(trie) if folder >= 0 else ():
                path = node.path + b"/" + name
                leading = trie[name] is not None
                try:
                    # the folders leading to a saved path are followed (/home may be a
                    # symlink to /data/home); a saved path itself is not
                    st = os.stat(name, dir_fd=folder, follow_symlinks=leading)
                except OSError as exc:
                    self.skip(f"cannot read '{os.fsdecode(path)}': {exc.strerror}")
                    continue
                # a saved path itself may be excluded (by name or absolute path);
                # the folders leading to it never are
                if not leading and self.selection.excluded(name, path, b"", stat.S_ISDIR(st.st_mode)):
                    continue
                entry = self._add_child(listing, folder, path, name, st)
                if entry is None or entry.kind != EntryKind.DIRECTORY:
                    continue
                child = DirNode(path, entry, node, (st.st_dev, st.st_ino))
                node.pending += 1
                if leading:
                    partial.append((child, trie[name]))
                else:
                    full.append(child)
        finally:
            if folder >= 0:
                os.close(folder)
        self._emit(listing)
        for child, sub in partial:
            self._scan_virtual(child, sub)
        for child in full:
            self._scan_tree(child)

    def _scan_tree(self, top: DirNode) -> None:
        """Everything below the saved path top (b"" for /)."""
        selection = self.selection
        filtering = selection.filters_entries
        base = top.path + b"/" if top.path else b"/"  # what relative patterns are relative to
        root_dev = top.ident[0] if selection.one_file_system else None
        # (folder, whether to list it): a folder on another filesystem is kept, empty
        stack: list[tuple[DirNode, bool]] = [(top, True)]
        while stack:
            node, descend = stack.pop()
            listing = Listing(node)
            subdirs: list[tuple[DirNode, bool]] = []
            folder, items = self._list(node) if descend else (-1, [])
            stats: list[tuple[bytes, bytes, os.stat_result]] = []
            try:
                for name, path in items:
                    try:
                        # by name in the folder listed: no path to look up from / again
                        st = os.stat(name, dir_fd=folder, follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # vanished since listing
                    except OSError as exc:
                        self.skip(f"cannot read '{os.fsdecode(path)}': {exc.strerror}")
                        continue
                    if filtering and selection.excluded(name, path, path[len(base):], stat.S_ISDIR(st.st_mode)):
                        continue
                    stats.append((name, path, st))
                self._prefetch_stats(stats)
                small = self._small_file if self._reads_all and self.report is None else None
                for name, path, st in stats:
                    if small is not None and st.st_nlink == 1 and 0 < st.st_size <= SMALL_FILE \
                            and stat.S_ISREG(st.st_mode):
                        small(listing, path, name, st)  # most files of a first save
                        continue
                    entry = self._add_child(listing, folder, path, name, st)
                    if entry is not None and entry.kind == _DIRECTORY:
                        subdirs.append((DirNode(path, entry, node, (st.st_dev, st.st_ino)),
                                        root_dev is None or st.st_dev == root_dev))
            finally:
                if folder >= 0:
                    os.close(folder)
            node.pending += len(subdirs)
            self._emit(listing)
            stack.extend(reversed(subdirs))

    def _emit(self, listing: Listing) -> None:
        if self.lead is not None:
            self.lead.take(len(listing.jobs))
        self.emit(listing)

    def _prefetch_stats(self, stats: list[tuple[bytes, bytes, os.stat_result]]) -> None:
        """The stat-cache rows of a folder's files in one query (not one per file)."""
        if not self._lookups:
            return
        files = [(path, stat_key(st)) for _, path, st in stats if stat.S_ISREG(st.st_mode) and st.st_size]
        self._cached = dict(zip((path for path, _ in files), self.repo.cache.lookup_stats(files)))

    def _open(self, node: DirNode) -> int:
        """node's folder opened (localfiles.open_folder(): the very folder
        its parent's listing saw; its entries are looked at through it, never
        by a path that a folder swapped for a symlink would lead elsewhere), or
        -1, reported, when it cannot be."""
        try:
            return open_folder(*node.folder)
        except OSError as exc:
            self._cannot_list(node, exc)
            return -1

    def _cannot_list(self, node: DirNode, exc: OSError) -> None:
        self.skip(f"cannot list '{os.fsdecode(node.path or b'/')}': {exc.strerror}; its content is missing")

    def _list(self, node: DirNode) -> tuple[int, list[tuple[bytes, bytes]]]:
        """node's folder opened (_open(): a descriptor the caller closes) and
        (name, path) of its entries, sorted; only the tag of a tagged cache
        folder when caches are excluded; (-1, []) when it cannot be listed."""
        fd = self._open(node)
        if fd < 0:
            return -1, []
        try:
            names = sorted(map(os.fsencode, os.listdir(fd)))
        except OSError as exc:
            os.close(fd)
            self._cannot_list(node, exc)
            return -1, []
        if self.selection.exclude_caches and CACHEDIR_TAG in names and is_cache_dir(fd):
            names = [CACHEDIR_TAG]
        prefix = node.path + b"/"
        return fd, [(name, prefix + name) for name in names]

    def leaves_xattrs(self, entry: Entry) -> bool:
        """Whether the extended attributes of entry are left to the batch of
        small files that reads its content (a system call less here): in a
        save that reads every file (no stat row to reuse), for a file of one link."""
        return self._reads_all and entry.kind == _FILE and 0 < entry.size <= SMALL_FILE \
            and entry.nlink == 1

    def _add_child(self, listing: Listing, folder: int, path: bytes, name: bytes,
                   st: os.stat_result) -> Entry | None:
        """The entry of name in the open folder (path: its path), with st its stat."""
        try:
            entry = entry_from_stat(name, st, folder)
            if entry is None:
                return None
            if not self.leaves_xattrs(entry):
                # through the open folder: by path, a folder swapped for a symlink
                # could lend another file's attributes (a file capability, say)
                entry.xattrs = read_xattrs(b"/proc/self/fd/%d/%s" % (folder, name) if _PROC_FD else path)
        except OSError as exc:
            self.skip(f"cannot read '{os.fsdecode(path)}': {exc.strerror}")
            return None
        listing.node.children.append(entry)
        if self.report is not None:
            self.report(path)
        if entry.kind == _DIRECTORY:
            self.stats.dirs += 1
        elif entry.kind == _FILE:
            self.stats.scanned_files += 1
            self.stats.scanned_bytes += entry.size
            self._file_job(listing, path, entry, st)
        return entry

    def _small_file(self, listing: Listing, path: bytes, name: bytes, st: os.stat_result) -> None:
        """_add_child() of a small regular file of one link in a save that
        reads every file (no report): what _add_child() would do, without
        the checks that cannot apply (a microsecond a file on the busiest
        thread). Its extended attributes are read with its content."""
        entry = Entry(_FILE, name, st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_atime_ns,
                      st.st_ctime_ns, st.st_size, 1)
        node = listing.node
        node.children.append(entry)
        stats = self.stats
        stats.scanned_files += 1
        stats.scanned_bytes += entry.size
        listing.jobs.append(FileJob(node, entry, path, stat_key(st)))
        node.pending += 1

    def _file_job(self, listing: Listing, path: bytes, entry: Entry, st: os.stat_result) -> None:
        key = stat_key(st)
        if st.st_nlink > 1:
            known = self._links.get((st.st_dev, st.st_ino))
            if known is not None:
                link_id, first, first_job = known
                entry.link_id = link_id
                if first_job is None:
                    entry.chunks_raw, entry.size = first.chunks_raw, first.size
                else:
                    listing.jobs.append(FileJob(listing.node, entry, path, key, first=first))
                    listing.node.pending += 1
                return
            entry.link_id = self._next_link_id
            self._next_link_id += 1
        if st.st_size == 0:
            cached: tuple[bytes, list[ChunkRef]] | None = (b"", [])
        elif path in self._cached:
            cached = self._cached.pop(path)
        elif self._lookups:
            cached = self.repo.cache.lookup_stat(path, key)
        else:
            cached = None
        job = None
        if cached is not None:
            entry.chunks_raw = cached[0]
            self.uses.update(chunk.location.pack for chunk in cached[1])
        else:
            job = FileJob(listing.node, entry, path, key)
            listing.jobs.append(job)
            listing.node.pending += 1
        if entry.link_id:
            self._links[(st.st_dev, st.st_ino)] = (entry.link_id, entry, job)
