"""Signed maintenance records: what a forget removed, and what a prune condemned.

    forgotten/<32 hex>   snapshots removed by `forget` (their tags deleted)
    condemned/<32 hex>   packs a prune found unused, deleted after a grace period

Both are signed by a key that may forget (Master, ReadWrite) and bound to the
repository ID; a record that does not verify is ignored by everyone (a
WriteOnly key could otherwise make writers refuse to publish, or a prune delete
live data). Their content (snapshot IDs, pack IDs, times) reveals nothing the
storage does not see anyway, so they are signed, not encrypted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import crypto
from .errors import CorruptedData
from .format import ID_SIZE, PACK_ID_SIZE
from .keys import Keyset, KeyType, Signer

FORGOTTEN_PREFIX = "forgotten/"
CONDEMNED_PREFIX = "condemned/"
NAME_SIZE = 16
RECORD_VERSION = 2
FORGET_CONTEXT = b"rekkord-forget-v2"
CONDEMN_CONTEXT = b"rekkord-condemn-v2"
# Only keys that can read everything may remove anything.
REMOVER_KINDS = frozenset({KeyType.MASTER, KeyType.READ_WRITE})
# A prune record stays at least this long after it is due, so that a writer
# that started before it and has run less than this sees it before publishing.
MARK_KEPT_NS = 3600 * 10**9

_HEAD = struct.Struct("<BqqI")  # version, time ns, grace ns (0 for forgets), count


@dataclass(frozen=True)
class Forgotten:
    """Snapshot IDs whose tags a forget deleted (their records wait for prune)."""

    time_ns: int
    snapshot_ids: tuple[bytes, ...]


@dataclass(frozen=True)
class Condemned:
    """Packs no snapshot used when a prune listed the repository at time_ns;
    a later prune deletes those still unused once time_ns + grace_ns is past."""

    time_ns: int
    grace_ns: int
    packs: tuple[bytes, ...]

    def due(self, now_ns: int, margin_ns: int = 0) -> bool:
        return now_ns >= self.time_ns + self.grace_ns - margin_ns


def _encode(context: bytes, time_ns: int, grace_ns: int, items: tuple[bytes, ...], keys: Keyset,
            repo_id: bytes) -> bytes:
    body = _HEAD.pack(RECORD_VERSION, time_ns, grace_ns, len(items)) + b"".join(items) + keys.signer.encode()
    return body + keys.sign(context + repo_id + body)


def _decode(context: bytes, raw: bytes, size: int, keys: Keyset, repo_id: bytes, what: str
            ) -> tuple[int, int, tuple[bytes, ...]]:
    try:
        version, time_ns, grace_ns, count = _HEAD.unpack_from(raw, 0)
        if version != RECORD_VERSION:
            raise ValueError(f"unsupported version {version}")
        end = _HEAD.size + count * size
        items = tuple(raw[pos:pos + size] for pos in range(_HEAD.size, end, size))
        signer = Signer.decode(raw[end:end + Signer.SIZE])
        signature = raw[end + Signer.SIZE:]
        if len(signature) != crypto.SIGNATURE_SIZE or grace_ns < 0:
            raise ValueError("bad length")
    except (struct.error, ValueError) as exc:
        raise CorruptedData(f"{what} is malformed ({exc})") from None
    problem = signer.certificate_problem(keys) or signer.signature_problem(context + repo_id + raw[:end + Signer.SIZE],
                                                                            signature)
    if problem is None and signer.kind not in REMOVER_KINDS:
        problem = f"is signed by a {signer.kind.label} key, which may not remove anything"
    if problem:
        raise CorruptedData(f"{what} {problem}")
    return time_ns, grace_ns, items


def encode_forgotten(record: Forgotten, keys: Keyset, repo_id: bytes) -> bytes:
    return _encode(FORGET_CONTEXT, record.time_ns, 0, record.snapshot_ids, keys, repo_id)


def decode_forgotten(raw: bytes, keys: Keyset, repo_id: bytes, name: str) -> Forgotten:
    time_ns, _, ids = _decode(FORGET_CONTEXT, raw, ID_SIZE, keys, repo_id, f"forget record '{name}'")
    return Forgotten(time_ns, ids)


def encode_condemned(record: Condemned, keys: Keyset, repo_id: bytes) -> bytes:
    return _encode(CONDEMN_CONTEXT, record.time_ns, record.grace_ns, record.packs, keys, repo_id)


def decode_condemned(raw: bytes, keys: Keyset, repo_id: bytes, name: str) -> Condemned:
    time_ns, grace_ns, packs = _decode(CONDEMN_CONTEXT, raw, PACK_ID_SIZE, keys, repo_id, f"prune record '{name}'")
    return Condemned(time_ns, grace_ns, packs)
