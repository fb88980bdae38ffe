"""The S3 requests the backend makes, signed here (sigv4.py) and sent over http.client.

botocore spent 2.5-2.8 ms of CPU on each request and about a quarter of a
second starting up; this does the same few operations for a fraction of both.
Failures are raised as the botocore exceptions botocore would raise
(ClientError with the S3 error code and HTTP status in .response, and its
connection errors), so s3.py classifies them one way whatever sent the request.

Each thread keeps one persistent connection (requests run in worker threads);
a connection the server closed while idle is noticed before reuse and replaced.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus, urlsplit
from xml.etree import ElementTree

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ProxyConnectionError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)

from ..errors import ConfigError
from . import sigv4
from .proxyenv import Proxy, proxy_for

# An error answer is a short XML document; a longer body is not read (nor trusted).
MAX_ERROR_BODY = 64 * 1024


class MalformedAnswer(BotoCoreError):
    """An answer that is not what S3 sends (the server is hostile or broken)."""

    fmt = "{detail}"


@dataclass(frozen=True)
class Listed:
    key: str
    size: int
    mtime_ns: int


class S3Client:
    def __init__(self, endpoint: str, bucket: str, region: str, key_id: str, secret: str, *,
                 path_style: bool, environ: Mapping[str, str] | None = None,
                 connect_timeout: float = 5.0, read_timeout: float = 60.0) -> None:
        environ = os.environ if environ is None else environ
        parts = urlsplit(endpoint)
        self.endpoint = endpoint
        self._tls = parts.scheme.lower() == "https"
        default_port = 443 if self._tls else 80
        self._port = parts.port or default_port
        host = parts.hostname or ""
        if not path_style and _dns_compatible(bucket, self._tls):
            self._host, self._path = f"{bucket}.{host}", ""
        else:  # path style, as botocore falls back to for names a host cannot carry
            self._host, self._path = host, "/" + sigv4.uri_encode(bucket)
        shown_host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = shown_host if self._port == default_port else f"{shown_host}:{self._port}"
        self._region = region
        self._key_id = key_id
        self._secret = secret
        self._day_key: tuple[str, bytes] = ("", b"")
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._proxy: Proxy | None = proxy_for("https" if self._tls else "http", self._host, self._port, environ)
        self._ssl = _tls_context(environ.get("AWS_CA_BUNDLE") or None) if self._tls else None
        self._local = threading.local()
        # weak: a worker thread that ends takes its connection with it
        self._open: weakref.WeakSet[http.client.HTTPConnection] = weakref.WeakSet()
        self._lock = threading.Lock()

    # --- operations ---------------------------------------------------------------

    def put_object(self, key: str, pieces: Sequence[bytes | bytearray], if_none_match: bool) -> None:
        """Store the pieces, one after another, as the object (sent as they are, never joined)."""
        headers = {"If-None-Match": "*"} if if_none_match else {}
        self._request("PutObject", "PUT", key, headers=headers, pieces=pieces)

    def get_object(self, key: str, byte_range: str | None = None) -> bytes:
        headers = {"Range": byte_range} if byte_range else {}
        return self._request("GetObject", "GET", key, headers=headers)[1]

    def head_object(self, key: str) -> int:
        """The object's size."""
        headers = self._request("HeadObject", "HEAD", key)[0]
        return int(headers.get("content-length", "0"))

    def delete_object(self, key: str) -> None:
        self._request("DeleteObject", "DELETE", key)

    def list_objects(self, prefix: str, token: str | None, limit: int) -> tuple[list[Listed], str | None]:
        """One page of ListObjectsV2: the objects and the token of the next page (None: last)."""
        query = [("list-type", "2"), ("prefix", prefix), ("max-keys", str(limit)), ("encoding-type", "url")]
        if token:
            query.append(("continuation-token", token))
        body = self._request("ListObjectsV2", "GET", "", query=query)[1]
        return _parse_listing(body)

    def close(self) -> None:
        with self._lock:
            connections, self._open = list(self._open), weakref.WeakSet()
        for connection in connections:
            connection.close()

    # --- requests --------------------------------------------------------------------

    def _request(self, operation: str, method: str, key: str, *, query: Sequence[tuple[str, str]] = (),
                 headers: Mapping[str, str] | None = None,
                 pieces: Sequence[bytes | bytearray] = ()) -> tuple[dict[str, str], bytes]:
        """Send one signed request; the answer's headers (lower-case names) and body,
        or the botocore exception for what went wrong."""
        path = self._path + "/" + sigv4.uri_encode(key, keep_slash=True) if key else self._path or "/"
        canonical_query = sigv4.canonical_query(query)
        target = f"{path}?{canonical_query}" if canonical_query else path
        signed = self._sign(method, path, canonical_query, dict(headers or {}), pieces)
        body: bytes | bytearray | Iterator[bytes | bytearray] | None = None
        if len(pieces) == 1:
            body = pieces[0]
        elif pieces:  # sent one by one: Content-Length keeps http.client from chunking them
            signed["Content-Length"] = str(sum(len(piece) for piece in pieces))
            body = iter(pieces)
        if self._proxy is not None and not self._tls:
            target = f"http://{self._host_header}{target}"  # a plain proxy forwards full URLs
            if self._proxy.authorization:
                signed["Proxy-Authorization"] = self._proxy.authorization
        connection = self._connection()
        try:
            connection.request(method, target, body=body, headers=signed)
            response = connection.getresponse()
            if response.status >= 300:
                data = response.read(MAX_ERROR_BODY)
                if not response.isclosed():
                    self._discard(connection)  # the rest of a long answer is never read
            else:
                data = response.read()
            if response.will_close:
                self._discard(connection)
        except BaseException as exc:
            self._discard(connection)
            raise self._botocore_error(exc, connecting=False) from exc
        answer_headers = {name.lower(): value for name, value in response.getheaders()}
        if response.status >= 300:
            raise _client_error(operation, response.status, answer_headers, data)
        return answer_headers, data

    def _sign(self, method: str, path: str, query: str, headers: dict[str, str],
              pieces: Sequence[bytes | bytearray]) -> dict[str, str]:
        now = time.gmtime()
        timestamp = time.strftime("%Y%m%dT%H%M%SZ", now)
        if self._day_key[0] != timestamp[:8]:
            self._day_key = (timestamp[:8], sigv4.signing_key(self._secret, timestamp[:8], self._region, "s3"))
        if self._tls:
            payload = sigv4.UNSIGNED_PAYLOAD  # TLS protects the body, as with botocore
        else:
            digest = hashlib.sha256()
            for piece in pieces:
                digest.update(piece)
            payload = digest.hexdigest()
        headers.update({"Host": self._host_header, "x-amz-date": timestamp, "x-amz-content-sha256": payload})
        headers["Authorization"] = sigv4.authorization(
            method=method, path=path, query=query, headers=headers, payload_hash=payload,
            key_id=self._key_id, key=self._day_key[1], timestamp=timestamp, region=self._region,
        )
        return headers

    # --- connections -------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is not None and connection.sock is not None and not _dropped(connection.sock):
            return connection
        if connection is not None:
            self._discard(connection)
        connection = self._new_connection()
        try:
            connection.connect()
        except BaseException as exc:
            connection.close()
            raise self._botocore_error(exc, connecting=True) from exc
        connection.sock.settimeout(self._read_timeout)
        # a body sent after its headers must not wait for the headers' ACK (Nagle)
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._local.connection = connection
        with self._lock:
            self._open.add(connection)
        return connection

    def _new_connection(self) -> http.client.HTTPConnection:
        proxy = self._proxy
        if self._tls:
            if proxy is None:
                return http.client.HTTPSConnection(self._host, self._port, timeout=self._connect_timeout,
                                                   context=self._ssl)
            tunnelled = http.client.HTTPSConnection(proxy.host, proxy.port, timeout=self._connect_timeout,
                                                    context=self._ssl)
            auth = {"Proxy-Authorization": proxy.authorization} if proxy.authorization else None
            tunnelled.set_tunnel(self._host, self._port, headers=auth)
            return tunnelled
        if proxy is None:
            return http.client.HTTPConnection(self._host, self._port, timeout=self._connect_timeout)
        return http.client.HTTPConnection(proxy.host, proxy.port, timeout=self._connect_timeout)

    def _discard(self, connection: http.client.HTTPConnection) -> None:
        connection.close()
        if getattr(self._local, "connection", None) is connection:
            self._local.connection = None
        with self._lock:
            self._open.discard(connection)

    def _botocore_error(self, exc: BaseException, connecting: bool) -> BaseException:
        """The botocore exception for a socket, TLS or HTTP failure (exc itself when
        it is none of those, like KeyboardInterrupt)."""
        url = self.endpoint
        if isinstance(exc, (ssl.SSLError, ssl.CertificateError)):
            return SSLError(endpoint_url=url, error=exc)
        if not isinstance(exc, (OSError, http.client.HTTPException)):
            return exc
        if connecting and self._proxy is not None:
            return ProxyConnectionError(proxy_url=self._proxy.shown, error=exc)
        if isinstance(exc, TimeoutError):
            return (ConnectTimeoutError if connecting else ReadTimeoutError)(endpoint_url=url, error=exc)
        if connecting:
            return EndpointConnectionError(endpoint_url=url, error=exc)
        if isinstance(exc, http.client.IncompleteRead):
            return ResponseStreamingError(error=exc)
        return ConnectionClosedError(endpoint_url=url, error=exc)


