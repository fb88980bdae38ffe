"""SSH host keys, checked as ssh does: `Fingerprint = SHA256:...` pins the
key; otherwise ~/.ssh/known_hosts (and /etc/ssh/ssh_known_hosts) decide, and
an unknown host is refused with its fingerprint (or accepted at a prompt on a
terminal, then remembered in ~/.ssh/known_hosts). Also asks for a password on
a terminal when none is configured, loads the client's key file, and says
plainly why a server was refused or refused us."""

from __future__ import annotations

import getpass
import os
import sys
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, StorageError

if TYPE_CHECKING:
    from .sftp import SFTPStorage

DEFAULT_PORT = 22
SYSTEM_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"


def user_known_hosts() -> str:
    return os.path.join(os.path.expanduser("~"), ".ssh", "known_hosts")


class HostClient:
    """asyncssh client callbacks: host key policy and the password prompt."""

    def __init__(self, storage: SFTPStorage) -> None:
        self.storage = storage
        self.offered: str | None = None  # SHA256 fingerprint the server showed
        self.known_keys = 0  # keys known_hosts lists for this host
        self.prompted = False

    def factory(self) -> Any:
        import asyncssh

        policy = self

        class Client(asyncssh.SSHClient):
            def validate_host_public_key(self, host: str, addr: str, port: int, key: Any) -> bool:
                return policy.validate(host, port, key)

            def password_auth_requested(self) -> str | None:
                return policy.ask_password()

        return Client()

    def known_hosts(self, host: str, addr: str, port: int | None) -> tuple[list, list, list]:
        """Keys trusted for this host; empty when a fingerprint is pinned."""
        import asyncssh

        if self.storage.settings.fingerprint:
            return [], [], []
        files = [f for f in (user_known_hosts(), SYSTEM_KNOWN_HOSTS) if os.path.isfile(f)]
        if not files:
            return [], [], []
        try:
            matched = asyncssh.read_known_hosts(files).match(host, addr, port)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read known_hosts: {exc}") from None
        self.known_keys = len(matched[0])
        return list(matched[0]), list(matched[1]), list(matched[2])

    def validate(self, host: str, port: int, key: Any) -> bool:
        """Called when the key is not among the known_hosts keys."""
        self.offered = key.get_fingerprint("sha256")
        pinned = self.storage.settings.fingerprint
        if pinned:
            return same_fingerprint(pinned, self.offered)
        if self.known_keys or not sys.stdin.isatty():
            return False
        where = self.storage.host_port
        print(f"The authenticity of SFTP host {where} can't be established.\n"
              f"Its {key.get_algorithm()} key fingerprint is {self.offered}.", file=sys.stderr)
        print("Trust it and remember it in ~/.ssh/known_hosts (yes/no)? ", end="", file=sys.stderr, flush=True)
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            return False
        remember_host(host, port, key)
        return True

    def ask_password(self) -> str | None:
        settings = self.storage.settings
        if settings.password or settings.key_file or self.prompted or not sys.stdin.isatty():
            return None  # a configured password was already tried: do not prompt
        self.prompted = True
        return getpass.getpass(f"SFTP password for {self.storage.login}: ")

    def host_key_error(self) -> StorageError:
        """Why the server's host key was refused."""
        offered = self.offered or "unknown"
        pinned = self.storage.settings.fingerprint
        where = self.storage.host_port
        if pinned:
            return StorageError(
                f"host key of SFTP server {where} does not match the pinned fingerprint: "
                f"expected {pinned}, got {offered}"
            )
        if self.known_keys:
            return StorageError(
                f"host key of SFTP server {where} has CHANGED (known_hosts lists another key; "
                f"offered {offered}): refusing to connect"
            )
        return StorageError(
            f"SFTP host {where} is unknown (not in known_hosts); its key fingerprint is {offered}: "
            f"after checking it, set Fingerprint = {offered} in the [SFTP] section (or SSH_FINGERPRINT)"
        )

    def login_refused(self) -> str:
        settings = self.storage.settings
        if settings.password and settings.key_file:
            how = "wrong password or key file"
        elif settings.password:
            how = "wrong password"
        elif settings.key_file:
            how = f"key '{settings.key_file}' not accepted"
        else:
            how = "no password or key file set ([SFTP] Password or KeyFile, SSH_PASSWORD or SSH_KEYFILE)"
        return f"SFTP server {self.storage.host_port} refused login as '{self.storage.user}': {how}"


def load_client_key(path: str) -> Any:
    import asyncssh

    try:
        return asyncssh.read_private_key(path)
    except FileNotFoundError:
        raise ConfigError(f"SSH key file '{path}' does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read SSH key file '{path}': {exc.strerror}") from None
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"cannot use SSH key file '{path}': {first} (passphrase-protected keys are not supported)"
        ) from None


def same_fingerprint(pinned: str, offered: str) -> bool:
    return pinned.rstrip("=") == offered.rstrip("=")


def remember_host(host: str, port: int, key: Any) -> None:
    path = user_known_hosts()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    name = host if port == DEFAULT_PORT else f"[{host}]:{port}"
    line = f"{name} {key.export_public_key('openssh').decode().strip()}\n"
    with open(path, "a", encoding="ascii") as handle:
        handle.write(line)
