"""Attacks as tests: a compromised WriteOnly machine against everyone else.

The attacker holds a WriteOnly keyfile and write access to the storage, which
is exactly what a backup machine has, and writes whatever it likes: with our
library (it holds the blob-ID key, the chunk seed, the public data and log
keys, and its own certified signing key) or raw objects. Overwriting or
deleting what others stored is outside this: whoever may delete objects can
destroy backups (docs/security.md says how to give backup machines credentials
that cannot). What it must never achieve: a snapshot of another key, written
before or after the attack, that restores wrong or not at all, or a listing
that follows its lies.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from rekkordfs import crypto
from rekkordfs.cacherows import MAC_SIZE, STAT_KEY
from rekkordfs.chunker import Chunker
from rekkordfs.codec import index_key, pack_key, snapshot_key
from rekkordfs.config import load_config
from rekkordfs.format import BlobKind, Entry, EntryKind, Location, Snapshot, Tag, encode_directory
from rekkordfs.keys import load_keyfile
from rekkordfs.repository import Repository
from rekkordfs.snapshotlog import tag_key
from tests.fsutil import assert_one_line_error, rsync_diff
from tests.servers import make_backend_runner

MiB = 1 << 20
FUTURE = 2_145_000_000 * 10**9  # 2037: far past the tolerance for clocks running ahead


@dataclass
class World:
    runner: object  # tests.servers' backend runner: every call gets -C <config>
    keys: dict[str, str]  # label -> keyfile path
    src: Path
    tmp: Path

    def run(self, *args: str, key: str = "master", cache: str | None = None, check: bool = True):
        """The CLI with one key, and a cache folder of its own (fresh per label)."""
        folder = self.tmp / f"cache-{cache or key}"
        folder.mkdir(exist_ok=True)
        previous, self.runner.cache_dir = self.runner.cache_dir, folder
        try:
            return self.runner(*args, key=self.keys[key], check=check)
        finally:
            self.runner.cache_dir = previous

    def save(self, channel: str, key: str) -> str:
        out = self.run("save", channel, str(self.src), key=key).stdout.strip().splitlines()
        return out[-1]


def make_source(root: Path) -> None:
    """What the victims save: content the attacker can guess (a well-known file,
    a large file it also has), empty folders, and the usual mix."""
    rng = random.Random(1)
    (root / "empty").mkdir(parents=True)
    (root / "docs" / "also-empty").mkdir(parents=True)
    (root / "docs" / "COPYING").write_bytes(COMMON)
    (root / "docs" / "installer.iso").write_bytes(BIG)
    (root / "docs" / "own-notes.txt").write_bytes(rng.randbytes(5000))
    (root / "photo.raw").write_bytes(rng.randbytes(3 * MiB))
    os.symlink("docs/COPYING", root / "license")
    os.link(root / "docs" / "COPYING", root / "COPYING-hardlink")


COMMON = b"GNU GENERAL PUBLIC LICENSE, or any text the whole world has\n" * 300
BIG = random.Random(7).randbytes(6 * MiB)  # a file the attacker also downloaded


@pytest.fixture(params=["local", "s3"])
def world(request, tmp_path: Path) -> World:
    return new_world(request, tmp_path, request.param)


def new_world(request, tmp_path: Path, backend: str) -> World:
    runner = make_backend_runner(request, tmp_path, backend)
    keys = {"master": str(runner.key_file)}
    for label, kind in (("rw", "ReadWrite"), ("wo", "WriteOnly"), ("evil", "WriteOnly"), ("log", "LogOnly")):
        keys[label] = str(tmp_path / f"{label}.key")
        runner("derive", "-t", kind, "-O", keys[label])
    src = tmp_path / "src"
    make_source(src)
    return World(runner, keys, src, tmp_path)


@asynccontextmanager
async def attacker(world: World) -> AsyncIterator[Repository]:
    """The repository as the compromised machine opens it: its WriteOnly key and
    the storage credentials of the configuration."""
    config = load_config(config_file=world.runner.config_file, repository=None, key_file=None, threads=None)
    async with Repository.connect(config, load_keyfile(world.keys["evil"])) as repo:
        yield repo


def guessable_blobs(repo: Repository) -> list[tuple[BlobKind, bytes]]:
    """Blobs the victims will store that the attacker can compute: chunks of
    files it has, and the record of an empty folder."""
    assert repo.keys.chunk_seed is not None
    chunker = Chunker(repo.keys.chunk_seed, repo.config.chunking)
    chunks = [bytes(view) for data in (COMMON, BIG) for view in chunker.split(data)]
    return [(BlobKind.CHUNK, chunk) for chunk in chunks] + [(BlobKind.DIRECTORY, encode_directory([]))]


async def poison_indexes(repo: Repository) -> str:
    """A junk pack and an index, signed by the attacker's own certified key, that
    claims every guessable blob: whoever trusted it would refer to junk."""
    junk = os.urandom(32)
    entries = []
    for offset, (kind, data) in enumerate(guessable_blobs(repo)):
        entries.append((repo.codec.blob_id(kind, data), kind, Location(junk, offset * 100, 100)))
    assert await repo.storage.put(pack_key(junk), os.urandom(100 * len(entries)))
    name = index_key(os.urandom(16))
    assert await repo.storage.put(name, repo.codec.seal_index(junk, entries))
    return name


async def squat_names(repo: Repository) -> None:
    """Junk under every name derivable from the guessable blobs' IDs (the old
    layout stored records under their ID): nothing honest may need one."""
    for kind, data in guessable_blobs(repo):
        hex_id = repo.codec.blob_id(kind, data).hex()
        for name in (f"blobs/{hex_id[:2]}/{hex_id}", f"snapshots/{hex_id}", f"packs/{hex_id[:2]}/{hex_id}",
                     f"index/{hex_id[:32]}"):
            await repo.storage.put(name, os.urandom(300))


async def publish_lies(repo: Repository) -> list[str]:
    """Tags the attacker may sign (its key is a writer): one dated in 2037 in the
    victims' channel, one an hour ahead whose record is junk. Neither may ever
    be the channel's `latest` for a key that can read."""
    empty, _ = await repo.write_blob(BlobKind.DIRECTORY, encode_directory([]))
    future = await repo.publish_snapshot(Snapshot("laptop", FUTURE, empty, 0, 0, 0), set())
    junk = Tag(os.urandom(32), "laptop", time.time_ns() + 3600 * 10**9, 1, 1, 1, repo.keys.signer)
    junk = dataclasses.replace(junk, signature=repo.keys.sign(junk.signature_message(repo.config.repo_id)))
    await repo.storage.put(snapshot_key(junk.snapshot_id), os.urandom(500))
    await repo.storage.put(tag_key(crypto.seal_to(repo.keys.log_public, junk.encode())), b"")
    return [future.id_hex, junk.id_hex]


