"""Direct tests of rekkordfs/vfs.py (SnapshotView) and blobcache.py, without a mount.

Repositories are filled with the real CLI; the view is driven in-process.
"""

from __future__ import annotations

import errno
import os
import random
import stat
from pathlib import Path

import pytest
import trio
import trio.testing

from rekkordfs.blobcache import BlobCache
from rekkordfs.codec import pack_key
from rekkordfs.format import Location, Snapshot
from rekkordfs.nodes import CHANNELS_INO, IDS_INO, ROOT_INO, NodeKind
from rekkordfs.vfs import SnapshotView, snapshot_dir_name

from .conftest import Rekkord
from .core_helpers import load_by_id, open_repo, open_view, run, src_parts, view_walk
from .trees import make_awkward_tree, make_random_files, make_wide_dir

WIDE = 20_000


@pytest.fixture(autouse=True)
def private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """In-process repositories keep their caches here, not in the user's folder."""
    folder = tmp_path / "core-cache"
    folder.mkdir()
    monkeypatch.setenv("REKKORD_CACHE_DIR", str(folder))
    return folder


class Saved:
    """A repository shared by the read-only tests of this module."""

    def __init__(self, base: Path) -> None:
        self.cli = Rekkord(cache_dir=base / "cli-cache", repository=str(base / "repo"),
                           key_file=str(base / "master.key"))
        self.cli.cache_dir.mkdir()
        self.cli("init", "-K", self.cli.key_file)
        self.src = make_awkward_tree(base / "src")
        self.docs = self.cli.save("docs", str(self.src))
        self.wide = make_wide_dir(base / "wide", WIDE)
        self.wide_id = self.cli.save("wide", str(self.wide))
        self.log_key = str(base / "log.key")
        self.write_key = str(base / "write.key")
        self.cli("derive", "-t", "LogOnly", "-O", self.log_key)
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
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return Saved(tmp_path_factory.mktemp("vfs"))


def stop_read_ahead(view: SnapshotView) -> None:
    """Detach the view from a nursery that is about to close (mount.py never needs to)."""
    view.read_ahead.nursery = None


def errno_of(excinfo: pytest.ExceptionInfo) -> int:
    return excinfo.value.errno


async def snapshot_ino(view: SnapshotView, channel: str) -> int:
    """channels/<channel>/<latest name>, looked up."""
    chan = await view.lookup(CHANNELS_INO, channel.encode())
    name = view.latest(channel)
    assert name is not None
    return (await view.lookup(chan.ino, name.encode())).ino


async def source_root(view: SnapshotView, saved: Saved) -> int:
    """The saved source folder inside the docs snapshot."""
    return await view_walk(view, await snapshot_ino(view, "docs"), src_parts(saved.src))


async def read_all(view: SnapshotView, ino: int, block: int = 128 << 10) -> bytes:
    reader = view.open(ino)
    parts, offset = [], 0
    while True:
        data = await view.read(reader, offset, block)
        if not data:
            return b"".join(parts)
        parts.append(data)
        offset += len(data)


# --- layout -------------------------------------------------------------------------------


async def republish(repo, snapshot_id: str, channel: str, time_ns: int) -> str:
    """A copy of a snapshot under another channel and time (what another machine could write)."""
    base = await load_by_id(repo, snapshot_id)
    copy = Snapshot(channel, time_ns, base.root_ref, base.size, 0, base.files, base.max_link_id, base.root)
    return (await repo.publish_snapshot(copy, set())).id_hex


