"""Storage backends behind one async interface (see base.Storage)."""

from __future__ import annotations

from ..config import Config, LocalLocation, S3Location, SFTPLocation
from .base import Storage
from .retry import RetryingStorage, RetryPolicy


def open_storage(config: Config) -> Storage:
    """The backend for the configured repository location (not yet connected),
    with transient failures retried for config.retry_time seconds."""
    return RetryingStorage(_backend(config), RetryPolicy(budget=config.retry_time))


def _backend(config: Config) -> Storage:
    location = config.require_location()
    if isinstance(location, LocalLocation):
        from .local import LocalStorage

        return LocalStorage(location.path, threads=config.threads)
    if isinstance(location, S3Location):
        from .s3 import S3Storage

        return S3Storage(location, config.s3, threads=config.threads)
    if isinstance(location, SFTPLocation):
        from .sftp import SFTPStorage

        return SFTPStorage(location, config.sftp, threads=config.threads)
    raise AssertionError(f"unknown location {location!r}")
