"""Configuration: INI file + environment + command line -> a typed Config.

Precedence for the repository URL and keyfile: command line, then REKKORD_*
environment variables, then the config file. Ambient credentials (AWS_*, S3_*,
SSH_*) only fill settings the config file leaves empty, so a stray AWS variable
never silently replaces credentials written in the file.
"""

from __future__ import annotations

import configparser
import getpass
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .errors import ConfigError

# Known settings per section; anything else is a typo worth reporting.
KNOWN_SETTINGS: dict[str, set[str]] = {
    "Repository": {"URL", "KeyFile", "RetryTime"},
    "S3": {"AccessKeyID", "KeyID", "SecretKey", "Region"},
    "SFTP": {"Password", "KeyFile", "Fingerprint", "Port"},
}
# Other names of a setting: (section, alias) -> the documented name
ALIASES: dict[tuple[str, str], str] = {("S3", "keyid"): "AccessKeyID"}

# Seconds a failing storage operation is retried before giving up (storage/retry.py).
DEFAULT_RETRY_TIME = 120.0

DEFAULT_CONFIG_PATHS = (
    Path("~/.config/rekkord/rekkord.ini"),
    Path("/etc/rekkord/rekkord.ini"),
)


@dataclass(frozen=True)
class LocalLocation:
    path: str

    def describe(self) -> str:
        return self.path


@dataclass(frozen=True)
class S3Location:
    endpoint: str  # scheme://host[:port], no trailing slash
    bucket: str
    prefix: str  # "" or "some/prefix" without leading or trailing slash
    region: str | None
    path_style: bool

    def describe(self) -> str:
        suffix = f"/{self.prefix}" if self.prefix else ""
        return f"s3 {self.endpoint} bucket {self.bucket}{suffix}"


@dataclass(frozen=True)
class SFTPLocation:
    user: str | None
    host: str
    port: int | None  # None: take [SFTP] Port, else 22
    path: str

    def describe(self) -> str:
        who = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"sftp {who}{self.host}{port}{self.path}"


Location = LocalLocation | S3Location | SFTPLocation


@dataclass
class S3Settings:
    key_id: str | None = None
    secret_key: str | None = None
    region: str | None = None


@dataclass
class SFTPSettings:
    password: str | None = None
    key_file: str | None = None
    fingerprint: str | None = None
    port: int | None = None


@dataclass
class Config:
    location: Location | None
    url: str | None
    key_file: str | None
    threads: int
    s3: S3Settings = field(default_factory=S3Settings)
    sftp: SFTPSettings = field(default_factory=SFTPSettings)
    config_file: str | None = None
    retry_time: float = DEFAULT_RETRY_TIME

    def require_location(self) -> Location:
        if self.location is None:
            raise ConfigError(
                "no repository given: use -R URL, set REKKORD_REPOSITORY, "
                "or set URL in the [Repository] section of the config file"
            )
        return self.location

    def require_key_file(self) -> str:
        if not self.key_file:
            raise ConfigError(
                "no keyfile given: use -K FILE, set REKKORD_KEYFILE, "
                "or set KeyFile in the [Repository] section of the config file"
            )
        return self.key_file


# --- URL parsing -------------------------------------------------------------

# Virtual-host style S3 hosts: (pattern, region group or None). The bucket is the
# first label. Order matters: more specific first.
_VHOST_PATTERNS: list[tuple[re.Pattern[str], str | None]] = [
    (re.compile(r"^(?P<bucket>[^.]+)\.s3[.-](?P<region>[a-z0-9-]+)\.amazonaws\.com$"), None),
    (re.compile(r"^(?P<bucket>[^.]+)\.s3\.amazonaws\.com$"), "us-east-1"),
    (re.compile(r"^(?P<bucket>[^.]+)\.s3\.(?P<region>[a-z0-9-]+)\.backblazeb2\.com$"), None),
    (re.compile(r"^(?P<bucket>[^.]+)\.s3\.(?P<region>[a-z0-9-]+)\.scw\.cloud$"), None),
    (re.compile(r"^(?P<bucket>[^.]+)\.sos-(?P<region>[a-z0-9-]+)\.exo\.io$"), None),
    (re.compile(r"^(?P<bucket>[^.]+)\.[0-9a-f]{32}\.r2\.cloudflarestorage\.com$"), "auto"),
]

