"""AWS Signature Version 4 for S3 requests (header-based, as the AWS docs describe it).

Only what the S3 backend sends is covered: one region, the "s3" service by
default, headers signed as given, the payload hash passed in
(x-amz-content-sha256). Pure functions over strings and bytes: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"

# RFC 3986 unreserved characters: the only ones SigV4 leaves unencoded.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")


def uri_encode(text: str, keep_slash: bool = False) -> str:
    """Percent-encode every UTF-8 byte outside the unreserved set (uppercase hex);
    '/' stays as is in a path (keep_slash), never in a query."""
    out: list[str] = []
    for byte in text.encode("utf-8"):
        if byte in _UNRESERVED or (keep_slash and byte == 0x2F):
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    """Encoded name=value pairs sorted by encoded name, then value; also the query sent."""
    encoded = sorted((uri_encode(name), uri_encode(value)) for name, value in params)
    return "&".join(f"{name}={value}" for name, value in encoded)


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """The key derived from the secret for one day, region and service."""
    key = _hmac(("AWS4" + secret).encode("utf-8"), date)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    return key


def authorization(*, method: str, path: str, query: str, headers: Mapping[str, str], payload_hash: str,
                  key_id: str, key: bytes, timestamp: str, region: str, service: str = "s3") -> str:
    """The Authorization header for a request.

    path is already encoded (see uri_encode), query is canonical_query()'s
    output, headers hold every header to sign (host and x-amz-date among them),
    key comes from signing_key() for timestamp's day (YYYYMMDD'T'HHMMSS'Z').
    """
    names = sorted(name.lower() for name in headers)
    values = {name.lower(): " ".join(str(value).split()) for name, value in headers.items()}
    signed = ";".join(names)
    canonical = "\n".join((
        method, path, query,
        "".join(f"{name}:{values[name]}\n" for name in names),
        signed, payload_hash,
    ))
    scope = f"{timestamp[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join((ALGORITHM, timestamp, scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest()))
    signature = hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{ALGORITHM} Credential={key_id}/{scope}, SignedHeaders={signed}, Signature={signature}"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()
