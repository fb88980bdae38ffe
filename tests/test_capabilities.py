"""Key capabilities through the real CLI, their cryptographic basis, and forged snapshots."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from rekkordfs import crypto, keys
from rekkordfs.codec import BlobCodec, snapshot_key
from rekkordfs.errors import RekkordError
from rekkordfs.format import PACK_ID_SIZE, BlobKind, Tag
from rekkordfs.keys import KeyType, Signer
from rekkordfs.repository import Repository
from rekkordfs.snapshotlog import tag_key
from rekkordfs.storage.local import LocalStorage
from tests.conftest import Rekkord
from tests.fsutil import assert_one_line_error, rsync_diff, tree_digest


@pytest.fixture
def setup(local_repo: Rekkord, tmp_path: Path) -> dict:
    """A repository with one snapshot, and one keyfile of each derived type."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "file.txt").write_bytes(b"capability test " * 1000)
    (src / "sub" / "data.bin").write_bytes(os.urandom(200_000))
    snapshot = local_repo.save("base", str(src))
    paths = {}
    master = keys.load_keyfile(str(local_repo.key_file))
    for kind in (KeyType.READ_WRITE, KeyType.WRITE_ONLY, KeyType.LOG_ONLY):
        # in-process to keep the tests quick; `rekkord derive` has its own test below
        paths[kind.label] = str(tmp_path / f"{kind.label}.key")
        keys.write_keyfile(paths[kind.label], keys.derive(master, kind))
    return {"repo": local_repo, "src": src, "snapshot": snapshot, "keys": paths, "tmp": tmp_path,
            "repo_path": Path(str(local_repo.repository))}


# --- the capability table through the CLI ------------------------------------------------


def test_write_only(setup: dict) -> None:
    rekkord, src, key = setup["repo"], setup["src"], setup["keys"]["WriteOnly"]
    (src / "new.txt").write_text("written by a WriteOnly key")
    snapshot = rekkord.save("wo", str(src), key=key)
    assert len(snapshot) == 64
    identity = json.loads(rekkord("identify", "-f", "json", key=key).stdout)
    assert identity["type"] == "WriteOnly"
    before = tree_digest(setup["repo_path"])
    dest = setup["tmp"] / "dest"
    refused = {
        "restore": ("restore", f"wo:{src}", str(dest)),
        "restore by ID": ("restore", snapshot, str(dest)),
        "list": ("list", snapshot),
        "snapshots": ("snapshots",),
        "channels": ("channels",),
        "check": ("check",),
        "derive": ("derive", "-t", "LogOnly", "-O", str(setup["tmp"] / "x.key")),
    }
    for what, args in refused.items():
        result = rekkord(*args, key=key, check=False)
        line = assert_one_line_error(result, "WriteOnly")
        assert "decrypt" not in line.lower() and "authentication" not in line.lower(), (what, line)
    assert not dest.exists() and not (setup["tmp"] / "x.key").exists()
    assert tree_digest(setup["repo_path"]) == before
    # what it wrote is a real snapshot: the master key restores it
    rekkord("restore", f"{snapshot}:{src}", str(dest))
    assert rsync_diff(src, dest) == ""


def test_log_only(setup: dict) -> None:
    rekkord, src, key = setup["repo"], setup["src"], setup["keys"]["LogOnly"]
    listed = json.loads(rekkord("snapshots", "-f", "json", key=key).stdout)
    assert [s["id"] for s in listed] == [setup["snapshot"]]
    assert listed[0]["channel"] == "base" and listed[0]["size"] == 216_000
    channels = json.loads(rekkord("channels", "-f", "json", key=key).stdout)
    assert [(c["channel"], c["latest"]) for c in channels] == [("base", setup["snapshot"])]
    before = tree_digest(setup["repo_path"])
    dest = setup["tmp"] / "dest"
    refused = [
        ("restore", f"base:{src}", str(dest)),
        ("restore", setup["snapshot"], str(dest)),
        ("list", "base"),
        ("list", f"base:{src}", "-r"),
        ("save", "lo", str(src)),
        ("check",),
        ("derive", "-t", "WriteOnly", "-O", str(setup["tmp"] / "x.key")),
    ]
    for args in refused:
        assert_one_line_error(rekkord(*args, key=key, check=False), "LogOnly")
    assert not dest.exists() and not (setup["tmp"] / "x.key").exists()
    assert tree_digest(setup["repo_path"]) == before


