"""`restore`: write a snapshot tree (or part of it) to a local folder.

Repository contents are treated as hostile: names are validated when records
are decoded (no '/', '.', '..' or NUL), every path below DEST is opened
component by component with O_NOFOLLOW relative to its parent's descriptor, an
existing entry in the way is never written through (it could be a symlink or a
hardlink to a file outside DEST), and the walk is bounded (treebudget.py).

DEST's own data is never lost to a failure: what replaces an existing entry is
written under a temporary name and renamed over it once complete; a folder
that replaces a file sets the file aside until the restore succeeds (and puts
it back if it fails); `--delete` removes what the snapshot does not hold only
after everything else is restored.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import trio

from .destination import (
    IS_ROOT,
    FolderFds,
    XattrFailed,
    apply_metadata,
    clear_name,
    make_special,
    move_into_place,
    name_taken,
    remove_quietly,
    temp_name,
)
from .errors import RestoreError
from .format import Entry, EntryKind
from .gcquiet import quiet_gc
from .repository import Repository
from .restorebatches import Batcher
from .restorefiles import FileWriter
from .restoreprocs import RestorePool
from .restorewrite import FileJob, xattr_warning
from .tasks import task_group
from .treebudget import refuse_hostile_tree
from .tuning import (
    BATCH_BYTES,
    BATCH_FILES,
    BULK_GC_THRESHOLDS,
    OPEN_FOLDERS,
    REMOTE_BATCH_FILES,
    REMOTE_HOLD,
    restore_processes,
    restore_workers,
)
from .workerprocs import WorkersAhead, workers_ahead


@dataclass
class RestoreOptions:
    force: bool = False
    delete: bool = False
    dry_run: bool = False


def restore_workers_ahead(threads: int, options: RestoreOptions) -> AbstractAsyncContextManager[WorkersAhead | None]:
    """The restore's worker processes, started now: before connecting to the
    repository (starting Python takes about as long); those the restore does
    not use are killed on exit."""
    return workers_ahead(RestorePool.module, 0 if options.dry_run else restore_processes(threads), handover=True)


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    links: int = 0
    other: int = 0
    bytes_written: int = 0
    deleted: int = 0
    total_bytes: int = 0


@dataclass
class _Plan:
    dirs: list[tuple[tuple[bytes, ...], Entry]] = field(default_factory=list)
    links: list[tuple[tuple[bytes, ...], tuple[bytes, ...]]] = field(default_factory=list)


class RestoreSession:
    def __init__(self, repo: Repository, target: Entry, dest: str, options: RestoreOptions,
                 warn: Callable[[str], None], report: Callable[[str], None] | None = None,
                 has_metadata: bool = True, label: str = "snapshot", ahead: WorkersAhead | None = None) -> None:
        """ahead: restore workers started before the repository was connected (restore_workers_ahead())."""
        self.repo = repo
        self.ahead = ahead
        self.target = target
        self.has_metadata = has_metadata  # False for a snapshot root saved without any
        self.dest = os.path.abspath(dest)
        self.options = options
        self.warn = warn
        self._report = report  # None: nobody listens (no -v or -n)
        self.stats = RestoreStats()
        self.plan = _Plan()
        self._links: dict[int, tuple[bytes, ...]] = {}
        self._walk_slots = trio.Semaphore(restore_workers(repo.threads))
        # folders whose entries are held while their files are queued: a bound on
        # memory, which otherwise holds every folder's entries of the whole tree
        self._open_folders = trio.Semaphore(OPEN_FOLDERS)
        # from a server, a batch's files are read with a few ranged requests: the more
        # files per batch, the fewer requests (each costs CPU: signing, parsing, a thread hop)
        remote = repo.storage.remote
        self.workers = restore_workers(repo.threads)
        # small files waiting to be sent together (from a server: grouped by pack)
        self._batcher = Batcher(REMOTE_BATCH_FILES if remote else BATCH_FILES, BATCH_BYTES, by_pack=remote,
                                hold_files=REMOTE_BATCH_FILES * REMOTE_HOLD, hold_bytes=BATCH_BYTES * REMOTE_HOLD)
        self.dest_fd = -1
        self.folders: FolderFds  # once dest_fd is open
        self.label = label
        self._keep: list[tuple[tuple[bytes, ...], set[bytes]]] = []  # --delete: each folder's names
        self._aside: list[tuple[tuple[bytes, ...], bytes]] = []  # files moved away for a folder

    # --- entry point -----------------------------------------------------------

    async def run(self) -> RestoreStats:
        with quiet_gc(BULK_GC_THRESHOLDS):  # the connected client and the tree's objects are not garbage
            return await self._run()

    async def _run(self) -> RestoreStats:
        started = time.monotonic()
        if self.target.kind == EntryKind.DIRECTORY:
            assert self.target.dir_ref is not None
            await refuse_hostile_tree(self.repo, self.target.dir_ref, self.label)
            await self._check_dest_dir()
            if self.options.dry_run:
                await self._dry_run((), self.target)
                return self.stats
            os.makedirs(self.dest, exist_ok=True)
            self.dest_fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            parts: tuple[bytes, ...] = ()
        else:
            parent, name = os.path.split(self.dest)
            if os.path.isdir(self.dest) and not os.path.islink(self.dest):
                # A file restores as DEST itself: replacing a whole folder by it, even
                # with -f, is never what was meant (cp FILE DIR/ puts it inside).
                raise RestoreError(
                    f"'{self.dest}' is a folder, and a file restores as DEST itself: give the path of the file "
                    f"to create, e.g. '{os.path.join(self.dest, os.fsdecode(self.target.name))}'"
                )
            if os.path.lexists(self.dest) and not (self.options.force or self.options.delete):
                raise RestoreError(f"'{self.dest}' already exists (use --force to replace it)")
            if self.options.dry_run:
                self._tell("restore", ())
                self._count_dry(self.target)
                return self.stats
            self.dest_fd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            parts = (os.fsencode(name),)
            self._tell("restore", ())
        self.folders = FolderFds(self.dest_fd)
        pool = self._pool()
        writer = FileWriter(self.repo, self.folders, self._show, self._xattr_failed, pool)
        try:
            send, recv = trio.open_memory_channel[list[FileJob]](self.workers * 2)
            async with task_group() as processes:
                if pool is not None:
                    processes.start_soon(pool.run)
                async with task_group() as nursery:
                    for _ in range(self.workers):
                        nursery.start_soon(self._worker, writer, recv.clone())
                    recv.close()
                    async with send:
                        if self.target.kind == EntryKind.DIRECTORY:
                            await self._restore_dir_contents(parts, self.target, send)
                        else:
                            await self._restore_entry(parts, self.target, send)
                        await self._send_rest(send)
                if pool is not None:
                    await pool.close()
            self.stats.files += writer.files
            self.stats.bytes_written += writer.bytes_written
            await trio.to_thread.run_sync(self._finish)
        except BaseException:
            await trio.to_thread.run_sync(self._put_back_aside)
            raise
        finally:
            self.folders.close()
            os.close(self.dest_fd)
        self.duration = time.monotonic() - started
        return self.stats

    def _pool(self) -> RestorePool | None:
        """Worker processes for the small files of a tree (from a local disk
        they read the packs themselves)."""
        keys = self.repo.keys
        processes = restore_processes(self.repo.threads)
        storage = self.repo.storage
        if (not processes or not (storage.remote or storage.local_root) or self.target.kind != EntryKind.DIRECTORY
                or keys.data_secret is None or keys.id_key is None):
            return None
        return RestorePool(keys.data_secret, keys.id_key, self.dest_fd, self.dest, processes, self.warn,
                           None if storage.remote else storage.local_root, self.ahead)

    async def _check_dest_dir(self) -> None:
        if not os.path.lexists(self.dest):
            return
        if not os.path.isdir(self.dest):
            raise RestoreError(f"destination '{self.dest}' exists and is not a folder")
        if os.listdir(self.dest) and not (self.options.force or self.options.delete):
            raise RestoreError(f"destination '{self.dest}' is not empty (use --force to restore into it)")

    # --- tree walk -------------------------------------------------------------

    async def _restore_dir_contents(self, parts: tuple[bytes, ...], entry: Entry,
                                    jobs: trio.MemorySendChannel[list[FileJob]]) -> None:
        async with task_group() as nursery:  # the subfolders, started as their entries come
            async with self._open_folders:  # given back once its files are queued
                await self._queue_dir_contents(parts, entry, jobs, nursery)

    async def _queue_dir_contents(self, parts: tuple[bytes, ...], entry: Entry,
                                  jobs: trio.MemorySendChannel[list[FileJob]], nursery: trio.Nursery) -> None:
        assert entry.dir_ref is not None
        async with self._walk_slots:
            children = await self.repo.read_directory(entry.dir_ref)
        if self.options.delete:
            self._keep.append((parts, {c.name for c in children}))
        subdirs = [parts + (child.name,) for child in children if child.kind == EntryKind.DIRECTORY]
        if subdirs:  # all of a folder's subfolders in one thread hop
            await trio.to_thread.run_sync(self._make_dirs, subdirs)
        for child in children:
            child_parts = parts + (child.name,)
            self._tell("restore", child_parts)
            if child.kind == EntryKind.DIRECTORY:
                self.plan.dirs.append((child_parts, child))
                self.stats.dirs += 1
                nursery.start_soon(self._restore_dir_contents, child_parts, child, jobs)
            else:
                await self._restore_entry(child_parts, child, jobs)
        # the batch is not sent at the end of each folder: it fills across
        # folders (made before their files are queued) and the walk's end sends the rest

    async def _restore_entry(self, parts: tuple[bytes, ...], entry: Entry,
                             jobs: trio.MemorySendChannel[list[FileJob]]) -> None:
        if entry.kind == EntryKind.FILE:
            if entry.link_id:
                first = self._links.get(entry.link_id)
                if first is not None:
                    self.plan.links.append((first, parts))
                    return
                self._links[entry.link_id] = parts
            self.stats.total_bytes += entry.size
            job = FileJob(parts, entry)
            if job.large:
                await jobs.send([job])
                return
            for batch in self._batcher.add(job):  # small files go in batches, many per thread hop
                await jobs.send(batch)
        else:
            await trio.to_thread.run_sync(self._make_special, parts, entry)

    def _delete_extras(self) -> None:
        """--delete, once everything is restored: what the snapshot does not hold."""
        for parts, keep in self._keep:
            fd = self.folders.open_folder(parts)
            try:
                for name in map(os.fsencode, os.listdir(fd)):  # listdir(fd) gives str
                    if name not in keep:
                        clear_name(fd, name, keep_dir=False)
                        self.stats.deleted += 1
                        self._tell("delete", parts + (name,))
            finally:
                os.close(fd)

    def _make_dirs(self, subdirs: list[tuple[bytes, ...]]) -> None:
        for parts in subdirs:
            self._make_dir(parts)

    def _make_dir(self, parts: tuple[bytes, ...]) -> None:
        fd = self.folders.open_parent(parts)
        name = parts[-1]
        try:
            try:
                st = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISDIR(st.st_mode):
                temp = temp_name()  # kept until the restore succeeds
                os.rename(name, temp, src_dir_fd=fd, dst_dir_fd=fd)
                self._aside.append((parts, temp))
            try:
                os.mkdir(name, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
        finally:
            os.close(fd)

    def _put_back_aside(self) -> None:
        """A failed restore: files set aside for folders go back where they were
        (the folders hold only what this restore wrote)."""
        for parts, temp in reversed(self._aside):
            try:
                fd = self.folders.open_parent(parts)
            except OSError:
                continue
            try:
                clear_name(fd, parts[-1], keep_dir=False)
                os.rename(temp, parts[-1], src_dir_fd=fd, dst_dir_fd=fd)
            except OSError as exc:
                self.warn(f"could not put '{self._show(parts)}' back (it is kept as "
                          f"'{os.fsdecode(temp)}' beside it): {exc.strerror or exc}")
            finally:
                os.close(fd)
        self._aside.clear()

    def _make_special(self, parts: tuple[bytes, ...], entry: Entry) -> None:
        if entry.kind in (EntryKind.CHAR_DEVICE, EntryKind.BLOCK_DEVICE) and not IS_ROOT:
            self.warn(f"skipped device '{self._show(parts)}' (needs root)")
        elif entry.kind == EntryKind.SOCKET:
            self.warn(f"skipped socket '{self._show(parts)}'")
        else:
            make_special(self.folders, parts, entry, self._xattr_failed(parts))
            if entry.kind == EntryKind.SYMLINK:
                self.stats.links += 1
            else:
                self.stats.other += 1

    def _xattr_failed(self, parts: tuple[bytes, ...]) -> XattrFailed:
        def warn(name: bytes, exc: OSError) -> None:
            self.warn(xattr_warning(name, exc, self._show(parts)))
        return warn

    # --- files -----------------------------------------------------------------

    async def _send_rest(self, jobs: trio.MemorySendChannel[list[FileJob]]) -> None:
        for batch in self._batcher.flush():
            await jobs.send(batch)

    async def _worker(self, writer: FileWriter, jobs: trio.MemoryReceiveChannel[list[FileJob]]) -> None:
        async with jobs:
            async for batch in jobs:
                await writer.write(batch)

    # --- after all files -------------------------------------------------------

    def _finish(self) -> None:
        for first, alias in self.plan.links:
            src_fd = self.folders.open_parent(first)
            dst_fd = self.folders.open_parent(alias)
            try:
                temp = temp_name() if name_taken(dst_fd, alias[-1]) else None
                os.link(first[-1], temp or alias[-1], src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
                if temp is not None:
                    move_into_place(dst_fd, temp, alias[-1])
            finally:
                os.close(src_fd)
                os.close(dst_fd)
            self.stats.files += 1
        if self.options.delete:
            self._delete_extras()
        # deepest directories first, so setting a parent's times is the last touch
        for parts, entry in sorted(self.plan.dirs, key=lambda item: len(item[0]), reverse=True):
            fd = self.folders.open_folder(parts)
            try:
                apply_metadata(fd, entry, self._xattr_failed(parts))
            finally:
                os.close(fd)
        if self.target.kind == EntryKind.DIRECTORY and self.has_metadata:
            apply_metadata(self.dest_fd, self.target, self._xattr_failed(()))
        for parts, temp in self._aside:  # the restore succeeded: what was set aside goes
            fd = self.folders.open_parent(parts)
            try:
                remove_quietly(fd, temp)
            finally:
                os.close(fd)
        self._aside.clear()

    # --- dry run ---------------------------------------------------------------

    async def _dry_run(self, parts: tuple[bytes, ...], entry: Entry) -> None:
        assert entry.dir_ref is not None
        children = await self.repo.read_directory(entry.dir_ref)
        if self.options.delete:
            here = os.path.join(self.dest.encode(), *parts) if parts else self.dest.encode()
            if os.path.isdir(here) and not os.path.islink(here):
                names = {c.name for c in children}
                for name in sorted(os.listdir(here)):
                    if name not in names:
                        self._tell("delete", parts + (name,))
                        self.stats.deleted += 1
        for child in children:
            child_parts = parts + (child.name,)
            self._tell("restore", child_parts)
            if child.kind == EntryKind.DIRECTORY:
                self.stats.dirs += 1
                await self._dry_run(child_parts, child)
            else:
                self._count_dry(child)

    def _count_dry(self, entry: Entry) -> None:
        """Count what restoring entry would do, as a real restore counts it."""
        if entry.kind == EntryKind.FILE:
            self.stats.files += 1
            if not entry.link_id or entry.link_id not in self._links:
                self.stats.total_bytes += entry.size  # hardlinks share their data
            if entry.link_id:
                self._links.setdefault(entry.link_id, ())
        elif entry.kind == EntryKind.SYMLINK:
            self.stats.links += 1

    def _tell(self, action: str, parts: tuple[bytes, ...]) -> None:
        """Report "ACTION PATH" if someone listens: building the path costs as
        much as restoring a small file's metadata, so it is not built for nobody."""
        if self._report is not None:
            self._report(f"{action} {self._show(parts)}")

    def _show(self, parts: tuple[bytes, ...]) -> str:
        if self.target.kind != EntryKind.DIRECTORY:
            return self.dest
        return os.path.join(self.dest, *(os.fsdecode(p) for p in parts))