# Path-style hosts whose region we can read off the host name.
_PATH_STYLE_REGION: list[tuple[re.Pattern[str], str | None]] = [
    (re.compile(r"^s3[.-](?P<region>[a-z0-9-]+)\.amazonaws\.com$"), None),
    (re.compile(r"^s3\.amazonaws\.com$"), "us-east-1"),
    (re.compile(r"^s3\.(?P<region>[a-z0-9-]+)\.backblazeb2\.com$"), None),
    (re.compile(r"^s3\.(?P<region>[a-z0-9-]+)\.scw\.cloud$"), None),
    (re.compile(r"^sos-(?P<region>[a-z0-9-]+)\.exo\.io$"), None),
    (re.compile(r"^[0-9a-f]{32}\.r2\.cloudflarestorage\.com$"), "auto"),
]

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,254}$", re.IGNORECASE)
# user:password@ right after the scheme (or after "s3:"): redacted in messages.
_USERINFO_RE = re.compile(r"(://|^s3:)([^/@]*?):([^/@]*)@", re.IGNORECASE)


def _redact(url: str) -> str:
    """The URL as shown in messages: a password in it is replaced by ***."""
    return _USERINFO_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}:***@", url, count=1)


def _check_port(port: int | None, shown: str) -> None:
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"malformed repository URL '{shown}': bad port")


_SCP_RE = re.compile(r"^(?:(?P<user>[^@/:]+)@)?(?P<host>[^@/:\[\]]+|\[[0-9a-fA-F:]+\]):(?P<path>.*)$")


def parse_url(url: str) -> Location:
    """Parse any repository URL form rekkord accepts."""
    url = url.strip()
    if not url:
        raise ConfigError("repository URL is empty")
    shown = _redact(url)
    lowered = url.lower()
    if lowered.startswith("s3:"):
        rest = url[3:]
        if rest.startswith("//"):
            rest = rest[2:]
        if "://" in rest and not re.match(r"^https?://", rest, re.IGNORECASE):
            scheme = rest.split("://", 1)[0]
            raise ConfigError(f"malformed repository URL '{shown}': unsupported scheme '{scheme}' after 's3:'")
        if not re.match(r"^https?://", rest, re.IGNORECASE):
            rest = "https://" + rest
        return _parse_s3(rest, shown)
    if lowered.startswith(("http://", "https://")):
        return _parse_s3(url, shown)
    if lowered.startswith(("ssh://", "sftp://")):
        return _parse_ssh_url(url, shown)
    if lowered.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc and parts.netloc.lower() != "localhost":
            raise ConfigError(
                f"malformed repository URL '{shown}': file:// URLs name a local path "
                f"(file:///path), not host '{parts.netloc}'"
            )
        if parts.query or parts.fragment:
            raise ConfigError(f"malformed repository URL '{shown}': unexpected query or fragment")
        path = unquote(parts.path)
        if not path:
            raise ConfigError(f"malformed repository URL '{shown}': file:// URL without a path")
        return LocalLocation(path)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise ConfigError(f"malformed repository URL '{shown}': unsupported scheme '{scheme}'")
    # scp-like user@host:/path; a local path never has ':' before its first '/'
    head = url.split("/", 1)[0]
    if ":" in head and not re.match(r"^[A-Za-z]:$", head):
        match = _SCP_RE.match(url)
        if not match or not match.group("path"):
            raise ConfigError(f"malformed repository URL '{shown}': expected user@host:/path")
        host = match.group("host").strip("[]")
        return SFTPLocation(match.group("user"), host, None, match.group("path"))
    return LocalLocation(url)


