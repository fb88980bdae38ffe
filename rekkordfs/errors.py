"""One error hierarchy. Every error a user can cause carries a one-line message
and an exit code; the CLI prints the message and exits, never a traceback."""

from __future__ import annotations

import os
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def errno_error(code: int) -> OSError:
    """An OSError of this errno with its usual text: what the FUSE adapters
    reply with (the mount's nodes and the staging tree alike)."""
    return OSError(code, os.strerror(code))


class RekkordError(Exception):
    """Base of every error meant for the user."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(RekkordError):
    """Bad command line or arguments."""

    exit_code = 2


class ConfigError(RekkordError):
    """Missing, unreadable or invalid configuration."""


class KeyFileError(RekkordError):
    """A keyfile that cannot be read, is corrupted, or belongs elsewhere."""


class CapabilityError(RekkordError):
    """The key type lacks what the operation needs."""


class RepositoryError(RekkordError):
    """The repository is missing, not initialized, or malformed."""


class StorageError(RekkordError):
    """A backend failed: unreachable server, permission denied, I/O error."""


class TransientStorageError(StorageError):
    """A failure that may pass if the operation is tried again: a dropped or
    refused connection, a timeout, a busy or restarting server.

    answered: the server itself answered (S3 503, SlowDown), so it is up and
    reachable; worth retrying even before anything succeeded in this process.
    """

    def __init__(self, message: str, *, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


class ObjectMissing(StorageError):
    """An object the repository refers to does not exist."""


class CorruptedData(RekkordError):
    """Stored data failed authentication or does not match its ID."""


class RestoreError(RekkordError):
    """Restore refused or failed (non-empty destination, path escape...)."""


class NotFound(RekkordError):
    """No snapshot, channel or path matches what the user asked for."""


def first_of(exc: BaseException, kind: type[E] | tuple[type[BaseException], ...]) -> E | None:
    """exc if it is a `kind`, else the first `kind` inside it (exception groups,
    however nested), else None."""
    if isinstance(exc, kind):
        return exc  # type: ignore[return-value]
    if isinstance(exc, BaseExceptionGroup):
        match, _ = exc.split(kind)
        return None if match is None else first_leaf(match)  # type: ignore[return-value]
    return None


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception that is not a group inside exc (exc if it is none)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def find_user_error(exc: BaseException) -> RekkordError | None:
    """The first RekkordError in exc or, for exception groups, inside it."""
    return first_of(exc, RekkordError)
