"""Write-behind: staged files are uploaded in the background once closed, so
a commit has less to do; a large file written front to back is uploaded while
it grows (streaming.py).

WriteBehind runs the uploads for every staging tree of a mount: the staging
area tells it of writes and closes, and the results go to each tree's
staging.Uploads, where a commit finds them (or waits for one running).
"""

from __future__ import annotations

import logging
import math
import sqlite3
from typing import TYPE_CHECKING

import trio

from .errors import RekkordError
from .repository import Repository
from .staging import StagingTree
from .streaming import GrowingFile, StreamAborted
from .testhooks import stop_point
from .tuning import BATCH_BYTES, BATCH_FILES, SMALL_FILE
from .upload import SmallFile, Uploader

if TYPE_CHECKING:
    from .stagingarea import Handle

log = logging.getLogger(__name__)

Closed = tuple[StagingTree, int, int]  # a closed written file: tree, inode, content version
# Closed files wait until no file was written or closed for this long: under a
# steady writer (rsync) an upload running beside the requests made each of them
# dearer (about 0.5 ms of the daemon's CPU a small file, against less than 0.1 ms
# for the commit to upload what was left). It also gathers a pause's files into
# batches (one thread hop per batch, not per file).
QUIET_SECONDS = 0.05


class WriteBehind:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.uploaders: dict[str, Uploader] = {}  # per channel (see uploader())
        self._nursery: trio.Nursery | None = None
        self._streams: dict[tuple[StagingTree, int], GrowingFile] = {}
        self._learned = False  # prepare_write() done once write-behind starts
        self._learning = trio.Lock()
        # closed files waiting for write-behind (few bytes each: the queue may grow)
        self._behind_send, self._behind_recv = trio.open_memory_channel[Closed](math.inf)
        self._active = 0.0  # trio time of the last write or close
        self._commits = 0  # running: they upload what is queued themselves

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        # On local disk one write-behind task at a time leaves the other CPUs to the
        # FUSE requests and to the writer (rsync): faster overall. To a server, more
        # seal while one waits for an upload.
        for _ in range(max(1, self.repo.threads) if self.repo.storage.remote else 1):
            nursery.start_soon(self._upload_behind)
        nursery.start_soon(self._abort_streams_when_done)

    async def _abort_streams_when_done(self) -> None:
        """On unmount, wake the threads waiting for more data of files never closed."""
        try:
            await trio.sleep_forever()
        finally:
            for stream in list(self._streams.values()):
                stream.abort()

    def add_channel(self, channel: str) -> None:
        self.uploaders[channel] = Uploader(self.repo)

    def drop_channel(self, channel: str) -> None:
        del self.uploaders[channel]

    def uploader(self, channel: str) -> Uploader:
        """The channel's: its statistics (write-behind's included) are the next commit's."""
        return self.uploaders[channel]

    async def learn_stored(self, again: bool = False) -> None:
        """Load what other writers stored (new pack indexes), so nothing is packed twice.
        Uploads wait for a load in progress."""
        async with self._learning:
            if again or not self._learned:
                await self.repo.prepare_write()
                self._learned = True

    # --- what the staging area tells -------------------------------------------------------

    def before_write(self, handle: Handle, offset: int) -> bool:
        """Whether this write appends to what the handle wrote from the start;
        any other write ends the file's streaming upload."""
        tree, ino = handle.tree, handle.ino
        self._active = trio.current_time()
        stream = self._streams.get((tree, ino))
        appending = (handle.sequential_end == offset and not tree.is_frozen(ino)
                     and (stream is None or stream is handle.stream))
        if not appending:
            self.abort_stream(tree, ino)
            handle.sequential_end = None
        return appending

    def appended(self, handle: Handle, written: int) -> None:
        """After an appending write: past SMALL_FILE the file streams out."""
        assert handle.sequential_end is not None
        handle.sequential_end += written
        if handle.stream is not None:
            handle.stream.appended(handle.sequential_end)
        elif handle.sequential_end > SMALL_FILE and self._nursery is not None:
            self._start_stream(handle)

    def closed(self, handle: Handle) -> None:
        """The last close of a file: its stream ends, or it is queued if written."""
        self._active = trio.current_time()
        stream = handle.stream
        if stream is not None and not stream.aborted:
            stream.version = handle.tree.uploads.version(handle.ino)  # what the streamed chunks hold
            stream.close()
        elif handle.wrote:
            self._behind_send.send_nowait((handle.tree, handle.ino, handle.tree.uploads.version(handle.ino)))

    def abort_stream(self, tree: StagingTree, ino: int) -> None:
        """The file changes other than by appending (or is opened to)."""
        stream = self._streams.pop((tree, ino), None)
        if stream is not None:
            stream.abort()

    # --- streaming --------------------------------------------------------------------------

    def _start_stream(self, handle: Handle) -> None:
        assert handle.sequential_end is not None and self._nursery is not None
        stream = handle.stream = GrowingFile(handle.tree.data_path(handle.ino), handle.sequential_end)
        self._streams[(handle.tree, handle.ino)] = stream
        done = handle.tree.uploads.begin([handle.ino])  # a commit may wait for it
        self._nursery.start_soon(self._upload_stream, handle.tree, handle.ino, stream, done)

    async def _upload_stream(self, tree: StagingTree, ino: int, stream: GrowingFile, done: trio.Event) -> None:
        """A large file written front to back is uploaded as it grows (see streaming.py)."""
        try:
            await self.learn_stored()
            chunks = await self.uploaders[tree.channel].upload_stream(stream)
            tree.uploads.record(ino, stream.version, chunks)
        except StreamAborted:
            pass  # what changed it closes it, and then write-behind takes it whole
        except (RekkordError, OSError) as exc:
            log.warning("streaming upload of staging/%s inode %d failed: %s", tree.channel, ino,
                        getattr(exc, "message", exc))
            self._behind_send.send_nowait((tree, ino, tree.uploads.version(ino)))  # once more, whole
        finally:
            stream.release()
            if self._streams.get((tree, ino)) is stream:
                del self._streams[(tree, ino)]
            tree.uploads.finish([ino], done)

    # --- closed files ------------------------------------------------------------------------

    async def _upload_behind(self) -> None:
        """Closed files, small ones many per thread hop like `save`."""
        pending: list[Closed] = []
        while True:
            if not pending:
                pending.append(await self._behind_recv.receive())
            await self._quiet()
            while len(pending) < BATCH_FILES:
                try:
                    pending.append(self._behind_recv.receive_nowait())
                except trio.WouldBlock:
                    break
            current = [item for item in pending if _wanted(*item)]
            if not current:
                pending = []
                continue
            by_tree: dict[StagingTree, list[int]] = {}
            for tree, ino, _ in current:
                by_tree.setdefault(tree, []).append(ino)
            # a commit may wait for this batch instead of uploading again
            running = {tree: tree.uploads.begin(inos) for tree, inos in by_tree.items()}
            try:
                stop_point("write-behind")
                await self.learn_stored()
                pending = await self._upload_batch(current)
            except (RekkordError, OSError) as exc:
                log.warning("write-behind upload failed (commit will retry): %s", getattr(exc, "message", exc))
                pending = []
            finally:
                for tree, inos in by_tree.items():
                    tree.uploads.finish(inos, running[tree])

    async def _quiet(self) -> None:
        """Until no file was written or closed for QUIET_SECONDS, and no commit
        runs (it uploads the files it captured itself: write-behind beside it
        would have it wait for each batch)."""
        while (left := self._active + QUIET_SECONDS - trio.current_time()) > 0 or self._commits:
            await trio.sleep(max(left, QUIET_SECONDS))

    def commit_started(self) -> None:
        self._commits += 1

    def commit_ended(self) -> None:
        self._commits -= 1
        self._active = trio.current_time()  # what is left waits for a pause again

    async def _upload_batch(self, items: list[Closed]) -> list[Closed]:
        """Upload what fits in one batch; returns the files left for the next one."""
        # content kept in the journal is read here: the journal stays on this thread
        inline = [tree.inline_data(ino) for tree, ino, _ in items]
        small, large, left = await self.repo.run_cpu(self._prepare_small, items, inline)
        by_channel: dict[str, list] = {}
        for entry in small:
            by_channel.setdefault(entry[0].channel, []).append(entry)
        for channel, entries in by_channel.items():  # one store per channel's uploader
            results = self.uploaders[channel].store_small([item for _, _, _, item in entries])
            for (tree, ino, version, _), chunks in zip(entries, results):
                assert chunks is not None
                tree.uploads.record(ino, version, chunks)
        await self.repo.upload_ready()
        for tree, ino, version in large:
            try:
                chunks = await self.uploaders[tree.channel].upload_path(tree.data_path(ino))
            except FileNotFoundError:
                continue
            tree.uploads.record(ino, version, chunks)
        return left

    def _prepare_small(self, items: list[Closed], inline: list[bytes | None]
                       ) -> tuple[list, list[Closed], list[Closed]]:
        """Thread side: read, chunk, hash and seal small files up to BATCH_BYTES
        (inline[i] is the content of items[i] when the journal holds it), with
        the small-file pipeline of upload.py."""
        if not items:
            return [], [], []
        files = [SmallFile(data) if data is not None else SmallFile(path=tree.data_path(ino))
                 for (tree, ino, _), data in zip(items, inline)]
        uploader = self.uploaders[items[0][0].channel]  # any: the stats are counted when stored
        handled = uploader.prepare_small(files, BATCH_BYTES)
        for item in files[:handled]:
            if item.error is not None and not isinstance(item.error, FileNotFoundError):  # deleted: nothing to do
                uploader.discard_small(files)
                raise item.error
        small = [(tree, ino, version, item) for (tree, ino, version), item in zip(items, files) if item.ready]
        large = [(tree, ino, version) for (tree, ino, version), item in zip(items, files) if item.large]
        return small, large, items[handled:]


def _wanted(tree: StagingTree, ino: int, version: int) -> bool:
    """Not closed again later, uploaded already (by a commit or an earlier
    pass), committed, or deleted meanwhile."""
    if tree.uploads.version(ino) != version or tree.uploads.result(ino, version) is not None:
        return False
    try:
        return bool(tree.get(ino).local)
    except (OSError, sqlite3.Error):  # deleted, or its tree closed
        return False
