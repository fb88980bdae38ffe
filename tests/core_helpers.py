"""Helpers for the direct (no kernel mount) tests of the vfs and staging cores.

The cores are driven in-process with trio.run; repositories are created and
filled with the real CLI (tests/conftest.py's Rekkord runner).
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import trio

from rekkordfs.blobcache import BlobCache
from rekkordfs.format import EntryKind, Snapshot
from rekkordfs.keys import load_keyfile
from rekkordfs.repository import Repository
from rekkordfs.staging import ROOT, Inode, StagingTree
from rekkordfs.stagingarea import StagingArea
from rekkordfs.storage.local import LocalStorage
from rekkordfs.vfs import SnapshotView

T = TypeVar("T")


def run(fn: Callable[..., Awaitable[T]], *args: object) -> T:
    """Run one async test body on a fresh trio loop."""
    return trio.run(fn, *args)


@asynccontextmanager
async def open_repo(repository: str | Path, key_file: str | Path) -> AsyncIterator[Repository]:
    """A repository opened the way rekkordfs/mount.py opens it (local backend)."""
    repo = await Repository.open(LocalStorage(str(repository)), load_keyfile(key_file))
    try:
        yield repo
    finally:
        await repo.aclose()


async def load_by_id(repo: Repository, snapshot_hex: str) -> Snapshot:
    """A snapshot's record, found by its ID through the verified listing."""
    return await repo.load_snapshot(await repo.resolve(snapshot_hex))


@asynccontextmanager
async def open_view(repository: str | Path, key_file: str | Path, **options) -> AsyncIterator[SnapshotView]:
    """A SnapshotView over a local repository (BlobCache without a disk cache, as
    mount.py does for local repositories); options go to BlobCache and SnapshotView."""
    cache_options = {k: options.pop(k) for k in ("memory_bytes", "directory_entries") if k in options}
    async with open_repo(repository, key_file) as repo:
        blobs = BlobCache(repo, **cache_options)
        view = SnapshotView(repo, blobs, **options)
        await view.refresh(force=True)
        yield view


def src_parts(path: Path | str) -> list[bytes]:
    """The components of an absolute source path as `save` stores it."""
    return [p for p in os.fsencode(str(path)).split(b"/") if p]


async def view_walk(view: SnapshotView, parent: int, parts: list[bytes]) -> int:
    """Look each part up (each lookup is remembered, as the kernel would) and
    return the inode number of the last one."""
    ino = parent
    for part in parts:
        ino = (await view.lookup(ino, part)).ino
    return ino


async def tree_walk(tree: StagingTree, parts: list[bytes], parent: int = ROOT) -> Inode:
    node = tree.get(parent)
    for part in parts:
        node = await tree.lookup(node.ino, part)
    return node


def manifest(root: Path | str) -> dict[bytes, tuple]:
    """Everything rsync -aHAX compares, with nanosecond times, for every path
    under root (root itself included, as b"."): type, mode, owner, size, mtime,
    content or symlink target, xattrs and hardlink groups."""
    root_b = os.fsencode(str(root))
    result: dict[bytes, tuple] = {}
    groups: dict[tuple[int, int], bytes] = {}

    def visit(path: bytes, rel: bytes) -> None:
        st = os.lstat(path)
        xattrs = tuple(sorted((name, os.getxattr(path, name, follow_symlinks=False))
                              for name in os.listxattr(path, follow_symlinks=False)))
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as handle:
                payload = handle.read()
            first = groups.setdefault((st.st_dev, st.st_ino), rel)
            link = (first, st.st_nlink)
        elif stat.S_ISLNK(st.st_mode):
            payload, link = os.readlink(path), None
        else:
            payload, link = b"", None
        mtime = None if stat.S_ISLNK(st.st_mode) else st.st_mtime_ns  # symlink times: not portable
        result[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                       st.st_size if not stat.S_ISDIR(st.st_mode) else 0, mtime, payload, xattrs, link)
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                visit(path + b"/" + name, name if rel == b"." else rel + b"/" + name)

    visit(root_b, b".")
    return result


def diff_manifests(expected: dict[bytes, tuple], actual: dict[bytes, tuple]) -> list[str]:
    fields = ("type", "mode", "uid", "gid", "size", "mtime_ns", "content", "xattrs", "hardlink")
    problems = []
    for path in sorted(set(expected) | set(actual)):
        if path not in actual:
            problems.append(f"{path!r}: missing")
        elif path not in expected:
            problems.append(f"{path!r}: unexpected")
        else:
            for name, want, got in zip(fields, expected[path], actual[path]):
                if want != got:
                    shown = (len(want), len(got)) if name == "content" else (want, got)
                    problems.append(f"{path!r}: {name} {shown[0]!r} != {shown[1]!r}")
    return problems


