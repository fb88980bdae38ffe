"""Where a staged file's content lives (inode.Content) and everything that
reads or changes it: read, write, truncate, copy-up from the stored chunks,
spilling inline content into a data file, fsync, and keeping the content a
running commit captured (frozen) while writes go on."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import trio

from ..blobcache import BlobCache
from ..chunkmap import ChunkMap, pwrite_all
from ..errors import errno_error
from ..format import EntryKind, decode_chunks
from ..lru import WeightedLRU
from .inode import Content, Inode
from .journal import Deleted, Journal
from .uploads import Uploads

CHUNK_MAPS = 1024  # decoded chunk lists of stored files being read
INLINE_WRITE = 1 << 20  # every FUSE write (max_write is 1 MiB) goes to the page cache inline
# Files up to this size keep their content in the journal: creating a file on
# disk costs far more than a journal transaction, and most files are small.
INLINE_MAX = 128 << 10


class ContentStore:
    def __init__(self, folder: Path, journal: Journal, uploads: Uploads, blobs: BlobCache | None,
                 clock: Callable[[], int]) -> None:
        self.journal = journal
        self.uploads = uploads
        self.blobs = blobs  # None: the key cannot read stored data (WriteOnly)
        self.clock = clock
        self.data_dir = folder / "data"
        self._data_prefix = os.fsdecode(self.data_dir) + "/"
        self.frozen_dir = folder / "frozen"
        self.frozen: dict[int, Path] = {}  # data files a running commit still needs
        # inline content a running commit still needs: None while the journal
        # still holds it unchanged, else the content it had (see _preserve_inline)
        self.frozen_inline: dict[int, bytes | None] = {}
        self._touched: set[int] = set()  # files written since their last flush
        # data files open for writing, from a file's first write to its next
        # close or fsync (flush()): a large file arrives in thousands of writes,
        # and an open() and close() each cost the request thread as much as the
        # write (two more hand-overs of the GIL). Dropped wherever the data
        # file's name may come to name another file (unfreeze, spill, reset).
        self._write_fds: dict[int, int] = {}
        self._chunk_maps: WeightedLRU[int, ChunkMap] = WeightedLRU(CHUNK_MAPS)  # decoded, for reads

    # --- the state folder ---------------------------------------------------------------

    def recover(self, data_files: set[str]) -> None:
        """After a crash: data of deleted or committed files, copies in progress,
        frozen copies of a commit that did not finish."""
        for path in self.data_dir.iterdir():
            if path.name not in data_files:
                path.unlink()
        for path in self.frozen_dir.iterdir():
            path.unlink()

    def reset(self) -> None:
        """The tree was seeded anew (the journal holds no written file)."""
        self.close_files()
        self._chunk_maps = WeightedLRU(CHUNK_MAPS)
        for path in self.data_dir.iterdir():
            path.unlink()

    def deleted(self, deleted: Deleted) -> None:
        """Inodes whose deletion was just committed."""
        for ino, content in deleted:
            self._close_write_fd(ino)
            if content == Content.DATA_FILE:
                _unlink(self.data_path(ino))
            self.uploads.deleted(ino)
            self._chunk_maps.pop(ino)

    def data_path(self, ino: int) -> str:
        return self._data_prefix + str(ino)  # on every write and stat: no pathlib

    def inline_data(self, ino: int) -> bytes | None:
        """The content of a file kept in the journal (None: it is not)."""
        row = self.journal.db.execute("SELECT data FROM inline WHERE ino = ?", (ino,)).fetchone()
        return row[0] if row else None

    def local_files(self) -> Iterator[int]:
        """Files whose content is written here and not yet committed (a data file or inline)."""
        self.journal.write_rows()
        for (ino,) in self.journal.db.execute("SELECT ino FROM inodes WHERE local != ? AND kind = ?",
                                              (Content.STORED, EntryKind.FILE)):
            yield ino

    def usage_of(self, node: Inode) -> tuple[int, int | None]:
        """Size, and 512-byte blocks used when known: a data file may have holes."""
        if node.kind == EntryKind.FILE and node.local == Content.DATA_FILE:
            try:
                st = os.stat(self.data_path(node.ino))
            except FileNotFoundError:
                return 0, 0
            return st.st_size, st.st_blocks
        return node.size, None

    # --- reading ------------------------------------------------------------------------

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        node = self.journal.get(ino)
        if node.local == Content.INLINE:
            row = self.journal.db.execute("SELECT substr(data, ?, ?) FROM inline WHERE ino = ?",
                                          (offset + 1, size, ino)).fetchone()
            return (row[0] if row else None) or b""  # SQLite: NULL for an empty blob
        if node.local == Content.DATA_FILE:
            fd = os.open(self.data_path(ino), os.O_RDONLY | os.O_CLOEXEC)
            try:
                return await trio.to_thread.run_sync(os.pread, fd, size, offset)
            finally:
                os.close(fd)
        if not node.chunks or self.blobs is None:
            return b""
        return await self._chunk_map(node).read(self.blobs.chunk, offset, size, node.size)

    def _chunk_map(self, node: Inode) -> ChunkMap:
        cached = self._chunk_maps.get(node.ino)
        if cached is None:
            cached = ChunkMap(decode_chunks(node.chunks or b""))
            self._chunk_maps.put(node.ino, cached)
        return cached

    # --- changing -----------------------------------------------------------------------

    def changed(self, ino: int) -> None:
        """The content of ino changed (its journal row says so already)."""
        self.uploads.changed(ino)
        self._chunk_maps.pop(ino)
        self.journal.sequence += 1

    async def copy_up(self, ino: int, keep_content: bool) -> None:
        """Give a stored file a local copy before it is modified."""
        await self.unfreeze(ino)
        node = self.journal.get(ino)
        if node.local:
            return
        if not keep_content or not node.chunks or node.size <= INLINE_MAX:
            await self._copy_up_inline(node, keep_content)
            return
        self._close_write_fd(ino)
        path = self.data_path(ino)
        tmp = self.data_dir / f"{ino}.copy"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if keep_content and node.chunks:
                if self.blobs is None:
                    raise errno_error(errno.EACCES)
                offset = 0
                for chunk in decode_chunks(node.chunks):
                    data = await self.blobs.chunk(chunk)
                    await trio.to_thread.run_sync(pwrite_all, fd, data, offset)
                    offset += chunk.size
                os.ftruncate(fd, node.size)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        with self.journal.transaction():
            self.journal.change(ino, local=Content.DATA_FILE, chunks=None, size=0)
            self.journal.changed()
        self.changed(ino)

    async def _copy_up_inline(self, node: Inode, keep_content: bool) -> None:
        data = b""
        if keep_content and node.chunks:
            if self.blobs is None:
                raise errno_error(errno.EACCES)
            data = await self._chunk_map(node).read(self.blobs.chunk, 0, node.size, node.size)
        if self.journal.get(node.ino).local:
            return  # another request made it local meanwhile
        with self.journal.transaction():
            self.journal.db.execute("INSERT OR REPLACE INTO inline (ino, data) VALUES (?, ?)", (node.ino, data))
            self.journal.change(node.ino, local=Content.INLINE, chunks=None, size=len(data))
            self.journal.changed()
        self.changed(node.ino)

    async def truncate(self, ino: int, size: int) -> None:
        """Of a file whose content is local already (see copy_up)."""
        await self.unfreeze(ino)
        node = self.journal.get(ino)
        if node.local == Content.INLINE and size <= INLINE_MAX:
            data = self.inline_data(ino) or b""
            self._set_inline(node, data[:size] + bytes(max(0, size - len(data))))
        else:
            if node.local == Content.INLINE:
                self._spill(node)
            await trio.to_thread.run_sync(os.truncate, self.data_path(ino), size)
        self.changed(ino)
        self._touched.add(ino)
        self.journal.changed()

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        node = self.journal.get(ino)
        if node.local == Content.INLINE:
            if offset + len(data) <= INLINE_MAX:
                self._write_inline(node, offset, data)
                self.changed(ino)
                return len(data)
            self._spill(node)
        elif ino in self.frozen:
            await self.unfreeze(ino)
        if len(data) <= INLINE_WRITE:
            fd = self._write_fds.get(ino)
            if fd is None:
                fd = self._write_fds[ino] = os.open(self.data_path(ino), os.O_WRONLY | os.O_CLOEXEC)
            pwrite_all(fd, data, offset)  # into the page cache: cheaper than a thread hop
        else:  # its own descriptor: a close of the shared one may come while the thread writes
            fd = os.open(self.data_path(ino), os.O_WRONLY | os.O_CLOEXEC)
            try:
                await trio.to_thread.run_sync(pwrite_all, fd, data, offset)
            finally:
                os.close(fd)
        self.changed(ino)
        self._touched.add(ino)
        if not self.journal.dirty:
            self.journal.changed()
        return len(data)

    def _set_inline(self, node: Inode, data: bytes) -> None:
        self._preserve_inline(node.ino)
        with self.journal.transaction():
            if len(data) < node.size:
                self.journal.freed()
            self.journal.db.execute("UPDATE inline SET data = ? WHERE ino = ?", (data, node.ino))
            self.journal.change(node.ino, size=len(data))
            if not self.journal.dirty:
                self.journal.changed()

    def _write_inline(self, node: Inode, offset: int, data: bytes) -> None:
        """One transaction, new mtime included (a data file's write has none: its
        mtime is journaled at close, see flush()); one statement, the row's
        change after it (see Journal.transaction)."""
        self._preserve_inline(node.ino)
        end = offset + len(data)
        now = self.clock()
        with self.journal.transaction(alone=True):
            if offset >= node.size:  # appending (after a hole, if any): SQLite joins the bytes
                self.journal.db.execute("UPDATE inline SET data = CAST(data || ? AS BLOB) WHERE ino = ?",
                                        (bytes(offset - node.size) + data, node.ino))
            else:
                old = self.inline_data(node.ino) or b""
                self.journal.db.execute("UPDATE inline SET data = ? WHERE ino = ?",
                                        (old[:offset] + data + old[end:], node.ino))
            self.journal.change(node.ino, size=max(node.size, end), mtime_ns=now, ctime_ns=now)
            if not self.journal.dirty:
                self.journal.changed()

    def _spill(self, node: Inode) -> None:
        """Inline content about to grow past INLINE_MAX moves to a data file.
        No await: no other request may change it meanwhile."""
        self._preserve_inline(node.ino)
        self._close_write_fd(node.ino)
        data = self.inline_data(node.ino) or b""
        fd = os.open(self.data_path(node.ino), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            pwrite_all(fd, data, 0)
        finally:
            os.close(fd)
        with self.journal.transaction():  # a crash before this leaves a data file that recover() deletes
            self.journal.db.execute("DELETE FROM inline WHERE ino = ?", (node.ino,))
            self.journal.change(node.ino, local=Content.DATA_FILE, size=0)

    def delete_inline(self, ino: int) -> None:
        """Inside a transaction deleting an inline file."""
        self._preserve_inline(ino)
        self.journal.db.execute("DELETE FROM inline WHERE ino = ?", (ino,))

    # --- mtime and fsync --------------------------------------------------------------------

    def flush(self, ino: int) -> None:
        """close()/fsync(): the file's new mtime goes into the journal."""
        self._close_write_fd(ino)
        if ino in self._touched:
            now = self.clock()
            self.journal.change_alone(ino, mtime_ns=now, ctime_ns=now)
            self._touched.discard(ino)

    def _close_write_fd(self, ino: int) -> None:
        fd = self._write_fds.pop(ino, None)
        if fd is not None:
            os.close(fd)

    def close_files(self) -> None:
        """The tree closes (or is reset): no data file stays open."""
        for ino in list(self._write_fds):
            self._close_write_fd(ino)

    def touched_mtime(self, ino: int) -> bool:
        """Written since its last flush: its mtime is now, not the journal's."""
        return ino in self._touched

    def mtime_set(self, ino: int) -> None:
        """An explicit time wins over the write that came before."""
        self._touched.discard(ino)

    def sync(self, ino: int | None = None) -> None:
        """fsync(): the file's data and the journal reach the disk (after
        Journal.flush(), on the journal's thread: this one runs in a worker)."""
        folder = self.journal.folder
        paths: list[str | Path] = [folder / "tree.db-wal", folder / "tree.db"]
        if ino is not None and self.journal.get(ino).local == Content.DATA_FILE:
            paths.append(self.data_path(ino))
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # --- content a running commit captured --------------------------------------------------

    def freeze(self, ino: int, sequence: int) -> Path:
        """Keep the data file as it is now for a commit (a hard link; a later
        write goes to a copy, see unfreeze)."""
        link = self.frozen_dir / f"{ino}.{sequence}"
        link.unlink(missing_ok=True)
        os.link(self.data_path(ino), link)
        self.frozen[ino] = link
        return link

    def freeze_inline(self, ino: int) -> None:
        self.frozen_inline[ino] = None  # the journal holds it until it changes

    def release(self, frozen: dict[int, Path], inline: list[int]) -> None:
        """The commit that froze these is over."""
        for ino, link in frozen.items():
            if self.frozen.get(ino) == link:
                del self.frozen[ino]
            link.unlink(missing_ok=True)
        for ino in inline:
            self.frozen_inline.pop(ino, None)

    async def unfreeze(self, ino: int) -> None:
        """A running commit holds this file's content: write from now on to a copy."""
        if ino not in self.frozen:
            return
        self._close_write_fd(ino)  # the name goes to the copy
        path = self.data_path(ino)
        tmp = self.data_dir / f"{ino}.copy"
        await trio.to_thread.run_sync(shutil.copyfile, path, tmp)
        os.replace(tmp, path)
        del self.frozen[ino]

    def _preserve_inline(self, ino: int) -> None:
        """Before inline content changes: a running commit that captured it keeps the old one."""
        if ino in self.frozen_inline and self.frozen_inline[ino] is None:
            self.frozen_inline[ino] = self.inline_data(ino)

    def captured_contents(self, inos: list[int]) -> list[bytes]:
        """The contents of inline files as the running commit captured them,
        those the journal still holds read with one statement."""
        kept = [self.frozen_inline[ino] for ino in inos]
        unchanged = [ino for ino, data in zip(inos, kept) if data is None]
        held: dict[int, bytes] = {}
        if unchanged:
            held = dict(self.journal.db.execute(
                f"SELECT ino, data FROM inline WHERE ino IN ({', '.join('?' * len(unchanged))})", unchanged))
        out = []
        for ino, data in zip(inos, kept):
            if data is None:
                data = held.get(ino)
                assert data is not None, "captured inline content changed without being preserved"
            out.append(data)
        return out


def remove_files(paths: list[str]) -> None:
    for path in paths:
        _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
