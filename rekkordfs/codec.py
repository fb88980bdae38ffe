"""Blob encoding: plaintext <-> stored bytes (compress, seal; open, check ID),
and the signed pack indexes.

A blob in a pack (docs/format.md):

    nonce (24) | XChaCha20-Poly1305(pack key, nonce, payload | version u8 | kind u8 | compression u8) (+16)

The trailer is inside the encryption: the storage cannot tell a blob's kind,
whether it is compressed, or (without the index, also encrypted) where one blob
ends and the next begins. Every method here is synchronous and thread-safe,
meant for worker threads: blake3, zstd and libsodium release the GIL.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from dataclasses import dataclass

import zstandard

from . import crypto
from .errors import CapabilityError, CorruptedData
from .format import ID_SIZE, PACK_ID_SIZE, BlobKind, Location
from .keys import Keyset, Signer

BLOB_VERSION = 2
TRAILER_SIZE = 3
STORED_OVERHEAD = crypto.NONCE_SIZE + crypto.TAG_SIZE + TRAILER_SIZE  # stored bytes beyond the payload
COMPRESS_NONE = 0
COMPRESS_ZSTD = 1
ZSTD_LEVEL = 1
# Keep the compressed form only when it saves at least this fraction.
MIN_SAVING = 1 / 32
SAMPLE_SIZE = 64 << 10
# Refuse to inflate a blob beyond this: a hostile writer could claim any size.
MAX_BLOB_SIZE = 256 << 20

INDEX_VERSION = 2
INDEX_CONTEXT = b"rekkord-index-v2"
INDEX_NAME_SIZE = 16
_INDEX_HEAD = struct.Struct(f"<B{PACK_ID_SIZE}s")  # version, pack ID
_INDEX_COUNT = struct.Struct("<I")
_INDEX_ENTRY = struct.Struct(f"<{ID_SIZE}sBII")  # blob id, kind, offset, length


# Where each kind of object lives in the storage (docs/format.md); marks.py
# names the prune and forget records.
PACKS_PREFIX = "packs/"
INDEX_PREFIX = "index/"
SNAPSHOTS_PREFIX = "snapshots/"
TAGS_PREFIX = "tags/"


def pack_key(pack_id: bytes) -> str:
    hex_id = pack_id.hex()
    return f"{PACKS_PREFIX}{hex_id[:2]}/{hex_id}"


def index_key(name: bytes) -> str:
    return f"{INDEX_PREFIX}{name.hex()}"


def snapshot_key(snapshot_id: bytes) -> str:
    return f"{SNAPSHOTS_PREFIX}{snapshot_id.hex()}"


def _id_from_key(key: str, size: int) -> bytes | None:
    try:
        raw = bytes.fromhex(key.rsplit("/", 1)[-1])
    except ValueError:
        return None
    return raw if len(raw) == size else None


def pack_id_from_key(key: str) -> bytes | None:
    return _id_from_key(key, PACK_ID_SIZE)


def index_name_from_key(key: str) -> bytes | None:
    return _id_from_key(key, INDEX_NAME_SIZE)


def snapshot_id_from_key(key: str) -> bytes | None:
    return _id_from_key(key, ID_SIZE)


@dataclass(frozen=True)
class PackIndex:
    """What a writer says one of its packs holds, signed by that writer."""

    pack: bytes
    signer: Signer
    entries: list[tuple[bytes, BlobKind, Location]]


class BlobCodec:
    def __init__(self, keys: Keyset, repo_id: bytes) -> None:
        self.keys = keys
        self.repo_id = repo_id
        self._opener = crypto.PackOpener(keys.data_secret) if keys.data_secret else None
        self._local = threading.local()
        # set up once per kind: a save computes 100,000 IDs (crypto.id_hasher)
        self._id_hashers = {kind: crypto.id_hasher(keys.id_key, kind) for kind in BlobKind} if keys.id_key else {}
        # Pack indexes are for writers and readers alike (every key but LogOnly);
        # their key derives from the blob-ID key that all of these hold. What
        # makes an index trustworthy is its signature, not its encryption.
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

    def blob_id(self, kind: BlobKind, data: bytes | bytearray | memoryview) -> bytes:
        if self.keys.id_key is None:
            raise CapabilityError(f"a {self.keys.kind.label} key cannot compute blob IDs")
        return self._id_hashers[kind](data)

    # --- sealing (writers) --------------------------------------------------------

    def new_sealer(self) -> crypto.PackSealer:
        if self.keys.id_key is None:
            raise CapabilityError(f"a {self.keys.kind.label} key cannot write blobs")
        return crypto.PackSealer(self.keys.data_public)

    def compress(self, data: bytes | bytearray | memoryview) -> tuple[int, bytes | bytearray | memoryview]:
        """(compression, payload): zstd when it saves enough, else the data itself."""
        return compress(self._compressor(), data)

    def compress_many(self, datas: list[memoryview]) -> list[tuple[int, bytes | bytearray | memoryview]]:
        return compress_many(self._compressor(), datas)

    def seal(self, sealer: crypto.PackSealer, kind: BlobKind, compression: int,
             payload: bytes | bytearray | memoryview) -> bytearray:
        """The stored form of a blob (compress() gave compression and payload), for sealer's pack."""
        return sealer.seal(payload, bytes((BLOB_VERSION, kind, compression)))

    def seal_many(self, kind: BlobKind, items: list[tuple[crypto.PackSealer, int, bytes | bytearray | memoryview]]
                  ) -> list[bytearray]:
        return seal_many(kind, items)

    def seal_alone(self, kind: BlobKind, data: bytes) -> bytes:
        """An object holding one blob (snapshot records): its pack ID, then the blob."""
        sealer = self.new_sealer()
        return sealer.pack_id + self.seal(sealer, kind, *self.compress(data))

    # --- opening (readers) ------------------------------------------------------------

    def unpack(self, kind: BlobKind, blob_id: bytes, pack_id: bytes,
               stored: bytes | bytearray | memoryview) -> bytes | bytearray:
        """Open a blob of a pack, check its kind and that its content hashes to blob_id."""
        return self._open_checked(kind, blob_id, pack_id, stored)[2]

    def reseal(self, sealer: crypto.PackSealer, kind: BlobKind, blob_id: bytes, pack_id: bytes,
               stored: bytes | bytearray | memoryview) -> bytearray:
        """A blob of pack_id sealed again for sealer's pack (a prune's repack):
        checked like unpack(), then its payload sealed as it was, compressed or
        not, so it is never compressed twice. The result is as long as stored."""
        compression, payload, _ = self._open_checked(kind, blob_id, pack_id, stored)
        return self.seal(sealer, kind, compression, payload)

    def _open_checked(self, kind: BlobKind, blob_id: bytes, pack_id: bytes, stored: bytes | bytearray | memoryview
                      ) -> tuple[int, bytearray, bytes | bytearray]:
        if self._opener is None:
            raise CapabilityError(f"a {self.keys.kind.label} key cannot read snapshot contents")
        if self.keys.id_key is None:
            raise CapabilityError(f"a {self.keys.kind.label} key cannot compute blob IDs")
        return open_checked(self._opener, self._decompressor(), self._id_hashers[kind], kind, blob_id, pack_id, stored)

    def open_alone(self, kind: BlobKind, raw: bytes) -> bytes | bytearray:
        """The content of a one-blob object whose ID nothing vouches for (a
        snapshot record without a tag): opened and decompressed, not verified."""
        if self._opener is None:
            raise CapabilityError(f"a {self.keys.kind.label} key cannot read snapshot contents")
        opened = self._opener.open(raw[:PACK_ID_SIZE], memoryview(raw)[PACK_ID_SIZE:])
        if len(opened) < TRAILER_SIZE or opened[-3] != BLOB_VERSION or opened[-2] != kind:
            raise CorruptedData(f"object is not a {kind.name.lower()} record")
        compression = opened[-1]
        del opened[-TRAILER_SIZE:]
        if compression == COMPRESS_NONE:
            return opened
        try:
            if compression != COMPRESS_ZSTD or not 0 <= zstandard.frame_content_size(opened) <= MAX_BLOB_SIZE:
                raise CorruptedData("record claims an invalid size")
            return self._decompressor().decompress(opened)
        except zstandard.ZstdError:
            raise CorruptedData("record does not decompress") from None

    def unpack_alone(self, kind: BlobKind, blob_id: bytes, raw: bytes) -> bytes | bytearray:
        if len(raw) < PACK_ID_SIZE:
            raise CorruptedData(f"blob {blob_id.hex()} is truncated")
        return self.unpack(kind, blob_id, raw[:PACK_ID_SIZE], memoryview(raw)[PACK_ID_SIZE:])

    # --- pack indexes ------------------------------------------------------------------

    def seal_index(self, pack_id: bytes, entries: list[tuple[bytes, BlobKind, Location]]) -> bytes:
        assert self._index_key is not None
        body = bytearray(_INDEX_HEAD.pack(INDEX_VERSION, pack_id))
        body += self.keys.signer.encode()
        body += _INDEX_COUNT.pack(len(entries))
        for blob_id, kind, loc in entries:
            body += _INDEX_ENTRY.pack(blob_id, kind, loc.offset, loc.length)
        body += self.keys.sign(INDEX_CONTEXT + self.repo_id + body)
        nonce = os.urandom(crypto.NONCE_SIZE)
        return nonce + crypto.aead_encrypt(self._index_key, nonce, INDEX_CONTEXT, bytes(body))

    def open_index(self, raw: bytes) -> tuple[PackIndex, str | None]:
        """A decoded index, and why its signature is not to be trusted (None: it is)."""
        if self._index_key is None:
            raise CapabilityError(f"a {self.keys.kind.label} key cannot read pack indexes")
        nonce, sealed = raw[:crypto.NONCE_SIZE], raw[crypto.NONCE_SIZE:]
        body = crypto.aead_decrypt(self._index_key, nonce, INDEX_CONTEXT, sealed)
        try:
            version, pack_id = _INDEX_HEAD.unpack_from(body, 0)
            if version != INDEX_VERSION:
                raise ValueError(f"unsupported version {version}")
            pos = _INDEX_HEAD.size
            signer = Signer.decode(body[pos:pos + Signer.SIZE])
            pos += Signer.SIZE
            (count,) = _INDEX_COUNT.unpack_from(body, pos)
            pos += _INDEX_COUNT.size
            end = pos + count * _INDEX_ENTRY.size
            if len(body) != end + crypto.SIGNATURE_SIZE:
                raise ValueError("bad length")
            entries = [(blob_id, BlobKind(kind), Location(pack_id, offset, length))
                       for blob_id, kind, offset, length in _INDEX_ENTRY.iter_unpack(body[pos:end])]
        except (struct.error, ValueError) as exc:
            raise CorruptedData(f"pack index is malformed ({exc})") from None
        problem = signer.problem(self.keys, INDEX_CONTEXT + self.repo_id + body[:end], body[end:])
        return PackIndex(pack_id, signer, entries), problem