def _parse_s3(url: str, original: str) -> S3Location:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if not host:
        raise ConfigError(f"malformed repository URL '{original}': no host")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"malformed repository URL '{original}': bad port") from None
    _check_port(port, original)
    if parts.query or parts.fragment:
        raise ConfigError(f"malformed repository URL '{original}': unexpected query or fragment")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"malformed repository URL '{original}': put S3 credentials in the [S3] section, not the URL"
        )
    if ":" in host:  # IPv6 literal: keep its brackets in the endpoint
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    segments = [unquote(s) for s in parts.path.split("/") if s]

    for pattern, fixed_region in _VHOST_PATTERNS:
        match = pattern.match(host)
        if match:
            bucket = match.group("bucket")
            region = fixed_region or match.group("region")
            endpoint_host = host[len(bucket) + 1:]
            endpoint = f"{scheme}://{endpoint_host}:{port}" if port else f"{scheme}://{endpoint_host}"
            return S3Location(endpoint, bucket, "/".join(segments), region, path_style=False)

    if not segments:
        raise ConfigError(f"malformed repository URL '{original}': no bucket in the path")
    bucket = segments[0]
    if not _BUCKET_RE.match(bucket):
        raise ConfigError(f"malformed repository URL '{original}': invalid bucket name '{bucket}'")
    region = None
    for pattern, fixed_region in _PATH_STYLE_REGION:
        match = pattern.match(host)
        if match:
            region = fixed_region or match.group("region")
            break
    return S3Location(f"{scheme}://{netloc}", bucket, "/".join(segments[1:]), region, path_style=True)


def _parse_ssh_url(url: str, shown: str) -> SFTPLocation:
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise ConfigError(f"malformed repository URL '{shown}': no host")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"malformed repository URL '{shown}': bad port") from None
    _check_port(port, shown)
    if parts.password is not None:
        raise ConfigError(f"malformed repository URL '{shown}': put the password in the [SFTP] section, not the URL")
    if parts.query or parts.fragment:
        raise ConfigError(
            f"malformed repository URL '{shown}': unexpected query or fragment "
            "(write '?' and '#' in paths as %3F and %23)"
        )
    path = unquote(parts.path) or "/"
    if path.startswith("/~/"):
        path = path[3:] or "."  # ssh://host/~/dir means relative to the home directory
    user = unquote(parts.username) if parts.username else None
    return SFTPLocation(user, host, port, path)


# --- loading -----------------------------------------------------------------


def _read_ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep key case
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file '{path}': {getattr(exc, 'strerror', None) or exc}") from None
    except configparser.Error as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError(f"config file '{path}' is malformed: {first_line}") from None
    for section in parser.sections():
        known = KNOWN_SETTINGS.get(section)
        if known is None:
            raise ConfigError(f"config file '{path}': unknown section [{section}]")
        lowered = {k.lower(): k for k in known}
        seen: set[str] = set()
        for key in parser[section]:
            if key.lower() not in lowered:
                raise ConfigError(f"config file '{path}': unknown setting '{key}' in [{section}]")
            canonical = ALIASES.get((section, key.lower()), lowered[key.lower()]).lower()
            if canonical in seen:
                raise ConfigError(f"config file '{path}': setting '{lowered[canonical]}' appears twice in [{section}]"
                                  + (f" (as '{key}')" if key.lower() != canonical else ""))
            seen.add(canonical)
    return parser


def _get(parser: configparser.ConfigParser | None, section: str, key: str) -> str | None:
    if parser is None or not parser.has_section(section):
        return None
    for name, value in parser[section].items():
        if name.lower() == key.lower():
            value = value.strip()
            return value or None
    return None


def _parse_port(value: str | None, where: str) -> int | None:
    if value is None:
        return None
    try:
        port = int(value)
    except ValueError:
        raise ConfigError(f"{where}: port '{value}' is not a number") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{where}: port {port} is out of range")
    return port


def _parse_retry_time(value: str | None, where: str) -> float:
    """Seconds (0 turns retries off); a number, not negative."""
    if value is None:
        return DEFAULT_RETRY_TIME
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ConfigError(f"{where}: retry time '{value}' is not a number of seconds (0 or more)")
    return seconds