def test_read_write(setup: dict) -> None:
    rekkord, src, key = setup["repo"], setup["src"], setup["keys"]["ReadWrite"]
    snapshot = rekkord.save("rw", str(src), key=key)
    dest = setup["tmp"] / "dest"
    rekkord("restore", f"{snapshot}:{src}", str(dest), key=key)
    assert rsync_diff(src, dest) == ""
    assert snapshot in rekkord("snapshots", key=key).stdout
    assert "file.txt" in rekkord("list", f"rw:{src}", key=key).stdout
    rekkord("check", "--read-data", key=key)
    for kind in ("ReadWrite", "WriteOnly", "LogOnly"):
        out = setup["tmp"] / f"from-rw-{kind}.key"
        assert_one_line_error(rekkord("derive", "-t", kind, "-O", str(out), key=key, check=False), "ReadWrite")
        assert not out.exists()


def test_derive_command(setup: dict) -> None:
    rekkord = setup["repo"]
    master_id = json.loads(rekkord("identify", "-f", "json").stdout)
    assert master_id["type"] == "Master"
    for label in ("ReadWrite", "writeonly", "LOGONLY"):  # type names are case-insensitive
        out = setup["tmp"] / f"cli-{label}.key"
        rekkord("derive", "-t", label, "-O", str(out))
        assert (os.stat(out).st_mode & 0o777) == 0o600
        derived = keys.load_keyfile(str(out))
        assert derived.kind.label.lower() == label.lower() and derived.master is None
        assert derived.master_public.hex() == master_id["master"]
    identity = json.loads(rekkord("identify", "-f", "json", key=str(setup["tmp"] / "cli-LOGONLY.key")).stdout)
    assert identity["type"] == "LogOnly" and identity["id"] != master_id["id"]
    assert identity["master"] == master_id["master"]
    plain = rekkord("identify", key=str(setup["tmp"] / "cli-writeonly.key")).stdout
    assert "WriteOnly" in plain and keys.load_keyfile(str(setup["tmp"] / "cli-writeonly.key")).id_hex in plain
    out = setup["tmp"] / "cli-writeonly.key"
    # never overwrites
    before = out.read_bytes()
    assert_one_line_error(rekkord("derive", "-t", "LogOnly", "-O", str(out), check=False), "overwrite")
    assert out.read_bytes() == before


# --- cryptographic enforcement ---------------------------------------------------------------


def _keyfile_windows(path: str) -> list[bytes]:
    raw = Path(path).read_bytes()
    lines = [line for line in raw.splitlines() if line and not line.startswith(b"#")]
    body = base64.b64decode(b"".join(lines))
    return [body[i:i + 32] for i in range(len(body) - 31)]


def _stored_objects(repo_path: Path, master: keys.Keyset) -> tuple[list[tuple[BlobKind, bytes, bytes]], list[bytes]]:
    """Every sealed blob as (kind, pack ID, sealed bytes), cut out of packs with
    their indexes or read from snapshot records, and every sealed tag."""
    blobs: list[tuple[BlobKind, bytes, bytes]] = []
    for record in (repo_path / "snapshots").iterdir():
        raw = record.read_bytes()
        blobs.append((BlobKind.SNAPSHOT, raw[:PACK_ID_SIZE], raw[PACK_ID_SIZE:]))
    codec = BlobCodec(master, b"")
    for index in (repo_path / "index").iterdir():
        opened, _ = codec.open_index(index.read_bytes())
        pack = (repo_path / "packs" / opened.pack.hex()[:2] / opened.pack.hex()).read_bytes()
        for _blob_id, kind, location in opened.entries:
            blobs.append((kind, opened.pack, pack[location.offset:location.offset + location.length]))
    tags = []
    for p in (repo_path / "tags").rglob("*"):
        if p.is_file():
            name = str(p.relative_to(repo_path / "tags")).replace("/", "")
            tags.append(base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)))
    return blobs, tags


