"""Direct tests of the staging cores (staging.py, stagingarea/, commit.py), without a mount.

Trees without a repository need none (blobs=None, as for a WriteOnly key);
copy-on-write and commit tests use a repository filled by the real CLI, and
check commits by restoring them with the CLI.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import pickle
import random
import stat
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from rekkordfs.blobcache import BlobCache
from rekkordfs.commit import Committer
from rekkordfs.control import CONTROL_CHANNEL, CONTROL_COMMIT
from rekkordfs.format import BlobKind, ChunkRef, EntryKind, Location, Snapshot, decode_chunks, encode_chunks
from rekkordfs.journalspace import free_bytes
from rekkordfs.nodes import IDS_INO, STAGING_INO
from rekkordfs.staging import (
    DATA_FILE,
    INLINE,
    INLINE_MAX,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT,
    Capture,
    StagingTree,
    remove_files,
)
from rekkordfs.stagingarea import StagingArea
from rekkordfs.upload import Uploader
from rekkordfs.vfs import SnapshotView

from .conftest import ROOT as PROJECT_ROOT
from .conftest import Rekkord
from .core_helpers import (
    NS_A,
    NS_B,
    Clock,
    area_over,
    build_sample,
    content,
    diff_manifests,
    dump,
    load_by_id,
    manifest,
    open_repo,
    open_view,
    put_file,
    run,
    src_parts,
    tree_walk,
    view_walk,
)
from .trees import make_awkward_tree, rsync_differences

DIR, FILE, SYMLINK, FIFO = EntryKind.DIRECTORY, EntryKind.FILE, EntryKind.SYMLINK, EntryKind.FIFO


@pytest.fixture(autouse=True)
def private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    folder = tmp_path / "core-cache"
    folder.mkdir()
    monkeypatch.setenv("REKKORD_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tree(tmp_path: Path, clock: Clock):
    """A staging tree without a base and without a repository."""
    staging = StagingTree(tmp_path / "state" / "scratch", "scratch", None, clock=clock)
    yield staging
    staging.close()


async def expect_errno(code: int, fn: Callable, *args, **kwargs) -> None:
    with pytest.raises(OSError) as info:
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            await result
    assert info.value.errno == code, f"{fn.__name__}{args}: {errno.errorcode.get(info.value.errno)} " \
                                     f"instead of {errno.errorcode[code]}"


async def names(tree: StagingTree, parent: int = ROOT) -> list[bytes]:
    return [name for name, _ in await tree.listdir(parent)]


def gone(tree: StagingTree, ino: int) -> bool:
    """The inode left the journal and its content (data file or inline) is deleted."""
    try:
        tree.get(ino)
    except OSError as exc:
        assert exc.errno == errno.ENOENT
        return not has_content(tree, ino)
    return False


def has_content(tree: StagingTree, ino: int) -> bool:
    """Written content of the inode is kept, as a data file or in the journal."""
    return os.path.exists(tree.data_path(ino)) or tree.inline_data(ino) is not None


# Content sizes: small files keep their content in the journal, larger ones in a data file.
SIZES = pytest.mark.parametrize("pad", [b"", b"." * (INLINE_MAX + 1)], ids=["inline", "data-file"])


def frozen_content(tree: StagingTree, ino: int, capture: Capture | None = None) -> bytes | None:
    """What a running commit (of capture, if given) will upload for a file (None: nothing)."""
    if capture is not None and ino in capture.frozen:
        return Path(capture.frozen[ino]).read_bytes()
    if ino in tree.content.frozen:
        return Path(tree.content.frozen[ino]).read_bytes()
    if ino in tree.content.frozen_inline:
        return tree.captured_contents([ino])[0]
    return None


async def upload_captured(uploader: Uploader, tree: StagingTree, capture: Capture) -> dict[int, bytes]:
    """What a commit uploads for the files a capture froze (encoded chunk lists)."""
    contents = {ino: encode_chunks(await uploader.upload_path(path)) for ino, path in capture.frozen.items()}
    datas = tree.captured_contents(capture.inline)
    uploaded = await uploader.upload_many(datas)
    contents.update((ino, encode_chunks(chunks)) for ino, chunks in zip(capture.inline, uploaded))
    return contents


# --- files -------------------------------------------------------------------------------


def test_create_write_read_truncate(tree: StagingTree, clock: Clock) -> None:
    async def main() -> None:
        f = await tree.create(ROOT, b"f", FILE, 0o644, 10, 20)
        assert (f.kind, f.mode, f.uid, f.gid, f.nlink, tree.size_of(f)) == (FILE, 0o644, 10, 20, 1, 0)
        assert f.full_mode == stat.S_IFREG | 0o644
        assert await content(tree, f.ino) == b""
        assert await tree.write(f.ino, 0, b"hello world") == 11
        assert await tree.write(f.ino, 6, b"WORLD!!") == 7
        assert await content(tree, f.ino) == b"hello WORLD!!"
        assert await tree.read(f.ino, 3, 4) == b"lo W"
        assert await tree.read(f.ino, 13, 10) == b""
        assert await tree.read(f.ino, 100, 5) == b""
        written = tree.get(f.ino)  # small: in the journal, whose write transaction sets the mtime
        assert written.mtime_ns == written.ctime_ns > f.mtime_ns and not tree.touched_mtime(f.ino)
        tree.flush(f.ino)
        assert tree.get(f.ino).mtime_ns == written.mtime_ns
        big = await put_file(tree, ROOT, b"big", bytes(INLINE_MAX + 1))  # a data file: mtime at close
        await tree.write(big.ino, 0, b"x")
        assert tree.touched_mtime(big.ino)
        before = tree.get(big.ino).mtime_ns
        tree.flush(big.ino)
        flushed = tree.get(big.ino)
        assert flushed.mtime_ns == flushed.ctime_ns > before and not tree.touched_mtime(big.ino)

        await tree.truncate(f.ino, 5)
        assert await content(tree, f.ino) == b"hello"
        await tree.truncate(f.ino, 8)
        assert await content(tree, f.ino) == b"hello\0\0\0"
        node = await tree.setattr(f.ino, size=0)
        assert tree.size_of(node) == 0 and await content(tree, f.ino) == b""

        assert (await tree.lookup(ROOT, b"f")).ino == f.ino
        await expect_errno(errno.EEXIST, tree.create, ROOT, b"f", FILE, 0o644, 0, 0)
        await expect_errno(errno.EEXIST, tree.create, ROOT, b"f", DIR, 0o755, 0, 0)
        await expect_errno(errno.ENOENT, tree.lookup, ROOT, b"missing")
        await expect_errno(errno.ENOTDIR, tree.create, f.ino, b"x", FILE, 0o644, 0, 0)
        await expect_errno(errno.ENOTDIR, tree.listdir, f.ino)
        d = await tree.create(ROOT, b"d", DIR, 0o755, 0, 0)
        await expect_errno(errno.EISDIR, tree.setattr, d.ino, size=0)
        link = await tree.create(ROOT, b"l", SYMLINK, 0o777, 0, 0, target=b"f")
        assert link.target == b"f" and tree.size_of(link) == 1
        await expect_errno(errno.EINVAL, tree.setattr, link.ino, size=0)
        assert await names(tree) == [b"big", b"d", b"f", b"l"]
        assert tree.dirty

    run(main)


def test_local_files_are_listed_wherever_their_content_is(tree: StagingTree) -> None:
    """ContentStore.local_files() names every file with content not committed yet:
    in the journal (small) and in a data file (large); stored ones are not."""
    async def main() -> None:
        small = await put_file(tree, ROOT, b"small", b"inline")
        large = await put_file(tree, ROOT, b"large", b"x" * (INLINE_MAX + 1))
        await tree.create(ROOT, b"dir", DIR, 0o755, 0, 0)
        assert tree.get(small.ino).local == INLINE and tree.get(large.ino).local == DATA_FILE
        assert sorted(tree.content.local_files()) == sorted([small.ino, large.ino])
        await tree.unlink(ROOT, b"small")
        assert list(tree.content.local_files()) == [large.ino]

    run(main)


def test_writes_beyond_the_end_leave_zeros_and_holes(tree: StagingTree) -> None:
    async def main() -> None:
        f = await tree.create(ROOT, b"sparse", FILE, 0o644, 0, 0)
        await tree.write(f.ino, 5 << 20, b"tail")
        assert tree.size_of(tree.get(f.ino)) == (5 << 20) + 4
        assert await tree.read(f.ino, 0, 5 << 20) == bytes(5 << 20)
        assert await tree.read(f.ino, (5 << 20) - 2, 10) == b"\0\0tail"
        await tree.write(f.ino, 1000, b"mid")
        data = await content(tree, f.ino)
        assert data == bytes(1000) + b"mid" + bytes((5 << 20) - 1003) + b"tail"
        await tree.truncate(f.ino, 9 << 20)
        assert (await content(tree, f.ino))[5 << 20:] == b"tail" + bytes((4 << 20) - 4)
        # the holes are not written out on disk
        assert os.stat(tree.data_path(f.ino)).st_blocks * 512 < 1 << 20

    run(main)


def test_content_moves_from_the_journal_to_a_data_file_as_it_grows(tree: StagingTree) -> None:
    """Random writes and truncates around INLINE_MAX read back like a plain bytearray,
    and survive reopening the journal."""
    rng = random.Random(5)

    async def main() -> None:
        f = await tree.create(ROOT, b"f", FILE, 0o644, 0, 0)
        assert tree.get(f.ino).local == INLINE and not os.path.exists(tree.data_path(f.ino))
        model = bytearray()
        for step in range(60):
            if step % 7 == 6:
                size = rng.choice([0, 10, INLINE_MAX, INLINE_MAX + 1, rng.randrange(2 * INLINE_MAX)])
                await tree.truncate(f.ino, size)
                model[size:] = b""
                model.extend(bytes(size - len(model)))
            else:
                offset = rng.choice([len(model), rng.randrange(len(model) + 1), len(model) + 100])
                data = rng.randbytes(rng.choice([1, 4096, 40_000]))
                await tree.write(f.ino, offset, data)
                model.extend(bytes(max(0, offset - len(model))))
                model[offset:offset + len(data)] = data
            node = tree.get(f.ino)
            assert tree.size_of(node) == len(model)
            assert await content(tree, f.ino) == bytes(model)
            if len(model) <= INLINE_MAX and node.local == INLINE:
                assert not os.path.exists(tree.data_path(f.ino))
            if node.local == DATA_FILE:
                assert tree.inline_data(f.ino) is None
        assert tree.get(f.ino).local == DATA_FILE  # it grew past INLINE_MAX at some point
        small = await put_file(tree, ROOT, b"small", b"x" * INLINE_MAX)
        assert tree.get(small.ino).local == INLINE
        tree.close()
        again = StagingTree(tree.folder, tree.channel, None)
        assert await content(again, f.ino) == bytes(model)
        assert await content(again, small.ino) == b"x" * INLINE_MAX
        again.close()

    run(main)


# --- rename ------------------------------------------------------------------------------------


def test_rename_over_an_existing_file(tree: StagingTree, clock: Clock) -> None:
    async def main() -> None:
        a = await put_file(tree, ROOT, b"a", b"AAA")
        b = await put_file(tree, ROOT, b"b", b"BBB")
        before = clock.now
        await tree.rename(ROOT, b"a", ROOT, b"b")
        assert (await tree.lookup(ROOT, b"b")).ino == a.ino
        assert await content(tree, a.ino) == b"AAA"
        await expect_errno(errno.ENOENT, tree.lookup, ROOT, b"a")
        assert gone(tree, b.ino)
        assert tree.get(ROOT).mtime_ns > before and tree.get(a.ino).ctime_ns > before

        # the replaced inode stays while the kernel still knows it
        await put_file(tree, ROOT, b"c", b"CCC")
        d = await put_file(tree, ROOT, b"d", b"DDD")
        tree.remember(d.ino)
        await tree.rename(ROOT, b"c", ROOT, b"d")
        assert tree.get(d.ino).nlink == 0 and await content(tree, d.ino) == b"DDD"
        assert await names(tree) == [b"b", b"d"]
        tree.forget(d.ino, 1)
        assert gone(tree, d.ino)

        # over one name of a hardlinked file: the other name keeps it
        e = await put_file(tree, ROOT, b"e", b"EEE")
        await tree.link(e.ino, ROOT, b"e2")
        g = await put_file(tree, ROOT, b"g", b"GGG")
        await tree.rename(ROOT, b"g", ROOT, b"e2")
        assert tree.get(e.ino).nlink == 1 and await content(tree, e.ino) == b"EEE"
        assert (await tree.lookup(ROOT, b"e2")).ino == g.ino

        # two names of one inode: POSIX rename does nothing
        await tree.link(e.ino, ROOT, b"e3")
        await tree.rename(ROOT, b"e", ROOT, b"e3")
        assert (await tree.lookup(ROOT, b"e")).ino == (await tree.lookup(ROOT, b"e3")).ino == e.ino
        assert tree.get(e.ino).nlink == 2

        # into another directory, under a new name
        sub = await tree.create(ROOT, b"sub", DIR, 0o755, 0, 0)
        before = clock.now
        await tree.rename(ROOT, b"b", sub.ino, b"moved")
        assert await names(tree, sub.ino) == [b"moved"]
        assert (await tree.lookup(sub.ino, b"moved")).ino == a.ino
        assert tree.get(sub.ino).mtime_ns > before and tree.get(ROOT).mtime_ns > before
        await expect_errno(errno.ENOENT, tree.rename, ROOT, b"nothing", ROOT, b"x")

    run(main)


def test_rename_of_directories(tree: StagingTree) -> None:
    async def main() -> None:
        d1 = await tree.create(ROOT, b"d1", DIR, 0o755, 0, 0)
        inner = await put_file(tree, d1.ino, b"inner", b"in d1")
        empty = await tree.create(ROOT, b"empty", DIR, 0o755, 0, 0)
        await tree.rename(ROOT, b"d1", ROOT, b"empty")
        assert (await tree.lookup(ROOT, b"empty")).ino == d1.ino
        assert (await tree.lookup(d1.ino, b"inner")).ino == inner.ino
        assert gone(tree, empty.ino)
        assert await names(tree) == [b"empty"]

        full = await tree.create(ROOT, b"full", DIR, 0o755, 0, 0)
        await put_file(tree, full.ino, b"f")
        other = await tree.create(ROOT, b"other", DIR, 0o755, 0, 0)
        await expect_errno(errno.ENOTEMPTY, tree.rename, ROOT, b"other", ROOT, b"full")
        plain = await put_file(tree, ROOT, b"plain", b"p")
        await expect_errno(errno.EISDIR, tree.rename, ROOT, b"plain", ROOT, b"other")
        await expect_errno(errno.ENOTDIR, tree.rename, ROOT, b"other", ROOT, b"plain")

        # a directory cannot move into itself or below itself
        deep = await tree.create(other.ino, b"deep", DIR, 0o755, 0, 0)
        deeper = await tree.create(deep.ino, b"deeper", DIR, 0o755, 0, 0)
        await expect_errno(errno.EINVAL, tree.rename, ROOT, b"other", other.ino, b"self")
        await expect_errno(errno.EINVAL, tree.rename, ROOT, b"other", deep.ino, b"below")
        await expect_errno(errno.EINVAL, tree.rename, ROOT, b"other", deeper.ino, b"further")
        # nothing changed on the way
        assert await names(tree) == [b"empty", b"full", b"other", b"plain"]
        assert tree.get(plain.ino).nlink == 1 and tree.get(other.ino).nlink == 3  # 2 + deep

        # a subtree moves whole
        await tree.rename(ROOT, b"other", full.ino, b"nested")
        found = await tree_walk(tree, [b"full", b"nested", b"deep", b"deeper"])
        assert found.ino == deeper.ino
        await tree.rename(deep.ino, b"deeper", ROOT, b"up")
        assert (await tree.lookup(ROOT, b"up")).ino == deeper.ino and await names(tree, deep.ino) == []
        # link counts: 2 + subfolders, moved with the folders
        assert [tree.get(ino).nlink for ino in (ROOT, full.ino, other.ino, deep.ino)] == [5, 3, 3, 2]

    run(main)


def test_rename_noreplace_and_exchange(tree: StagingTree) -> None:
    async def main() -> None:
        a = await put_file(tree, ROOT, b"a", b"AAA")
        b = await put_file(tree, ROOT, b"b", b"BBB")
        await expect_errno(errno.EEXIST, tree.rename, ROOT, b"a", ROOT, b"b", RENAME_NOREPLACE)
        assert await content(tree, a.ino) == b"AAA" and await content(tree, b.ino) == b"BBB"
        await tree.rename(ROOT, b"a", ROOT, b"c", RENAME_NOREPLACE)
        assert (await tree.lookup(ROOT, b"c")).ino == a.ino

        # exchange a file and a directory in different folders
        sub = await tree.create(ROOT, b"sub", DIR, 0o755, 0, 0)
        q = await tree.create(sub.ino, b"q", DIR, 0o755, 0, 0)
        child = await put_file(tree, q.ino, b"child", b"kid")
        await tree.rename(ROOT, b"c", sub.ino, b"q", RENAME_EXCHANGE)
        assert (await tree.lookup(ROOT, b"c")).ino == q.ino
        assert (await tree.lookup(sub.ino, b"q")).ino == a.ino
        assert (await tree_walk(tree, [b"c", b"child"])).ino == child.ino
        assert await content(tree, a.ino) == b"AAA" and tree.get(a.ino).nlink == 1
        assert tree.get(q.ino).nlink == 2

        await expect_errno(errno.ENOENT, tree.rename, ROOT, b"b", ROOT, b"absent", RENAME_EXCHANGE)
        # exchanging a directory with something inside it would detach a loop
        await expect_errno(errno.EINVAL, tree.rename, ROOT, b"c", q.ino, b"child", RENAME_EXCHANGE)
        await expect_errno(errno.EINVAL, tree.rename, q.ino, b"child", ROOT, b"c", RENAME_EXCHANGE)
        assert (await tree_walk(tree, [b"c", b"child"])).ino == child.ino
        assert sorted(await names(tree)) == [b"b", b"c", b"sub"]

    run(main)


# --- links and deferred deletion ----------------------------------------------------------


def test_link_unlink_and_deferred_deletion(tree: StagingTree) -> None:
    async def main() -> None:
        f = await put_file(tree, ROOT, b"f", b"data")
        sub = await tree.create(ROOT, b"sub", DIR, 0o755, 0, 0)
        linked = await tree.link(f.ino, sub.ino, b"g")
        assert linked.ino == f.ino and linked.nlink == 2 and tree.get(f.ino).nlink == 2
        await expect_errno(errno.EPERM, tree.link, sub.ino, ROOT, b"dirlink")
        await expect_errno(errno.EEXIST, tree.link, f.ino, ROOT, b"sub")
        await tree.unlink(ROOT, b"f")
        assert tree.get(f.ino).nlink == 1
        assert await content(tree, (await tree.lookup(sub.ino, b"g")).ino) == b"data"
        await tree.unlink(sub.ino, b"g")
        assert gone(tree, f.ino)

        # held by a lookup and an open file: released first, forgotten last
        h = await put_file(tree, ROOT, b"h", b"held")
        tree.remember(h.ino)
        tree.opened(h.ino)
        await tree.unlink(ROOT, b"h")
        assert tree.get(h.ino).nlink == 0 and await names(tree) == [b"sub"]
        assert await content(tree, h.ino) == b"held"
        await tree.write(h.ino, 4, b"!")
        assert await content(tree, h.ino) == b"held!"
        tree.released(h.ino)
        assert not gone(tree, h.ino)
        tree.forget(h.ino, 1)
        assert gone(tree, h.ino)

        # forgotten first, released last
        k = await put_file(tree, ROOT, b"k", b"kept")
        tree.remember(k.ino)
        tree.remember(k.ino)
        tree.opened(k.ino)
        await tree.unlink(ROOT, b"k")
        tree.forget(k.ino, 1)
        tree.forget(k.ino, 1)
        assert await content(tree, k.ino) == b"kept"
        tree.released(k.ino)
        assert gone(tree, k.ino)

        # a linked inode is not deleted when one name goes while held
        m = await put_file(tree, ROOT, b"m", b"mmm")
        await tree.link(m.ino, ROOT, b"m2")
        tree.remember(m.ino)
        await tree.unlink(ROOT, b"m")
        tree.forget(m.ino, 1)
        assert tree.get(m.ino).nlink == 1 and await content(tree, m.ino) == b"mmm"

        await expect_errno(errno.EISDIR, tree.unlink, ROOT, b"sub")
        await expect_errno(errno.ENOENT, tree.unlink, ROOT, b"nothing")
        await expect_errno(errno.ENOENT, tree.link, 999999, ROOT, b"x")

    run(main)


def test_rmdir(tree: StagingTree) -> None:
    async def main() -> None:
        d = await tree.create(ROOT, b"d", DIR, 0o755, 0, 0)
        await put_file(tree, d.ino, b"f")
        await tree.create(ROOT, b"file", FILE, 0o644, 0, 0)
        await expect_errno(errno.ENOTEMPTY, tree.rmdir, ROOT, b"d")
        await expect_errno(errno.ENOTDIR, tree.rmdir, ROOT, b"file")
        await expect_errno(errno.ENOENT, tree.rmdir, ROOT, b"missing")
        await tree.unlink(d.ino, b"f")
        tree.remember(d.ino)
        await tree.rmdir(ROOT, b"d")
        await expect_errno(errno.ENOENT, tree.lookup, ROOT, b"d")
        assert tree.get(d.ino).nlink == 0  # the kernel still knows it
        tree.forget(d.ino, 1)
        await expect_errno(errno.ENOENT, tree.get, d.ino)
        assert await names(tree) == [b"file"]

    run(main)


# --- attributes ----------------------------------------------------------------------------


def test_setattr_mode_owner_and_nanosecond_times(tree: StagingTree, clock: Clock) -> None:
    async def main() -> None:
        f = await put_file(tree, ROOT, b"f", b"x")
        before = clock.now
        node = await tree.setattr(f.ino, mode=stat.S_IFREG | 0o4755)
        assert node.mode == 0o4755 and node.full_mode == stat.S_IFREG | 0o4755
        assert before < node.ctime_ns <= clock.now
        node = await tree.setattr(f.ino, uid=1234, gid=5678)
        assert (node.uid, node.gid, node.mode) == (1234, 5678, 0o4755)
        node = await tree.setattr(f.ino, atime_ns=NS_A, mtime_ns=NS_B)
        assert (node.atime_ns, node.mtime_ns) == (NS_A, NS_B)

        # rsync's order: write, then set the times before or after close; the explicit time wins
        await tree.write(f.ino, 1, b"more")
        await tree.setattr(f.ino, mtime_ns=NS_A)
        tree.flush(f.ino)
        assert tree.get(f.ino).mtime_ns == NS_A

        d = await tree.create(ROOT, b"d", DIR, 0o755, 0, 0)
        node = await tree.setattr(d.ino, mode=0o2775, uid=65534, gid=65534, mtime_ns=NS_B)
        assert (node.mode, node.uid, node.gid, node.mtime_ns) == (0o2775, 65534, 65534, NS_B)
        link = await tree.create(ROOT, b"l", SYMLINK, 0o777, 0, 0, target=b"f")
        node = await tree.setattr(link.ino, uid=42, gid=43, mtime_ns=NS_A)
        assert (node.uid, node.gid, node.mtime_ns, node.target) == (42, 43, NS_A, b"f")
        # a set-group-ID directory hands its group down
        child = await tree.create(d.ino, b"child", DIR, 0o755, 1, 2)
        assert child.gid == 65534 and child.mode & stat.S_ISGID
        await expect_errno(errno.ENOENT, tree.setattr, 999999, mode=0o644)

    run(main)


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
NO_ID = 0xFFFFFFFF


def test_xattrs_and_acls(tree: StagingTree) -> None:
    async def main() -> None:
        f = await put_file(tree, ROOT, b"f", b"x", mode=0o4644)
        assert tree.listxattr(f.ino) == []
        await expect_errno(errno.ENODATA, tree.getxattr, f.ino, b"user.a")
        await tree.setxattr(f.ino, b"user.b", b"2")
        await tree.setxattr(f.ino, b"user.a", b"\x00\xff")
        await tree.setxattr(f.ino, b"user.empty", b"")
        assert tree.listxattr(f.ino) == [b"user.a", b"user.b", b"user.empty"]
        assert tree.getxattr(f.ino, b"user.a") == b"\x00\xff"
        assert tree.getxattr(f.ino, b"user.empty") == b""
        await tree.setxattr(f.ino, b"user.a", b"replaced" * 1000)
        assert tree.listxattr(f.ino) == [b"user.a", b"user.b", b"user.empty"]
        assert tree.getxattr(f.ino, b"user.a") == b"replaced" * 1000
        await tree.removexattr(f.ino, b"user.b")
        assert tree.listxattr(f.ino) == [b"user.a", b"user.empty"]
        await expect_errno(errno.ENODATA, tree.getxattr, f.ino, b"user.b")
        await expect_errno(errno.ENODATA, tree.removexattr, f.ino, b"user.b")
        for kind, name in ((DIR, b"d"), (SYMLINK, b"s"), (FIFO, b"p")):
            node = await tree.create(ROOT, name, kind, 0o755, 0, 0, target=b"t" if kind == SYMLINK else None)
            await tree.setxattr(node.ino, b"trusted.x", name)
            assert tree.getxattr(node.ino, b"trusted.x") == name

        # an access ACL sets the mode bits (group bits from the mask); chmod rewrites the ACL
        acl = _acl((USER_OBJ, 7, NO_ID), (USER, 5, 1234), (GROUP_OBJ, 1, NO_ID), (MASK, 6, NO_ID), (OTHER, 4, NO_ID))
        await tree.setxattr(f.ino, b"system.posix_acl_access", acl)
        assert tree.get(f.ino).mode == 0o4764
        await tree.setattr(f.ino, mode=0o4750)
        entries = list(struct.iter_unpack("<HHI", tree.getxattr(f.ino, b"system.posix_acl_access")[4:]))
        assert entries == [(USER_OBJ, 7, NO_ID), (USER, 5, 1234), (GROUP_OBJ, 1, NO_ID), (MASK, 5, NO_ID),
                           (OTHER, 0, NO_ID)]

    run(main)


def test_names_are_validated(tree: StagingTree) -> None:
    async def main() -> None:
        f = await put_file(tree, ROOT, b"f")
        for bad in (b"a/b", b"/", b"", b".", b"..", b"nul\0byte"):
            await expect_errno(errno.EINVAL, tree.create, ROOT, bad, FILE, 0o644, 0, 0)
            await expect_errno(errno.EINVAL, tree.create, ROOT, bad, DIR, 0o755, 0, 0)
            await expect_errno(errno.EINVAL, tree.link, f.ino, ROOT, bad)
            await expect_errno(errno.EINVAL, tree.rename, ROOT, b"f", ROOT, bad)
        for long in (b"x" * 256, "é".encode() * 128):
            await expect_errno(errno.ENAMETOOLONG, tree.create, ROOT, long, FILE, 0o644, 0, 0)
            await expect_errno(errno.ENAMETOOLONG, tree.link, f.ino, ROOT, long)
            await expect_errno(errno.ENAMETOOLONG, tree.rename, ROOT, b"f", ROOT, long)
        ok = [b"x" * 255, b"\xff\xfe not utf-8", b"new\nline", b" ", b"...", b"-"]
        for name in ok:
            await tree.create(ROOT, name, FILE, 0o644, 0, 0)
        assert await names(tree) == sorted(ok + [b"f"])

    run(main)


# --- the journal ---------------------------------------------------------------------------


def test_journal_keeps_everything_across_close_and_reopen(tmp_path: Path) -> None:
    folder = tmp_path / "state" / "c"

    async def main() -> None:
        first = StagingTree(folder, "c", None)
        await build_sample(first)
        expected = await dump(first)
        first.close()
        second = StagingTree(folder, "c", None)
        assert await dump(second) == expected
        await put_file(second, ROOT, b"later", b"written later")
        await second.setattr(ROOT, mode=0o711)
        expected = await dump(second)
        second.close()  # (without a close, see the kill -9 test below)
        third = StagingTree(folder, "c", None)
        assert await dump(third) == expected
        assert third.dirty
        third.close()

    run(main)


CRASH_SCRIPT = """
import os, pickle, sys, trio
from pathlib import Path
from rekkordfs.format import EntryKind
from rekkordfs.staging import ROOT, StagingTree
from tests.core_helpers import build_sample, dump, put_file

