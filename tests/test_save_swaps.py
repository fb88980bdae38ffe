"""A save of a tree that someone else can change while it runs: whoever can
write to a folder inside it (another user's home, in a save of /home) may
swap that folder for a symlink to a place they cannot read, between the
moment the save lists the folder and the moment it reads what is in it. The
save must then store nothing from that place: no content, no extended
attribute, no listing. Each test makes the swap at one such moment, the way
an attacker racing the save would, and fails against a save that reads by
path."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from rekkordfs import keys as keymod
from rekkordfs import prepprocs, save, tuning
from rekkordfs.format import Entry
from rekkordfs.repository import Repository
from rekkordfs.save import SaveSession
from rekkordfs.savewalk import Walker
from rekkordfs.storage.memory import MemoryStorage
from rekkordfs.upload import Uploader
from tests.test_save_processes import tree_of

SECRET_XATTR = b"capability of a file you may not read"
SECRET_TARGET = "/where/the/secret/link/leads"


@pytest.fixture(autouse=True)
def private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REKKORD_CACHE_DIR", str(tmp_path / "cache"))


class Scene:
    """src/victim: a folder its owner controls, inside the saved tree;
    secret/: what they may not read, with files of the same names and sizes
    (so a read through the swapped folder looks right)."""

    def __init__(self, root: Path) -> None:
        rng = random.Random(5)
        self.src, self.secret = root / "src", root / "secret"
        self.victim = self.src / "victim"
        for folder in (self.src / "other", self.victim, self.secret):
            folder.mkdir(parents=True)
        for index in range(40):
            (self.src / "other" / f"o{index}").write_bytes(rng.randbytes(900))
        sizes = {"small1": 1000, "small2": 1500, "big": tuning.SMALL_FILE + 300_000}
        for name, size in sizes.items():
            (self.victim / name).write_bytes(rng.randbytes(size))
            (self.secret / name).write_bytes(rng.randbytes(size))
            os.setxattr(self.secret / name, "user.cap", SECRET_XATTR)
        for folder in (self.victim, self.secret):  # entries whose metadata the walker reads itself
            (folder / "sub").mkdir()
        os.setxattr(self.secret / "sub", "user.cap", SECRET_XATTR)
        os.symlink("nowhere", self.victim / "link")
        os.symlink(SECRET_TARGET, self.secret / "link")
        (self.secret / "only-in-secret").write_bytes(rng.randbytes(700))
        self.swapped = False

    def swap(self) -> None:
        """The attack: the victim folder becomes a symlink to the secret one."""
        if not self.swapped:
            self.swapped = True
            os.rename(self.victim, self.victim.with_name("victim.old"))
            os.symlink(self.secret, self.victim)

    def holds_victim(self, paths: Iterator[bytes]) -> bool:
        return any(path.startswith(os.fsencode(self.victim) + b"/") for path in paths)


def save_attacked(scene: Scene, processes: int) -> None:
    """Save src with the swap made by whatever the test patched in, then check
    that nothing of secret/ is in its snapshot."""
    master = keymod.new_master()
    storage = MemoryStorage()
    warnings: list[str] = []

    async def main() -> None:
        await Repository.create(storage, master)
        snapshots = []
        for what, warn in ((scene.secret, lambda _m: None), (scene.src, warnings.append)):
            repo = await Repository.open(storage, master)
            try:
                session = SaveSession(repo, "c", [str(what)], warn=warn, processes=processes)
                snapshots.append((await session.run()).snapshot_id)
            finally:
                await repo.aclose()
        repo = await Repository.open(storage, master)
        try:
            secret, attacked = [await tree_of(repo, (await repo.load_snapshot(await repo.resolve(s))).root_ref)
                                for s in snapshots]
        finally:
            await repo.aclose()
        secret_chunks = {chunk for _, chunks in secret.values() if chunks for chunk in chunks}
        assert len(secret_chunks) >= 4
        for path, (entry, chunks) in attacked.items():
            assert isinstance(entry, Entry)
            assert not secret_chunks & set(chunks or []), f"{path!r} holds secret content"
            assert SECRET_XATTR not in dict(entry.xattrs).values(), f"{path!r} has a secret attribute"
            assert entry.target != os.fsencode(SECRET_TARGET), f"{path!r} has the secret link's target"
            assert b"only-in-secret" not in path, "the secret folder's listing was stored"

    scene.swapped = False
    trio.run(main)
    assert scene.swapped, "the test never made its swap"
    assert any("victim" in line for line in warnings), warnings  # what was refused is told


def patch_before(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str,
                 when: Callable[..., bool], scene: Scene) -> None:
    """owner.name swaps the victim folder first, the first time when(args) holds."""
    real = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs):
            scene.swap()
        return real(*args, **kwargs)

    async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs):
            scene.swap()
        return await real(*args, **kwargs)

    import inspect
    monkeypatch.setattr(owner, name, async_wrapper if inspect.iscoroutinefunction(real) else wrapper)


def test_a_folder_swapped_before_a_batch_of_small_files_is_read(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    scene = Scene(tmp_path)
    patch_before(monkeypatch, Uploader, "prepare_small",
                 lambda _self, files, *_a, **_k: scene.holds_victim(
                     os.path.join(item.folder[0], item.path) for item in files if item.folder), scene)
    save_attacked(scene, processes=0)


def test_a_folder_swapped_before_a_worker_process_reads_it(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuning, "SAVE_PROCESS_FILES", 0)
    real_init = prepprocs.PrepPool.__init__

    def eager(pool: prepprocs.PrepPool, *args: Any) -> None:
        real_init(pool, *args)
        pool.ready = True  # the worker takes every batch, from the first on

    monkeypatch.setattr(prepprocs.PrepPool, "__init__", eager)
    scene = Scene(tmp_path)
    batches: list[int] = []

    def holds_victim(_pool: object, folders: list, names: list, *_rest: object) -> bool:
        batches.append(len(names))
        return scene.holds_victim(folder[0] + b"/" for folder, _count in folders)

    patch_before(monkeypatch, prepprocs.PrepPool, "prepare", holds_victim, scene)
    save_attacked(scene, processes=1)
    assert batches  # the worker read the files


def test_a_folder_swapped_before_a_large_file_is_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scene = Scene(tmp_path)
    patch_before(monkeypatch, save, "open_in_folder",
                 lambda folder, name: scene.holds_victim(iter([folder[0] + b"/" + name])), scene)
    save_attacked(scene, processes=0)


def test_a_folder_swapped_between_its_parents_listing_and_its_own(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The walker saw victim/ as a folder in src/'s listing; when it comes to
    list victim/ itself, victim/ leads to secret/."""
    scene = Scene(tmp_path)
    patch_before(monkeypatch, Walker, "_list",
                 lambda _self, node: node.path == os.fsencode(scene.victim), scene)
    save_attacked(scene, processes=0)


def test_a_folder_swapped_while_its_entries_are_looked_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """victim/ listed and its entries stat'ed; then swapped before their
    extended attributes and symlink targets are read."""
    scene = Scene(tmp_path)
    patch_before(monkeypatch, Walker, "_prefetch_stats",
                 lambda _self, stats: scene.holds_victim(path for _, path, _ in stats), scene)
    save_attacked(scene, processes=0)
