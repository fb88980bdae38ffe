"""The fast tier for the commands that look at snapshots (diff, find, dump,
stats, check's data subsets) and for the mount's state folders, in-process
over an in-memory storage: what they read, what they skip, hostile trees.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import pytest
import trio

from rekkordfs import keys as keymod
from rekkordfs.check import DataSubset, parse_subset
from rekkordfs.diff import Status, diff_entries
from rekkordfs.dump import TarDumper, dump_file
from rekkordfs.errors import CorruptedData, UsageError
from rekkordfs.find import Matcher, find
from rekkordfs.format import BlobKind, BlobRef, Entry, EntryKind, Location, Snapshot, Tag, encode_directory
from rekkordfs.keys import KeyType
from rekkordfs.repository import Repository, walk_path
from rekkordfs.staging import StagingTree
from rekkordfs.statedir import key_state_folder, lock_state_folder, prepare_state_folder
from rekkordfs.stats import gather
from rekkordfs.storage.memory import MemoryStorage
from tests.test_fast_core import master, new_repository, opened, private_cache, save  # noqa: F401  (fixtures)

pytestmark = pytest.mark.fast
FIXED_NS = 1_600_000_000_123_456_789


def wide_tree(root: Path, folders: int = 40) -> Path:
    """folders d00.. each holding sub/ with two files, and a file."""
    for index in range(folders):
        sub = root / f"d{index:02d}" / "sub"
        sub.mkdir(parents=True)
        (sub / "one.txt").write_bytes(b"one %d\n" % index)
        (sub / "two.dat").write_bytes(os.urandom(3000))
        (root / f"d{index:02d}" / "top.txt").write_bytes(b"top %d\n" % index)
    return root


async def settled_save(storage: MemoryStorage, keys: keymod.Keyset, channel: str, src: Path) -> str:
    """A save after a first one: the first reads every file, which may set
    their access times (stored in records); unchanged folders then keep equal
    records, as between any two backups of a tree."""
    await save(storage, keys, channel, src)
    return await save(storage, keys, channel, src)


async def records_down_to(repo: Repository, tag: Tag, path: Path) -> set[bytes]:
    """The IDs of a snapshot's directory records from its root down to path's own."""
    snapshot = await repo.load_snapshot(tag)
    found = {snapshot.root_ref.id}
    parts = path.parts[1:]
    for depth in range(1, len(parts) + 1):
        entry, _ = await walk_path(repo, snapshot, "/" + "/".join(parts[:depth]))
        assert entry.dir_ref is not None
        found.add(entry.dir_ref.id)
    return found


async def top_of(repo: Repository, snapshot: str, path: Path) -> tuple[Entry, bool]:
    tag = await repo.resolve(snapshot)
    return await walk_path(repo, await repo.load_snapshot(tag), str(path))


# --- diff -------------------------------------------------------------------------------


def test_diff_reads_only_the_folders_on_the_way_to_a_change(master: keymod.Keyset, tmp_path: Path) -> None:
    src = wide_tree(tmp_path / "src")

    async def main() -> None:
        storage = await new_repository(master)
        first = await settled_save(storage, master, "c", src)
        (src / "d07" / "sub" / "one.txt").write_bytes(b"changed\n")
        second = await settled_save(storage, master, "c", src)
        async with opened(storage, master) as repo:
            old, old_meta = await top_of(repo, first, src)
            new, new_meta = await top_of(repo, second, src)
            result = await diff_entries(repo, old, new, old_meta and new_meta)
            assert [(c.path, c.status, c.kinds) for c in result.changes] == [
                (b"d07/sub/one.txt", Status.CHANGED, ("content", "metadata"))]
            # src, d07 and d07/sub on both sides; the 39 other folders (and d07's
            # unchanged ones: none) are equal records, never read
            assert result.directories_read == 6 and result.directories_skipped == 39
            same = await diff_entries(repo, new, new, True)
            assert same.changes == [] and same.directories_read == 0 and same.directories_skipped == 1
            backwards = await diff_entries(repo, new, old, True)
            assert [c.path for c in backwards.changes] == [b"d07/sub/one.txt"]

    trio.run(main)


def test_diff_lists_added_removed_and_type_changes_below_folders(master: keymod.Keyset, tmp_path: Path) -> None:
    src = wide_tree(tmp_path / "src", folders=3)
    os.utime(src, ns=(FIXED_NS, FIXED_NS))

    async def main() -> None:
        storage = await new_repository(master)
        first = await settled_save(storage, master, "c", src)
        for path in sorted((src / "d01").rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        (src / "d01").rmdir()
        (src / "d01").write_bytes(b"now a file")  # a folder became a file
        (src / "d02" / "top.txt").chmod(0o600)
        os.utime(src, ns=(FIXED_NS, FIXED_NS))
        os.utime(src / "d01", ns=(FIXED_NS, FIXED_NS))
        second = await settled_save(storage, master, "c", src)
        async with opened(storage, master) as repo:
            old, _ = await top_of(repo, first, src)
            new, _ = await top_of(repo, second, src)
            result = await diff_entries(repo, old, new, True)
            changes = {(c.path, c.status, c.kinds, c.fields) for c in result.changes}
        assert changes == {
            (b"d01", Status.CHANGED, ("type",), ()),
            (b"d01/sub", Status.REMOVED, (), ()), (b"d01/sub/one.txt", Status.REMOVED, (), ()),
            (b"d01/sub/two.dat", Status.REMOVED, (), ()), (b"d01/top.txt", Status.REMOVED, (), ()),
            (b"d02/top.txt", Status.CHANGED, ("metadata",), ("mode",)),
        }

    trio.run(main)


# --- find -------------------------------------------------------------------------------


def test_find_reads_each_record_once_for_every_snapshot(master: keymod.Keyset, tmp_path: Path) -> None:
    src = wide_tree(tmp_path / "src", folders=10)

    async def main() -> None:
        storage = await new_repository(master)
        ids = [await settled_save(storage, master, channel, src) for channel in ("a", "b", "c")]
        (src / "d03" / "sub" / "new.txt").write_bytes(b"new")
        ids.append(await settled_save(storage, master, "a", src))
        async with opened(storage, master) as repo:
            tags = [await repo.resolve(i) for i in ids]
            everything = await find(repo, Matcher(["*.txt"]), tags, warn=pytest.fail)
            anchored = await find(repo, Matcher([f"{src}/d0[35]/sub/*.txt"]), tags, warn=pytest.fail)
            # The records from the root down to src differ between snapshots when a folder
            # above src changed between saves (other tests write in /tmp): count them as stored.
            path_records = len(set().union(*[await records_down_to(repo, tag, src) for tag in tags]))
            # one tree below src (10 * 2 folders), read once for the three equal snapshots,
            # then what the last save changed below src: d03, d03/sub
            assert everything.records_read == path_records + 20 + 2
            per = {t.id_hex: sorted(m.path.rsplit(b"/", 2)[-2] + b"/" + m.path.rsplit(b"/", 1)[-1]
                                    for m in everything.matches if m.tag == t) for t in tags}
            assert len(per[ids[0]]) == 20 and per[ids[0]] == per[ids[1]] == per[ids[2]]
            assert b"sub/new.txt" in per[ids[3]] and len(per[ids[3]]) == 21
            # a pattern anchored at the root walks only the folders its leading parts match
            assert anchored.records_read == path_records + 4 + 2  # d01, d02, d04... unread
            assert sorted({bytes(m.path) for m in anchored.matches if m.tag == tags[3]}) == [
                os.fsencode(f"{str(src)[1:]}/{name}") for name in
                ("d03/sub/new.txt", "d03/sub/one.txt", "d05/sub/one.txt")]
            folders = await find(repo, Matcher(["sub/"]), tags[:1], warn=pytest.fail)
            assert len(folders.matches) == 10 and all(m.entry.kind == EntryKind.DIRECTORY for m in folders.matches)

    trio.run(main)


@pytest.mark.parametrize("pattern, path, expected", [
    ("*.txt", "a/b/c.txt", True), ("*.txt", "a/b/c.txd", False),
    ("/a/*/c.txt", "a/b/c.txt", True), ("a/*/c.txt", "a/b/c.txt", True), ("a/*/c.txt", "x/a/b/c.txt", False),
    ("a/**/c.txt", "a/c.txt", True), ("a/**/c.txt", "a/x/y/c.txt", True), ("**/b", "a/b", True),
    ("a/[bx]/c.txt", "a/b/c.txt", True), ("a/[b/x]/c.txt", "a/b/c.txt", True), ("a/b/", "a/b", True),
])
def test_find_patterns_and_the_folders_they_walk(pattern: str, path: str, expected: bool) -> None:
    """The matcher agrees with save's exclude rules, and never prunes a folder
    on the way to a match."""
    matcher = Matcher([pattern])
    parts = path.encode().split(b"/")
    is_dir = pattern.endswith("/")
    found = matcher.matches(path.encode(), parts[-1], is_dir)
    assert found == expected
    if found:
        assert matcher.candidate(parts[-1], is_dir)
        assert all(matcher.may_descend(depth, name) for depth, name in enumerate(parts[:-1], start=1))


async def publish_bomb(repo: Repository, levels: int = 40) -> str:
    """A tree of a few records that doubles at every level (tests/test_hostile.py)."""
    ref, _ = await repo.write_blob(BlobKind.DIRECTORY, encode_directory([Entry(EntryKind.FILE, b"leaf.txt")]))
    for _ in range(levels):
        entries = [Entry(EntryKind.DIRECTORY, name, 0o755, dir_ref=ref) for name in (b"a", b"b")]
        ref, _ = await repo.write_blob(BlobKind.DIRECTORY, encode_directory(entries))
    return (await repo.publish_snapshot(Snapshot("bomb", time.time_ns(), ref, 0, 0, 0), set())).id_hex


def test_hostile_trees_are_refused_by_diff_find_and_dump(master: keymod.Keyset, tmp_path: Path) -> None:
    src = wide_tree(tmp_path / "src", folders=2)

    async def main() -> None:
        storage = await new_repository(master)
        honest = await save(storage, master, "honest", src)
        async with opened(storage, master) as repo:
            bomb = await publish_bomb(repo)
        async with opened(storage, master) as repo:
            warnings: list[str] = []
            tags = [await repo.resolve(honest), await repo.resolve(bomb)]
            result = await find(repo, Matcher(["leaf.txt", "*.txt"]), tags, warn=warnings.append)
            assert result.problems == 1 and len(warnings) == 1 and "multiply work" in warnings[0]
            assert {m.tag.id_hex for m in result.matches} == {honest} and len(result.matches) == 4
            honest_top, _ = await top_of(repo, honest, Path("/"))
            bomb_top, _ = await top_of(repo, bomb, Path("/"))
            with pytest.raises(CorruptedData, match="multiply work"):
                await diff_entries(repo, honest_top, bomb_top, False)
            with pytest.raises(CorruptedData, match="multiply work"):
                await TarDumper(repo, io.BytesIO(), pytest.fail, "bomb").run(bomb_top, False)
            assert (await gather(repo, pytest.fail)).directories is not None  # distinct records only: no blow-up

    trio.run(main)


# --- dump -------------------------------------------------------------------------------


def test_dump_members_never_escape_and_files_are_exact(master: keymod.Keyset, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    big = os.urandom(3 << 20)
    (src / "dir" / "big.bin").write_bytes(big)
    (src / "dir" / "zeros").write_bytes(bytes(9 << 20))  # whole zero chunks are not fetched
    with open(os.fsencode(src) + b"/\xff\xfe", "wb") as handle:
        handle.write(b"raw name")
    os.symlink("/etc/passwd", src / "abs-link")
    os.symlink("../../..", src / "up-link")
    os.link(src / "dir" / "big.bin", src / "hard")

    async def main() -> None:
        storage = await new_repository(master)
        snapshot = await save(storage, master, "c", src)
        async with opened(storage, master) as repo:
            top, has_metadata = await top_of(repo, snapshot, src)
            out = io.BytesIO()
            stats = await TarDumper(repo, out, pytest.fail, "test").run(top, has_metadata)
            assert stats.files == 4 and stats.bytes == len(big) + (9 << 20) + 8  # a hardlink's data once
            file_entry, _ = await top_of(repo, snapshot, src / "dir" / "big.bin")
            single = io.BytesIO()
            assert await dump_file(repo, file_entry, single, "big.bin") == len(big)
            assert single.getvalue() == big
        archive = tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:")
        members = {m.name: m for m in archive.getmembers()}
        for name in members:
            assert not name.startswith("/") and ".." not in name.split("/"), name
        assert members["."].isdir()
        assert archive.extractfile(members["dir/big.bin"]).read() == big  # type: ignore[union-attr]
        assert archive.extractfile(members["dir/zeros"]).read() == bytes(9 << 20)  # type: ignore[union-attr]
        assert members["hard"].islnk() or members["dir/big.bin"].islnk()
        assert members["up-link"].linkname == "../../.." and members["abs-link"].linkname == "/etc/passwd"
        assert os.fsencode("\udcff\udcfe") in {os.fsencode(n) for n in members}

    trio.run(main)


# --- stats ------------------------------------------------------------------------------


def test_stats_count_distinct_data_once_and_log_only_sees_the_tags(master: keymod.Keyset, tmp_path: Path) -> None:
    src = wide_tree(tmp_path / "src", folders=5)
    (src / "twice-a").write_bytes(b"x" * 5000)
    (src / "twice-b").write_bytes(b"x" * 5000)  # same content: one chunk

    async def main() -> None:
        storage = await new_repository(master)
        await save(storage, master, "a", src)
        await save(storage, master, "b", src)
        async with opened(storage, master) as repo:
            found = await gather(repo, pytest.fail)
        data = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        assert found.snapshots == 2 and [c.name for c in found.channels] == ["a", "b"]
        assert found.logical_size == 2 * data
        assert found.distinct_size == data - 5000 and found.dedup_ratio == pytest.approx(2 * data / (data - 5000))
        assert found.packs == sum(1 for k in storage.objects if k.startswith("packs/"))
        assert found.stored_size == sum(len(v[0]) for k, v in storage.objects.items() if k.startswith("packs/"))
        log = keymod.derive(master, KeyType.LOG_ONLY)
        async with opened(storage, log) as repo:
            logged = await gather(repo, pytest.fail)
        assert logged.distinct_size is None and logged.logical_size == found.logical_size
        assert logged.stored_size == found.stored_size

    trio.run(main)


# --- check --read-data-subset ----------------------------------------------------------------


def test_data_subsets_split_the_packs() -> None:
    packs = {os.urandom(32) for _ in range(200)}
    groups = [parse_subset(f"{n}/5").choose(packs) for n in range(1, 6)]
    assert set().union(*groups) == packs and sum(len(g) for g in groups) == len(packs)
    assert all(groups)
    assert len(parse_subset("10%").choose(packs)) == 20
    assert len(parse_subset("0.1%").choose(packs)) == 1  # at least one
    assert parse_subset("100%").choose(packs) == packs
    for bad in ("0%", "101%", "0/3", "4/3", "x/3", "1/0", "ten%", "1-3", "nan%"):
        with pytest.raises(UsageError):
            parse_subset(bad)
    assert isinstance(parse_subset("2/7"), DataSubset)


# --- the mount's state folders --------------------------------------------------------------


def seeded_tree(folder: Path, channel: str, from_snapshot: bool) -> None:
    """A staging tree as a mount leaves it: seeded from a snapshot (folders not
    yet read) or started empty."""
    tree = StagingTree(folder / channel, channel, None)
    if from_snapshot:
        ref = BlobRef(bytes(32), Location(bytes(32), 0, 10))
        tree.seed(bytes(32), Snapshot(channel, FIXED_NS, ref, 0, 0, 0))
    tree.close()


def test_state_folders_are_per_key_and_old_trees_go_to_a_key_that_can_use_them(
        master: keymod.Keyset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REKKORD_STATE_DIR", str(tmp_path / "state"))
    repo_id = "ab" * 16
    write = keymod.derive(master, KeyType.WRITE_ONLY)
    old = tmp_path / "state" / repo_id  # where an older version kept every key's trees
    old.mkdir(parents=True)
    seeded_tree(old, "seeded", from_snapshot=True)
    seeded_tree(old, "empty", from_snapshot=False)

    def prepare(keys: keymod.Keyset) -> Path:
        folder = key_state_folder(repo_id, keys.id_hex)
        folder.mkdir(parents=True, exist_ok=True)
        fd = lock_state_folder(folder, f"/mnt/{keys.kind.label}")
        try:
            prepare_state_folder(folder, keys, repo_id)
        finally:
            os.close(fd)
        return folder

    # the WriteOnly key takes only the tree it can use; the master the rest
    write_folder = prepare(write)
    assert sorted(p.name for p in write_folder.iterdir() if p.is_dir()) == ["empty"]
    master_folder = prepare(master)
    assert sorted(p.name for p in master_folder.iterdir() if p.is_dir()) == ["seeded"]
    assert not (old / "seeded").exists() and not (old / "empty").exists()
    assert write_folder != master_folder and write_folder.parent == master_folder.parent == old

    # a folder given by hand belongs to the first key that used it
    shared = tmp_path / "shared"
    shared.mkdir()
    prepare_state_folder(shared, master, repo_id)
    with pytest.raises(UsageError, match=f"another key \\(Master key {master.id_hex}\\)"):
        prepare_state_folder(shared, write, repo_id)
    with pytest.raises(UsageError, match="another repository"):
        prepare_state_folder(shared, master, "cd" * 16)
    # an unowned one holding trees a WriteOnly key cannot read is refused to it
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    seeded_tree(legacy, "seeded", from_snapshot=True)
    with pytest.raises(UsageError, match="WriteOnly key cannot read"):
        prepare_state_folder(legacy, write, repo_id)
    prepare_state_folder(legacy, master, repo_id)

    # one mount per folder, and the second one is told where the first is
    folder = key_state_folder(repo_id, master.id_hex)
    held = lock_state_folder(folder, "/mnt/first")
    try:
        with pytest.raises(UsageError, match="already mounted on '/mnt/first'"):
            lock_state_folder(folder, "/mnt/second")
    finally:
        os.close(held)