def test_layout_channels_latest_ids_and_same_second_names(local_repo, tmp_path: Path) -> None:
    src = tmp_path / "tiny"
    src.mkdir()
    (src / "f").write_bytes(b"tiny")
    first = local_repo.save("daily", str(src))

    async def main() -> None:
        async with open_repo(local_repo.repository, local_repo.key_file) as repo:
            base = await load_by_id(repo, first)
            second = (base.time_ns // 10**9 + 100) * 10**9  # a later second, two snapshots in it
            same_1 = await republish(repo, first, "daily", second + 100_000_000)
            same_2 = await republish(repo, first, "daily", second + 700_000_000)
            weekly = await republish(repo, first, "weekly", base.time_ns)
        async with open_view(local_repo.repository, local_repo.key_file) as view:
            assert [n for n, _ in await view.children(ROOT_INO)] == [b"channels", b"ids"]
            assert [n for n, _ in await view.children(CHANNELS_INO)] == [b"daily", b"weekly"]
            daily = await view.lookup(CHANNELS_INO, b"daily")
            assert daily.kind == NodeKind.VIRTUAL_DIR and stat.S_ISDIR(daily.attr.mode)
            names = [n for n, _ in await view.children(daily.ino)]
            first_name = snapshot_dir_name(base.time_ns).encode()
            later = snapshot_dir_name(second).encode()
            assert names == [first_name, later, later + b"_2", b"latest"]

            latest = await view.lookup(daily.ino, b"latest")
            assert latest.kind == NodeKind.LATEST and stat.S_ISLNK(latest.attr.mode)
            assert await view.readlink(latest.ino) == later + b"_2"
            assert (await view.getattr(latest.ino)).size == len(later + b"_2")

            # the names lead to the right snapshots, and ids/ holds every one of them
            by_name = {n: node for n, node in await view.children(daily.ino)}
            assert by_name[later].snapshot == bytes.fromhex(same_1)
            assert by_name[later + b"_2"].snapshot == bytes.fromhex(same_2)
            assert by_name[first_name].snapshot == bytes.fromhex(first)
            ids = [n for n, _ in await view.children(IDS_INO)]
            assert sorted(ids) == sorted(i.encode() for i in (first, same_1, same_2, weekly))
            by_id = await view.lookup(IDS_INO, same_2.encode())
            via_channel = await view.lookup(daily.ino, later + b"_2")
            assert by_id.ino == via_channel.ino and by_id.kind == NodeKind.SNAPSHOT_ROOT

            # inside a snapshot: the saved path, with its content
            f = await view_walk(view, via_channel.ino, src_parts(src / "f"))
            assert await read_all(view, f) == b"tiny"
            weekly_node = await view.lookup(CHANNELS_INO, b"weekly")
            assert [n for n, _ in await view.children(weekly_node.ino)] == [first_name, b"latest"]
            with pytest.raises(OSError) as info:
                await view.lookup(CHANNELS_INO, b"monthly")
            assert errno_of(info) == errno.ENOENT
            with pytest.raises(OSError) as info:
                await view.lookup(daily.ino, b"1999-01-01_00-00-00")
            assert errno_of(info) == errno.ENOENT

    run(main)


def test_snapshot_dir_name_truncates_to_the_second() -> None:
    second = 1_700_000_000
    assert snapshot_dir_name(second * 10**9) == "2023-11-14_22-13-20"
    assert snapshot_dir_name(second * 10**9 + 999_999_999) == "2023-11-14_22-13-20"


def test_refresh_picks_up_snapshots_saved_after_the_first_listing(local_repo, tmp_path: Path) -> None:
    src = tmp_path / "data"
    src.mkdir()
    (src / "v").write_text("one")
    first = local_repo.save("daily", str(src))
    now = [1000.0]

    async def main() -> None:
        async with open_view(local_repo.repository, local_repo.key_file, refresh_interval=10.0,
                             clock=lambda: now[0]) as view:
            daily = await view.lookup(CHANNELS_INO, b"daily")
            assert [n for n, _ in await view.children(IDS_INO)] == [first.encode()]
            old_latest = view.latest("daily")

            (src / "v").write_text("two")
            second = await trio.to_thread.run_sync(local_repo.save, "daily", str(src))
            # an unknown name is looked for again in the repository (once a second at most)
            now[0] += 2
            node = await view.lookup(IDS_INO, second.encode())
            assert node.snapshot == bytes.fromhex(second)
            latest = await view.lookup(daily.ino, b"latest")
            new_name = await view.readlink(latest.ino)
            assert new_name != old_latest.encode()
            assert [n for n, _ in await view.children(daily.ino)][-2:] == [new_name, b"latest"]
            v = await view_walk(view, (await view.lookup(daily.ino, new_name)).ino, src_parts(src / "v"))
            assert await read_all(view, v) == b"two"

            # a new channel appears in channels/ once the refresh interval has passed
            third = await trio.to_thread.run_sync(local_repo.save, "hourly", str(src))
            now[0] += 11
            assert b"hourly" in [n for n, _ in await view.children(CHANNELS_INO)]
            assert third.encode() in [n for n, _ in await view.children(IDS_INO)]
            assert view.latest_tag("hourly").id_hex == third

    run(main)


def test_channel_folder_time_follows_its_latest_snapshot(local_repo, tmp_path: Path) -> None:
    src = tmp_path / "data"
    src.mkdir()
    first = local_repo.save("daily", str(src))

    async def main() -> None:
        async with open_view(local_repo.repository, local_repo.key_file) as view:
            daily = await view.lookup(CHANNELS_INO, b"daily")
            assert daily.attr.mtime_ns == view.latest_tag("daily").time_ns
            async with open_repo(local_repo.repository, local_repo.key_file) as repo:
                base = await load_by_id(repo, first)
                await republish(repo, first, "daily", base.time_ns + 3600 * 10**9)
            await view.refresh(force=True)
            listed = dict(await view.children(CHANNELS_INO))[b"daily"]
            assert listed.ino == daily.ino
            assert listed.attr.mtime_ns == base.time_ns + 3600 * 10**9
            assert (await view.getattr(daily.ino)).mtime_ns == base.time_ns + 3600 * 10**9

    run(main)


# --- inode numbers and lookup counts ---------------------------------------------------------


def test_inode_numbers_stable_and_shared_by_hardlinks(saved: Saved) -> None:
    async def inodes(view: SnapshotView) -> dict[bytes, int]:
        root = await source_root(view, saved)
        result = {}
        for name, node in await view.children(root):
            result[name] = (await view.lookup(root, name)).ino
            assert node.ino == result[name]  # listed and looked up alike
        assert [node.ino for _, node in await view.children(root)] == list(result.values())  # listed again
        deep = await view_walk(view, root, [b"a", b"b", b"c", b"d", b"e", b"hard-3"])
        result[b"a/b/c/d/e/hard-3"] = deep
        return result

    async def main() -> None:
        async with open_view(saved.repository, saved.key) as view:
            first = await inodes(view)
            assert first[b"hard-1"] == first[b"hard-2"] == first[b"a/b/c/d/e/hard-3"]
            assert view.node(first[b"hard-1"]).attr.nlink == 3
            others = [ino for name, ino in first.items() if not name.startswith((b"hard-", b"a/b/"))]
            assert len(set(others)) == len(others) and first[b"hard-1"] not in others
            assert all(ino > CHANNELS_INO and ino > IDS_INO for ino in first.values())

            # forget everything the kernel was told about: nodes go, numbers come back the same
            for ino, node in list(view.nodes.items()):
                view.forget(ino, node.lookups)
            assert set(view.nodes) == {ROOT_INO, CHANNELS_INO, IDS_INO}
            with pytest.raises(OSError) as info:
                view.node(first[b"small.txt"])
            assert errno_of(info) == errno.ENOENT
            assert await inodes(view) == first

            # the same snapshot through ids/ has the same numbers
            by_id = await view.lookup(IDS_INO, saved.docs.encode())
            root = await view_walk(view, by_id.ino, src_parts(saved.src))
            assert (await view.lookup(root, b"small.txt")).ino == first[b"small.txt"]
        async with open_view(saved.repository, saved.key) as other_mount:
            root = await source_root(other_mount, saved)  # looked up before its folder is listed
            assert (await other_mount.lookup(root, b"small.txt")).ino == first[b"small.txt"]
            assert await inodes(other_mount) == first

    run(main)


def test_attributes_match_the_source(saved: Saved) -> None:
    async def main() -> None:
        async with open_view(saved.repository, saved.key) as view:
            root = await source_root(view, saved)
            for name in (b"small.txt", b"exec.sh", b"setuid", b"no-perms", b"owned", b"empty", b"a",
                         b"sticky", b"setgid-dir", b"link-relative", b"fifo", b"sparse", b"x" * 255,
                         b"\xff\xfe not utf-8"):
                node = await view.lookup(root, name)
                st = os.lstat(os.fsencode(saved.src) + b"/" + name)
                attr = await view.getattr(node.ino)
                assert attr.mode == st.st_mode, name
                assert (attr.uid, attr.gid) == (st.st_uid, st.st_gid), name
                assert attr.mtime_ns == st.st_mtime_ns, name
                if not stat.S_ISDIR(st.st_mode):
                    assert attr.size == st.st_size, name
            link = await view.lookup(root, b"link-relative")
            assert await view.readlink(link.ino) == b"small.txt"
            assert await view.readlink((await view.lookup(root, b"link-dangling")).ino) == b"does/not/exist"

            small = await view.lookup(root, b"small.txt")
            with pytest.raises(OSError) as info:
                await view.readlink(small.ino)
            assert errno_of(info) == errno.EINVAL
            with pytest.raises(OSError) as info:
                await view.children(small.ino)
            assert errno_of(info) == errno.ENOTDIR
            with pytest.raises(OSError) as info:
                await view.lookup(small.ino, b"x")
            assert errno_of(info) == errno.ENOTDIR
            with pytest.raises(OSError) as info:
                await view.lookup(root, b"no such name")
            assert errno_of(info) == errno.ENOENT
            with pytest.raises(OSError) as info:
                view.open((await view.lookup(root, b"a")).ino)
            assert errno_of(info) == errno.EISDIR
            with pytest.raises(OSError) as info:
                view.open(link.ino)
            assert errno_of(info) == errno.EINVAL

    run(main)


def test_lookup_counts_drop_nodes_at_zero_but_not_permanent_ones(saved: Saved) -> None:
    async def main() -> None:
        async with open_view(saved.repository, saved.key) as view:
            root = await source_root(view, saved)
            small = await view.lookup(root, b"small.txt")
            again = await view.lookup(root, b"small.txt")
            assert again is small and small.lookups == 2
            view.forget(small.ino, 1)
            assert view.node(small.ino) is small
            view.forget(small.ino, 1)
            assert small.ino not in view.nodes

            # listing a directory remembers nothing (readdir's caller does that per entry)
            wide_root = await view_walk(view, await snapshot_ino(view, "wide"), src_parts(saved.wide))
            before = len(view.nodes)
            assert len(await view.children(wide_root)) == WIDE
            assert len(view.nodes) == before

            # a lookup of every entry, then a forget of each: memory goes back to where it was
            for name, _ in await view.children(wide_root):
                await view.lookup(wide_root, name)
            assert len(view.nodes) == before + WIDE
            for _name, node in await view.children(wide_root):
                view.forget(node.ino, 1)
            assert len(view.nodes) == before

            for ino, node in list(view.nodes.items()):
                view.forget(ino, node.lookups + 5)
            assert set(view.nodes) == {ROOT_INO, CHANNELS_INO, IDS_INO}
            view.forget(ROOT_INO, 1000)
            view.forget(123456789, 1)  # unknown: ignored
            assert set(view.nodes) == {ROOT_INO, CHANNELS_INO, IDS_INO}
            assert [n for n, _ in await view.children(CHANNELS_INO)] == [b"docs", b"wide"]

    run(main)


def test_listed_entries_are_held_without_nodes_until_asked_for(saved: Saved) -> None:
    """readdirplus (view.entries + its remember) counts the kernel's references
    to a snapshot folder's entries without building nodes; the first request
    by inode builds the node lookup would give, with the count it had."""
    async def main() -> None:
        async with open_view(saved.repository, saved.key) as view:
            root = await source_root(view, saved)
            by_lookup = {name: node for name, node in await view.children(root)}
            nodes_before = set(view.nodes)
            remember, items = await view.entries(root)
            assert [name for name, _, _ in items] == list(by_lookup)
            for name, attr, key in items:
                assert attr == by_lookup[name].attr, name
                remember(key)
            assert set(view.nodes) == nodes_before  # nothing built
            hard = by_lookup[b"hard-1"].ino
            assert by_lookup[b"hard-2"].ino == hard
            assert all(view.holds(node.ino) for node in by_lookup.values())
            assert view.listed[hard].lookups == 2  # both names of the hardlink group

            # asked for by inode: built, with the listing's count; attributes as a lookup's
            small = by_lookup[b"small.txt"]
            built = view.node(small.ino)
            assert built.ino not in view.listed and view.nodes[small.ino] is built
            assert (built.lookups, built.attr, built.path, built.entry) == (1, small.attr, small.path, small.entry)
            assert await view.getattr(small.ino) == small.attr

            # a lookup of a listed entry adds to its count (the third name of the group is elsewhere)
            deep = await view_walk(view, root, [b"a", b"b", b"c", b"d", b"e", b"hard-3"])
            assert deep == hard and view.nodes[hard].lookups == 3 and hard not in view.listed

            # listed again: counts add up; forgets take them away, past zero too
            remember, items = await view.entries(root)
            for _, _, key in items:
                remember(key)
            link = by_lookup[b"link-relative"].ino
            assert view.listed[link].lookups == 2
            view.forget(link, 1)
            assert view.holds(link)
            view.forget(link, 5)
            assert not view.holds(link)
            with pytest.raises(OSError) as info:
                view.node(link)
            assert errno_of(info) == errno.ENOENT
            for node in by_lookup.values():
                view.forget(node.ino, 10)
            assert not any(view.holds(node.ino) for node in by_lookup.values())
            assert not view.listed

    run(main)


def test_readdir_of_20000_entries_returns_every_name_in_order(saved: Saved) -> None:
    async def main() -> None:
        async with open_view(saved.repository, saved.key) as view:
            wide_root = await view_walk(view, await snapshot_ino(view, "wide"), src_parts(saved.wide))
            items = await view.children(wide_root)
            names = [name for name, _ in items]
            assert names == sorted(os.fsencode(n) for n in os.listdir(saved.wide))
            assert len(names) == WIDE
            assert len({node.ino for _, node in items}) == WIDE
            assert all(stat.S_ISREG(node.attr.mode) and node.attr.size == 0 for _, node in items)
            last = await view.lookup(wide_root, names[-1])
            assert last.ino == items[-1][1].ino
            # a second listing gives the same nodes in the same order
            assert [(n, node.ino) for n, node in await view.children(wide_root)] == \
                [(n, node.ino) for n, node in items]

    run(main)


# --- reads -----------------------------------------------------------------------------


def test_read_at_any_offset_and_size_equals_the_file(saved: Saved) -> None:
    rng = random.Random(7)

    async def check(view: SnapshotView, ino: int, expected: bytes, min_chunks: int) -> None:
        reader = view.open(ino)
        assert reader.map.size == len(expected)
        boundaries = reader.map.offsets[1:]
        assert len(reader.map.chunks) >= min_chunks
        windows = [(0, len(expected) + 10), (len(expected) - 1, 10), (len(expected), 10),
                   (len(expected) + 5, 10), (0, 0), (0, 1)]
        for b in boundaries:
            windows += [(b - 1, 2), (b, 1), (b - 1, 1), (b - 4096, 8192), (b - 1, 3 << 20)]
        windows += [(rng.randrange(len(expected)), rng.randrange(1, 3 << 20)) for _ in range(40)]
        if boundaries:
            windows += [(boundaries[0] - 7, boundaries[-1] - boundaries[0] + 14)]  # across every chunk
        for offset, size in windows:
            got = await view.read(reader, offset, size)
            assert got == expected[offset:offset + size], (offset, size)
        # sequential reads, with read-ahead running in the background
        async with trio.open_nursery() as nursery:
            view.start(nursery)
            sequential = view.open(ino)
            parts, offset = [], 0
            while offset < len(expected):
                data = await view.read(sequential, offset, 131072)
                assert data, offset
                parts.append(data)
                offset += len(data)
            assert b"".join(parts) == expected
            stop_read_ahead(view)

    async def main() -> None:
        async with open_view(saved.repository, saved.key) as view:
            root = await source_root(view, saved)
            # chunks are at most 4 MiB: the 10 MiB file has at least 3
            for name, min_chunks in ((b"text-10M.txt", 3), (b"random-3M.bin", 1)):
                node = await view.lookup(root, name)
                await check(view, node.ino, (saved.src / os.fsdecode(name)).read_bytes(), min_chunks)
            # a sparse file: its hole comes from all-zero chunks
            sparse = await view.lookup(root, b"sparse")
            reader = view.open(sparse.ino)
            expected = (saved.src / "sparse").read_bytes()
            assert await view.read(reader, (20 << 20) - 3, 30) == expected[(20 << 20) - 3:(20 << 20) + 27]
            assert await view.read(reader, 0, 1 << 20) == bytes(1 << 20)
            assert await read_all(view, sparse.ino, 4 << 20) == expected
            assert await read_all(view, (await view.lookup(root, b"empty")).ino) == b""

    run(main)


def test_memory_cache_stays_within_its_byte_bound(saved: Saved) -> None:
    limit = 3 << 20

    async def main() -> None:
        async with open_view(saved.repository, saved.key, memory_bytes=limit) as view:
            lru = view.blobs._chunks
            assert lru.limit == limit
            root = await source_root(view, saved)
            async with trio.open_nursery() as nursery:
                view.start(nursery)  # read-ahead fills the cache too
                for name in (b"text-10M.txt", b"random-3M.bin", b"small.txt", b"text-10M.txt", b"sparse"):
                    node = await view.lookup(root, name)
                    reader = view.open(node.ino)
                    offset = 0
                    while offset < reader.map.size:
                        data = await view.read(reader, offset, 1 << 20)
                        offset += len(data)
                        assert lru.used <= limit
                    await trio.testing.wait_all_tasks_blocked()
                    assert lru.used <= limit
                    assert lru.used == sum(len(v) for v in lru._items.values())
                    assert lru.used > 0
                stop_read_ahead(view)

    run(main)


def test_directory_cache_stays_within_its_entry_bound(saved: Saved) -> None:
    limit = 40

    async def main() -> None:
        async with open_view(saved.repository, saved.key, directory_entries=limit) as view:
            dirs = view.blobs._dirs
            root = await source_root(view, saved)
            deep = await view_walk(view, root, [b"a", b"b", b"c", b"d", b"e"])
            assert [n for n, _ in await view.children(deep)] == [b"deep.txt", b"hard-3"]
            for name in (b"sticky", b"empty-dir", b"setgid-dir", b"a"):
                await view.children((await view.lookup(root, name)).ino)
                assert dirs.used <= limit
                assert dirs.used == sum(len(listing.entries) + 1 for listing in dirs._items.values())
            # a directory larger than the bound is kept alone while it is the newest
            wide_root = await view_walk(view, await snapshot_ino(view, "wide"), src_parts(saved.wide))
            assert len(await view.children(wide_root)) == WIDE
            assert len(dirs._items) == 1 and dirs.used == WIDE + 1
            assert (await view.lookup(root, b"small.txt")).attr.size == 120
            assert len(dirs._items) == 1 and dirs.used == len(os.listdir(saved.src)) + 1  # the wide one went

    run(main)


def test_xattrs(saved: Saved) -> None:
    async def main() -> None:
        async with open_view(saved.repository, saved.key) as view:
            root = await source_root(view, saved)
            small = await view.lookup(root, b"small.txt")
            assert view.listxattr(small.ino) == [b"user.comment", b"user.empty"]
            assert view.getxattr(small.ino, b"user.comment") == b"\x00\xffbinary value"
            assert view.getxattr(small.ino, b"user.empty") == b""
            with pytest.raises(OSError) as info:
                view.getxattr(small.ino, b"user.missing")
            assert errno_of(info) == errno.ENODATA
            a = await view.lookup(root, b"a")
            assert view.getxattr(a.ino, b"user.on-dir") == b"dir attr"
            exec_sh = await view.lookup(root, b"exec.sh")
            acl = os.getxattr(saved.src / "exec.sh", "system.posix_acl_access")
            assert view.getxattr(exec_sh.ino, b"system.posix_acl_access") == acl
            assert view.listxattr((await view.lookup(root, b"empty")).ino) == []
            snap = await snapshot_ino(view, "docs")
            assert view.listxattr(snap) == []
            assert view.listxattr(CHANNELS_INO) == []
            with pytest.raises(OSError) as info:
                view.getxattr(snap, b"user.comment")
            assert errno_of(info) == errno.ENODATA

    run(main)


def corrupt(repository: Path, location: Location) -> None:
    """Flip one bit in the middle of a stored blob, inside its pack."""
    path = repository / pack_key(location.pack)
    raw = bytearray(path.read_bytes())
    raw[location.offset + location.length // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def test_corrupted_or_missing_blobs_give_eio_for_that_file_only(local_repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rng = random.Random(3)
    victim = rng.randbytes(9 << 20)  # chunks are 256 KiB to 4 MiB: at least 3, all but the last stored alone
    healthy = rng.randbytes(3 << 20)
    gone = rng.randbytes(2 << 20)
    (src / "victim").write_bytes(victim)
    (src / "tiny-victim").write_bytes(rng.randbytes(10_000))  # small: stored inside a pack
    (src / "healthy").write_bytes(healthy)
    (src / "gone").write_bytes(gone)
    (src / "sub" / "inside").write_bytes(b"inside")
    local_repo.save("g", str(src / "gone"))  # its chunks get a pack of their own, shared by the next save
    local_repo.save("c", str(src))

    async def main() -> None:
        async with open_view(local_repo.repository, local_repo.key_file) as view:
            root = await view_walk(view, await snapshot_ino(view, "c"), src_parts(src))
            bad = await view.lookup(root, b"victim")
            chunks = bad.entry.chunks
            assert len(chunks) >= 3
            corrupt(Path(local_repo.repository), chunks[1].location)
            tiny = await view.lookup(root, b"tiny-victim")
            assert tiny.entry.chunks[0].location is not None
            corrupt(Path(local_repo.repository), tiny.entry.chunks[0].location)
            missing = await view.lookup(root, b"gone")
            gone_pack = missing.entry.chunks[0].location.pack
            assert all(c.location.pack != gone_pack for c in chunks + tiny.entry.chunks)
            (Path(local_repo.repository) / pack_key(gone_pack)).unlink()
            # sub's record is damaged before anything reads it (a lookup reads it to count its folders)
            listing = await view.blobs.directory(view.node(root).dir_ref)
            sub_ref = listing.entries[listing.index[b"sub"]].dir_ref
            corrupt(Path(local_repo.repository), sub_ref.location)
            sub = await view.lookup(root, b"sub")
            assert sub.attr.nlink == 2  # its folders cannot be counted; the lookup still works

            async with trio.open_nursery() as nursery:
                view.start(nursery)  # read-ahead meets the bad chunk first: it must not break anything
                reader = view.open(bad.ino)
                start = reader.map.offsets[1]
                for _ in range(2):
                    with pytest.raises(OSError) as info:
                        await view.read(reader, start - 10, 100)
                    assert errno_of(info) == errno.EIO
                with pytest.raises(OSError) as info:
                    await read_all(view, bad.ino)
                assert errno_of(info) == errno.EIO
                for ino in (missing.ino, tiny.ino):
                    with pytest.raises(OSError) as info:
                        await read_all(view, ino)
                    assert errno_of(info) == errno.EIO
                with pytest.raises(OSError) as info:
                    await view.children(sub.ino)
                assert errno_of(info) == errno.EIO
                with pytest.raises(OSError) as info:
                    await view.lookup(sub.ino, b"inside")
                assert errno_of(info) == errno.EIO
                await trio.testing.wait_all_tasks_blocked()
                assert await read_all(view, (await view.lookup(root, b"healthy")).ino) == healthy
                assert [n for n, _ in await view.children(root)] == [b"gone", b"healthy", b"sub", b"tiny-victim",
                                                                     b"victim"]
                stop_read_ahead(view)

    run(main)


# --- restricted keys -----------------------------------------------------------------------


def test_log_only_key_sees_names_and_gets_eacces_inside(saved: Saved) -> None:
    async def names(view: SnapshotView, ino: int) -> list[bytes]:
        return [n for n, _ in await view.children(ino)]

    async def main() -> None:
        async with open_view(saved.repository, saved.key) as full:
            expected_channels = await names(full, CHANNELS_INO)
            expected_ids = await names(full, IDS_INO)
            docs = await full.lookup(CHANNELS_INO, b"docs")
            expected_docs = await names(full, docs.ino)
        async with open_view(saved.repository, saved.log_key) as view:
            assert await names(view, CHANNELS_INO) == expected_channels == [b"docs", b"wide"]
            assert await names(view, IDS_INO) == expected_ids
            docs = await view.lookup(CHANNELS_INO, b"docs")
            assert await names(view, docs.ino) == expected_docs
            latest = await view.lookup(docs.ino, b"latest")
            assert await view.readlink(latest.ino) == expected_docs[0]
            for snap in (await view.lookup(docs.ino, expected_docs[0]),
                         await view.lookup(IDS_INO, saved.docs.encode())):
                assert snap.kind == NodeKind.SNAPSHOT_ROOT
                assert stat.S_IMODE((await view.getattr(snap.ino)).mode) == 0
                with pytest.raises(OSError) as info:
                    await view.children(snap.ino)
                assert errno_of(info) == errno.EACCES
                with pytest.raises(OSError) as info:
                    await view.lookup(snap.ino, b"tmp")
                assert errno_of(info) == errno.EACCES
                with pytest.raises(OSError) as info:
                    view.check_readable(snap.ino)
                assert errno_of(info) == errno.EACCES
            view.check_readable(docs.ino)  # the channel folders themselves can be listed

    run(main)


def test_write_only_key_sees_no_snapshots(saved: Saved) -> None:
    async def main() -> None:
        async with open_view(saved.repository, saved.write_key) as view:
            assert [n for n, _ in await view.children(ROOT_INO)] == [b"channels", b"ids"]
            assert await view.children(CHANNELS_INO) == []
            assert await view.children(IDS_INO) == []
            for parent, name in ((CHANNELS_INO, b"docs"), (IDS_INO, saved.docs.encode())):
                with pytest.raises(OSError) as info:
                    await view.lookup(parent, name)
                assert errno_of(info) == errno.ENOENT
            assert view.latest("docs") is None

    run(main)


def test_blob_cache_shares_one_fetch_between_concurrent_readers(saved: Saved) -> None:
    async def main() -> None:
        async with open_repo(saved.repository, saved.key) as repo:
            blobs = BlobCache(repo)
            view = SnapshotView(repo, blobs)
            await view.refresh(force=True)
            root = await source_root(view, saved)
            node = await view.lookup(root, b"random-3M.bin")
            chunk = node.entry.chunks[0]
            calls = []
            original = repo.read_chunk

            async def counting(ref):
                calls.append(ref.id)
                await trio.sleep(0.01)
                return await original(ref)

            repo.read_chunk = counting
            values = []

            async def fetch() -> None:
                values.append(await blobs.chunk(chunk))

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(fetch)
            assert len(values) == 5
            expected = (saved.src / "random-3M.bin").read_bytes()[:chunk.size]
            assert all(bytes(v) == expected for v in values)
            assert calls == [chunk.id]

    run(main)


def test_read_ahead_fetches_following_small_files_and_subdirectories_in_batches(local_repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    contents = make_random_files(src, 100, 20_000, seed=5)
    for i in range(20):
        (src / f"d{i:02}").mkdir()
        (src / f"d{i:02}" / "inner").write_bytes(b"x" * i)
    (src / "e1").mkdir()  # two empty folders: one record, listed twice in a batch
    (src / "e2").mkdir()
    local_repo.save("c", str(src))

    async def main() -> None:
        async with open_view(local_repo.repository, local_repo.key_file) as view:
            root = await view_walk(view, await snapshot_ino(view, "c"), src_parts(src))
            corrupt(Path(local_repo.repository), (await view.lookup(root, b"f010")).entry.chunks[0].location)
            batches: list[int] = []
            fetched: list[bytes] = []  # blob IDs, in the order asked for
            original = view.repo.open_many

            async def counting(kind, blobs, then=None):
                batches.append(len(blobs))
                fetched.extend(blob_id for blob_id, _ in blobs)
                return await original(kind, blobs, then)

            view.repo.open_many = counting
            async with trio.open_nursery() as nursery:
                view.start(nursery)
                names = [name for name, _ in await view.children(root)]
                await trio.testing.wait_all_tasks_blocked()
                assert sum(batches) == 21 and max(batches) > 1  # every subdirectory record, in batches
                assert names == [f"d{i:02}".encode() for i in range(20)] + [b"e1", b"e2"] + sorted(contents)
                assert await view.children((await view.lookup(root, b"e2")).ino) == []
                batches.clear()
                for i in range(20):
                    inner = await view.children((await view.lookup(root, f"d{i:02}".encode())).ino)
                    assert [n for n, _ in inner] == [b"inner"]
                assert batches == []  # listed from memory

                first = await view.lookup(root, b"f000")
                assert await read_all(view, first.ino) == contents[b"f000"]
                await trio.testing.wait_all_tasks_blocked()
                assert 1 < len(batches) and sum(batches) >= 60  # the files after it, a few batches
                batches.clear()
                fetched.clear()
                read_in_order: dict[bytes, bytes] = {}  # name -> its chunk's ID
                for i in range(1, 40):
                    name = f"f{i:03}".encode()
                    node = await view.lookup(root, name)
                    read_in_order[name] = node.entry.chunks[0].id
                    ino = node.ino
                    if name == b"f010":  # the damaged one fails alone, on its own read
                        with pytest.raises(OSError) as info:
                            await read_all(view, ino)
                        assert errno_of(info) == errno.EIO
                    else:
                        assert await read_all(view, ino) == contents[name]
                # of the files read, only f010 was fetched again (and failed again); opening
                # f033 and later may start the read-ahead of the files after f064 meanwhile
                again = [name for name, chunk_id in read_in_order.items() if chunk_id in fetched]
                assert again == [b"f010"] and fetched.count(read_in_order[b"f010"]) == 1
                await trio.testing.wait_all_tasks_blocked()
                for name in contents:
                    if name != b"f010":
                        assert await read_all(view, (await view.lookup(root, name)).ino) == contents[name]
                stop_read_ahead(view)

    run(main)


def test_small_files_read_ahead_are_handed_to_the_kernel_store_under_their_inodes(local_repo, tmp_path: Path) -> None:
    """fuse.py stores them in the page cache (a first read then needs no request):
    each with its own inode and exact content, the damaged one and empty ones not."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(7)
    contents = {f"f{i:03}".encode(): rng.randbytes(rng.randrange(0, 3_000)) for i in range(40)}
    contents[b"f005"] = b""
    for name, data in contents.items():
        (src / os.fsdecode(name)).write_bytes(data)
    local_repo.save("c", str(src))

    async def main() -> None:
        async with open_view(local_repo.repository, local_repo.key_file) as view:
            root = await view_walk(view, await snapshot_ino(view, "c"), src_parts(src))
            corrupt(Path(local_repo.repository), (await view.lookup(root, b"f010")).entry.chunks[0].location)
            stored: dict[int, bytes] = {}
            view.read_ahead.store = lambda pages: stored.update(pages)
            async with trio.open_nursery() as nursery:
                view.start(nursery)
                first = await view.lookup(root, b"f000")
                view.open(first.ino)
                inodes = {name: node.ino for name, node in await view.children(root)}
                expected = {inodes[name]: data for name, data in contents.items()
                            if name not in (b"f000", b"f005", b"f010")}
                with trio.fail_after(30):  # stores run in worker threads, which trio does not wait for
                    while len(stored) < len(expected):
                        await trio.sleep(0.01)
                await trio.testing.wait_all_tasks_blocked()
                assert stored == expected
                stop_read_ahead(view)

    run(main)
