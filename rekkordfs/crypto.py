"""Cryptographic primitives: key derivation, keyed hashing, sealing, signatures.

Blob encryption (see docs/format.md): each pack has its own ephemeral X25519
key pair whose public half names it; the pack key is agreed with the
repository's public data key, and every blob of the pack is sealed with
XChaCha20-Poly1305 under it and a random nonce. Writers (WriteOnly) hold only
the public data key, so they can seal but never open; readers recompute the
pack key from the pack ID and their secret data key.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from collections.abc import Callable
from typing import Final

import blake3
import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing

# pynacl's high-level AEAD wrappers copy the message twice and return fresh
# bytes; blob sealing is on the hot path of every save and read, so it calls
# libsodium through pynacl's own cffi module to encrypt in place in the final
# object (cffi releases the GIL meanwhile).
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib

from .errors import CorruptedData
from .lru import WeightedLRU

KEY_SIZE: Final = 32
NONCE_SIZE: Final = 24
TAG_SIZE: Final = 16
PUBLIC_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64
BIG_COPY: Final = 64 << 10  # payloads from this size are copied without holding the GIL


def kdf(master: bytes, context: bytes, size: int = KEY_SIZE) -> bytes:
    """Derive a subkey from the master key for one purpose (BLAKE2b keyed)."""
    if len(context) > 16:
        raise ValueError("kdf context is at most 16 bytes")
    return hashlib.blake2b(b"", key=master, person=context, digest_size=size).digest()


def x25519_public(secret: bytes) -> bytes:
    return sodium.crypto_scalarmult_base(secret)


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


def keyed_hash(key: bytes, kind: int, data: bytes | bytearray | memoryview) -> bytes:
    """Blob ID: keyed BLAKE3 over a type byte and the plaintext."""
    hasher = blake3.blake3(bytes((kind,)), key=key)
    hasher.update(data)
    return hasher.digest()


# a blob's ID from its plaintext, for one key and kind (id_hasher)
IdHasher = Callable[[bytes | bytearray | memoryview], bytes]


def id_hasher(key: bytes, kind: int) -> IdHasher:
    """keyed_hash(key, kind, data) for many blobs: the keyed state, type byte
    included, is set up once and copied for each (a 1 KiB chunk's ID in 60%
    of the time; a save hashes 100,000 of them). Thread-safe: the state
    copied is never updated."""
    base = blake3.blake3(bytes((kind,)), key=key)

    def hash_one(data: bytes | bytearray | memoryview) -> bytes:
        hasher = base.copy()
        hasher.update(data)
        return hasher.digest()

    return hash_one


# --- signatures --------------------------------------------------------------


def signing_key(seed: bytes) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(seed)


def verify_signature(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public).verify(message, signature)
        return True
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        return False


# --- sealed boxes (snapshot tags) -------------------------------------------


def seal_to(public: bytes, message: bytes) -> bytes:
    return sodium.crypto_box_seal(message, public)


def open_sealed(public: bytes, secret: bytes, sealed: bytes) -> bytes:
    try:
        return sodium.crypto_box_seal_open(sealed, public, secret)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise CorruptedData("sealed record failed authentication") from None


# --- symmetric records (pack indexes) ------------------------------------------


def aead_encrypt(key: bytes, nonce: bytes, associated: bytes, message: bytes) -> bytes:
    return sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(message, associated, nonce, key)


def aead_decrypt(key: bytes, nonce: bytes, associated: bytes, sealed: bytes) -> bytes:
    try:
        return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, associated, nonce, key)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise CorruptedData("record failed authentication") from None


# --- packs --------------------------------------------------------------------
#
# Every pack has its own X25519 key pair, drawn by the writer; the public half
# is the pack's ID (its object name), the secret half is dropped once the pack
# key is agreed with the public data key. Readers recompute the pack key from
# the pack ID and the secret data key. Each blob in a pack is
# nonce | XChaCha20-Poly1305(pack key, nonce, payload | trailer): nothing about
# a blob (its kind, compression, or where it starts) is readable without keys.


_NONCES_AT_ONCE: Final = 256
_nonces = threading.local()


def _nonce() -> bytes:
    """A random nonce from a per-thread pool filled by os.urandom 256 at a time
    (a getrandom call lets go of the GIL: one per blob was one more hand-off
    per small file). The pool is refilled after a fork, never shared."""
    pool: bytes | None = getattr(_nonces, "pool", None)
    pos: int = getattr(_nonces, "pos", 0)
    if pool is None or pos >= len(pool) or _nonces.pid != os.getpid():
        pool = _nonces.pool = os.urandom(NONCE_SIZE * _NONCES_AT_ONCE)
        _nonces.pid = os.getpid()
        pos = 0
    _nonces.pos = pos + NONCE_SIZE
    return pool[pos:pos + NONCE_SIZE]


def _pack_key(shared: bytes, pack_id: bytes, data_public: bytes) -> bytes:
    return hashlib.blake2b(shared + pack_id + data_public, digest_size=KEY_SIZE, person=b"rekkord-pack-v2").digest()


class PackSealer:
    """Seals the blobs of one pack; needs only the public data key."""

    def __init__(self, data_public: bytes) -> None:
        secret = os.urandom(KEY_SIZE)
        self.pack_id = x25519_public(secret)
        self._key = _pack_key(sodium.crypto_scalarmult(secret, data_public), self.pack_id, data_public)

    def seal(self, payload: bytes | bytearray | memoryview, trailer: bytes) -> bytearray:
        """nonce | ciphertext of (payload | trailer) | tag, encrypted in place."""
        size = len(payload) + len(trailer)
        out = bytearray(NONCE_SIZE + size + TAG_SIZE)
        nonce = _nonce()
        out[:NONCE_SIZE] = nonce
        end = NONCE_SIZE + len(payload)
        pointer = _ffi.from_buffer(out) + NONCE_SIZE
        if len(payload) < BIG_COPY:
            out[NONCE_SIZE:end] = payload
        else:  # ctypes lets go of the GIL while it copies: other threads keep working
            ctypes.memmove(int(_ffi.cast("uintptr_t", pointer)),
                           int(_ffi.cast("uintptr_t", _ffi.from_buffer(payload))), len(payload))
        out[end:end + len(trailer)] = trailer
        rc = _lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
            pointer, _ffi.NULL, pointer, size, _ffi.NULL, 0, _ffi.NULL, nonce, self._key)
        if rc != 0:
            raise RuntimeError("libsodium encryption failed")
        return out


def seal_many(items: list[tuple[PackSealer, bytes | bytearray | memoryview]], trailers: list[bytes]) -> list[bytearray]:
    """PackSealer.seal() of many small blobs (each for its sealer's pack) in
    one go: one call for their nonces, the Python around each encryption cut
    to the bone (100,000 small files are 100,000 blobs)."""
    nonces = os.urandom(NONCE_SIZE * len(items))
    encrypt = _lib.crypto_aead_xchacha20poly1305_ietf_encrypt
    from_buffer, null = _ffi.from_buffer, _ffi.NULL
    out: list[bytearray] = []
    pos = 0
    for (sealer, payload), trailer in zip(items, trailers):
        if len(payload) >= BIG_COPY:
            out.append(sealer.seal(payload, trailer))
            continue
        end = NONCE_SIZE + len(payload)
        size = end - NONCE_SIZE + len(trailer)
        nonce = nonces[pos:pos + NONCE_SIZE]
        pos += NONCE_SIZE
        blob = bytearray(nonce)
        blob += payload
        blob += trailer
        blob += bytes(TAG_SIZE)
        pointer = from_buffer(blob) + NONCE_SIZE
        if encrypt(pointer, null, pointer, size, null, 0, null, nonce, sealer._key) != 0:
            raise RuntimeError("libsodium encryption failed")
        out.append(blob)
    return out


class PackOpener:
    """Opens blobs of any pack; needs the secret data key."""

    KEYS_KEPT = 1 << 16

    def __init__(self, data_secret: bytes) -> None:
        self._secret = data_secret
        self._public = x25519_public(data_secret)
        self._keys: WeightedLRU[bytes, bytes] = WeightedLRU(self.KEYS_KEPT)
        self._lock = threading.Lock()  # worker threads share the keys

    def _key_for(self, pack_id: bytes) -> bytes:
        with self._lock:
            key = self._keys.get(pack_id)
        if key is None:
            try:
                shared = sodium.crypto_scalarmult(self._secret, pack_id)
            except (nacl.exceptions.CryptoError, ValueError, TypeError):
                raise CorruptedData("pack has an invalid ID") from None
            key = _pack_key(shared, pack_id, self._public)
            with self._lock:
                self._keys.put(pack_id, key)
        return key

    def open(self, pack_id: bytes, sealed: bytes | bytearray | memoryview) -> bytearray:
        """Authenticate and decrypt one blob: payload | trailer."""
        sealed = memoryview(sealed)
        if len(sealed) < NONCE_SIZE + TAG_SIZE:
            raise CorruptedData("blob is truncated")
        key = self._key_for(pack_id)
        nonce = bytes(sealed[:NONCE_SIZE])
        size = len(sealed) - NONCE_SIZE - TAG_SIZE
        out = bytearray(size)
        rc = _lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
            _ffi.from_buffer(out), _ffi.NULL, _ffi.NULL, _ffi.from_buffer(sealed[NONCE_SIZE:]), size + TAG_SIZE,
            _ffi.NULL, 0, nonce, key,
        )
        if rc != 0:
            raise CorruptedData("blob failed authentication")
        return out