def find_config_file(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    if explicit:
        return Path(explicit)
    if env.get("REKKORD_CONFIG_FILE"):
        return Path(env["REKKORD_CONFIG_FILE"])
    for candidate in DEFAULT_CONFIG_PATHS:
        candidate = candidate.expanduser()
        if candidate.is_file():
            return candidate
    return None


def _s3_settings(parser: configparser.ConfigParser | None, env: Mapping[str, str]) -> S3Settings:
    """[S3] of the config file, else the variables AWS tools use."""
    return S3Settings(
        key_id=_get(parser, "S3", "AccessKeyID") or _get(parser, "S3", "KeyID")
        or env.get("AWS_ACCESS_KEY_ID") or env.get("S3_ACCESS_KEY_ID"),
        secret_key=_get(parser, "S3", "SecretKey")
        or env.get("AWS_SECRET_ACCESS_KEY")
        or env.get("S3_SECRET_ACCESS_KEY"),
        region=_get(parser, "S3", "Region") or env.get("AWS_REGION") or env.get("S3_REGION"),
    )


def _sftp_settings(parser: configparser.ConfigParser | None, env: Mapping[str, str], where: str,
                   key_file: str | None) -> SFTPSettings:
    """[SFTP] of the config file (key_file already made relative to it), else SSH_* variables."""
    sftp = SFTPSettings(
        password=_get(parser, "SFTP", "Password") or env.get("SSH_PASSWORD"),
        key_file=key_file or env.get("SSH_KEYFILE"),
        fingerprint=_get(parser, "SFTP", "Fingerprint") or env.get("SSH_FINGERPRINT"),
        port=_parse_port(_get(parser, "SFTP", "Port"), where),
    )
    if sftp.fingerprint and not re.match(r"^SHA256:[A-Za-z0-9+/]{43}=?$", sftp.fingerprint):
        raise ConfigError(
            f"SFTP fingerprint '{sftp.fingerprint}' is malformed: expected SHA256:<43 base64 characters>"
        )
    return sftp


def load_config(
    config_file: str | None = None,
    repository: str | None = None,
    key_file: str | None = None,
    threads: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    env = os.environ if env is None else env
    path = find_config_file(config_file, env)
    parser = _read_ini(path) if path else None
    base_dir = path.parent if path else Path(".")

    def relative_to_config(value: str | None) -> str | None:
        if value is None:
            return None
        expanded = Path(value).expanduser()
        return str(expanded if expanded.is_absolute() else base_dir / expanded)

    url = repository or env.get("REKKORD_REPOSITORY") or None
    if url is None:
        url = _get(parser, "Repository", "URL")
        if url is not None:
            location = parse_url(url)
            if isinstance(location, LocalLocation):
                location = LocalLocation(relative_to_config(location.path) or location.path)
        else:
            location = None
    else:
        location = parse_url(url)

    key = key_file or env.get("REKKORD_KEYFILE") or env.get("REKKORD_KEY_FILE") or None
    if key is None:
        key = relative_to_config(_get(parser, "Repository", "KeyFile"))

    if threads is None:
        threads = os.cpu_count() or 2
    if threads < 1:
        raise ConfigError(f"thread count must be at least 1, not {threads}")

    where = f"config file '{path}'"
    s3 = _s3_settings(parser, env)
    sftp = _sftp_settings(parser, env, where, relative_to_config(_get(parser, "SFTP", "KeyFile")))
    if env.get("REKKORD_RETRY_TIME"):
        retry_time = _parse_retry_time(env["REKKORD_RETRY_TIME"], "REKKORD_RETRY_TIME")
    else:
        retry_time = _parse_retry_time(_get(parser, "Repository", "RetryTime"), where)
    return Config(
        location=location,
        url=url,
        key_file=key,
        threads=threads,
        s3=s3,
        sftp=sftp,
        config_file=str(path) if path else None,
        retry_time=retry_time,
    )


def prompt_secret(what: str) -> str:
    """Ask for a secret on the terminal; a clear error when there is none."""
    if not sys.stdin.isatty():
        raise ConfigError(f"{what} is not set and there is no terminal to ask for it")
    value = getpass.getpass(f"{what}: ")
    if not value:
        raise ConfigError(f"{what} is empty")
    return value