# --- writing, without keys: shared by BlobCodec and the save's worker processes (prepworker.py)


def open_checked(opener: crypto.PackOpener, decompressor: zstandard.ZstdDecompressor, id_of: crypto.IdHasher,
                 kind: BlobKind, blob_id: bytes, pack_id: bytes, stored: bytes | bytearray | memoryview
                 ) -> tuple[int, bytearray, bytes | bytearray]:
    """(compression, stored payload, plaintext) of a blob of pack_id whose
    version, kind and ID are checked (BlobCodec's, and a restore's worker
    process's, which holds no Keyset). id_of: crypto.id_hasher() of the
    blob-ID key for this kind (a keyed state copied, not set up per blob)."""
    try:
        opened = opener.open(pack_id, stored)
    except CorruptedData as exc:
        raise CorruptedData(f"blob {blob_id.hex()} {exc.message.removeprefix('blob ')}") from None
    if len(opened) < TRAILER_SIZE:
        raise CorruptedData(f"blob {blob_id.hex()} is truncated")
    version, stored_kind, compression = opened[-3], opened[-2], opened[-1]
    del opened[-TRAILER_SIZE:]  # shrinks in place, no copy
    if version != BLOB_VERSION:
        raise CorruptedData(f"blob {blob_id.hex()} has unsupported version {version}")
    if stored_kind != kind:
        raise CorruptedData(f"blob {blob_id.hex()} is not a {kind.name.lower()} blob")
    data: bytes | bytearray
    if compression == COMPRESS_ZSTD:
        try:
            if not 0 <= zstandard.frame_content_size(opened) <= MAX_BLOB_SIZE:
                raise CorruptedData(f"blob {blob_id.hex()} claims an invalid size")
            data = decompressor.decompress(opened)
        except zstandard.ZstdError:
            raise CorruptedData(f"blob {blob_id.hex()} does not decompress") from None
    elif compression == COMPRESS_NONE:
        data = opened
    else:
        raise CorruptedData(f"blob {blob_id.hex()} has unknown compression {compression}")
    if id_of(data) != blob_id:
        raise CorruptedData(f"blob {blob_id.hex()} does not match its ID")
    return compression, opened, data