# --- staging trees ---------------------------------------------------------------------------

NS_A = 1_234_567_890_123_456_789
NS_B = 1_300_000_000_987_654_321


class Clock:
    """A deterministic clock for StagingTree: every call is 1 µs later."""

    def __init__(self, start: int = 1_600_000_000_000_000_000) -> None:
        self.now = start

    def __call__(self) -> int:
        self.now += 1000
        return self.now


async def content(tree: StagingTree, ino: int) -> bytes:
    """Everything a file holds (local or stored)."""
    size = tree.size_of(tree.get(ino))
    data = await tree.read(ino, 0, size + 16)
    assert len(data) == size, (ino, len(data), size)
    return data


async def put_file(tree: StagingTree, parent: int, name: bytes, data: bytes = b"", mode: int = 0o644,
                   uid: int = 0, gid: int = 0) -> Inode:
    node = await tree.create(parent, name, EntryKind.FILE, mode, uid, gid)
    if data:
        await tree.write(node.ino, 0, data)
    tree.flush(node.ino)
    return tree.get(node.ino)


async def dump(tree: StagingTree, parent: int = ROOT, prefix: bytes = b"") -> dict[bytes, tuple]:
    """Every entry under parent with its inode, metadata and content."""
    result: dict[bytes, tuple] = {}
    if parent == ROOT and not prefix:
        root = tree.get(ROOT)
        result[b"."] = (root.ino, root.mode, root.uid, root.gid, root.mtime_ns, root.xattrs)
    for name, node in await tree.listdir(parent):
        path = prefix + name
        data = await content(tree, node.ino) if node.kind == EntryKind.FILE else None
        result[path] = (node.ino, node.kind, node.mode, node.uid, node.gid, tree.size_of(node), node.atime_ns,
                        node.mtime_ns, node.nlink, node.target, node.rdev, tuple(tree.listxattr(node.ino)),
                        tuple(tree.getxattr(node.ino, x) for x in tree.listxattr(node.ino)), data)
        if node.kind == EntryKind.DIRECTORY:
            result.update(await dump(tree, node.ino, path + b"/"))
    return result


async def build_sample(tree: StagingTree) -> dict[str, int]:
    """A small tree with every kind of entry and metadata; returns some inode numbers."""
    d = await tree.create(ROOT, b"dir", EntryKind.DIRECTORY, 0o2750, 12, 34)
    sub = await tree.create(d.ino, b"sub", EntryKind.DIRECTORY, 0o700, 0, 0)
    f = await put_file(tree, ROOT, b"file", b"some content\n" * 100, 0o640, 1000, 1000)
    await tree.write(f.ino, 5000, b"after a hole")
    tree.flush(f.ino)
    await put_file(tree, sub.ino, b"\xff\xfe odd name\n", b"odd")
    await put_file(tree, ROOT, b"empty")
    g = await put_file(tree, d.ino, b"truncated", b"0123456789")
    await tree.truncate(g.ino, 4)
    tree.flush(g.ino)
    await tree.link(f.ino, sub.ino, b"hardlink")
    await tree.create(ROOT, b"symlink", EntryKind.SYMLINK, 0o777, 5, 6, target=b"dir/sub/../../file")
    await tree.create(ROOT, b"fifo", EntryKind.FIFO, 0o600, 0, 0)
    await tree.setxattr(f.ino, b"user.one", b"\x00\x01\x02")
    await tree.setxattr(d.ino, b"user.dir", b"")
    await tree.setattr(f.ino, mode=0o4755, atime_ns=NS_A, mtime_ns=NS_B)
    await tree.setattr(d.ino, uid=7, gid=8, mtime_ns=NS_A)
    gone = await put_file(tree, ROOT, b"gone", b"x")
    await tree.rename(ROOT, b"gone", d.ino, b"moved")
    return {"dir": d.ino, "sub": sub.ino, "file": f.ino, "moved": gone.ino}


@asynccontextmanager
async def area_over(repo: Repository, state: Path) -> AsyncIterator[StagingArea]:
    """A running staging area (and its snapshot view) over an open repository."""
    blobs = BlobCache(repo)
    view = SnapshotView(repo, blobs)
    await view.refresh(force=True)
    area = StagingArea(repo, blobs, view, state)
    try:
        async with trio.open_nursery() as nursery:
            area.start(nursery)
            view.start(nursery)
            yield area
            nursery.cancel_scope.cancel()
    finally:
        area.close()
