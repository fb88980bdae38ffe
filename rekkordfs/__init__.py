"""rekkordfs: deduplicated, encrypted backups with a FUSE view of every snapshot."""

__version__ = "0.1.0"