def _opens_anything(window: bytes, data_public: bytes, log_public: bytes, blobs: list[tuple[BlobKind, bytes, bytes]],
                    tags: list[bytes]) -> bool:
    opener = crypto.PackOpener(window)
    for _kind, pack_id, blob in blobs:
        try:
            opener.open(pack_id, blob)
            return True
        except RekkordError:
            pass
    for sealed in tags:
        for public in (data_public, log_public, crypto.x25519_public(window)):
            try:
                crypto.open_sealed(public, window, sealed)
                return True
            except RekkordError:
                pass
    return False


@pytest.mark.parametrize("kind", ["WriteOnly", "LogOnly"])
def test_restricted_keyfiles_cannot_decrypt_data(setup: dict, kind: str) -> None:
    """No 32-byte string anywhere in a WriteOnly (or LogOnly) keyfile decrypts a stored blob
    (chunk, directory or snapshot record); none in a WriteOnly keyfile opens a snapshot tag.
    The refusal is cryptographic, not a check in our code."""
    key_path = setup["keys"][kind]
    restricted = keys.load_keyfile(key_path)
    master = keys.load_keyfile(str(setup["repo"].key_file))
    blobs, tags = _stored_objects(setup["repo_path"], master)
    assert len(tags) == 1
    kinds = [kind for kind, _, _ in blobs]
    assert kinds.count(BlobKind.CHUNK) >= 2 and kinds.count(BlobKind.DIRECTORY) >= 2
    assert kinds.count(BlobKind.SNAPSHOT) == 1
    # the test can tell success from failure: the master's data secret opens every one
    for blob in blobs:
        assert _opens_anything(master.data_secret, master.data_public, master.log_public, [blob], [])  # type: ignore[arg-type]
    check_tags = tags if kind == "WriteOnly" else []  # LogOnly is meant to open tags
    for window in _keyfile_windows(key_path):
        assert not _opens_anything(window, restricted.data_public, restricted.log_public, blobs, check_tags)
    if kind == "LogOnly":
        assert restricted.log_secret is not None
        assert crypto.open_sealed(restricted.log_public, restricted.log_secret, tags[0])


def test_bypassing_the_capability_check_does_not_help(setup: dict) -> None:
    """A WriteOnly keyset relabelled as Master still cannot read: it lacks the secrets."""
    write_only = keys.load_keyfile(setup["keys"]["WriteOnly"])
    forged = dataclasses.replace(write_only, kind=KeyType.MASTER)
    tag = run_with_repo(setup, str(setup["repo"].key_file), latest_tag)

    async def attempt() -> list[str]:
        failures = []
        storage = LocalStorage(str(setup["repo_path"]))
        repo = await Repository.open(storage, forged)
        try:
            for name, action in (
                ("read snapshot", lambda: repo.load_snapshot(tag)),
                ("list tags", lambda: repo.list_tags()),
            ):
                try:
                    await action()
                except (RekkordError, AssertionError, TypeError) as exc:
                    failures.append(f"{name}: {type(exc).__name__}")
        finally:
            await repo.aclose()
        return failures

    assert len(trio.run(attempt)) == 2


# --- forged and uncertified tags -----------------------------------------------------------------


def run_with_repo(setup: dict, key_path: str, action: Callable[[Repository], Awaitable[object]]) -> object:
    async def main() -> object:
        storage = LocalStorage(str(setup["repo_path"]))
        repo = await Repository.open(storage, keys.load_keyfile(key_path))
        try:
            return await action(repo)
        finally:
            await repo.aclose()

    return trio.run(main)


async def latest_tag(repo: Repository) -> Tag:
    return (await repo.list_tags())[-1]


async def put_tag(repo: Repository, tag: Tag, record_from: Tag | None = None) -> str:
    """Store a tag exactly as given (no re-signing) and, when record_from is
    given, a copy of that snapshot's record under the new tag's name: what
    anyone who can write to the storage can do."""
    if record_from is not None:
        raw = await repo.storage.get(snapshot_key(record_from.snapshot_id))
        await repo.storage.put(snapshot_key(tag.snapshot_id), raw)
    await repo.storage.put(tag_key(crypto.seal_to(repo.keys.log_public, tag.encode())), b"")
    return tag.id_hex