async def main():
    tree = StagingTree(Path(sys.argv[1]), "crash", None)
    inos = await build_sample(tree)
    orphans = []
    for name, size in ((b"orphan", 1 << 20), (b"small-orphan", 100)):  # in a data file, inline
        orphan = await put_file(tree, ROOT, name, os.urandom(size))
        tree.remember(orphan.ino)
        tree.opened(orphan.ino)
        await tree.unlink(ROOT, name)
        orphans.append(orphan.ino)
    big = await put_file(tree, ROOT, b"big", os.urandom(3 << 20))
    tree.capture(lambda done: set())  # a commit that never finishes: frozen copies stay behind
    await tree.write(big.ino, 10 << 20, b"end")  # written, never flushed
    listing = await dump(tree)
    Path(sys.argv[2]).write_bytes(pickle.dumps((listing, orphans, inos)))
    os._exit(0)  # no close, no cleanup: as if killed

trio.run(main)
"""


def test_journal_survives_a_killed_process_and_drops_orphans(tmp_path: Path) -> None:
    folder = tmp_path / "state" / "crash"
    out = tmp_path / "listing.pickle"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(folder), str(out)], check=True, env=env,
                   cwd=str(PROJECT_ROOT), timeout=120)
    listing, (orphan, small_orphan), inos = pickle.loads(out.read_bytes())
    assert (folder / "data" / str(orphan)).exists()
    assert any((folder / "frozen").iterdir())

    async def main() -> None:
        tree = StagingTree(folder, "crash", None)
        try:
            assert await dump(tree) == listing
            assert gone(tree, orphan) and gone(tree, small_orphan)
            assert not any((folder / "frozen").iterdir())
            assert tree.get(inos["file"]).nlink == 2
            assert (await tree.lookup(inos["dir"], b"moved")).ino == inos["moved"]
            # and the tree goes on working
            await put_file(tree, inos["sub"], b"after", b"after the crash")
            assert await content(tree, (await tree_walk(tree, [b"dir", b"sub", b"after"])).ino) == b"after the crash"
        finally:
            tree.close()

    run(main)


BATCH_CRASH_SCRIPT = """
import os, pickle, sys, trio
from pathlib import Path
import rekkordfs.staging.journal as journal
from rekkordfs.staging import ROOT, StagingTree
from tests.core_helpers import build_sample, dump, put_file

