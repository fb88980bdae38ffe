"""Master key, derived keyfiles and their capabilities.

A keyfile holds only the key material its type needs (see docs/security.md):

| type      | blob-id key + chunk seed | data key      | log key       |
|-----------|--------------------------|---------------|---------------|
| Master    | derived                  | secret        | secret        |
| ReadWrite | yes                      | secret        | secret        |
| WriteOnly | yes                      | public only   | public only   |
| LogOnly   | no                       | public only   | secret        |

Each derived keyfile also has its own Ed25519 signing pair, certified by the
master key over (type, key id, signing key, public data key, public log key).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import nacl.signing

from . import crypto
from .errors import CapabilityError, KeyFileError

MAGIC = b"RKKEY"
KEYFILE_VERSION = 1
CHECKSUM_SIZE = 16
KEY_ID_SIZE = 16
CERT_CONTEXT = b"rekkord-key-certificate-v1"


class KeyType(enum.IntEnum):
    MASTER = 0
    READ_WRITE = 1
    WRITE_ONLY = 2
    LOG_ONLY = 3

    @property
    def label(self) -> str:
        return _LABELS[self]

    @classmethod
    def from_label(cls, label: str) -> KeyType:
        for kind, name in _LABELS.items():
            if name.lower() == label.lower():
                return kind
        raise KeyFileError(f"unknown key type '{label}' (use ReadWrite, WriteOnly or LogOnly)")


_LABELS = {
    KeyType.MASTER: "Master",
    KeyType.READ_WRITE: "ReadWrite",
    KeyType.WRITE_ONLY: "WriteOnly",
    KeyType.LOG_ONLY: "LogOnly",
}


class Capability(enum.Enum):
    LIST = "list snapshots"
    READ = "read snapshot contents"
    WRITE = "create snapshots"
    FORGET = "forget snapshots or prune the repository"
    DERIVE = "derive keys"


_CAPABILITIES = {
    KeyType.MASTER: {Capability.LIST, Capability.READ, Capability.WRITE, Capability.FORGET, Capability.DERIVE},
    KeyType.READ_WRITE: {Capability.LIST, Capability.READ, Capability.WRITE, Capability.FORGET},
    KeyType.WRITE_ONLY: {Capability.WRITE},
    KeyType.LOG_ONLY: {Capability.LIST},
}


# Only these may sign snapshots and pack indexes: a LogOnly key lists, nothing more.
WRITER_KINDS = frozenset({KeyType.MASTER, KeyType.READ_WRITE, KeyType.WRITE_ONLY})


def certificate_payload(kind: KeyType, key_id: bytes, sign_public: bytes, data_public: bytes,
                        log_public: bytes) -> bytes:
    return CERT_CONTEXT + bytes((kind,)) + key_id + sign_public + data_public + log_public


@dataclass(frozen=True)
class Signer:
    """Who signed a snapshot: enough to verify against the master public key."""

    kind: KeyType
    key_id: bytes
    sign_public: bytes
    certificate: bytes  # master signature over certificate_payload(...)

    SIZE = 1 + KEY_ID_SIZE + crypto.PUBLIC_SIZE + crypto.SIGNATURE_SIZE

    def encode(self) -> bytes:
        return bytes((self.kind,)) + self.key_id + self.sign_public + self.certificate

    @classmethod
    def decode(cls, raw: bytes) -> Signer:
        if len(raw) != cls.SIZE or raw[0] not in KeyType._value2member_map_:
            raise ValueError("malformed signer")
        kid_end = 1 + KEY_ID_SIZE
        pub_end = kid_end + crypto.PUBLIC_SIZE
        return cls(KeyType(raw[0]), raw[1:kid_end], raw[kid_end:pub_end], raw[pub_end:])

    def is_certified(self, master_public: bytes, data_public: bytes, log_public: bytes) -> bool:
        payload = certificate_payload(self.kind, self.key_id, self.sign_public, data_public, log_public)
        return crypto.verify_signature(master_public, payload, self.certificate)

    def certificate_problem(self, keys: Keyset) -> str | None:
        """Why this signer may not sign for the repository of keys, or None."""
        if not self.is_certified(keys.master_public, keys.data_public, keys.log_public):
            return "is signed by a key the master key did not certify"
        if self.kind not in WRITER_KINDS:
            return f"is signed by a {self.kind.label} key, which may not write"
        return None

    def signature_problem(self, message: bytes, signature: bytes) -> str | None:
        if not crypto.verify_signature(self.sign_public, message, signature):
            return "has an invalid signature"
        return None

    def problem(self, keys: Keyset, message: bytes, signature: bytes) -> str | None:
        """Why a signature by this signer on message is not to be trusted, or None."""
        return self.certificate_problem(keys) or self.signature_problem(message, signature)


@dataclass(frozen=True)
class Keyset:
    kind: KeyType
    key_id: bytes
    master_public: bytes
    data_public: bytes
    log_public: bytes
    sign_key: nacl.signing.SigningKey
    certificate: bytes
    id_key: bytes | None = None
    chunk_seed: int | None = None
    data_secret: bytes | None = None
    log_secret: bytes | None = None
    master: bytes | None = None

    def can(self, capability: Capability) -> bool:
        return capability in _CAPABILITIES[self.kind]

    def require(self, capability: Capability) -> None:
        if not self.can(capability):
            raise CapabilityError(f"a {self.kind.label} key cannot {capability.value}")

    @property
    def signer(self) -> Signer:
        return Signer(self.kind, self.key_id, bytes(self.sign_key.verify_key), self.certificate)

    def sign(self, message: bytes) -> bytes:
        return self.sign_key.sign(message).signature

    @property
    def id_hex(self) -> str:
        return self.key_id.hex()


# --- master key and derivation ----------------------------------------------


def _chunk_seed(master: bytes) -> int:
    # pyfastcdc takes a positive 64-bit seed; keep it in 63 bits and non-zero.
    return (int.from_bytes(crypto.kdf(master, b"chunk-seed", 8), "little") & ((1 << 63) - 1)) | 1


def master_signing_key(master: bytes) -> nacl.signing.SigningKey:
    return crypto.signing_key(crypto.kdf(master, b"master-sign"))


def keyset_from_master(master: bytes) -> Keyset:
    if len(master) != crypto.KEY_SIZE:
        raise KeyFileError("master key has the wrong size")
    master_sign = master_signing_key(master)
    data_secret = crypto.kdf(master, b"data-key")
    log_secret = crypto.kdf(master, b"log-key")
    data_public = crypto.x25519_public(data_secret)
    log_public = crypto.x25519_public(log_secret)
    key_id = crypto.kdf(master, b"key-id", KEY_ID_SIZE)
    sign_public = bytes(master_sign.verify_key)
    certificate = master_sign.sign(
        certificate_payload(KeyType.MASTER, key_id, sign_public, data_public, log_public)
    ).signature
    return Keyset(
        kind=KeyType.MASTER,
        key_id=key_id,
        master_public=sign_public,
        data_public=data_public,
        log_public=log_public,
        sign_key=master_sign,
        certificate=certificate,
        id_key=crypto.kdf(master, b"blob-id"),
        chunk_seed=_chunk_seed(master),
        data_secret=data_secret,
        log_secret=log_secret,
        master=master,
    )


def new_master() -> Keyset:
    return keyset_from_master(crypto.random_bytes(crypto.KEY_SIZE))


def derive(master: Keyset, kind: KeyType) -> Keyset:
    """A new restricted keyset with its own signing pair, certified by the master."""
    master.require(Capability.DERIVE)
    assert master.master is not None
    if kind == KeyType.MASTER:
        raise KeyFileError("derive creates ReadWrite, WriteOnly or LogOnly keys, not Master keys")
    sign_key = crypto.signing_key(crypto.random_bytes(crypto.KEY_SIZE))
    key_id = crypto.random_bytes(KEY_ID_SIZE)
    certificate = master_signing_key(master.master).sign(
        certificate_payload(kind, key_id, bytes(sign_key.verify_key), master.data_public, master.log_public)
    ).signature
    writes = kind in (KeyType.READ_WRITE, KeyType.WRITE_ONLY)
    return Keyset(
        kind=kind,
        key_id=key_id,
        master_public=master.master_public,
        data_public=master.data_public,
        log_public=master.log_public,
        sign_key=sign_key,
        certificate=certificate,
        id_key=master.id_key if writes else None,
        chunk_seed=master.chunk_seed if writes else None,
        data_secret=master.data_secret if kind == KeyType.READ_WRITE else None,
        log_secret=master.log_secret if kind in (KeyType.READ_WRITE, KeyType.LOG_ONLY) else None,
    )


# --- keyfile encoding --------------------------------------------------------


def encode_keyfile(keys: Keyset) -> bytes:
    body = bytearray(MAGIC + bytes((KEYFILE_VERSION, keys.kind)))
    if keys.kind == KeyType.MASTER:
        assert keys.master is not None
        body += keys.master
    else:
        body += keys.key_id + bytes(keys.sign_key) + keys.master_public + keys.certificate
        body += keys.data_public + keys.log_public
        if keys.kind in (KeyType.READ_WRITE, KeyType.WRITE_ONLY):
            assert keys.id_key is not None and keys.chunk_seed is not None
            body += keys.id_key + struct.pack("<Q", keys.chunk_seed)
        if keys.kind == KeyType.READ_WRITE:
            assert keys.data_secret is not None
            body += keys.data_secret
        if keys.kind in (KeyType.READ_WRITE, KeyType.LOG_ONLY):
            assert keys.log_secret is not None
            body += keys.log_secret
    body += hashlib.blake2b(bytes(body), digest_size=CHECKSUM_SIZE).digest()
    text = base64.b64encode(bytes(body)).decode()
    header = f"# rekkord {keys.kind.label} key {keys.id_hex}\n"
    return (header + text + "\n").encode()


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise ValueError("short")
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        return chunk


def decode_keyfile(raw: bytes, name: str = "keyfile") -> Keyset:
    corrupted = KeyFileError(f"keyfile '{name}' is truncated or corrupted")
    lines = [line.strip() for line in raw.splitlines() if line.strip() and not line.startswith(b"#")]
    try:
        body = base64.b64decode(b"".join(lines), validate=True)
    except (binascii.Error, ValueError):
        raise corrupted from None
    if not body.startswith(MAGIC):
        raise KeyFileError(f"'{name}' is not a rekkord keyfile")
    if len(body) < len(MAGIC) + 2 + CHECKSUM_SIZE:
        raise corrupted
    content, checksum = body[:-CHECKSUM_SIZE], body[-CHECKSUM_SIZE:]
    if hashlib.blake2b(content, digest_size=CHECKSUM_SIZE).digest() != checksum:
        raise corrupted
    version, kind_value = content[len(MAGIC)], content[len(MAGIC) + 1]
    if version != KEYFILE_VERSION:
        raise KeyFileError(f"keyfile '{name}' has unsupported version {version}")
    if kind_value not in KeyType._value2member_map_:
        raise KeyFileError(f"keyfile '{name}' has unknown key type {kind_value}")
    kind = KeyType(kind_value)
    reader = _Reader(content[len(MAGIC) + 2:])
    try:
        if kind == KeyType.MASTER:
            keys = keyset_from_master(reader.take(crypto.KEY_SIZE))
        else:
            keys = _decode_derived(kind, reader)
    except ValueError:
        raise corrupted from None
    if reader.pos != len(reader.data):
        raise corrupted
    if not keys.signer.is_certified(keys.master_public, keys.data_public, keys.log_public):
        raise KeyFileError(f"keyfile '{name}' has an invalid master certificate")
    return keys


def _decode_derived(kind: KeyType, reader: _Reader) -> Keyset:
    key_id = reader.take(KEY_ID_SIZE)
    sign_key = crypto.signing_key(reader.take(crypto.KEY_SIZE))
    master_public = reader.take(crypto.PUBLIC_SIZE)
    certificate = reader.take(crypto.SIGNATURE_SIZE)
    data_public = reader.take(crypto.PUBLIC_SIZE)
    log_public = reader.take(crypto.PUBLIC_SIZE)
    id_key = chunk_seed = data_secret = log_secret = None
    if kind in (KeyType.READ_WRITE, KeyType.WRITE_ONLY):
        id_key = reader.take(crypto.KEY_SIZE)
        chunk_seed = struct.unpack("<Q", reader.take(8))[0]
    if kind == KeyType.READ_WRITE:
        data_secret = reader.take(crypto.KEY_SIZE)
        if crypto.x25519_public(data_secret) != data_public:
            raise ValueError("data key mismatch")
    if kind in (KeyType.READ_WRITE, KeyType.LOG_ONLY):
        log_secret = reader.take(crypto.KEY_SIZE)
        if crypto.x25519_public(log_secret) != log_public:
            raise ValueError("log key mismatch")
    return Keyset(
        kind=kind,
        key_id=key_id,
        master_public=master_public,
        data_public=data_public,
        log_public=log_public,
        sign_key=sign_key,
        certificate=certificate,
        id_key=id_key,
        chunk_seed=chunk_seed,
        data_secret=data_secret,
        log_secret=log_secret,
    )


def load_keyfile(path: str | os.PathLike[str]) -> Keyset:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(64 * 1024)
    except FileNotFoundError:
        raise KeyFileError(f"keyfile '{path}' does not exist") from None
    except IsADirectoryError:
        raise KeyFileError(f"keyfile '{path}' is a directory") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read keyfile '{path}': {exc.strerror}") from None
    return decode_keyfile(raw, str(path))


def write_keyfile(path: str | os.PathLike[str], keys: Keyset) -> None:
    """Write a keyfile with mode 0600; never overwrite an existing file."""
    data = encode_keyfile(keys)
    target = Path(path)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"refusing to overwrite existing file '{target}'") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create keyfile '{target}': {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # umask may not have given us exactly 0600
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
