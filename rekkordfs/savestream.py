"""Saving a stream (`save CHANNEL - --stdin-filename NAME`): its content
becomes the one file NAME at the root of a new snapshot.

The stream is chunked as it is read, like a large file, so memory stays
bounded whatever its length; nothing is spooled to disk.
"""

from __future__ import annotations

import os
import time
from typing import BinaryIO, cast

import trio

from .chunker import ReadsInto
from .errors import UsageError
from .format import BlobKind, Entry, EntryKind, Snapshot, encode_chunks, encode_directory, validate_channel
from .keys import Capability
from .repository import Repository
from .save import SaveResult, SaveStats
from .upload import Uploader

STREAM_MODE = 0o644  # a stream has no mode of its own: that of a file created with the usual umask


def validate_stream_name(name: str) -> bytes:
    raw = os.fsencode(name)
    if not raw or raw in (b".", b"..") or b"/" in raw or b"\0" in raw:
        raise UsageError(f"--stdin-filename '{name}' is not a file name (no '/', not '.' or '..')")
    return raw


async def save_stream(repo: Repository, channel: str, name: str, stream: BinaryIO) -> SaveResult:
    repo.keys.require(Capability.WRITE)
    channel = validate_channel(channel)
    raw_name = validate_stream_name(name)
    started = time.monotonic()
    time_ns = time.time_ns()
    await repo.prepare_write()
    stats = SaveStats()
    chunks = await Uploader(repo, stats).upload_stream(cast(ReadsInto, stream))  # a buffered binary file
    uses = {chunk.location.pack for chunk in chunks}  # every pack the snapshot refers to
    size = sum(chunk.size for chunk in chunks)
    entry = Entry(kind=EntryKind.FILE, name=raw_name, mode=STREAM_MODE, uid=os.getuid(), gid=os.getgid(),
                  mtime_ns=time_ns, atime_ns=time_ns, ctime_ns=time_ns, size=size,
                  chunks_raw=encode_chunks(chunks))
    stats.files, stats.size, stats.scanned_files, stats.scanned_bytes = 1, size, 1, size
    root_ref, stored = await repo.write_blob(BlobKind.DIRECTORY, await repo.run_cpu(encode_directory, [entry]))
    uses.add(root_ref.location.pack)
    stats.bytes_stored += stored
    snapshot = Snapshot(channel, time_ns, root_ref, size, 0, 1)
    snapshot.stored = stats.bytes_stored
    tag = await repo.publish_snapshot(snapshot, uses)
    await trio.to_thread.run_sync(repo.remember_session)
    return SaveResult(tag.id_hex, channel, time_ns, stats, time.monotonic() - started)
