"""Which HTTP proxy, if any, a request to an S3 endpoint goes through.

The variables are those curl, boto3 and most tools read: https_proxy for
https:// endpoints, http_proxy for http:// ones (lower case first, then upper
case), and no_proxy to go direct. The proxy itself is spoken to in plain HTTP:
CONNECT tunnels for https endpoints, full URLs for http ones.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    authorization: str | None  # Proxy-Authorization header value (Basic), from user:password@
    shown: str  # the URL without its password, for messages


def proxy_for(scheme: str, host: str, port: int, environ: Mapping[str, str]) -> Proxy | None:
    """The proxy for scheme://host:port, or None to connect directly."""
    name = f"{scheme}_proxy"
    url = environ.get(name) or environ.get(name.upper()) or ""
    if not url.strip():
        return None
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    if bypasses(no_proxy, host, port):
        return None
    return parse_proxy_url(url.strip(), name)


def bypasses(no_proxy: str, host: str, port: int) -> bool:
    """True when no_proxy names the host: '*', the host or a parent domain
    (with or without a leading dot), an IP address or network, each optionally
    with ':port'."""
    host = host.strip("[]").lower()
    address = _address(host)
    for entry in (item.strip().lower() for item in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        entry, wanted_port = _split_port(entry)
        if wanted_port is not None and wanted_port != port:
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.lstrip(".").removeprefix("*.")
        if host == entry or host.endswith("." + entry):
            return True
    return False


def parse_proxy_url(url: str, variable: str) -> Proxy:
    if "://" not in url:
        url = "http://" + url  # "host:port", as curl takes it
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    shown = _without_password(parts.scheme, parts.hostname, port if port != -1 else None, parts.username)
    if parts.scheme.lower() != "http":
        raise ConfigError(f"{variable}: proxy '{shown}' is not supported (only http:// proxies are)")
    if not parts.hostname or port == -1:
        raise ConfigError(f"{variable}: malformed proxy URL '{shown}'")
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
    return Proxy(parts.hostname, port or 80, authorization, shown)


def _without_password(scheme: str, host: str | None, port: int | None, user: str | None) -> str:
    who = f"{user}@" if user else ""
    where = f"[{host}]" if host and ":" in host else host or ""
    suffix = f":{port}" if port else ""
    return f"{scheme}://{who}{where}{suffix}"


def _split_port(entry: str) -> tuple[str, int | None]:
    """'host:port' -> (host, port); '[v6]:port' too; a bare IPv6 address keeps its colons."""
    if entry.startswith("["):
        inside, _, rest = entry[1:].partition("]")
        return inside, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        if port.isdigit():
            return name, int(port)
    return entry, None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