async def publish_bomb(repo: Repository, levels: int = 40) -> str:
    """A snapshot of a few records whose tree doubles at every level: 2^40 folders."""
    ref, _ = await repo.write_blob(BlobKind.DIRECTORY, encode_directory([]))
    for _ in range(levels):
        entries = [Entry(EntryKind.DIRECTORY, name, 0o755, dir_ref=ref) for name in (b"a", b"b")]
        ref, _ = await repo.write_blob(BlobKind.DIRECTORY, encode_directory(entries))
    return (await repo.publish_snapshot(Snapshot("bomb", time.time_ns(), ref, 0, 0, 0), set())).id_hex


def attack(world: World) -> dict[str, object]:
    async def main() -> dict[str, object]:
        async with attacker(world) as repo:
            index = await poison_indexes(repo)
            await squat_names(repo)
            lies = await publish_lies(repo)
            bomb = await publish_bomb(repo)
            return {"index": index, "lies": lies, "bomb": bomb, "key": repo.keys.id_hex}

    return trio.run(main)


def assert_restores_exactly(world: World, snapshot: str, name: str) -> None:
    dest = world.tmp / f"restored-{name}"
    world.run("restore", f"{snapshot}:{world.src}", str(dest))
    assert rsync_diff(world.src, dest) == ""