def signed(tag: Tag, key: keys.Keyset, repo: Repository) -> Tag:
    tag = dataclasses.replace(tag, signer=key.signer)
    return dataclasses.replace(tag, signature=key.sign(tag.signature_message(repo.config.repo_id)))


def assert_check_reports(setup: dict, snapshot_hex: str, *fragments: str, listed: bool = False) -> None:
    rekkord = setup["repo"]
    result = rekkord("check", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if snapshot_hex in line]
    assert lines, f"check did not name snapshot {snapshot_hex}:\n{result.stderr}"
    for fragment in fragments:
        assert any(fragment in line for line in lines), (fragment, lines)
    # the forged snapshot cannot be used either, and listings name it without failing
    listing = rekkord("snapshots", "-f", "json", check=False)
    assert listing.returncode == (0 if listed else 3), listing.stderr
    assert (snapshot_hex in listing.stdout) == listed
    assert listed or snapshot_hex in listing.stderr
    dest = setup["tmp"] / "forged-dest"
    assert_one_line_error(rekkord("restore", snapshot_hex, str(dest), check=False), snapshot_hex)
    assert not dest.exists()
    assert_one_line_error(rekkord("list", snapshot_hex, check=False), snapshot_hex)
    # and the genuine snapshot is still fine, and still the newest of its channel
    good = rekkord("restore", f"base:{setup['src']}", str(setup["tmp"] / "genuine"))
    assert good.returncode == 0
    assert rsync_diff(setup["src"], setup["tmp"] / "genuine") == ""
    channels = json.loads(rekkord("channels", "-f", "json", check=False).stdout)
    assert {c["channel"]: c["latest"] for c in channels}["base"] == setup["snapshot"]


def test_clean_repository_checks(setup: dict) -> None:
    result = setup["repo"]("check", "--read-data")
    assert "No problems found" in result.stdout


def test_forged_signature_reported(setup: dict) -> None:
    """A tag altered after signing (here: its file count and time)."""
    async def forge(repo: Repository) -> str:
        genuine = await latest_tag(repo)
        return await put_tag(repo, dataclasses.replace(genuine, files=genuine.files + 1000,
                                                       time_ns=genuine.time_ns + 1), record_from=genuine)

    forged = run_with_repo(setup, str(setup["repo"].key_file), forge)
    assert_check_reports(setup, forged, "invalid signature")


def test_zeroed_signature_reported(setup: dict) -> None:
    async def forge(repo: Repository) -> str:
        genuine = await latest_tag(repo)
        return await put_tag(repo, dataclasses.replace(genuine, channel="base", time_ns=genuine.time_ns + 10**9,
                                                       signature=bytes(64)), record_from=genuine)

    forged = run_with_repo(setup, str(setup["repo"].key_file), forge)
    assert_check_reports(setup, forged, "invalid signature")


@pytest.mark.parametrize("claim", [KeyType.WRITE_ONLY, KeyType.MASTER])
def test_uncertified_signer_reported(setup: dict, claim: KeyType) -> None:
    """Correctly signed, but by a key another master certified (for this repository's public keys)."""
    other_master = keys.new_master()

    async def forge(repo: Repository) -> str:
        genuine = await latest_tag(repo)
        sign_key = crypto.signing_key(os.urandom(32))
        key_id = repo.keys.key_id if claim == KeyType.MASTER else os.urandom(keys.KEY_ID_SIZE)
        payload = keys.certificate_payload(claim, key_id, bytes(sign_key.verify_key),
                                           repo.keys.data_public, repo.keys.log_public)
        certificate = keys.master_signing_key(other_master.master).sign(payload).signature  # type: ignore[arg-type]
        tag = dataclasses.replace(genuine, channel="base", time_ns=genuine.time_ns + 10**9,
                                  signer=Signer(claim, key_id, bytes(sign_key.verify_key), certificate))
        tag = dataclasses.replace(tag, signature=sign_key.sign(tag.signature_message(repo.config.repo_id)).signature)
        assert crypto.verify_signature(tag.signer.sign_public, tag.signature_message(repo.config.repo_id),
                                       tag.signature)
        return await put_tag(repo, tag, record_from=genuine)

    forged = run_with_repo(setup, str(setup["repo"].key_file), forge)
    assert_check_reports(setup, forged, "did not certify")


