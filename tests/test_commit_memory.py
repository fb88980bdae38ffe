"""A commit's memory is bounded by the folders it writes at once, not by the tree
(rekkordfs/staging/capture.py, rekkordfs/commit.py): the capture is a copy of the
tree in temporary tables, read one folder at a time; in memory are only the
facts of the files written since the last commit."""

from __future__ import annotations

from pathlib import Path

import pytest

from rekkordfs import commit
from rekkordfs.blobcache import BlobCache
from rekkordfs.commit import Committer
from rekkordfs.errors import StorageError
from rekkordfs.format import EntryKind
from rekkordfs.nodes import IDS_INO
from rekkordfs.staging import ROOT, Capture, StagingTree
from rekkordfs.tuning import record_writers
from rekkordfs.upload import Uploader

from .conftest import Rekkord
from .core_helpers import content, open_repo, open_view, put_file, run

DIRS_PER_HOP = 2  # folders a commit writes per thread hop here (commit.DIRS_PER_HOP)
FOLDERS = 3 * 12 * DIRS_PER_HOP  # more than record_writers() hops' worth on any machine these tests run on
FILES = 5  # in each


@pytest.fixture
def repo_dir(tmp_path: Path) -> Rekkord:
    cli = Rekkord(cache_dir=tmp_path / "cli-cache", repository=str(tmp_path / "repo"),
                  key_file=str(tmp_path / "master.key"))
    cli.cache_dir.mkdir()
    cli("init", "-K", cli.key_file)
    return cli


def per_inode_state(capture: Capture) -> dict[str, int]:
    """Sizes of every collection a capture holds in memory."""
    return {name: len(value) for name, value in vars(capture).items() if isinstance(value, dict | list | set)}


def test_a_commit_holds_the_entries_of_a_few_folders_at_a_time(repo_dir: Rekkord, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    held = {"most": 0, "folders": 0}
    loaded: set[int] = set()  # folders whose entries a running _write_group() holds
    children, write_group = Capture.children, Committer._write_group

    def counting_children(self: Capture, ino: int):
        loaded.add(ino)
        held["folders"] += 1
        held["most"] = max(held["most"], len(loaded))
        return children(self, ino)

    async def counting_write_group(self: Committer, capture: Capture, group: list[int], *args):
        try:
            return await write_group(self, capture, group, *args)
        finally:
            loaded.difference_update(group)  # their entries go with it

    monkeypatch.setattr(Capture, "children", counting_children)
    monkeypatch.setattr(Committer, "_write_group", counting_write_group)
    monkeypatch.setattr(commit, "DIRS_PER_HOP", DIRS_PER_HOP)

    async def main() -> None:
        async with open_repo(repo_dir.repository, repo_dir.key_file) as repo:
            tree = StagingTree(tmp_path / "state", "many", BlobCache(repo))
            expected = {}
            for d in range(FOLDERS):
                folder = await tree.create(ROOT, b"d%02d" % d, EntryKind.DIRECTORY, 0o755, 0, 0)
                for f in range(FILES):
                    data = b"file %d of folder %d\n" % (f, d)
                    await put_file(tree, folder.ino, b"f%d" % f, data)
                    expected[(b"d%02d" % d, b"f%d" % f)] = data
            first = await Committer(repo, tree, Uploader(repo)).run()
            assert held["folders"] == FOLDERS + 1  # each folder read once, the root included
            assert 1 <= held["most"] <= record_writers(repo.threads) * DIRS_PER_HOP < FOLDERS
            assert first.files == FOLDERS * FILES

            # Nothing per inode of the tree is held in memory, only per written file:
            # here one written since the commit.
            changed = (await tree.lookup((await tree.lookup(ROOT, b"d07")).ino, b"f3")).ino
            await tree.make_local(changed)  # as opening it for writing does
            await tree.write(changed, 0, b"F")
            capture = tree.capture(lambda done: set())
            try:
                sizes = per_inode_state(capture)
                assert sizes and max(sizes.values()) <= 1, sizes
                assert [name for name, _ in capture.children(ROOT)] == [b"d%02d" % d for d in range(FOLDERS)]
            finally:
                tree.release_capture(capture)
            second = await Committer(repo, tree, Uploader(repo)).run()
            expected[(b"d07", b"f3")] = b"F" + expected[(b"d07", b"f3")][1:]
            for (folder_name, name), data in expected.items():
                node = await tree.lookup((await tree.lookup(ROOT, folder_name)).ino, name)
                assert await content(tree, node.ino) == data
            tree.close()
        async with open_view(repo_dir.repository, repo_dir.key_file) as view:
            snap = await view.lookup(IDS_INO, second.tag.id_hex.encode())
            folder = await view.lookup(snap.ino, b"d07")
            node = await view.lookup(folder.ino, b"f3")
            assert await view.read(view.open(node.ino), 0, 100) == expected[(b"d07", b"f3")]
            assert len(await view.children(snap.ino)) == FOLDERS

    run(main)


def test_a_commit_that_fails_halfway_leaves_staging_as_it_was(repo_dir: Rekkord, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Some folders' records are written, then the commit fails: staging keeps
    every staged file as it was, the capture's tables are gone, and the next
    commit stores the whole tree."""
    entries = Committer._entries
    calls = {"n": 0}

    def failing_entries(self: Committer, capture: Capture, ino: int, *args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise StorageError("the storage went away")
        return entries(self, capture, ino, *args)

    async def main() -> None:
        async with open_repo(repo_dir.repository, repo_dir.key_file) as repo:
            tree = StagingTree(tmp_path / "state", "halfway", BlobCache(repo))
            files = {}
            for d in range(8):
                folder = await tree.create(ROOT, b"d%d" % d, EntryKind.DIRECTORY, 0o755, 0, 0)
                files[d] = (await put_file(tree, folder.ino, b"f", b"staged %d" % d)).ino
            monkeypatch.setattr(Committer, "_entries", failing_entries)
            with pytest.raises(StorageError):
                await Committer(repo, tree, Uploader(repo)).run()
            assert calls["n"] >= 4  # it did fail halfway
            temp = tree.journal.db.execute("SELECT name FROM temp.sqlite_master WHERE type = 'table'").fetchall()
            assert temp == []
            assert tree.dirty and tree.base is None
            for d, ino in files.items():
                assert tree.get(ino).local and await content(tree, ino) == b"staged %d" % d
            monkeypatch.setattr(Committer, "_entries", entries)
            result = await Committer(repo, tree, Uploader(repo)).run()
            assert result.files == 8 and not tree.dirty
            tree.close()

    run(main)