def test_victims_save_and_restore_exactly_after_the_attack(world: World) -> None:
    before = world.save("laptop", key="rw")  # written before the attack
    evil = attack(world)
    # after it: a ReadWrite machine, a second WriteOnly machine and the master
    # save from empty caches (they learn the indexes now, the attacker's among them)
    after_rw = world.save("laptop", key="rw")
    after_wo = world.save("desktop", key="wo")
    after_master = world.save("server", key="master")
    for name, snapshot in (("before", before), ("rw", after_rw), ("wo", after_wo), ("master", after_master)):
        assert_restores_exactly(world, snapshot, name)

    # check reads everything; what it reports is the attacker's, never a victim's
    result = world.run("check", "--read-data", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    problems = [line for line in result.stderr.splitlines() if line.startswith("problem: ")]
    assert problems
    victims = (before, after_rw, after_wo, after_master)
    assert not [line for line in problems if any(v in line for v in victims)], problems
    assert any(evil["index"] in line and evil["key"] in line for line in problems), problems  # type: ignore[operator]
    assert any(evil["bomb"] in line and "multiply work" in line for line in problems), problems  # type: ignore[operator]
    assert any(evil["lies"][0] in line and "future" in line for line in problems), problems  # type: ignore[index]
    assert any(evil["lies"][1] in line for line in problems), problems  # type: ignore[index]

    # listings: the lies are named on stderr, the rest listed, and `latest` is honest
    listing = world.run("snapshots", "-f", "json", check=False)
    assert listing.returncode == 3 and evil["lies"][0] in listing.stderr  # type: ignore[index]
    ids = [s["id"] for s in json.loads(listing.stdout)]
    assert len(ids) == len(set(ids)) and set(victims) <= set(ids)
    channels = world.run("channels", "-f", "json", check=False)
    latest = {c["channel"]: c["latest"] for c in json.loads(channels.stdout)}
    assert latest["laptop"] == after_rw and latest["desktop"] == after_wo and latest["server"] == after_master
    world.run("restore", f"laptop:{world.src}", str(world.tmp / "by-channel"))
    assert rsync_diff(world.src, world.tmp / "by-channel") == ""


def test_trust_costs_two_write_only_machines_their_shared_deduplication(world: World) -> None:
    """The price of the trust rule, measured: a WriteOnly machine deduplicates
    against its own data and that of keys that can read, never against another
    WriteOnly key's (which might lie)."""
    first = json.loads(world.run("save", "a", str(world.src), "-f", "json", key="wo").stdout)
    assert first["bytes_new"] > 9 * MiB
    again = json.loads(world.run("save", "a", str(world.src), "-f", "json", key="wo", cache="wo-2").stdout)
    assert again["bytes_new"] == 0  # its own indexes: trusted, even from a fresh cache
    other = json.loads(world.run("save", "b", str(world.src), "-f", "json", key="evil").stdout)
    assert other["bytes_new"] == first["bytes_new"]  # another WriteOnly key's: stored again
    rw = json.loads(world.run("save", "c", str(world.src), "-f", "json", key="rw").stdout)
    assert rw["bytes_new"] == first["bytes_new"]  # WriteOnly data is not trusted by readers either
    wo_after_rw = json.loads(world.run("save", "d", str(world.src), "-f", "json", key="evil",
                                       cache="evil-2").stdout)
    assert wo_after_rw["bytes_new"] == 0  # but ReadWrite data is trusted by everyone


def test_hostile_tree_is_refused_before_any_work(world: World) -> None:
    evil = attack(world)
    dest = world.tmp / "bomb"  # 2^40 folders: refused at once, or the test times out
    assert_one_line_error(world.run("restore", evil["bomb"], str(dest), check=False), "multiply work")
    assert_one_line_error(world.run("list", "-r", evil["bomb"], check=False), "multiply work")
    assert not dest.exists()
    # its top level alone lists fine
    assert world.run("list", evil["bomb"]).stdout.count("\n") == 2
    # the commands that walk trees refuse it too, with one line; find and stats go on without it
    victim = world.save("laptop", key="master")
    assert_one_line_error(world.run("dump", evil["bomb"], check=False), "multiply work")
    assert_one_line_error(world.run("diff", victim, evil["bomb"], check=False), "multiply work")
    found = world.run("find", "*", "-f", "json", check=False)
    assert found.returncode == 3 and evil["bomb"] in found.stderr and "multiply work" in found.stderr
    assert {m["id"] for m in json.loads(found.stdout)} == {victim}
    stats = world.run("stats", "-f", "json", check=False)  # the attack's lies are named, and left out
    assert stats.returncode == 3 and "in the future" in stats.stderr and "Traceback" not in stats.stderr
    assert json.loads(stats.stdout)["snapshots"] >= 2


# --- one backend is enough for what follows: it does not depend on the storage ----------


@pytest.fixture
def local_world(request, tmp_path: Path) -> World:
    return new_world(request, tmp_path, "local")


def repository_path(world: World) -> Path:
    return Path(world.runner.location.url)  # type: ignore[attr-defined]


def test_restore_delete_keeps_dest_when_the_restore_fails(local_world: World) -> None:
    """DEST holds an edited file the snapshot also holds, an extra file, and a file
    where the snapshot has a folder; a pack the restore needs is unreadable. The
    restore fails, and DEST's entries are as they were (or restored): nothing is
    deleted first, nothing is left half-written."""
    world = local_world
    snapshot = world.save("laptop", key="master")
    dest = world.tmp / "dest"
    world.run("restore", f"{snapshot}:{world.src}", str(dest))
    (dest / "docs" / "own-notes.txt").write_bytes(b"edited since the backup")
    (dest / "extra").write_bytes(b"not in the snapshot")
    (dest / "empty").rmdir()
    (dest / "empty").write_bytes(b"a file where the snapshot has a folder")
    # the data pack of the large files goes bad (the records stay readable)
    packs = sorted((p for p in (repository_path(world) / "packs").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    packs[-1].write_bytes(os.urandom(packs[-1].stat().st_size))

    result = world.run("restore", "--delete", f"{snapshot}:{world.src}", str(dest), check=False)
    assert_one_line_error(result, "failed authentication")
    assert (dest / "docs" / "own-notes.txt").read_bytes() in (b"edited since the backup",
                                                             (world.src / "docs" / "own-notes.txt").read_bytes())
    assert (dest / "extra").read_bytes() == b"not in the snapshot"
    assert (dest / "empty").read_bytes() == b"a file where the snapshot has a folder"
    assert not [p for p in dest.rglob("*") if p.name.startswith(".rekkord-restore-")]


def test_restore_delete_compares_names_as_bytes(local_world: World) -> None:
    world = local_world
    odd = world.src / os.fsdecode(b"caf\xe9-latin1")  # not UTF-8: a name must match as bytes
    odd.write_bytes(b"x")
    snapshot = world.save("laptop", key="master")
    dest = world.tmp / "dest"
    world.run("restore", f"{snapshot}:{world.src}", str(dest))
    (dest / "docs" / "own-notes.txt").write_bytes(b"edited")
    (dest / "extra").write_bytes(b"extra")
    out = world.run("restore", "--delete", f"{snapshot}:{world.src}", str(dest)).stdout
    assert "deleted 1 entr" in out or "deleted 1 item" in out or "1 deleted" in out, out
    assert not (dest / "extra").exists()
    assert rsync_diff(world.src, dest) == ""


def test_tampered_stat_cache_is_not_trusted(local_world: World) -> None:
    """Swapping two files' cached chunk lists (same size) in the local cache
    does not make the next save store the wrong content."""
    import sqlite3

    world = local_world
    for name in ("a", "b"):
        (world.src / name).write_bytes(name.encode() * 4096)
    world.save("laptop", key="master")
    databases = list((world.tmp / "cache-master").rglob("cache.db"))
    assert len(databases) == 1
    db = sqlite3.connect(databases[0])
    rows = dict(db.execute("SELECT path, row FROM stats").fetchall())
    a, b = os.fsencode(world.src / "a"), os.fsencode(world.src / "b")
    assert a in rows and b in rows, sorted(rows)
    # each row keeps its file's key (size, times, inode) and MAC, with the other's chunks
    head = STAT_KEY.size
    assert len(rows[a]) == len(rows[b]) and rows[a][head:-MAC_SIZE] != rows[b][head:-MAC_SIZE]
    for this, other in ((a, b), (b, a)):
        swapped = rows[this][:head] + rows[other][head:-MAC_SIZE] + rows[this][-MAC_SIZE:]
        db.execute("UPDATE stats SET row = ? WHERE path = ?", (swapped, this))
    db.commit()
    db.close()
    second = world.save("laptop", key="master")
    assert_restores_exactly(world, second, "after-tampering")


def test_deleted_tag_is_reported_by_check(local_world: World) -> None:
    """A tag deleted behind the repository's back: its record remains, and check
    names it (a forgotten snapshot would leave a signed record instead)."""
    world = local_world
    gone = world.save("desktop", key="wo")
    for tag in (repository_path(world) / "tags").rglob("*"):
        if tag.is_file():
            tag.unlink()
    assert json.loads(world.run("snapshots", "-f", "json", key="log").stdout) == []
    result = world.run("check", check=False)
    assert result.returncode == 1
    assert any(gone in line and "no valid tag" in line for line in result.stderr.splitlines()), result.stderr


def test_packs_show_no_blob_framing_without_keys(local_world: World) -> None:
    """The storage sees packs of random-looking bytes: the start of every blob
    (known here from the master's view of the indexes) looks like any other
    byte, and nothing repeats inside a pack (the old format repeated a 32-byte
    session key and a 3-byte header in front of every blob)."""
    world = local_world
    for index in range(300):  # many small files: many blobs per pack
        (world.src / "docs" / f"note-{index:03d}").write_bytes(random.Random(index).randbytes(200 + index))
    world.save("laptop", key="master")

    async def boundaries() -> dict[bytes, list[int]]:
        config = load_config(config_file=world.runner.config_file, repository=None, key_file=None, threads=None)
        async with Repository.connect(config, load_keyfile(world.keys["master"])) as repo:
            found: dict[bytes, list[int]] = {}
            for name in await repo.storage.list("index/"):
                index, problem = await repo.read_index(name)
                assert problem is None
                found[index.pack] = sorted(location.offset for _, _, location in index.entries)
            return found

    starts = trio.run(boundaries)
    assert sum(len(offsets) for offsets in starts.values()) > 300
    for pack_id, offsets in starts.items():
        raw = (repository_path(world) / pack_key(pack_id)).read_bytes()
        heads = [raw[offset:offset + 4] for offset in offsets]
        assert len(set(heads)) == len(heads)  # no constant header in front of blobs
        grams = [raw[i:i + 16] for i in range(0, len(raw) - 16)]
        assert len(set(grams)) == len(grams)  # no repeated 16-byte string anywhere
        counts = [0] * 256
        for byte in raw:
            counts[byte] += 1
        expected = len(raw) / 256
        chi2 = sum((c - expected) ** 2 / expected for c in counts)
        assert chi2 < 400  # uniform bytes (255 degrees of freedom: ~255 +- 23)


def test_the_mount_isolates_what_the_attacker_wrote(local_world: World) -> None:
    """Mounted with the master key after the attack: every channel lists,
    `latest` is honest, each snapshot appears once, the staging area starts
    from the honest snapshot, and the bomb is confined to its own folder."""
    from tests.mounting import mounted

    world = local_world
    honest = world.save("laptop", key="rw")
    evil = attack(world)
    world.runner.env["REKKORD_STATE_DIR"] = str(world.tmp / "state")
    world.runner.cache_dir = world.tmp / "cache-master"
    world.runner.cache_dir.mkdir(exist_ok=True)
    with mounted(world.runner, world.tmp / "mnt") as mnt:
        assert sorted(os.listdir(mnt / "channels")) == ["bomb", "laptop"]
        latest = os.readlink(mnt / "channels" / "laptop" / "latest")
        assert sorted(os.listdir(mnt / "channels" / "laptop")) == sorted([latest, "latest"])
        ids = os.listdir(mnt / "ids")
        assert len(ids) == len(set(ids)) and honest in ids
        assert not set(evil["lies"]) & set(ids)  # type: ignore[arg-type]
        inside = mnt / "channels" / "laptop" / "latest" / str(world.src).lstrip("/")
        assert rsync_diff(world.src, inside) == ""
        assert sorted(os.listdir(mnt / "staging")) == ["bomb", "laptop"]
        staged = mnt / "staging" / "laptop" / str(world.src).lstrip("/")
        assert sorted(os.listdir(staged)) == sorted(os.listdir(world.src))
        assert sorted(os.listdir(mnt / "channels" / "bomb" / "latest")) == ["a", "b"]


def test_the_mount_stops_a_tree_built_to_multiply_work(local_world: World) -> None:
    """Walking the bomb in the mount's view ends in EIO after a bounded number
    of listings (treebudget.py), not after 2^40 of them."""
    from rekkordfs.nodes import CHANNELS_INO
    from rekkordfs.treebudget import AMPLIFICATION, FREE_ENTRIES
    from tests.core_helpers import open_view

    world = local_world
    attack(world)

    async def walk() -> int:
        async with open_view(repository_path(world), world.keys["master"]) as view:
            channel = await view.lookup(CHANNELS_INO, b"bomb")
            root = await view.lookup(channel.ino, os.fsencode(view.latest("bomb") or ""))
            pending, listings = [root.ino], 0
            while pending:
                ino = pending.pop()
                try:
                    children = await view.children(ino)
                except OSError as exc:
                    assert exc.errno == errno.EIO
                    return listings
                listings += 1
                pending.extend(node.ino for _, node in children)
                for _, node in children:
                    view.remember(node)
        raise AssertionError("the whole bomb was walked")

    listings = trio.run(walk)
    assert listings <= AMPLIFICATION * 80 + FREE_ENTRIES + 1  # 80 distinct entries; a listing adds at least one