journal.BATCH_SECONDS = 3600  # the batch stays open however slow this machine is
journal.disk_is_short = lambda folder: False

async def main():
    tree = StagingTree(Path(sys.argv[1]), "crash", None)
    tree.journal.batching = True
    inos = await build_sample(tree)
    tree.journal.flush()
    flushed = await dump(tree)
    await put_file(tree, ROOT, b"late", os.urandom(300))
    await tree.rename(ROOT, b"late", inos["dir"], b"moved-late")
    await tree.setattr(inos["file"], mode=0o600)
    await tree.unlink(inos["dir"], b"moved")
    assert tree.journal.db.in_transaction, "the batch was committed"
    assert await dump(tree) != flushed
    Path(sys.argv[2]).write_bytes(pickle.dumps(flushed))
    os._exit(0)  # as if killed: the open batch is lost, all of it

trio.run(main)
"""


def test_a_killed_process_loses_the_open_batch_whole(tmp_path: Path) -> None:
    """With batching, kill -9 loses the requests of the batch not yet committed,
    all of them and nothing else: the journal is as it was at the last flush."""
    folder = tmp_path / "state" / "crash"
    out = tmp_path / "listing.pickle"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    subprocess.run([sys.executable, "-c", BATCH_CRASH_SCRIPT, str(folder), str(out)], check=True, env=env,
                   cwd=str(PROJECT_ROOT), timeout=120)
    flushed = pickle.loads(out.read_bytes())

    async def main() -> None:
        tree = StagingTree(folder, "crash", None)
        try:
            assert await dump(tree) == flushed
        finally:
            tree.close()

    run(main)


@pytest.fixture
def one_open_batch(monkeypatch) -> None:
    """A batch of requests stays open however slow this machine is, on a disk with room."""
    monkeypatch.setattr("rekkordfs.staging.journal.BATCH_SECONDS", 3600)
    monkeypatch.setattr("rekkordfs.staging.journal.disk_is_short", lambda folder: False)


def batching_tree(folder: Path) -> StagingTree:
    tree = StagingTree(folder, folder.name, None)
    tree.journal.batching = True
    return tree


def test_a_failed_request_in_a_batch_undoes_only_its_own_changes(tmp_path: Path, one_open_batch: None) -> None:
    folder = tmp_path / "state" / "b"

    async def main() -> None:
        tree = batching_tree(folder)
        kept = await put_file(tree, ROOT, b"kept", b"in the batch")
        mode = tree.get(ROOT).mode
        with pytest.raises(OSError):
            with tree.journal.transaction():
                tree.journal.change(ROOT, mode=0o700)
                await tree.create(ROOT, b"undone", EntryKind.FILE, 0o644, 0, 0)  # nested: same request
                raise OSError(errno.EIO, "failed half way")
        assert tree.journal.db.in_transaction  # the batch goes on
        assert tree.get(ROOT).mode == mode
        assert (await tree.lookup(ROOT, b"kept")).ino == kept.ino
        with pytest.raises(FileNotFoundError):
            await tree.lookup(ROOT, b"undone")
        tree.close()  # commits the batch
        again = StagingTree(folder, "b", None)
        try:
            assert await content(again, (await again.lookup(ROOT, b"kept")).ino) == b"in the batch"
            assert again.get(ROOT).mode == mode
            assert sorted(name for name, _ in await again.listdir(ROOT)) == [b"kept"]
        finally:
            again.close()

    run(main)


def test_a_failed_request_keeps_the_row_changes_of_the_batch_before_it(tmp_path: Path,
                                                                        one_open_batch: None) -> None:
    """Inode rows change in memory until the batch commits: undoing a request
    restores the rows as the batch's earlier requests left them, also when the
    failed request had them written into the journal (write_rows) half way."""
    folder = tmp_path / "state" / "rows"

    async def main() -> None:
        tree = batching_tree(folder)
        f = await put_file(tree, ROOT, b"f", b"x" * 100)
        tree.journal.flush()
        await tree.setattr(f.ino, mode=0o600, mtime_ns=123_000)  # held in memory, no SQL
        await tree.write(f.ino, 100, b"more")
        before = tree.get(f.ino)
        assert (before.mode, before.size) == (0o600, 104)
        stored = tree.journal.db.execute("SELECT mode, size FROM inodes WHERE ino = ?", (f.ino,)).fetchone()
        assert stored == (0o644, 100)  # not written yet
        with pytest.raises(OSError):
            with tree.journal.transaction():
                tree.journal.change(f.ino, mode=0o711, size=1)
                tree.journal.write_rows()  # the rows reach SQL inside this request's SAVEPOINT
                raise OSError(errno.EIO, "failed half way")
        assert tree.journal.db.in_transaction  # the batch goes on
        assert tree.get(f.ino) == before
        assert list(tree.content.local_files()) == [f.ino]  # (writes the rows again)
        assert tree.journal.db.execute("SELECT mode, size FROM inodes WHERE ino = ?",
                                       (f.ino,)).fetchone() == (0o600, 104)
        tree.close()  # commits the batch
        again = StagingTree(folder, "rows", None)
        try:
            node = again.get(f.ino)
            assert (node.mode, node.size, node.mtime_ns) == (0o600, 104, before.mtime_ns)
            assert await content(again, f.ino) == b"x" * 100 + b"more"
        finally:
            again.close()

    run(main)


def test_a_create_over_an_existing_name_in_a_batch_leaves_no_trace(tmp_path: Path, one_open_batch: None) -> None:
    """create() learns of an existing name from the journal's key (no look-up
    first): EEXIST, its new inode undone, the batch and the existing file kept."""
    folder = tmp_path / "state" / "x"

    async def main() -> None:
        tree = batching_tree(folder)
        f = await put_file(tree, ROOT, b"f", b"first")
        rows = tree.journal.db.execute("SELECT count(*) FROM inodes").fetchone()[0]
        for kind in (EntryKind.FILE, EntryKind.DIRECTORY):
            await expect_errno(errno.EEXIST, tree.create, ROOT, b"f", kind, 0o755, 0, 0)
        assert tree.journal.db.in_transaction  # the batch goes on
        assert tree.journal.db.execute("SELECT count(*) FROM inodes").fetchone()[0] == rows
        assert tree.get(ROOT).nlink == 2  # no subfolder counted
        g = await tree.create(ROOT, b"g", EntryKind.FILE, 0o644, 0, 0)  # the next request is served
        tree.close()  # commits the batch
        again = StagingTree(folder, "x", None)
        try:
            assert (await again.lookup(ROOT, b"f")).ino == f.ino
            assert await content(again, f.ino) == b"first"
            assert (await again.lookup(ROOT, b"g")).ino == g.ino
        finally:
            again.close()

    run(main)


def test_with_batching_freed_journal_space_goes_back_when_idle(tmp_path: Path, monkeypatch) -> None:
    """On a disk with room, what deletions free is given back by tidy() (the
    idle daemon), not inside the request or commit that freed it."""
    monkeypatch.setattr("rekkordfs.staging.journal.disk_is_short", lambda folder: False)
    folder = tmp_path / "state" / "t"

    def journal_size() -> int:
        return sum(path.stat().st_size for path in folder.glob("tree.db*"))

    async def main() -> None:
        tree = StagingTree(folder, "t", None)
        tree.journal.batching = True
        try:
            for i in range(40):
                await put_file(tree, ROOT, b"f%d" % i, os.urandom(60_000))
            tree.journal.flush()
            tree.journal.tidy()
            full = journal_size()
            for i in range(40):
                await tree.unlink(ROOT, b"f%d" % i)
            tree.journal.flush()
            assert free_bytes(tree.journal.db) > (1 << 20)  # nothing given back yet
            tree.journal.tidy()
            assert free_bytes(tree.journal.db) < (1 << 20)
            assert journal_size() < full - (1 << 20)
        finally:
            tree.close()

    run(main)


def test_unlinked_but_held_inodes_are_dropped_on_reopen(tmp_path: Path) -> None:
    folder = tmp_path / "state" / "o"

    async def main() -> None:
        tree = StagingTree(folder, "o", None)
        held = await put_file(tree, ROOT, b"held", b"x" * 1000)
        d = await tree.create(ROOT, b"d", DIR, 0o755, 0, 0)
        kept = await put_file(tree, ROOT, b"kept", b"kept")
        tree.remember(held.ino)
        tree.remember(d.ino)
        await tree.unlink(ROOT, b"held")
        await tree.rmdir(ROOT, b"d")
        assert tree.get(held.ino).nlink == 0
        tree.close()
        again = StagingTree(folder, "o", None)
        assert gone(again, held.ino)
        await expect_errno(errno.ENOENT, again.get, d.ino)
        assert await names(again) == [b"kept"] and await content(again, kept.ino) == b"kept"
        again.close()

    run(main)


# --- capture (the moment a commit begins) -------------------------------------------------------


@SIZES
def test_capture_freezes_content_that_later_writes_do_not_change(tree: StagingTree, pad: bytes) -> None:
    async def main() -> None:
        f = await put_file(tree, ROOT, b"f", b"captured content" + pad)
        g = await put_file(tree, ROOT, b"g", b"doomed" + pad)
        h = await put_file(tree, ROOT, b"h", b"uploaded" + pad)
        fake = [ChunkRef(b"\1" * 32, 8, Location(b"\2" * 32, 0, 48))]
        tree.uploads.record(h.ino, tree.uploads.version(h.ino), fake)
        tree.uploads.record(g.ino, tree.uploads.version(g.ino) - 1, fake)  # stale: ignored

        capture = tree.capture(lambda done: {ino for ino, raw in done.items() if decode_chunks(raw) == fake})
        assert set(capture.frozen) | set(capture.inline) == {f.ino, g.ino}
        assert capture.uploaded == {h.ino: encode_chunks(fake)}
        assert set(capture.inline if not pad else capture.frozen) == {f.ino, g.ino}
        assert frozen_content(tree, f.ino, capture) == b"captured content" + pad
        await tree.write(f.ino, 0, b"CHANGED")
        await tree.truncate(g.ino, 2)
        await tree.unlink(ROOT, b"g")
        await tree.setattr(f.ino, mode=0o600)
        assert await content(tree, f.ino) == b"CHANGEDd content" + pad
        assert frozen_content(tree, f.ino, capture) == b"captured content" + pad
        assert frozen_content(tree, g.ino, capture) == b"doomed" + pad
        assert capture.node(f.ino).mode == 0o644 and capture.versions[f.ino] != tree.uploads.version(f.ino)
        assert [name for name, _ in capture.children(ROOT)] == [b"f", b"g", b"h"]
        # writing again after the first copy-on-write changes only the live file
        await tree.write(f.ino, 0, b"AGAIN!!")
        assert frozen_content(tree, f.ino, capture) == b"captured content" + pad
        frozen = list(capture.frozen.values())
        tree.release_capture(capture)
        assert not any(Path(p).exists() for p in frozen)
        assert tree.content.frozen == {} and tree.content.frozen_inline == {}
        assert await content(tree, f.ino) == b"AGAIN!!d content" + pad

    run(main)


def test_a_file_written_while_open_keeps_its_captured_content(tree: StagingTree) -> None:
    """A data file written in many writes keeps one descriptor open between
    them; a capture while it is open freezes what it held, and the writes
    after it (through a new descriptor) change only the live file."""
    async def main() -> None:
        first = b"a" * (INLINE_MAX + 1)
        node = await tree.create(ROOT, b"big", EntryKind.FILE, 0o644, 0, 0)
        await tree.write(node.ino, 0, first)
        await tree.write(node.ino, len(first), b"b" * 1000)  # no close in between: the same descriptor
        capture = tree.capture(lambda done: set())
        assert frozen_content(tree, node.ino, capture) == first + b"b" * 1000
        await tree.write(node.ino, 0, b"CHANGED")
        await tree.write(node.ino, len(first) + 1000, b"c" * 10)
        assert frozen_content(tree, node.ino, capture) == first + b"b" * 1000
        tree.flush(node.ino)
        assert await content(tree, node.ino) == b"CHANGED" + first[7:] + b"b" * 1000 + b"c" * 10
        tree.release_capture(capture)
        await tree.write(node.ino, 0, b"again")  # a new descriptor after the close, the same file
        tree.flush(node.ino)
        assert await content(tree, node.ino) == b"againED" + first[7:] + b"b" * 1000 + b"c" * 10

    run(main)


# --- with a repository ----------------------------------------------------------------------------


class Based:
    """A repository with the awkward tree saved in channel 'base' (shared by this module)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.cli = Rekkord(cache_dir=folder / "cli-cache", repository=str(folder / "repo"),
                           key_file=str(folder / "master.key"))
        self.cli.cache_dir.mkdir()
        self.cli("init", "-K", self.cli.key_file)
        self.src = make_awkward_tree(folder / "src")
        self.base = self.cli.save("base", str(self.src))
        self.write_key = str(folder / "write.key")
        self.cli("derive", "-t", "WriteOnly", "-O", self.write_key)

    @property
    def repository(self) -> str:
        assert self.cli.repository is not None
        return self.cli.repository

    @property
    def key(self) -> str:
        assert self.cli.key_file is not None
        return self.cli.key_file