def compress(compressor: zstandard.ZstdCompressor, data: bytes | bytearray | memoryview
             ) -> tuple[int, bytes | bytearray | memoryview]:
    """(compression, payload): zstd when it saves enough, else the data itself."""
    if len(data) >= 64 and _worth_compressing(compressor, data):
        compressed = compressor.compress(data)
        if len(compressed) <= len(data) * (1 - MIN_SAVING):
            return COMPRESS_ZSTD, compressed
    return COMPRESS_NONE, data


def compress_many(compressor: zstandard.ZstdCompressor, datas: list[memoryview]
                  ) -> list[tuple[int, bytes | bytearray | memoryview]]:
    """compress() of each, the small ones (always worth trying) in one call
    to zstd: one GIL hand-off for a batch of small files, not one each."""
    out: list[tuple[int, bytes | bytearray | memoryview] | None] = [None] * len(datas)
    small = [index for index, data in enumerate(datas) if 64 <= len(data) <= 4 * SAMPLE_SIZE]
    if len(small) > 1:
        frames = compressor.multi_compress_to_buffer([datas[index] for index in small], threads=0)
        for n, index in enumerate(small):
            compressed = frames[n].tobytes()  # the same frame as compress() makes
            out[index] = ((COMPRESS_ZSTD, compressed) if len(compressed) <= len(datas[index]) * (1 - MIN_SAVING)
                          else (COMPRESS_NONE, datas[index]))
    return [found if found is not None else compress(compressor, data) for found, data in zip(out, datas)]


def seal_many(kind: BlobKind, items: list[tuple[crypto.PackSealer, int, bytes | bytearray | memoryview]]
              ) -> list[bytearray]:
    """The stored form of many blobs: (sealer, compression, payload) each."""
    trailers = {compression: bytes((BLOB_VERSION, kind, compression)) for compression in (COMPRESS_NONE,
                                                                                          COMPRESS_ZSTD)}
    return crypto.seal_many([(sealer, payload) for sealer, _, payload in items],
                            [trailers[compression] for _, compression, _ in items])


def _worth_compressing(compressor: zstandard.ZstdCompressor, data: bytes | bytearray | memoryview) -> bool:
    # Compressing incompressible data (media, archives, encrypted files)
    # costs as much as encrypting it; a sample tells which kind this is.
    if len(data) <= 4 * SAMPLE_SIZE:
        return True
    middle = len(data) // 2
    sample = memoryview(data)[middle:middle + SAMPLE_SIZE]
    return len(compressor.compress(sample)) <= SAMPLE_SIZE * (1 - MIN_SAVING)
