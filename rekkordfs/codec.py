"""Blob encoding: plaintext <-> stored object (compress, seal; open, check ID).

Stored blob layout (docs/format.md):

    version u8 | kind u8 | compression u8 | ephemeral X25519 public (32)
    | nonce (24) | XChaCha20-Poly1305 ciphertext + tag (16)

The three header bytes are authenticated as associated data. Every method here
is synchronous, thread-safe and meant to run in worker threads: blake3, zstd
and libsodium release the GIL.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading

import zstandard

from . import crypto
from .errors import CapabilityError, CorruptedData
from .format import ID_SIZE, PACK_ID_SIZE, BlobKind, Location
from .keys import Keyset

BLOB_VERSION = 1
HEADER_SIZE = 3
COMPRESS_NONE = 0
COMPRESS_ZSTD = 1
ZSTD_LEVEL = 1
# Keep the compressed form only when it saves at least this fraction.
MIN_SAVING = 1 / 32
SAMPLE_SIZE = 64 << 10
# Refuse to inflate a blob beyond this: a hostile writer could claim any size.
MAX_BLOB_SIZE = 256 << 20


INDEX_VERSION = 1
_INDEX_ENTRY = struct.Struct(f"<{ID_SIZE}sII")  # blob id, offset, length


def object_key(blob_id: bytes) -> str:
    hex_id = blob_id.hex()
    return f"blobs/{hex_id[:2]}/{hex_id}"


def pack_key(pack_id: bytes) -> str:
    hex_id = pack_id.hex()
    return f"packs/{hex_id[:2]}/{hex_id}"


def index_key(pack_id: bytes) -> str:
    return f"index/{pack_id.hex()}"



def pack_id_from_key(key: str) -> bytes | None:
    """The pack ID named by a pack or index object key."""
    try:
        raw = bytes.fromhex(key.rsplit("/", 1)[-1])
    except ValueError:
        return None
    return raw if len(raw) == PACK_ID_SIZE else None


def blob_id_from_key(key: str) -> bytes | None:
    name = key.rsplit("/", 1)[-1]
    try:
        raw = bytes.fromhex(name)
    except ValueError:
        return None
    return raw if len(raw) == ID_SIZE else None


class BlobCodec:
    def __init__(self, keys: Keyset) -> None:
        self.keys = keys
        self._sealer = crypto.BlobSealer(keys.data_public) if keys.id_key else None
        self._opener = crypto.BlobOpener(keys.data_secret) if keys.data_secret else None
        self._local = threading.local()
        # Pack indexes are for writers and readers alike (every key but LogOnly):
        # they list blob IDs, which object names already reveal, so their key
        # derives from the blob-ID key that all of these hold.
        self._index_key = (hashlib.blake2b(keys.id_key, digest_size=crypto.KEY_SIZE, person=b"rekkord-index").digest()
                           if keys.id_key else None)

    def _compressor(self) -> zstandard.ZstdCompressor:
        # zstd contexts are not thread-safe: one per thread.
        comp = getattr(self._local, "compressor", None)
        if comp is None:
            comp = self._local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        return comp

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dec = getattr(self._local, "decompressor", None)
        if dec is None:
            dec = self._local.decompressor = zstandard.ZstdDecompressor()
        return dec

    def blob_id(self, kind: BlobKind, data: bytes | memoryview) -> bytes:
        if self.keys.id_key is None:
            raise CapabilityError(f"a {self.keys.kind.label} key cannot compute blob IDs")
        return crypto.keyed_hash(self.keys.id_key, kind, data)

    def pack(self, kind: BlobKind, data: bytes | memoryview) -> bytearray:
        if self._sealer is None:
            raise CapabilityError(f"a {self.keys.kind.label} key cannot write blobs")
        compression = COMPRESS_NONE
        payload: bytes | memoryview = data
        if len(data) >= 64 and self._worth_compressing(data):
            compressed = self._compressor().compress(data)
            if len(compressed) <= len(data) * (1 - MIN_SAVING):
                compression, payload = COMPRESS_ZSTD, compressed
        return self._sealer.seal(bytes((BLOB_VERSION, kind, compression)), payload)

    def _worth_compressing(self, data: bytes | memoryview) -> bool:
        # Compressing incompressible data (media, archives, encrypted files)
        # costs as much as encrypting it; a sample tells which kind this is.
        if len(data) <= 4 * SAMPLE_SIZE:
            return True
        middle = len(data) // 2
        sample = memoryview(data)[middle:middle + SAMPLE_SIZE]
        return len(self._compressor().compress(sample)) <= SAMPLE_SIZE * (1 - MIN_SAVING)

    def unpack(self, kind: BlobKind, blob_id: bytes, stored: bytes) -> bytes:
        """Open a stored blob, check its kind and that its content hashes to blob_id."""
        if self._opener is None:
            raise CapabilityError(f"a {self.keys.kind.label} key cannot read snapshot contents")
        if len(stored) < HEADER_SIZE:
            raise CorruptedData(f"blob {blob_id.hex()} is truncated")
        version, stored_kind, compression = stored[0], stored[1], stored[2]
        if version != BLOB_VERSION:
            raise CorruptedData(f"blob {blob_id.hex()} has unsupported version {version}")
        if stored_kind != kind:
            raise CorruptedData(f"blob {blob_id.hex()} is not a {kind.name.lower()} blob")
        try:
            payload = self._opener.open(HEADER_SIZE, stored)
        except CorruptedData as exc:
            raise CorruptedData(f"blob {blob_id.hex()} {exc.message.removeprefix('blob ')}") from None
        if compression == COMPRESS_ZSTD:
            try:
                if not 0 <= zstandard.frame_content_size(payload) <= MAX_BLOB_SIZE:
                    raise CorruptedData(f"blob {blob_id.hex()} claims an invalid size")
                data = self._decompressor().decompress(payload)
            except zstandard.ZstdError:
                raise CorruptedData(f"blob {blob_id.hex()} does not decompress") from None
        elif compression == COMPRESS_NONE:
            data = payload
        else:
            raise CorruptedData(f"blob {blob_id.hex()} has unknown compression {compression}")
        if self.blob_id(kind, data) != blob_id:
            raise CorruptedData(f"blob {blob_id.hex()} does not match its ID")
        return data

    # --- pack indexes --------------------------------------------------------

    def seal_index(self, pack_id: bytes, entries: list[tuple[bytes, Location]]) -> bytes:
        assert self._index_key is not None
        body = bytes((INDEX_VERSION,)) + b"".join(
            _INDEX_ENTRY.pack(blob_id, loc.offset, loc.length) for blob_id, loc in entries)
        nonce = os.urandom(crypto.NONCE_SIZE)
        return nonce + crypto.aead_encrypt(self._index_key, nonce, b"rekkord-index" + pack_id, body)

    def open_index(self, pack_id: bytes, raw: bytes) -> list[tuple[bytes, Location]]:
        if self._index_key is None:
            raise CapabilityError(f"a {self.keys.kind.label} key cannot read pack indexes")
        nonce, sealed = raw[:crypto.NONCE_SIZE], raw[crypto.NONCE_SIZE:]
        body = crypto.aead_decrypt(self._index_key, nonce, b"rekkord-index" + pack_id, sealed)
        if not body or body[0] != INDEX_VERSION or (len(body) - 1) % _INDEX_ENTRY.size:
            raise CorruptedData(f"pack index {pack_id.hex()} is malformed")
        return [(blob_id, Location(pack_id, offset, length))
                for blob_id, offset, length in _INDEX_ENTRY.iter_unpack(body[1:])]
