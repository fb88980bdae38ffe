"""How much work goes together, and how much runs at once: every such number
of rekkordfs in one place, with the reason for it.

`threads` is the -j setting (the CPUs by default): the CPU work (hash,
compress, seal) never runs on more threads than that; what waits on disks and
networks may run wider.
"""

from __future__ import annotations

# --- batches: one worker-thread hop handles many small things --------------------------
# (a hop costs tens of microseconds; a small file's CPU work is less than that)

SMALL_FILE = 2 << 20  # files up to this size are read, or written, in one go
BATCH_FILES = 64  # small files per hop (save, restore, write-behind, commit)...
BATCH_BYTES = 8 << 20  # ...up to this many bytes
REMOTE_BATCH_FILES = 1024  # small files per batch of a restore from a server (fewer, larger requests)
REMOTE_HOLD = 16  # batches' worth of small files a restore from a server may hold back, grouping them by pack
STREAM_BATCH = 8 << 20  # bytes of a large file's chunks handed over per hop
OPEN_FOLDERS = 32  # folders a restore holds the entries of while it queues their files
STAT_BATCH = 4096  # stat-cache rows a save stores per transaction, as it goes
RECORD_BATCH = 64  # directory records read per hop when walking whole trees (prune, measuring)
RECORD_READS = 8  # such batches read at once


# --- read-ahead of the mount --------------------------------------------------------------

PREFETCH_CHUNKS = 8  # chunks of a file read in order fetched ahead of the reader
# Read-ahead across entries, for walks and `cp -r`: the records of a listed
# directory's first subdirectories, and the content of the small files after one
# being opened, each fetched in batches (one worker-thread hop per batch).
PREFETCH_SUBDIRS = 128
PREFETCH_FILES = 64
PREFETCH_FILE_BYTES = 4 << 20
PREFETCH_SMALL_FILE = 1 << 20
PREFETCH_BATCH = 16  # subdirectory records per hop (the small files after one: one hop for all)
# The cycle collector's thresholds (gcquiet.py) while a mount serves: a young
# collection every 100,000 allocations (not 700), the oldest generation every
# 100 x 50 of those; during a save or a restore: every 50,000, older ones at
# Python's rates (a restore from a server collected 13-22% of its main
# thread's time away, traversing the S3 client's service model or asyncssh's
# objects again and again)
MOUNT_GC_THRESHOLDS = (100_000, 50, 100)
BULK_GC_THRESHOLDS = (50_000, 10, 10)


# --- concurrency ------------------------------------------------------------------------


def small_file_threads(threads: int) -> int:
    """Threads preparing batches of small files at once in a save: their work is
    Python and short system calls, which a second thread cannot overlap (the
    GIL), so two only hand the GIL back and forth on every call. (A restore
    from a local disk without a worker process keeps `threads`: there one
    thread at a time left the disk idle while a file creation waited on it,
    27 s against 17 s for 100,000 files; with a worker, which writes too, it
    uses this.)"""
    return 1


# files up to this size go to a restore's worker process (restoreprocs.py): their
# cost is per file (Python, creating the file, its metadata); a larger file's is
# per byte, in C code a thread of the main process runs without the GIL, and
# sending its bytes through a pipe would only add copies
WORKER_FILE = 64 << 10
# small files a save must have before it starts worker processes: one takes a
# few tenths of a second to start, and the batches until then go the in-process way
SAVE_PROCESS_FILES = 512
# ...and small files it must have seen before its batches wait for that worker
# to be ready rather than going the in-process way: the main process (the
# save's critical path) spends about 90 us more on a small file it prepares
# itself than on one a worker prepared, and its walker goes on while it
# waits; 100,000 files prepared 4,600 in-process while the worker started
SAVE_WAIT_FILES = 2048
# small files per batch for a save's worker process: each batch costs both
# processes a round trip (frames, a reply, a pack hand-over), 64 files were many
PROCESS_BATCH_FILES = 256
RECORD_BATCH = 64  # a save's directory records written in one thread hop, at most
# entries of finished folders a save holds before writing their records (their
# memory: a re-save held 5 MB more with 64 folders of 100 files waiting)
RECORD_ENTRIES = 2048


def save_processes(threads: int) -> int:
    """Worker processes preparing a save's small files (prepprocs.py): the
    CPUs it may use less the one of its main process, which the GIL holds."""
    import os

    return max(0, min(threads, os.cpu_count() or 1, 5) - 1)


def restore_processes(threads: int) -> int:
    """Worker processes writing the small files of a restore from a server
    (restoreprocs.py): like save_processes(), the CPUs less the main process's."""
    return save_processes(threads)


def save_lead(threads: int) -> int:
    """Files a save's walker may have queued and not saved yet: about 1 KiB of
    memory each, and far more than the workers need to stay busy."""
    return 8192


def save_workers(threads: int) -> int:
    """Tasks reading files: most wait on the disk, so more than the CPUs."""
    return max(8, threads * 4)


def chunks_in_flight(threads: int) -> int:
    """Chunks of large files read but not stored yet: bounds a save's memory."""
    return max(4, threads * 3)


def record_writers(threads: int) -> int:
    """Directory records a commit writes at once, or staged files it uploads at once."""
    return max(4, threads * 2)


def restore_workers(threads: int) -> int:
    return max(8, threads * 4)


def restore_chunk_reads(threads: int, remote: bool) -> int:
    """Chunks a restore fetches at once: remote backends need many requests in
    flight, and about 8 chunks share a pack, so several packs load at once."""
    return max(8, threads * (20 if remote else 3))


RESTORE_WINDOW = 4 << 20  # stored bytes of a large file's neighbouring chunks read together from a server


def restore_windows(threads: int) -> int:
    """Windows of large files a restore from a server reads at once (each holds
    up to RESTORE_WINDOW bytes twice: sealed, then opened)."""
    return max(6, threads * 3)


def check_reads(threads: int) -> int:
    return max(4, threads * 4)


def local_io(threads: int) -> int:
    """Threads doing a local repository's file I/O."""
    return max(4, threads * 2)


def s3_requests(threads: int) -> int:
    return max(24, threads * 8)


def sftp_requests(threads: int) -> int:
    """SFTP requests in flight (asyncssh pipelines them over a few channels)."""
    return max(16, threads * 8)


def repack_packs(threads: int, remote: bool) -> int:
    """Packs a prune repacks at once: while one is resealed (CPU) the next is
    read, and every CPU has a pack to work on; on a server more, as each waits
    for its download and for the upload of the packs it fills (each pack in
    flight holds about twice its 8 MiB)."""
    return max(4, threads * 2) if remote else max(2, threads)