def test_log_only_signer_reported(setup: dict) -> None:
    """A LogOnly key is certified, but may not sign snapshots."""
    log_only = keys.load_keyfile(setup["keys"]["LogOnly"])

    async def forge(repo: Repository) -> str:
        genuine = await latest_tag(repo)
        tag = signed(dataclasses.replace(genuine, time_ns=genuine.time_ns + 10**9), log_only, repo)
        return await put_tag(repo, tag, record_from=genuine)

    forged = run_with_repo(setup, str(setup["repo"].key_file), forge)
    assert_check_reports(setup, forged, "LogOnly key, which may not write")


def test_key_from_another_master_is_refused(setup: dict, tmp_path: Path) -> None:
    """A keyfile derived from another master, patched to name this repository's keys,
    fails its certificate check; unpatched, it does not belong to the repository."""
    rekkord = setup["repo"]
    other = Rekkord(cache_dir=rekkord.cache_dir, repository=str(tmp_path / "other-repo"))
    other_master = tmp_path / "other-master.key"
    other("init", "-K", str(other_master))
    foreign = tmp_path / "foreign-write.key"
    other("derive", "-t", "WriteOnly", "-O", str(foreign), key=str(other_master))
    before = tree_digest(setup["repo_path"])
    assert_one_line_error(rekkord("save", "x", str(setup["src"]), key=str(foreign), check=False),
                          "does not belong")
    ours = keys.load_keyfile(str(rekkord.key_file))
    derived = keys.load_keyfile(str(foreign))
    patched = dataclasses.replace(derived, master_public=ours.master_public, data_public=ours.data_public,
                                  log_public=ours.log_public)
    patched_path = tmp_path / "patched.key"
    patched_path.write_bytes(keys.encode_keyfile(patched))
    assert_one_line_error(rekkord("save", "x", str(setup["src"]), key=str(patched_path), check=False),
                          "certificate")
    assert tree_digest(setup["repo_path"]) == before


def test_tag_relabelling_another_snapshot_reported(setup: dict) -> None:
    """A WriteOnly key signs a tag that relabels the genuine snapshot's record as
    the newest of another channel, dated in the future (it copies the record
    object, as any storage writer can): readers refuse it, and it never
    becomes `latest`."""
    write_only = keys.load_keyfile(setup["keys"]["WriteOnly"])

    async def forge(repo: Repository) -> str:
        genuine = await latest_tag(repo)
        lie = signed(dataclasses.replace(genuine, channel="base", time_ns=genuine.time_ns + 3600 * 10**9),
                     write_only, repo)
        return await put_tag(repo, lie, record_from=genuine)

    forged = run_with_repo(setup, str(setup["repo"].key_file), forge)
    result = setup["repo"]("check", check=False)
    assert result.returncode == 1
    assert any(forged in line and "does not match" in line for line in result.stderr.splitlines()), result.stderr
    dest = setup["tmp"] / "relabelled"
    assert_one_line_error(setup["repo"]("restore", forged, str(dest), check=False), "does not match")
    assert not dest.exists()
    channels = setup["repo"]("channels", "-f", "json", check=False)
    assert channels.returncode == 3 and forged in channels.stderr
    assert {c["channel"]: c["latest"] for c in json.loads(channels.stdout)}["base"] == setup["snapshot"]
    setup["repo"]("restore", f"base:{setup['src']}", str(dest))  # the channel's newest usable snapshot
    assert rsync_diff(setup["src"], dest) == ""


def test_write_only_snapshot_is_certified(setup: dict) -> None:
    """Snapshots written with a derived key carry that key's certified signature."""
    rekkord = setup["repo"]
    rekkord.save("wo", str(setup["src"]), key=setup["keys"]["WriteOnly"])
    rekkord.save("rw", str(setup["src"]), key=setup["keys"]["ReadWrite"])
    result = rekkord("check")
    assert "Checked 3 snapshots" in result.stdout and "No problems found" in result.stdout
    listed = json.loads(rekkord("snapshots", "-f", "json", key=setup["keys"]["LogOnly"]).stdout)
    assert sorted(s["key"]["type"] for s in listed) == ["Master", "ReadWrite", "WriteOnly"]