def _tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """The system's trust store, or only the certificates of AWS_CA_BUNDLE."""
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"AWS_CA_BUNDLE: cannot load certificates from '{ca_bundle}': {reason}") from None


def _dropped(sock: Any) -> bool:
    """True when an idle connection has something to read: the server closed it
    (or sent what nobody asked for); either way it cannot carry a request."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _dns_compatible(bucket: str, tls: bool) -> bool:
    """Can the bucket be the first label of a host name (with TLS, one label:
    certificates cover one level of wildcard)?"""
    if tls and "." in bucket:
        return False
    labels = bucket.split(".")
    return 3 <= len(bucket) <= 63 and all(
        label and label[0].isalnum() and label[-1].isalnum()
        and all(c.isdigit() or ("a" <= c <= "z") or c == "-" for c in label)
        for label in labels
    )


def _client_error(operation: str, status: int, headers: dict[str, str], body: bytes) -> ClientError:
    """The ClientError botocore raises: the S3 error document's code and message, or
    the status as the code when there is no document (HEAD answers have none)."""
    code, message = str(status), http.client.responses.get(status, "")
    if body:
        try:
            root = ElementTree.fromstring(body)
        except ElementTree.ParseError:
            pass
        else:
            fields = {_local_name(child.tag): (child.text or "") for child in root}
            code = fields.get("Code") or code
            message = fields.get("Message") or message
    response: dict[str, Any] = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers},
    }
    return ClientError(response, operation)


def _parse_listing(body: bytes) -> tuple[list[Listed], str | None]:
    try:
        root = ElementTree.fromstring(body)
        children = list(root)
        fields = {_local_name(child.tag): (child.text or "").strip() for child in children
                  if _local_name(child.tag) != "Contents"}
        url_encoded = fields.get("EncodingType", "").lower() == "url"  # asked for, not always done
        items: list[Listed] = []
        for child in children:
            if _local_name(child.tag) == "Contents":
                item = {_local_name(field.tag): (field.text or "") for field in child}
                key = unquote_plus(item["Key"]) if url_encoded else item["Key"]
                modified = datetime.fromisoformat(item["LastModified"].replace("Z", "+00:00"))
                items.append(Listed(key, int(item["Size"]), int(modified.timestamp() * 1e9)))
    except (ElementTree.ParseError, KeyError, ValueError) as exc:
        raise MalformedAnswer(detail=f"malformed ListObjectsV2 answer ({type(exc).__name__}: {exc})") from None
    token = fields.get("NextContinuationToken") or None
    return items, token if fields.get("IsTruncated", "").lower() == "true" else None


def _local_name(tag: str) -> str:
    return tag.rpartition("}")[2]
