"""Bad input of every kind: one line on stderr, a non-zero exit, no traceback, and
nothing stored changes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REKKORD, ROOT, Rekkord
from tests.fsutil import assert_one_line_error, rsync_diff, tree_digest


def stored_objects(repo: Path) -> dict[str, int]:
    """Every object file of a local repository (but the identity and tags) -> its size."""
    return {str(p.relative_to(repo)): p.stat().st_size for p in repo.rglob("*")
            if p.is_file() and p.name != "rekkord" and p.relative_to(repo).parts[0] not in ("tags", "tmp")}


@pytest.fixture
def world(local_repo: Rekkord, tmp_path: Path) -> dict:
    """A repository with one snapshot of a small tree; digest of the repository.

    The object holding victim.bin's chunks is found without knowing the storage
    layout: it is the largest object in the repository (victim.bin is 3 MiB of
    random data, every other file and record is tiny). The bystander is saved
    first, alone, so the pack of the main save holds only victim.bin."""
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "bystander.txt").write_bytes(b"unrelated file\n" * 100)
    local_repo.save("early", str(src / "dir"))
    (src / "victim.bin").write_bytes(os.urandom(3 << 20))  # random: several chunks, incompressible
    snapshot = local_repo.save("main", str(src))
    repo_path = Path(str(local_repo.repository))
    objects = stored_objects(repo_path)
    victim_object = repo_path / max(objects, key=lambda k: objects[k])
    assert objects[victim_object.relative_to(repo_path).as_posix()] > 256 << 10
    return {"rekkord": local_repo, "src": src, "snapshot": snapshot, "repo": repo_path, "tmp": tmp_path,
            "digest": tree_digest(repo_path), "victim_object": victim_object}


def unchanged(world: dict) -> None:
    assert tree_digest(world["repo"]) == world["digest"], "the repository changed"


def fails(world: dict, *args: str, fragments: tuple[str, ...] = (), **kwargs) -> str:
    line = assert_one_line_error(world["rekkord"](*args, check=False, **kwargs), *fragments)
    unchanged(world)
    return line


# --- configuration --------------------------------------------------------------------------


def test_missing_config_file(world: dict) -> None:
    missing = str(world["tmp"] / "missing.ini")
    fails(world, "-C", missing, "snapshots", fragments=("missing.ini", "does not exist"))
    fails(world, "save", "-C", missing, "main", str(world["src"]), fragments=("missing.ini",))
    # through REKKORD_CONFIG_FILE too
    env = {**os.environ, "REKKORD_CONFIG_FILE": missing, "REKKORD_CACHE_DIR": str(world["rekkord"].cache_dir),
           "PYTHONPATH": str(ROOT)}
    result = subprocess.run([*REKKORD, "snapshots"], capture_output=True, text=True, env=env)
    assert_one_line_error(result, "missing.ini")
    unchanged(world)


# Every kind of mistake is covered by tests/test_config.py; these go through the CLI.
GARBLED_CONFIGS = [
    (b"\x00\xff\xfe\x80\x81garbage\x00", "garbled.ini"),
    (b"URL = /somewhere\n", "malformed"),
    (b"[Repository]\nthis is not a setting\n", "malformed"),
    (b"[Backups]\nURL = /x\n", "unknown section"),
    (b"[Repository]\nURL = https://key:secret@s3.eu-west-3.amazonaws.com/b\n", "[S3]"),
    (b"[SFTP]\nPort = 99999\n", "port"),
]


def test_garbled_config(world: dict) -> None:
    ini = world["tmp"] / "garbled.ini"
    # without -R, so that the URL in the file is the one used
    rekkord = Rekkord(cache_dir=world["rekkord"].cache_dir, key_file=world["rekkord"].key_file)
    for content, fragment in GARBLED_CONFIGS:
        ini.write_bytes(content)
        args = ("save", "main", str(world["src"])) if fragment in ("malformed", "port") else ("snapshots",)
        line = assert_one_line_error(rekkord("-C", str(ini), *args, check=False), fragment)
        assert "secret" not in line
    unchanged(world)


def test_no_repository_or_key_given(world: dict, tmp_path: Path) -> None:
    bare = Rekkord(cache_dir=world["rekkord"].cache_dir)
    assert_one_line_error(bare("snapshots", check=False, key=str(world["rekkord"].key_file)), "-R")
    assert_one_line_error(bare("-R", str(world["repo"]), "snapshots", check=False), "-K")
    unchanged(world)


# --- keys ------------------------------------------------------------------------------------


def test_unknown_key_type(world: dict) -> None:
    out = world["tmp"] / "new.key"
    for kind in ("SuperUser", "Master", "", "read-write"):
        fails(world, "derive", "-t", kind, "-O", str(out), fragments=(kind,) if kind else ())
        assert not out.exists()


def test_derive_usage_errors(world: dict) -> None:
    result = world["rekkord"]("derive", "-t", "WriteOnly", check=False)  # no -O
    assert result.returncode == 2
    assert_one_line_error(result, "-O")
    result = world["rekkord"]("derive", "-O", str(world["tmp"] / "x.key"), check=False)  # no -t
    assert_one_line_error(result, "-t")
    assert not (world["tmp"] / "x.key").exists()
    unchanged(world)


def test_wrong_master_key(world: dict, tmp_path: Path) -> None:
    other = Rekkord(cache_dir=world["rekkord"].cache_dir, repository=str(tmp_path / "other-repo"))
    foreign = tmp_path / "foreign.key"
    other("init", "-K", str(foreign))
    dest = tmp_path / "dest"
    for args in (("snapshots",), ("save", "main", str(world["src"])), ("restore", "main", str(dest)),
                 ("check",)):
        fails(world, *args, key=str(foreign), fragments=("does not belong",))
    assert not dest.exists()
    # a derived key of the other repository too
    derived = tmp_path / "foreign-rw.key"
    other("derive", "-t", "ReadWrite", "-O", str(derived), key=str(foreign))
    fails(world, "save", "main", str(world["src"]), key=str(derived), fragments=("does not belong",))


def test_truncated_and_broken_keyfiles(world: dict, tmp_path: Path) -> None:
    raw = Path(str(world["rekkord"].key_file)).read_bytes()
    cases = {
        # (every cut and every flipped bit is covered by tests/test_keys.py; these go through the CLI)
        "half.key": raw[: len(raw) // 2],
        "header-only.key": raw[: raw.index(b"\n") + 1],
        "minus-four.key": raw.rstrip(b"\n")[:-4] + b"\n",
        "empty.key": b"",
        "flipped.key": raw[:60] + bytes([raw[60] ^ 0x02]) + raw[61:],
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        fails(world, "snapshots", key=str(path), fragments=(name,))
    fails(world, "save", "main", str(world["src"]), key=str(tmp_path / "half.key"), fragments=("half.key",))
    fails(world, "snapshots", key=str(tmp_path / "absent.key"), fragments=("absent.key", "does not exist"))
    fails(world, "snapshots", key=str(tmp_path), fragments=("directory",))


def test_init_never_overwrites_a_key_or_a_repository(world: dict, tmp_path: Path) -> None:
    rekkord = world["rekkord"]
    key_before = Path(str(rekkord.key_file)).read_bytes()
    fails(world, "init", "-K", str(rekkord.key_file), fragments=("overwrite",))
    assert Path(str(rekkord.key_file)).read_bytes() == key_before
    fresh_key = tmp_path / "fresh.key"
    fails(world, "init", "-K", str(fresh_key), fragments=("already exists",))
    assert not fresh_key.exists()  # no key for a repository that was not created


# --- the repository ------------------------------------------------------------------------------


def test_missing_repository(world: dict, tmp_path: Path) -> None:
    rekkord = world["rekkord"]
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    plain_file = tmp_path / "plain-file"
    plain_file.write_text("not a repository")
    for location, fragment, command in ((tmp_path / "nowhere", "nowhere", ("snapshots",)),
                                        (tmp_path / "nowhere", "nowhere", ("save", "main", str(world["src"]))),
                                        (empty, "empty-folder", ("save", "main", str(world["src"]))),
                                        (empty, "empty-folder", ("check",)),
                                        (plain_file, "plain-file", ("snapshots",))):
        result = rekkord("-R", str(location), *command, check=False)
        assert_one_line_error(result, fragment)
        assert not (tmp_path / "nowhere").exists()
        assert os.listdir(empty) == []
    unchanged(world)


def test_damaged_repository_identity(world: dict) -> None:
    identity = world["repo"] / "rekkord"
    original = identity.read_bytes()
    for damaged in (original[:20], b"", original[:-1] + bytes([original[-1] ^ 1]), b"x" * len(original)):
        identity.write_bytes(damaged)
        world["digest"] = tree_digest(world["repo"])
        fails(world, "snapshots", fragments=(str(world["repo"]),))
    identity.write_bytes(original)


# --- corrupted blobs --------------------------------------------------------------------------------


def flip_middle_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x10
    path.write_bytes(bytes(content))


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "delete"])
def test_corrupted_chunk(world: dict, damage: str) -> None:
    rekkord, src = world["rekkord"], world["src"]
    victim = world["victim_object"]
    assert victim.relative_to(world["repo"]).parts[0] == "packs"
    content = victim.read_bytes()
    if damage == "flip":
        flip_middle_byte(victim)
    elif damage == "truncate":
        victim.write_bytes(content[:len(content) - 100])
    elif damage == "empty":
        victim.write_bytes(b"")
    else:
        victim.unlink()
    world["digest"] = tree_digest(world["repo"])
    # check --read-data reports the file that uses the chunk
    result = rekkord("check", "--read-data", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert any("victim.bin" in line for line in result.stderr.splitlines()), result.stderr
    assert "bystander" not in result.stderr
    if damage == "delete":  # a missing chunk is found without reading data
        result = rekkord("check", check=False)
        assert result.returncode == 1 and "victim.bin" in result.stderr, result.stderr
    unchanged(world)
    # restoring that file fails clearly, naming it (a file restores as DEST itself)
    dest = world["tmp"] / "victim-restored"
    fails(world, "restore", f"main:{src}/victim.bin", str(dest), fragments=("victim-restored",))
    # so does restoring the whole tree
    fails(world, "restore", f"main:{src}", str(world["tmp"] / "tree"), fragments=("victim.bin",))
    # the rest is still restorable
    rekkord("restore", f"main:{src}/dir", str(world["tmp"] / "dir"))
    assert rsync_diff(src / "dir", world["tmp"] / "dir") == ""
    unchanged(world)


def test_corrupted_directory_record(world: dict) -> None:
    """A damaged directory record: check names the directory, list and restore fail in one line.

    A directory of thousands of long names has a record far larger than any other
    object that save writes, so it is found without knowing the storage layout."""
    rekkord, src = world["rekkord"], world["src"]
    big = src / "dir" / "crowded"
    big.mkdir()
    for index in range(3000):
        (big / (f"{index:05d}-" + os.urandom(90).hex())).touch()
    before = stored_objects(world["repo"])
    rekkord.save("crowd", str(src))
    added = {k: v for k, v in stored_objects(world["repo"]).items() if k not in before}
    record = world["repo"] / max(added, key=lambda k: added[k])
    flip_middle_byte(record)
    world["digest"] = tree_digest(world["repo"])
    result = rekkord("check", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert any("crowded" in line and "directory" in line for line in result.stderr.splitlines()), result.stderr
    fails(world, "list", f"crowd:{src}/dir/crowded")
    fails(world, "restore", f"crowd:{src}", str(world["tmp"] / "d"))
    # the older snapshot does not use that record and is intact
    rekkord("restore", f"main:{src}/dir", str(world["tmp"] / "older"))
    assert (world["tmp"] / "older" / "bystander.txt").is_file()


def test_corrupted_snapshot_record(world: dict) -> None:
    """Everything a re-save of an unchanged tree adds is its snapshot record: damage it."""
    rekkord = world["rekkord"]
    before = stored_objects(world["repo"])
    snapshot = rekkord.save("again", str(world["src"]))
    added = [k for k in stored_objects(world["repo"]) if k not in before]
    assert added
    for key in added:
        flip_middle_byte(world["repo"] / key)
    world["digest"] = tree_digest(world["repo"])
    result = rekkord("check", check=False)
    assert result.returncode == 1 and snapshot in result.stderr and "Traceback" not in result.stderr
    assert world["snapshot"] not in result.stderr  # the other snapshot is fine
    fails(world, "restore", snapshot, str(world["tmp"] / "d"), fragments=(snapshot,))
    fails(world, "list", "again", fragments=(snapshot,))
    # the LogOnly view still lists it: tags are separate from records
    assert snapshot in rekkord("snapshots").stdout


def test_damaged_pack_index(world: dict) -> None:
    """Small chunks are packed with an index per pack (docs/format.md). Readers do not
    need the index, but a damaged one is damaged storage, and check says so."""
    rekkord, src = world["rekkord"], world["src"]
    indexes = sorted((world["repo"] / "index").iterdir())
    assert indexes, "the small file of the fixture should have gone into a pack"
    flip_middle_byte(indexes[0])
    world["digest"] = tree_digest(world["repo"])
    result = rekkord("check", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert any(indexes[0].name in line and "damaged" in line for line in result.stderr.splitlines()), result.stderr
    unchanged(world)
    # the data is still all there
    rekkord("restore", f"main:{src}", str(world["tmp"] / "all"))
    assert rsync_diff(src, world["tmp"] / "all") == ""


# --- hostile records --------------------------------------------------------------------------------


def publish_crafted(world: dict, channel: str, entries: list) -> str:
    """A correctly signed snapshot whose root holds the given entries (as any writer,
    even a WriteOnly key, could make), written with the library."""
    import time

    import trio

    from rekkordfs import keys
    from rekkordfs.format import BlobKind, Snapshot, encode_directory
    from rekkordfs.repository import Repository
    from rekkordfs.storage.local import LocalStorage

    async def main() -> str:
        keyset = keys.load_keyfile(str(world["rekkord"].key_file))
        repo = await Repository.open(LocalStorage(str(world["repo"])), keyset)
        try:
            root_id, _ = await repo.write_blob(BlobKind.DIRECTORY, encode_directory(entries))
            tag = await repo.publish_snapshot(Snapshot(channel, time.time_ns(), root_id, 0, 0, len(entries)), set())
            return tag.id_hex
        finally:
            await repo.aclose()

    return trio.run(main)


@pytest.mark.parametrize("case", ["xattr-nul", "xattr-empty", "symlink-nul", "symlink-empty"])
def test_impossible_names_in_records(world: dict, case: str) -> None:
    """Names no filesystem can hold are refused as damaged records, not a traceback."""
    from rekkordfs.format import Entry, EntryKind
    entry = {
        "xattr-nul": Entry(EntryKind.FILE, b"f", xattrs=[(b"user.a\0b", b"v")]),
        "xattr-empty": Entry(EntryKind.FILE, b"f", xattrs=[(b"", b"v")]),
        "symlink-nul": Entry(EntryKind.SYMLINK, b"l", target=b"a\0b"),
        "symlink-empty": Entry(EntryKind.SYMLINK, b"l", target=b""),
    }[case]
    snapshot = publish_crafted(world, case, [entry])
    world["digest"] = tree_digest(world["repo"])
    dest = world["tmp"] / "dest"
    fails(world, "restore", snapshot, str(dest), fragments=("malformed",))
    fails(world, "list", snapshot, fragments=("malformed",))
    result = world["rekkord"]("check", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert any(snapshot in line and "malformed" in line for line in result.stderr.splitlines()), result.stderr


def test_xattr_the_destination_cannot_hold(world: dict) -> None:
    """An attribute too large for the destination filesystem: a warning naming the file and
    the attribute, and the rest of the restore goes on (as rsync -X does)."""
    from rekkordfs.format import Entry, EntryKind
    entries = [Entry(EntryKind.FILE, b"a-file", xattrs=[(b"user.huge", b"v" * 100_000), (b"user.fine", b"ok")]),
               Entry(EntryKind.FIFO, b"b-fifo", mode=0o600, xattrs=[(b"user.huge", b"v" * 100_000)])]
    snapshot = publish_crafted(world, "big-xattr", entries)
    dest = world["tmp"] / "dest"
    result = world["rekkord"]("restore", snapshot, str(dest), check=False)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    warnings = result.stderr.splitlines()
    assert len(warnings) == 2 and all(w.startswith("rekkord: warning: ") and "user.huge" in w for w in warnings)
    assert "a-file" in warnings[0] + warnings[1] and "b-fifo" in warnings[0] + warnings[1]
    assert os.getxattr(dest / "a-file", "user.fine") == b"ok"
    assert (dest / "b-fifo").exists()
    assert oct(os.stat(dest / "b-fifo", follow_symlinks=False).st_mode & 0o777) == "0o600"


def test_os_errors_on_descriptors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """OSError.filename is an int for calls on a file descriptor; reporting one must not crash."""
    import errno

    from rekkordfs.cli.main import _report
    assert _report(OSError(errno.EIO, "Input/output error", 7)) == 1
    assert _report(OSError(errno.ENOSPC, "No space left on device", b"/some/path")) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["rekkord: error: Input/output error", "rekkord: error: No space left on device '/some/path'"]


# --- command line mistakes ---------------------------------------------------------------------------


def test_restore_into_non_empty_destination(world: dict) -> None:
    dest = world["tmp"] / "dest"
    dest.mkdir()
    (dest / "precious").write_text("mine")
    before = tree_digest(dest)
    fails(world, "restore", f"main:{world['src']}", str(dest), fragments=("not empty", "--force"))
    assert tree_digest(dest) == before
    fails(world, "restore", "--delete", "-n", f"main:{world['src']}", str(world["tmp"] / "dest" / "precious"),
          fragments=("not a folder",))
    assert tree_digest(dest) == before


def test_bad_names_and_paths(world: dict) -> None:
    src = world["src"]
    dest = world["tmp"] / "dest"
    fails(world, "restore", "no-such-channel", str(dest), fragments=("no-such-channel",))
    fails(world, "restore", f"main:{src}/no/such/path", str(dest), fragments=("no/such/path",))
    fails(world, "restore", "0000000000", str(dest), fragments=("0000000000",))
    fails(world, "restore", ":/tmp", str(dest))
    fails(world, "list", f"main:{src}/victim.bin/inside", fragments=("does not exist",))
    fails(world, "save", "bad/channel", str(src), fragments=("channel",))
    fails(world, "save", "bad:channel", str(src), fragments=("channel",))
    fails(world, "save", "x" * 65, str(src), fragments=("channel",))
    fails(world, "save", "main", str(world["tmp"] / "does-not-exist"), fragments=("does-not-exist",))
    assert not dest.exists()


USAGE_ERRORS = [("bogus",), ("save", "main"), ("restore", "main"), ("snapshots", "-f", "xml"),
                ("-j", "0", "snapshots"), ("check", "--read-everything")]


def test_usage_errors(world: dict) -> None:
    for args in USAGE_ERRORS:
        result = world["rekkord"](*args, check=False)
        assert result.returncode in (1, 2), args
        assert_one_line_error(result)
    result = world["rekkord"](check=False)  # no command: help on stderr, exit 2
    assert result.returncode == 2 and "usage" in result.stderr and "Traceback" not in result.stderr
    unchanged(world)