@pytest.fixture(scope="module")
def based(tmp_path_factory: pytest.TempPathFactory) -> Based:
    return Based(tmp_path_factory.mktemp("staging"))


@pytest.fixture
def own_based(tmp_path: Path) -> Based:
    """A repository of this test alone: for assertions about everything the
    repository holds (its channels), whatever other tests committed."""
    (tmp_path / "own").mkdir()
    return Based(tmp_path / "own")


@asynccontextmanager
async def seeded_tree(based: Based, folder: Path, channel: str):
    """(repo, tree): a staging tree seeded from the base snapshot, and its repository."""
    async with open_repo(based.repository, based.key) as repo:
        tree = StagingTree(folder, channel, BlobCache(repo))
        tree.seed(bytes.fromhex(based.base), await load_by_id(repo, based.base))
        try:
            yield repo, tree
        finally:
            tree.close()


async def record_of(repo, snapshot_id: str, parts: list[bytes]) -> dict[bytes, object]:
    """The entries of the directory at parts inside a snapshot, by name."""
    snapshot = await load_by_id(repo, snapshot_id)
    ref = snapshot.root_ref
    for part in parts:
        entries = {e.name: e for e in await repo.read_directory(ref)}
        ref = entries[part].dir_ref
    return {e.name: e for e in await repo.read_directory(ref)}


