"""Cryptographic primitives: key derivation, keyed hashing, sealing, signatures.

Blob encryption (see docs/format.md): a writer session draws one ephemeral
X25519 key pair and agrees a session key with the repository's public data key;
every blob is then sealed with XChaCha20-Poly1305 under that session key and a
random nonce. Writers (WriteOnly) hold only the public data key, so they can seal
but never open; readers recompute the session key from the ephemeral public key
stored in each blob and their secret data key.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Final

import blake3
import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing

# pynacl's high-level AEAD wrappers copy the message twice and return fresh
# bytes; blob sealing is on the hot path of every save and read, so it calls
# libsodium through pynacl's own cffi module to encrypt straight from the
# caller's buffer into the final object (cffi releases the GIL meanwhile).
from nacl._sodium import ffi as _ffi, lib as _lib

from .errors import CorruptedData

KEY_SIZE: Final = 32
NONCE_SIZE: Final = 24
TAG_SIZE: Final = 16
PUBLIC_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64
SEAL_OVERHEAD: Final = sodium.crypto_box_SEALBYTES


def kdf(master: bytes, context: bytes, size: int = KEY_SIZE) -> bytes:
    """Derive a subkey from the master key for one purpose (BLAKE2b keyed)."""
    if len(context) > 16:
        raise ValueError("kdf context is at most 16 bytes")
    return hashlib.blake2b(b"", key=master, person=context, digest_size=size).digest()


def x25519_public(secret: bytes) -> bytes:
    return sodium.crypto_scalarmult_base(secret)


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


def keyed_hash(key: bytes, kind: int, data: bytes | memoryview) -> bytes:
    """Blob ID: keyed BLAKE3 over a type byte and the plaintext."""
    hasher = blake3.blake3(bytes((kind,)), key=key)
    hasher.update(data)
    return hasher.digest()


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


# --- blob sessions -----------------------------------------------------------


def _session_key(shared: bytes, ephemeral_public: bytes, data_public: bytes) -> bytes:
    return hashlib.blake2b(
        shared + ephemeral_public + data_public, digest_size=KEY_SIZE, person=b"rekkord-session"
    ).digest()


class BlobSealer:
    """Seals blobs for one writer session; needs only the public data key."""

    def __init__(self, data_public: bytes) -> None:
        ephemeral_secret = os.urandom(KEY_SIZE)
        self.ephemeral_public = x25519_public(ephemeral_secret)
        shared = sodium.crypto_scalarmult(ephemeral_secret, data_public)
        self._key = _session_key(shared, self.ephemeral_public, data_public)

    def seal(self, header: bytes, payload: bytes | memoryview) -> bytearray:
        """Return header + ephemeral public + nonce + ciphertext; header is authenticated."""
        nonce = os.urandom(NONCE_SIZE)
        prefix = header + self.ephemeral_public + nonce
        size = len(payload)
        out = bytearray(len(prefix) + size + TAG_SIZE)
        out[:len(prefix)] = prefix
        out_ptr = _ffi.from_buffer(out)
        rc = _lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
            out_ptr + len(prefix), _ffi.NULL, _ffi.from_buffer(payload), size,
            prefix, len(prefix), _ffi.NULL, nonce, self._key,
        )
        if rc != 0:
            raise RuntimeError("libsodium encryption failed")
        return out


class BlobOpener:
    """Opens blobs sealed by any writer session; needs the secret data key."""

    def __init__(self, data_secret: bytes) -> None:
        self._secret = data_secret
        self._public = x25519_public(data_secret)
        self._keys: dict[bytes, bytes] = {}
        self._lock = threading.Lock()

    def _key_for(self, ephemeral_public: bytes) -> bytes:
        key = self._keys.get(ephemeral_public)
        if key is None:
            try:
                shared = sodium.crypto_scalarmult(self._secret, ephemeral_public)
            except (nacl.exceptions.CryptoError, ValueError, TypeError):
                raise CorruptedData("blob has an invalid session key") from None
            key = _session_key(shared, ephemeral_public, self._public)
            with self._lock:
                if len(self._keys) > 4096:
                    self._keys.clear()
                self._keys[ephemeral_public] = key
        return key

    def open(self, header_size: int, sealed: bytes | memoryview) -> bytearray:
        """Authenticate and decrypt; the first header_size bytes are the header."""
        sealed = memoryview(sealed)
        prefix_end = header_size + PUBLIC_SIZE + NONCE_SIZE
        if len(sealed) < prefix_end + TAG_SIZE:
            raise CorruptedData("blob is truncated")
        ephemeral_public = bytes(sealed[header_size:header_size + PUBLIC_SIZE])
        nonce = bytes(sealed[header_size + PUBLIC_SIZE:prefix_end])
        key = self._key_for(ephemeral_public)
        size = len(sealed) - prefix_end - TAG_SIZE
        out = bytearray(size)
        rc = _lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
            _ffi.from_buffer(out), _ffi.NULL, _ffi.NULL, _ffi.from_buffer(sealed[prefix_end:]), size + TAG_SIZE,
            _ffi.from_buffer(sealed[:prefix_end]), prefix_end, nonce, key,
        )
        if rc != 0:
            raise CorruptedData("blob failed authentication")
        return out
