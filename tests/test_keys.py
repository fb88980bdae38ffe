"""Keyfiles: encoding round trips, what each type holds, file safety, tampering."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import pytest

from rekkordfs import crypto, keys
from rekkordfs.codec import BlobCodec
from rekkordfs.errors import CapabilityError, CorruptedData, KeyFileError
from rekkordfs.format import BlobKind
from rekkordfs.keys import Capability, KeyType

DERIVED = [KeyType.READ_WRITE, KeyType.WRITE_ONLY, KeyType.LOG_ONLY]


@pytest.fixture(scope="module")
def master() -> keys.Keyset:
    return keys.new_master()


def body_of(raw: bytes) -> bytes:
    """The base64-decoded payload of a keyfile (what decode_keyfile parses)."""
    lines = [line.strip() for line in raw.splitlines() if line.strip() and not line.startswith(b"#")]
    return base64.b64decode(b"".join(lines))


def rebuild(body: bytes, fix_checksum: bool = True) -> bytes:
    """A keyfile around a (tampered) body, optionally with a valid checksum."""
    if fix_checksum:
        content = body[:-keys.CHECKSUM_SIZE]
        body = content + hashlib.blake2b(content, digest_size=keys.CHECKSUM_SIZE).digest()
    return b"# rekkord key\n" + base64.b64encode(body) + b"\n"


def secrets_of(master: keys.Keyset) -> dict[str, bytes]:
    """Every master-side secret that must never leave the master keyfile."""
    assert master.master and master.data_secret and master.log_secret
    return {
        "master key": master.master,
        "data secret": master.data_secret,
        "log secret": master.log_secret,
        "master signing seed": crypto.kdf(master.master, b"master-sign"),
        "master signing key": bytes(keys.master_signing_key(master.master)),
    }


def contains(haystack: bytes, needle: bytes) -> bool:
    """Whether needle appears in haystack, raw or in any base64/hex form of the file."""
    return needle in haystack or needle.hex().encode() in haystack.lower()


# --- round trips --------------------------------------------------------------------


def test_master_round_trip(master: keys.Keyset, tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    keys.write_keyfile(path, master)
    loaded = keys.load_keyfile(path)
    assert loaded == master
    assert loaded.kind == KeyType.MASTER and loaded.master == master.master
    assert loaded.signer.is_certified(master.master_public, master.data_public, master.log_public)
    # derived from the 32 bytes alone: the same master gives the same keyset
    assert keys.keyset_from_master(master.master) == master  # type: ignore[arg-type]
    assert path.read_bytes().startswith(f"# rekkord Master key {master.id_hex}".encode())


@pytest.mark.parametrize("kind", DERIVED, ids=lambda k: k.label)
def test_derived_round_trip(master: keys.Keyset, kind: KeyType, tmp_path: Path) -> None:
    derived = keys.derive(master, kind)
    path = tmp_path / f"{kind.label}.key"
    keys.write_keyfile(path, derived)
    loaded = keys.load_keyfile(path)
    assert loaded.kind == kind
    assert loaded.key_id == derived.key_id and loaded.key_id != master.key_id
    assert bytes(loaded.sign_key) == bytes(derived.sign_key)
    assert bytes(loaded.sign_key.verify_key) != bytes(master.sign_key.verify_key)
    assert loaded.certificate == derived.certificate
    assert (loaded.master_public, loaded.data_public, loaded.log_public) == (
        master.master_public, master.data_public, master.log_public)
    assert (loaded.id_key, loaded.chunk_seed, loaded.data_secret, loaded.log_secret, loaded.master) == (
        derived.id_key, derived.chunk_seed, derived.data_secret, derived.log_secret, None)
    assert loaded.signer.is_certified(master.master_public, master.data_public, master.log_public)
    # a signature made with the loaded key verifies with the public key its certificate names
    message = b"a snapshot record"
    assert crypto.verify_signature(loaded.signer.sign_public, message, loaded.sign(message))


def test_two_derivations_differ(master: keys.Keyset) -> None:
    a = keys.derive(master, KeyType.WRITE_ONLY)
    b = keys.derive(master, KeyType.WRITE_ONLY)
    assert a.key_id != b.key_id and bytes(a.sign_key) != bytes(b.sign_key)
    # but they write compatible blobs: same blob-id key and chunking seed
    assert a.id_key == b.id_key == master.id_key and a.chunk_seed == b.chunk_seed == master.chunk_seed


# --- what each keyfile holds -----------------------------------------------------------


def test_write_only_holds_no_reading_secret(master: keys.Keyset, tmp_path: Path) -> None:
    path = tmp_path / "write.key"
    keys.write_keyfile(path, keys.derive(master, KeyType.WRITE_ONLY))
    raw = path.read_bytes()
    loaded = keys.load_keyfile(path)
    assert loaded.data_secret is None and loaded.log_secret is None and loaded.master is None
    assert loaded.id_key is not None and loaded.chunk_seed is not None  # what writing needs
    body = body_of(raw)
    for name, secret in secrets_of(master).items():
        assert not contains(raw, secret), f"WriteOnly keyfile text contains the {name}"
        assert not contains(body, secret), f"WriteOnly keyfile contains the {name}"
    # No 32-byte window of the file is a secret matching the repository's public keys.
    for start in range(len(body) - crypto.KEY_SIZE + 1):
        window = body[start:start + crypto.KEY_SIZE]
        assert crypto.x25519_public(window) not in (master.data_public, master.log_public), (
            f"bytes {start}..{start + 32} of the WriteOnly keyfile are a secret key")
    assert {c for c in Capability if loaded.can(c)} == {Capability.WRITE}


def test_log_only_holds_no_data_secret_nor_blob_id_key(master: keys.Keyset, tmp_path: Path) -> None:
    path = tmp_path / "log.key"
    keys.write_keyfile(path, keys.derive(master, KeyType.LOG_ONLY))
    raw = path.read_bytes()
    loaded = keys.load_keyfile(path)
    assert loaded.data_secret is None and loaded.id_key is None and loaded.chunk_seed is None
    assert loaded.master is None
    assert loaded.log_secret == master.log_secret  # what listing snapshots needs
    body = body_of(raw)
    secrets = secrets_of(master)
    del secrets["log secret"]
    secrets["blob-id key"] = master.id_key  # type: ignore[assignment]
    for name, secret in secrets.items():
        assert not contains(body, secret) and not contains(raw, secret), f"LogOnly keyfile contains the {name}"
    for start in range(len(body) - crypto.KEY_SIZE + 1):
        assert crypto.x25519_public(body[start:start + crypto.KEY_SIZE]) != master.data_public
    assert {c for c in Capability if loaded.can(c)} == {Capability.LIST}


def test_read_write_holds_no_master_secret(master: keys.Keyset, tmp_path: Path) -> None:
    path = tmp_path / "rw.key"
    keys.write_keyfile(path, keys.derive(master, KeyType.READ_WRITE))
    raw = path.read_bytes()
    loaded = keys.load_keyfile(path)
    assert loaded.master is None
    assert loaded.data_secret == master.data_secret and loaded.log_secret == master.log_secret
    body = body_of(raw)
    for name in ("master key", "master signing seed", "master signing key"):
        assert not contains(body, secrets_of(master)[name]), f"ReadWrite keyfile contains the {name}"
    assert {c for c in Capability if loaded.can(c)} == {Capability.LIST, Capability.READ, Capability.WRITE,
                                                         Capability.FORGET}
    with pytest.raises(CapabilityError, match="ReadWrite"):
        keys.derive(loaded, KeyType.WRITE_ONLY)


@pytest.mark.parametrize("kind", DERIVED, ids=lambda k: k.label)
def test_derived_keys_cannot_derive(master: keys.Keyset, kind: KeyType) -> None:
    derived = keys.derive(master, kind)
    with pytest.raises(CapabilityError) as info:
        keys.derive(derived, KeyType.LOG_ONLY)
    assert kind.label in info.value.message


def test_master_cannot_be_derived(master: keys.Keyset) -> None:
    with pytest.raises(KeyFileError):
        keys.derive(master, KeyType.MASTER)


def test_key_type_labels() -> None:
    assert KeyType.from_label("writeonly") == KeyType.WRITE_ONLY
    assert KeyType.from_label("ReadWrite") == KeyType.READ_WRITE
    assert KeyType.from_label("LogOnly") == KeyType.LOG_ONLY
    with pytest.raises(KeyFileError, match="SuperUser"):
        KeyType.from_label("SuperUser")


# --- files ----------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_keyfiles_are_0600(master: keys.Keyset, tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        keys.write_keyfile(tmp_path / "master.key", master)
        keys.write_keyfile(tmp_path / "write.key", keys.derive(master, KeyType.WRITE_ONLY))
    finally:
        os.umask(old)
    for name in ("master.key", "write.key"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600


def test_refuses_to_overwrite(master: keys.Keyset, tmp_path: Path) -> None:
    path = tmp_path / "existing.key"
    path.write_bytes(b"precious")
    with pytest.raises(KeyFileError, match="overwrite"):
        keys.write_keyfile(path, master)
    assert path.read_bytes() == b"precious"
    # nor through a symlink, even a dangling one
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "target.key")
    with pytest.raises(KeyFileError):
        keys.write_keyfile(link, master)
    assert not (tmp_path / "target.key").exists()


def test_unwritable_location(master: keys.Keyset, tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot create"):
        keys.write_keyfile(tmp_path / "missing-folder" / "master.key", master)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        keys.load_keyfile(tmp_path / "missing.key")
    with pytest.raises(KeyFileError, match="directory"):
        keys.load_keyfile(tmp_path)


# --- damaged and tampered keyfiles --------------------------------------------------------


@pytest.mark.parametrize("kind", [KeyType.MASTER, *DERIVED], ids=lambda k: k.label)
def test_truncated_keyfiles(master: keys.Keyset, kind: KeyType, tmp_path: Path) -> None:
    keyset = master if kind == KeyType.MASTER else keys.derive(master, kind)
    raw = keys.encode_keyfile(keyset)
    header_end = raw.index(b"\n") + 1
    cuts = {0, header_end, header_end + 1, header_end + 4, header_end + 8, len(raw) // 2,
            len(raw) - 6, len(raw) - 5, len(raw) - 2}
    for cut in sorted(cuts):
        with pytest.raises(KeyFileError):
            keys.decode_keyfile(raw[:cut], "cut.key")
    # cut at a base64 group boundary, so that only the length betrays it
    body = body_of(raw)
    for size in range(0, len(body), 3):
        with pytest.raises(KeyFileError):
            keys.decode_keyfile(base64.b64encode(body[:size]), "cut.key")
    # and the same through a file
    path = tmp_path / "truncated.key"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(KeyFileError, match="truncated.key"):
        keys.load_keyfile(path)


@pytest.mark.parametrize("kind", [KeyType.MASTER, *DERIVED], ids=lambda k: k.label)
def test_garbled_keyfiles(master: keys.Keyset, kind: KeyType) -> None:
    keyset = master if kind == KeyType.MASTER else keys.derive(master, kind)
    raw = keys.encode_keyfile(keyset)
    body = body_of(raw)
    # every single flipped bit in the body is caught (checksum)
    for index in range(len(body)):
        damaged = bytearray(body)
        damaged[index] ^= 0x01
        with pytest.raises(KeyFileError):
            keys.decode_keyfile(rebuild(bytes(damaged), fix_checksum=False))
    for garbage in (b"", b"\n\n", b"# only a comment\n", b"not base64 at all!!\n", os.urandom(200),
                    b"\xff\xfe\x00\x01" * 40, base64.b64encode(os.urandom(150)) + b"\n"):
        with pytest.raises(KeyFileError):
            keys.decode_keyfile(garbage)
    # extra bytes after a valid body
    with pytest.raises(KeyFileError):
        keys.decode_keyfile(rebuild(body[:-keys.CHECKSUM_SIZE] + b"\x00" * 5 + body[-keys.CHECKSUM_SIZE:]))
    # an unknown version or type byte, even with a valid checksum
    magic = len(keys.MAGIC)
    for offset, value in ((magic, 99), (magic + 1, 17)):
        damaged = bytearray(body)
        damaged[offset] = value
        with pytest.raises(KeyFileError):
            keys.decode_keyfile(rebuild(bytes(damaged)))


def _derived_layout() -> dict[str, tuple[int, int]]:
    """Offsets of the fields of a derived keyfile body."""
    pos = len(keys.MAGIC) + 2
    layout = {}
    for name, size in (("key_id", keys.KEY_ID_SIZE), ("sign_seed", crypto.KEY_SIZE),
                       ("master_public", crypto.PUBLIC_SIZE), ("certificate", crypto.SIGNATURE_SIZE),
                       ("data_public", crypto.PUBLIC_SIZE), ("log_public", crypto.PUBLIC_SIZE)):
        layout[name] = (pos, pos + size)
        pos += size
    return layout


@pytest.mark.parametrize("kind", DERIVED, ids=lambda k: k.label)
@pytest.mark.parametrize("field", ["key_id", "sign_seed", "certificate", "data_public", "log_public", "master_public"])
def test_tampered_certificate_detected(master: keys.Keyset, kind: KeyType, field: str) -> None:
    """Changing any certified field, with a recomputed checksum, is refused."""
    body = body_of(keys.encode_keyfile(keys.derive(master, kind)))
    start, end = _derived_layout()[field]
    damaged = bytearray(body)
    damaged[start] ^= 0x40
    with pytest.raises(KeyFileError) as info:
        keys.decode_keyfile(rebuild(bytes(damaged)), "tampered.key")
    assert "tampered.key" in info.value.message


def test_type_upgrade_refused(master: keys.Keyset) -> None:
    """A LogOnly holder cannot turn their key into a more powerful one by editing it."""
    log_only = keys.derive(master, KeyType.LOG_ONLY)
    body = bytearray(body_of(keys.encode_keyfile(log_only)))
    body[len(keys.MAGIC) + 1] = KeyType.READ_WRITE
    with pytest.raises(KeyFileError):
        keys.decode_keyfile(rebuild(bytes(body)))
    # nor by certifying a signing key with a master of their own and pointing it at ours
    other = keys.new_master()
    layout = _derived_layout()
    for kind in DERIVED:
        forged_body = bytearray(body_of(keys.encode_keyfile(keys.derive(other, kind))))
        for field in ("master_public", "data_public", "log_public"):
            start, end = layout[field]
            forged_body[start:end] = getattr(master, field)
        with pytest.raises(KeyFileError) as info:
            keys.decode_keyfile(rebuild(bytes(forged_body)))
        if kind == KeyType.WRITE_ONLY:  # no secret to betray it: only the certificate does
            assert "certificate" in info.value.message


def test_id_hasher_gives_keyed_hash_for_every_kind_and_size() -> None:
    """The copied keyed state (a save's chunk IDs) must give the IDs keyed_hash() gives,
    call after call (a state updated by one call would change the next one's ID)."""
    key = os.urandom(32)
    for kind in (1, 2, 3):
        hash_one = crypto.id_hasher(key, kind)
        for size in (0, 1, 1000, 1024, 1025, 70_000):
            data = os.urandom(size)
            assert hash_one(data) == crypto.keyed_hash(key, kind, data)
            assert hash_one(memoryview(data)) == crypto.keyed_hash(key, kind, data)
    assert crypto.id_hasher(key, 1)(b"x") != crypto.id_hasher(os.urandom(32), 1)(b"x")


def test_blobs_are_checked_against_their_ids_on_read(master: keys.Keyset) -> None:
    """The read path's ID check (copied keyed states, one per kind): every blob
    opens to its content, call after call, and a blob given another blob's ID,
    or read as another kind, is refused."""
    codec = BlobCodec(master, b"repo")
    sealer = codec.new_sealer()
    blobs = []
    for size in (0, 1, 1000, 70_000):
        data = os.urandom(size // 2) * 2  # compressible or not
        blob_id = codec.blob_id(BlobKind.CHUNK, data)
        blobs.append((blob_id, data, codec.seal(sealer, BlobKind.CHUNK, *codec.compress(data))))
    for _ in range(2):
        for blob_id, data, stored in blobs:
            assert codec.unpack(BlobKind.CHUNK, blob_id, sealer.pack_id, stored) == data
    with pytest.raises(CorruptedData, match="does not match its ID"):
        codec.unpack(BlobKind.CHUNK, blobs[1][0], sealer.pack_id, blobs[2][2])
    with pytest.raises(CorruptedData, match="not a directory blob"):
        codec.unpack(BlobKind.DIRECTORY, blobs[2][0], sealer.pack_id, blobs[2][2])


def test_stat_rows_macs_do_not_depend_on_the_rows_before(master: keys.Keyset, tmp_path: Path) -> None:
    """signed_stats() copies one keyed state per row: the same row gets the same MAC
    alone, after others, and as _mac() computes it for a lookup."""
    from rekkordfs.cache import LocalCache, StatKey, stat_row

    cache = LocalCache(tmp_path / "cache", master)
    rows = [stat_row(b"/a/%d" % n, StatKey(n, 2, 3, 4), b"chunks") for n in range(3)]
    together = cache.signed_stats(rows)
    alone = [cache.signed_stats([row])[0] for row in rows]
    assert together == alone
    assert len({row[-16:] for row in together}) == 3
    assert all(signed[-16:] == cache._mac(row) for row, signed in zip(rows, together))
    cache.close()
