"""A restore's worker process: opens, checks and writes batches of small
files below DEST on another CPU (the main process, held by the GIL to one
core, keeps the walk, the requests to the server, the folders and the large
files). From a repository on a local disk it also reads the files' chunks
from the packs itself (rawruns.read_local): the main process then only
walks the tree and sends paths and metadata.

Started by restoreprocs.py as `python -m rekkordfs.restoreworker` in its own
process group, with one end of a socket pair through which it receives DEST's
open descriptor (the one the main process opened: the worker never looks DEST
up by name), it talks only through its stdin and stdout, in frames (frames.py):

    main -> worker  (data_secret, id_key, handover, dest, repository)  once (handover: the number
                                                             of its socket end, which then brings
                                                             DEST's descriptor; repository: the
                                                             local repository's folder, or None)
    worker -> main  ("ready",)
    main -> worker  [file, ...]                              a batch, any number of times
    worker -> main  ("done", bytes_written, warnings)        one per batch, in order
    worker -> main  ("unread",)                              instead, for a batch whose chunks it
                                                             could not read itself: nothing written
    worker -> main  ("failed", kind, message, errno, filename)   then it exits

Each file is (parts, mode, uid, gid, atime_ns, mtime_ns, size, xattrs,
chunks_raw, found): its path below DEST, its metadata, its encoded chunk list
and its one chunk's stored bytes with the pack they were found in (None: an
empty or all-zero file; True: to be read from the local repository). When a
pack cannot be read (pruned and rewritten since the tree was read, or a disk
error), the batch is answered "unread" and the main process restores it its
usual way, which finds moved blobs and words the errors. Everything read is
checked here as in the main process (restorewrite.py: authenticated, its ID
and size checked, before anything is written). The secrets (the data key that opens
blobs, the blob-ID key that checks them) come through the pipe, never argv,
the environment or a file. Its stdin closing ends it.
"""

from __future__ import annotations

import os
import signal
import sys

import zstandard

from . import crypto
from .codec import open_checked
from .destination import FolderFds, XattrFailed
from .errors import CorruptedData, RekkordError
from .fdhandover import receive_fds
from .format import BlobKind, ChunkRef, Entry, EntryKind, Location, Raw
from .frames import read_frame, serve_messages
from .rawruns import read_local
from .restorewrite import FileJob, SmallWriter, xattr_warning


def decode_batch(message: list[tuple]) -> tuple[list[FileJob], dict[bytes, Raw], list[ChunkRef]]:
    """The batch's files, the stored bytes sent with them by chunk ID, and
    the chunks to read from the local repository."""
    jobs: list[FileJob] = []
    raws: dict[bytes, Raw] = {}
    to_read: list[ChunkRef] = []
    for parts, mode, uid, gid, atime_ns, mtime_ns, size, xattrs, chunks_raw, found in message:
        job = FileJob(tuple(parts), Entry(EntryKind.FILE, parts[-1], mode=mode, uid=uid, gid=gid, atime_ns=atime_ns,
                                          mtime_ns=mtime_ns, size=size, xattrs=xattrs, chunks_raw=chunks_raw))
        jobs.append(job)
        if found is None or not job.chunks:
            continue
        if found is True:
            to_read.append(job.chunks[0])
        else:
            stored, pack = found
            raws[job.chunks[0].id] = (stored, Location(pack, 0, len(stored)))
    return jobs, raws, to_read


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides what a Ctrl-C does
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    start = read_frame(stdin)
    if start is None:
        return 0
    data_secret, id_key, handover, dest, repository = start
    del start
    try:
        [dest_fd] = receive_fds(handover, 1)
    except OSError:
        return 0  # the main process ended first (a restore that failed or was interrupted)
    opener = crypto.PackOpener(data_secret)
    del data_secret
    decompressor = zstandard.ZstdDecompressor()
    chunk_id = crypto.id_hasher(id_key, BlobKind.CHUNK)
    folders = FolderFds(dest_fd)  # keeps a duplicate
    os.close(dest_fd)
    warnings: list[str] = []

    def unpack(blob_id: bytes, pack_id: bytes, stored: bytes | bytearray | memoryview) -> bytes | bytearray:
        return open_checked(opener, decompressor, chunk_id, BlobKind.CHUNK, blob_id, pack_id, stored)[2]

    def show(parts: tuple[bytes, ...]) -> str:
        return os.path.join(dest, *(os.fsdecode(p) for p in parts))

    def xattr_failed(parts: tuple[bytes, ...]) -> XattrFailed:
        return lambda name, exc: warnings.append(xattr_warning(name, exc, show(parts)))

    writer = SmallWriter(unpack, folders, show, xattr_failed)

    def handle(message: list[tuple]) -> tuple:
        try:
            jobs, raws, to_read = decode_batch(message)
            if to_read:
                try:
                    raws.update(zip((chunk.id for chunk in to_read), read_local(repository, to_read)))
                except (OSError, RekkordError):
                    return ("unread",)
            return "done", writer.write_batch(jobs, raws), warnings[:]
        except CorruptedData as exc:
            return "failed", "corrupt", exc.message, 0, None
        except OSError as exc:
            return "failed", "os", exc.strerror or str(exc), exc.errno or 0, exc.filename
        except Exception as exc:  # noqa: BLE001 - told to the main process, which fails the restore
            return "failed", "error", f"{type(exc).__name__}: {exc}", 0, None
        finally:
            warnings.clear()

    try:
        return serve_messages(stdin, stdout, handle)
    finally:
        folders.close()


if __name__ == "__main__":
    sys.exit(main())