class HookUploader(Uploader):
    """An uploader that runs `hook` once, before its first upload: writes that
    arrive while a commit is uploading."""

    def __init__(self, repo, hook: Callable[[], Awaitable[None]]) -> None:
        super().__init__(repo)
        self.hook = hook
        self.fired = False

    async def _fire(self) -> None:
        if not self.fired:
            self.fired = True
            await self.hook()

    async def upload_path(self, path):
        await self._fire()
        return await super().upload_path(path)

    async def upload_many(self, datas):
        await self._fire()
        return await super().upload_many(datas)


def restore(based: Based, spec: str, dest: Path) -> Path:
    based.cli("restore", spec, str(dest))
    return dest


def test_copy_on_write_from_a_snapshot_and_commit_reuses_untouched_records(based: Based, tmp_path: Path) -> None:
    parts = src_parts(based.src)
    text = (based.src / "text-10M.txt").read_bytes()
    patch_at = (5 << 20) + 123
    patched = text[:patch_at] + b"PATCHED" + text[patch_at + 7:]

    async def main() -> str:
        async with seeded_tree(based, tmp_path / "state", "cow") as (repo, tree):
            base = await load_by_id(repo, based.base)
            assert tree.get(ROOT).dir_ref == base.root_ref and not tree.dirty
            assert tree.base == bytes.fromhex(based.base)
            src = await tree_walk(tree, parts)
            assert src.dir_ref is not None  # not expanded until something inside is needed
            listing = dict(await tree.listdir(src.ino))
            assert sorted(listing) == sorted(os.listdir(os.fsencode(based.src)))
            subdirs = [b"a", b"empty-dir", b"sticky", b"setgid-dir"]
            assert all(listing[name].dir_ref is not None for name in subdirs)
            assert all(listing[name].dir_ref is None and not listing[name].local
                       for name in listing if listing[name].kind == FILE)

            small = listing[b"small.txt"]
            assert await content(tree, small.ino) == (based.src / "small.txt").read_bytes()
            assert tree.getxattr(small.ino, b"user.comment") == b"\x00\xffbinary value"
            assert tree.get(listing[b"hard-1"].ino).nlink == 3 and listing[b"hard-1"].ino == listing[b"hard-2"].ino
            assert tree.size_of(listing[b"sparse"]) == 40 << 20
            assert await tree.read(listing[b"sparse"].ino, 20 << 20, 18) == b"data in the middle"

            # a file modified in place: base content plus the change
            t = listing[b"text-10M.txt"]
            await tree.make_local(t.ino)
            assert tree.get(t.ino).local and await content(tree, t.ino) == text
            await tree.write(t.ino, patch_at, b"PATCHED")
            assert await content(tree, t.ino) == patched
            assert tree.dirty

            committer = Committer(repo, tree, Uploader(repo))
            result = await committer.run()
            remove_files(committer.garbage)  # as the staging area does in the background
            new_id = result.tag.id_hex
            assert tree.base == result.tag.snapshot_id and not tree.dirty
            # totals count the files of directories never expanded too, as save counts them
            assert (result.snapshot.files, result.snapshot.size) == (base.files, base.size)
            assert (result.files, result.size) == (base.files, base.size)
            assert not tree.get(t.ino).local and not os.path.exists(tree.data_path(t.ino))
            assert await content(tree, t.ino) == patched
            # untouched directories are still unexpanded, and the snapshot uses their old records
            assert all(tree.get(listing[name].ino).dir_ref == listing[name].dir_ref for name in subdirs)
            old, new = await record_of(repo, based.base, parts), await record_of(repo, new_id, parts)
            assert sorted(old) == sorted(new)
            for name in subdirs:
                assert new[name].dir_ref == old[name].dir_ref
            for name in (b"random-3M.bin", b"small.txt", b"sparse", b"hard-1"):
                assert new[name].chunks_raw == old[name].chunks_raw
            assert new[b"text-10M.txt"].chunks_raw != old[b"text-10M.txt"].chunks_raw
            assert new[b"text-10M.txt"].size == len(text)
            # a removed file leaves the totals; those of unexpanded directories stay
            await tree.unlink(src.ino, b"small.txt")
            second = await Committer(repo, tree, Uploader(repo)).run()
            small_size = (based.src / "small.txt").stat().st_size
            assert (second.snapshot.files, second.snapshot.size) == (base.files - 1, base.size - small_size)
            return new_id

    new_id = run(main)
    dest = restore(based, f"{new_id}:{based.src}", tmp_path / "restored")
    expected = tmp_path / "expected"
    subprocess.run(["cp", "-a", str(based.src), str(expected)], check=True)
    st = os.stat(expected / "text-10M.txt")
    (expected / "text-10M.txt").write_bytes(patched)
    os.utime(expected / "text-10M.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert diff_manifests(manifest(expected), manifest(dest)) == []
    assert rsync_differences(expected, dest) == ""


@SIZES
def test_commit_captures_one_moment_while_writes_go_on(based: Based, tmp_path: Path, pad: bytes) -> None:
    async def main() -> None:
        async with open_repo(based.repository, based.key) as repo:
            tree = StagingTree(tmp_path / "state", "moment", BlobCache(repo))
            x = await put_file(tree, ROOT, b"x", b"captured-x" + pad)
            w = await put_file(tree, ROOT, b"w", b"untouched-w" + pad)
            z = await put_file(tree, ROOT, b"z", b"doomed-z" + pad)
            d = await tree.create(ROOT, b"d", DIR, 0o755, 0, 0)
            await put_file(tree, d.ino, b"y0", b"in d")
            during = {}

            async def writes_during_the_commit() -> None:
                assert frozen_content(tree, x.ino) == b"captured-x" + pad
                await tree.write(x.ino, 0, b"CHANGED")
                during["frozen"] = frozen_content(tree, x.ino)
                await tree.setattr(x.ino, mode=0o600)
                await put_file(tree, ROOT, b"late", b"arrived during the commit")
                await tree.unlink(ROOT, b"z")
                await tree.rename(ROOT, b"d", ROOT, b"d2")

            committer = Committer(repo, tree, HookUploader(repo, writes_during_the_commit))
            result = await committer.run()
            remove_files(committer.garbage)  # as the staging area does in the background
            assert during["frozen"] in (None, b"captured-x" + pad)
            # the snapshot is the tree as it was when the commit began
            async with open_view(based.repository, based.key) as view:
                snap = await view.lookup(IDS_INO, result.tag.id_hex.encode())
                names_in = [n for n, _ in await view.children(snap.ino)]
                assert names_in == [b"d", b"w", b"x", b"z"]
                got = {}
                for name in (b"w", b"x", b"z"):
                    node = await view.lookup(snap.ino, name)
                    got[name] = await view.read(view.open(node.ino), 0, 1 << 20)
                    if name == b"x":
                        assert node.attr.mode & 0o7777 == 0o644
                assert got == {b"w": b"untouched-w" + pad, b"x": b"captured-x" + pad, b"z": b"doomed-z" + pad}
            # staging keeps what was written meanwhile; unchanged files are now clean
            assert await content(tree, x.ino) == b"CHANGEDd-x" + pad and tree.get(x.ino).local
            assert not tree.get(w.ino).local and not has_content(tree, w.ino)
            assert await content(tree, w.ino) == b"untouched-w" + pad
            assert gone(tree, z.ino)
            assert tree.dirty and tree.content.frozen == {} and tree.content.frozen_inline == {}
            assert not any((tmp_path / "state" / "frozen").iterdir())
            assert await names(tree) == [b"d2", b"late", b"w", b"x"]

            # the next commit takes what came in meanwhile
            second = await Committer(repo, tree, Uploader(repo)).run()
            assert not tree.dirty and not tree.get(x.ino).local
            async with open_view(based.repository, based.key) as view:
                snap = await view.lookup(IDS_INO, second.tag.id_hex.encode())
                assert [n for n, _ in await view.children(snap.ino)] == [b"d2", b"late", b"w", b"x"]
                node = await view.lookup(snap.ino, b"x")
                assert await view.read(view.open(node.ino), 0, 1 << 20) == b"CHANGEDd-x" + pad
                assert node.attr.mode & 0o7777 == 0o600
            tree.close()

    run(main)


@SIZES
def test_committed_leaves_files_written_after_the_capture_local(based: Based, tmp_path: Path, pad: bytes) -> None:
    size = 5000 + len(pad)

    async def main() -> None:
        async with open_repo(based.repository, based.key) as repo:
            tree = StagingTree(tmp_path / "state", "clean", BlobCache(repo))
            a = await put_file(tree, ROOT, b"a", b"a" * size)
            b = await put_file(tree, ROOT, b"b", b"b" * size)
            capture = tree.capture(lambda done: set())
            uploader = Uploader(repo)
            contents = await upload_captured(uploader, tree, capture)
            await repo.flush_packs()  # as publish_snapshot does before anything refers to them
            await tree.write(b.ino, 0, b"B")  # after the capture
            snapshot = Snapshot("clean", 1, b"\0" * 32, 0, 0, 0, max_link_id=0)
            remove_files(tree.committed(capture, b"\7" * 32, snapshot, contents, {}))
            assert not tree.get(a.ino).local and tree.get(a.ino).chunks
            assert not has_content(tree, a.ino)
            assert await content(tree, a.ino) == b"a" * size
            assert tree.get(b.ino).local and await content(tree, b.ino) == b"B" + b"b" * (size - 1)
            assert tree.base == b"\7" * 32 and tree.dirty
            assert tree.content.frozen == {} and tree.content.frozen_inline == {}
            # nothing written after the capture: the tree is clean
            capture = tree.capture(lambda done: set())
            contents = await upload_captured(uploader, tree, capture)
            await repo.flush_packs()  # as publish_snapshot does before anything refers to them
            remove_files(tree.committed(capture, b"\10" * 32, snapshot, contents, {}))
            assert not tree.dirty and not tree.get(b.ino).local and not has_content(tree, b.ino)
            assert await content(tree, b.ino) == b"B" + b"b" * (size - 1)
            tree.close()

    run(main)


# --- the staging area (what the mount serves) ---------------------------------------------------


@asynccontextmanager
async def open_area(based: Based, state: Path, key: str | None = None) -> AsyncIterator[StagingArea]:
    async with open_repo(based.repository, key or based.key) as repo, area_over(repo, state) as area:
        yield area


class StagingOps:
    """Builds a tree through the StagingArea, as the FUSE adapter would."""

    def __init__(self, area: StagingArea, root: int) -> None:
        self.area = area
        self.inos: dict[bytes, int] = {b"": root}

    def _parent(self, path: bytes) -> tuple[int, bytes]:
        parent, _, name = path.rpartition(b"/")
        return self.inos[parent], name

    async def mkdir(self, path: bytes, mode: int, uid: int, gid: int) -> None:
        parent, name = self._parent(path)
        self.inos[path] = (await self.area.make(parent, name, DIR, mode, uid, gid)).ino
        await self.area.setattr(self.inos[path], uid=uid, gid=gid)  # as rsync's chown, then chmod
        await self.area.setattr(self.inos[path], mode=mode)

    async def file(self, path: bytes, pieces: list[tuple[int, bytes]], mode: int, uid: int, gid: int) -> None:
        parent, name = self._parent(path)
        handle, attr = await self.area.create(parent, name, mode, uid, gid)
        for offset, data in pieces:
            await self.area.write(handle, offset, data)
        self.area.release(handle)
        self.inos[path] = attr.ino
        await self.area.setattr(attr.ino, uid=uid, gid=gid)
        await self.area.setattr(attr.ino, mode=mode)

    async def symlink(self, path: bytes, target: bytes, uid: int, gid: int) -> None:
        parent, name = self._parent(path)
        self.inos[path] = (await self.area.make(parent, name, SYMLINK, 0o777, uid, gid, target=target)).ino

    async def fifo(self, path: bytes, mode: int) -> None:
        parent, name = self._parent(path)
        self.inos[path] = (await self.area.make(parent, name, FIFO, mode, 0, 0)).ino

    async def link(self, existing: bytes, path: bytes) -> None:
        parent, name = self._parent(path)
        self.inos[path] = (await self.area.link(self.inos[existing], parent, name)).ino

    async def xattr(self, path: bytes, name: bytes, value: bytes) -> None:
        await self.area.setxattr(self.inos[path], name, value)

    async def times(self, path: bytes, atime: int, mtime: int) -> None:
        await self.area.setattr(self.inos[path], atime_ns=atime, mtime_ns=mtime)

    async def root_meta(self, mode: int, uid: int, gid: int) -> None:
        await self.area.setattr(self.inos[b""], mode=mode, uid=uid, gid=gid)


class DiskOps:
    """The same tree on a local disk, for comparison."""

    def __init__(self, root: Path) -> None:
        self.root = os.fsencode(str(root))
        os.mkdir(self.root)

    def _path(self, path: bytes) -> bytes:
        return self.root + b"/" + path if path else self.root

    async def mkdir(self, path: bytes, mode: int, uid: int, gid: int) -> None:
        os.mkdir(self._path(path))
        os.chown(self._path(path), uid, gid)
        os.chmod(self._path(path), mode)

    async def file(self, path: bytes, pieces: list[tuple[int, bytes]], mode: int, uid: int, gid: int) -> None:
        fd = os.open(self._path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        for offset, data in pieces:
            os.pwrite(fd, data, offset)
        os.close(fd)
        os.chown(self._path(path), uid, gid)
        os.chmod(self._path(path), mode)

    async def symlink(self, path: bytes, target: bytes, uid: int, gid: int) -> None:
        os.symlink(target, self._path(path))
        os.lchown(self._path(path), uid, gid)

    async def fifo(self, path: bytes, mode: int) -> None:
        os.mkfifo(self._path(path))
        os.chmod(self._path(path), mode)

    async def link(self, existing: bytes, path: bytes) -> None:
        os.link(self._path(existing), self._path(path))

    async def xattr(self, path: bytes, name: bytes, value: bytes) -> None:
        os.setxattr(self._path(path), name, value, follow_symlinks=False)

    async def times(self, path: bytes, atime: int, mtime: int) -> None:
        os.utime(self._path(path), ns=(atime, mtime), follow_symlinks=False)

    async def root_meta(self, mode: int, uid: int, gid: int) -> None:
        os.chown(self.root, uid, gid)
        os.chmod(self.root, mode)


async def build(ops, rng: random.Random) -> None:
    """Files of many kinds and sizes (written in pieces, out of order), dirs, links, metadata."""
    big = rng.randbytes(5 << 20)
    await ops.root_meta(0o750, 1000, 1000)
    await ops.mkdir(b"d", 0o2775, 0, 100)
    await ops.mkdir(b"d/deeper", 0o700, 65534, 65534)
    await ops.mkdir(b"empty-dir", 0o755, 0, 0)
    await ops.file(b"empty", [], 0o644, 0, 0)
    await ops.file(b"hello.txt", [(0, b"hello\n")], 0o644, 0, 0)
    await ops.file(b"big.bin", [(3 << 20, big[3 << 20:]), (0, big[:1 << 20]), (1 << 20, big[1 << 20:3 << 20])],
                   0o640, 0, 0)
    await ops.file(b"sparse", [(6 << 20, b"end"), (1 << 20, b"middle")], 0o600, 0, 0)
    await ops.file(b"setuid", [(0, b"#!/bin/sh\n")], 0o4755, 0, 0)
    await ops.file(b"owned", [(0, b"owned")], 0o600, 1234, 5678)
    await ops.file(b"d/inner.txt", [(0, b"inner " * 1000)], 0o644, 0, 100)
    await ops.file(b"d/deeper/x", [(0, rng.randbytes(300_000))], 0o644, 0, 0)
    await ops.file(b"\xff\xfe not utf-8", [(0, b"odd name")], 0o644, 0, 0)
    await ops.file(b"new\nline", [(0, b"newline")], 0o644, 0, 0)
    await ops.file(b"hard-a", [(0, b"shared by two names\n" * 50)], 0o644, 0, 0)
    await ops.link(b"hard-a", b"d/hard-b")
    await ops.link(b"hello.txt", b"d/deeper/hello-again")
    await ops.symlink(b"sym", b"hello.txt", 4321, 8765)
    await ops.symlink(b"dangling", b"no/such/thing", 0, 0)
    await ops.fifo(b"pipe", 0o640)
    await ops.xattr(b"hello.txt", b"user.note", b"\x00\x01binary")
    await ops.xattr(b"hello.txt", b"user.empty", b"")
    await ops.xattr(b"d", b"user.on-dir", b"dir attr")
    for i, path in enumerate([b"empty", b"hello.txt", b"big.bin", b"sparse", b"setuid", b"owned", b"d/inner.txt",
                              b"d/deeper/x", b"\xff\xfe not utf-8", b"new\nline", b"hard-a", b"sym", b"dangling",
                              b"pipe", b"d/deeper", b"d", b"empty-dir", b""]):
        await ops.times(path, NS_A + i, NS_B - i * 1_000_000_007)


def test_staging_area_commit_restores_to_the_same_tree(own_based: Based, tmp_path: Path) -> None:
    based = own_based
    reference = tmp_path / "reference"

    async def main() -> str:
        await build(DiskOps(reference), random.Random(5))
        async with open_area(based, tmp_path / "state") as area:
            before = await area.channel_names()
            assert before == ["base"]
            root = await area.make(STAGING_INO, b"built", DIR, 0o755, 0, 0)
            assert area.getxattr(root.ino, CONTROL_CHANNEL) == b"built"
            tree = area.trees["built"]
            await build(StagingOps(area, root.ino), random.Random(5))
            with trio.fail_after(60):  # write-behind uploads of the closed files
                while tree.uploads.done_count() < 10:
                    await trio.sleep(0.01)
            await area.setxattr(root.ino, CONTROL_COMMIT, b"token-1")
            result = json.loads(area.getxattr(root.ino, CONTROL_COMMIT + b".token-1"))
            assert result["channel"] == "built" and len(result["id"]) == 64
            assert area.view.latest_tag("built").id_hex == result["id"]
            # the mount shows it at once, with the staging root's own metadata
            snap = await area.view.lookup(IDS_INO, result["id"].encode())
            attr = await area.view.getattr(snap.ino)
            assert (attr.mode, attr.uid, attr.gid) == (stat.S_IFDIR | 0o750, 1000, 1000)
            assert attr.mtime_ns == os.stat(reference).st_mtime_ns
            assert await area.channel_names() == ["base", "built"]
            # staging now shows the committed tree, all of it clean: no content
            # left local, in a data file or in the journal
            assert not tree.dirty and list(tree.content.local_files()) == []
            assert [n for n, _ in await area.children(root.ino)] == sorted(os.listdir(os.fsencode(reference)))
            hello = await area.lookup(root.ino, b"hello.txt")
            handle = await area.open(hello.ino, os.O_RDONLY)
            assert await area.read(handle, 0, 100) == b"hello\n"
            area.release(handle)
            return result["id"]

    snapshot = run(main)
    assert based.cli("snapshots", "-c", "built", "-f", "json").stdout.count(snapshot) == 1
    dest = restore(based, "built", tmp_path / "restored")  # the channel's newest: this commit
    assert diff_manifests(manifest(reference), manifest(dest)) == []
    assert rsync_differences(reference, dest) == ""


def test_write_only_key_stages_and_commits_without_seeing_anything(based: Based, tmp_path: Path) -> None:
    async def main() -> str:
        async with open_area(based, tmp_path / "state", key=based.write_key) as area:
            assert area.blobs is None
            assert await area.channel_names() == []
            await expect_errno(errno.ENOENT, area.lookup, STAGING_INO, b"base")
            root = await area.make(STAGING_INO, b"drop", DIR, 0o755, 0, 0)
            handle, _ = await area.create(root.ino, b"report.txt", 0o644, 0, 0)
            await area.write(handle, 0, b"written with a WriteOnly key")
            area.release(handle)
            result = await area.commit("drop")
            assert await area.channel_names() == ["drop"]
            return result.tag.id_hex

    snapshot = run(main)

    async def check() -> None:
        async with open_view(based.repository, based.key) as view:
            snap = await view.lookup(IDS_INO, snapshot.encode())
            node = await view_walk(view, snap.ino, [b"report.txt"])
            assert await view.read(view.open(node), 0, 100) == b"written with a WriteOnly key"

    run(check)


def test_channel_inode_numbers_stay_distinct_after_a_channel_is_removed(based: Based, tmp_path: Path) -> None:
    async def main() -> None:
        async with open_area(based, tmp_path / "state") as area:
            await area.make(STAGING_INO, b"chan-a", DIR, 0o755, 0, 0)
            b = await area.make(STAGING_INO, b"chan-b", DIR, 0o755, 0, 0)
            handle, f = await area.create(b.ino, b"file", 0o644, 0, 0)
            await area.write(handle, 0, b"in b")
            area.release(handle)
            await area.rmdir(STAGING_INO, b"chan-a")
            c = await area.make(STAGING_INO, b"chan-c", DIR, 0o755, 0, 0)
            assert c.ino != b.ino
            assert (await area.getattr(f.ino)).size == 4
            assert [n for n, _ in await area.children(b.ino)] == [b"file"]
            assert await area.children(c.ino) == []

    run(main)


# --- what the commit must get right, and does not (yet) -------------------------------------------


def test_writes_through_a_handle_open_across_a_commit_are_kept(based: Based, tmp_path: Path) -> None:
    async def main() -> None:
        async with open_area(based, tmp_path / "state") as area:
            root = await area.make(STAGING_INO, b"open-across", DIR, 0o755, 0, 0)
            handle, attr = await area.create(root.ino, b"log", 0o644, 0, 0)
            await area.write(handle, 0, b"first;")
            await area.commit("open-across")
            await area.write(handle, 6, b"second;")
            assert await area.read(handle, 0, 100) == b"first;second;"
            area.release(handle)
            again = await area.open(attr.ino, os.O_RDONLY)
            assert await area.read(again, 0, 100) == b"first;second;"
            area.release(again)
            second = await area.commit("open-across")
            view = area.view
            snap = await view.lookup(IDS_INO, second.tag.id_hex.encode())
            node = await view.lookup(snap.ino, b"log")
            assert await view.read(view.open(node.ino), 0, 100) == b"first;second;"

    run(main)


def test_a_file_that_reuses_a_deleted_inode_number_during_a_commit_keeps_its_content(based: Based,
                                                                                      tmp_path: Path) -> None:
    async def main() -> None:
        async with open_repo(based.repository, based.key) as repo:
            tree = StagingTree(tmp_path / "state", "reuse", BlobCache(repo))
            await put_file(tree, ROOT, b"keep", b"keep")
            old = await put_file(tree, ROOT, b"old", b"old content")  # the highest inode number
            reborn = {}

            async def replace_during_commit() -> None:
                await tree.unlink(ROOT, b"old")
                new = await put_file(tree, ROOT, b"new", b"NEW CONTENT")
                reborn["ino"] = new.ino

            await Committer(repo, tree, HookUploader(repo, replace_during_commit)).run()
            assert reborn["ino"] != old.ino  # inode numbers are never reused
            node = await tree.lookup(ROOT, b"new")
            assert await content(tree, node.ino) == b"NEW CONTENT"
            assert tree.get(node.ino).local and tree.dirty
            tree.close()

    run(main)


def test_a_reused_inode_number_never_reads_the_old_files_chunks(based: Based, tmp_path: Path) -> None:
    async def main() -> None:
        async with seeded_tree(based, tmp_path / "state", "stale") as (_, tree):
            src = await tree_walk(tree, src_parts(based.src))
            listing = await tree.listdir(src.ino)
            last_name, last = listing[-1]
            assert last_name == b"\xff\xfe not utf-8" and last.ino == max(node.ino for _, node in listing)
            assert await content(tree, last.ino) == last_name
            await tree.unlink(src.ino, last_name)
            sticky = await tree.lookup(src.ino, b"sticky")
            inside = await tree.lookup(sticky.ino, b"inside")  # expands sticky/
            assert inside.ino != last.ino  # inode numbers are never reused
            assert await content(tree, inside.ino) == b"x"

    run(main)


def test_modifying_a_hardlink_changes_every_name_even_in_unexpanded_directories(based: Based,
                                                                                  tmp_path: Path) -> None:
    parts = src_parts(based.src)

    async def main() -> None:
        async with seeded_tree(based, tmp_path / "state", "hardlinks") as (repo, tree):
            src = await tree_walk(tree, parts)
            hard = await tree.lookup(src.ino, b"hard-1")
            await tree.make_local(hard.ino)
            await tree.truncate(hard.ino, 0)
            await tree.write(hard.ino, 0, b"new content of all three names\n")
            result = await Committer(repo, tree, Uploader(repo)).run()
        async with open_view(based.repository, based.key) as view:
            snap = await view.lookup(IDS_INO, result.tag.id_hex.encode())
            deep = await view_walk(view, snap.ino, parts + [b"a", b"b", b"c", b"d", b"e", b"hard-3"])
            assert await view.read(view.open(deep), 0, 1000) == b"new content of all three names\n"
        async with open_repo(based.repository, based.key) as repo:
            top = await record_of(repo, result.tag.id_hex, parts)
            deep_record = await record_of(repo, result.tag.id_hex, parts + [b"a", b"b", b"c", b"d", b"e"])
            assert top[b"hard-1"].link_id == deep_record[b"hard-3"].link_id
            assert top[b"hard-1"].chunks_raw == deep_record[b"hard-3"].chunks_raw

    run(main)


def test_commit_deduplicates_against_chunks_already_in_the_repository(based: Based, tmp_path: Path) -> None:
    indexes = Path(based.repository) / "index"

    async def main() -> None:
        async with open_area(based, tmp_path / "state") as area:
            root = await area.make(STAGING_INO, b"dedup", DIR, 0o755, 0, 0)
            handle, _ = await area.create(root.ino, b"copy-of-hard-1", 0o644, 0, 0)
            await area.write(handle, 0, (based.src / "hard-1").read_bytes())
            area.release(handle)
            before = set(os.listdir(indexes))
            result = await area.commit("dedup")
            assert result.bytes_new == 0
            # the only new pack holds the new directory records, no chunk
            kinds = set()
            for name in set(os.listdir(indexes)) - before:
                index, problem = await area.repo.read_index(f"index/{name}")
                assert problem is None
                kinds |= {kind for _, kind, _ in index.entries}
            assert kinds == {BlobKind.DIRECTORY}

    run(main)
