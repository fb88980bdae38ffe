"""The mount's writable `staging/` folder: one StagingTree per channel.

    MNT/staging/<channel>/...   starts as a copy-on-write view of the channel's
                                latest snapshot; `mkdir MNT/staging/NEW` starts
                                a new, empty channel

The parts, each a module of this package (none knows FUSE; errors are OSError):

    area.py      StagingArea: the requests, routed to the channels' trees; it
                 tells write-behind (writebehind.py) of writes and closes
    inodes.py    the mount's inode numbers: a slot per channel in the high bits
    channels.py  the channels' trees: opened, seeded, following newer snapshots,
                 started and removed
    batches.py   the journals' batches of requests, committed once the daemon is idle
    commits.py   commits asked for by `rekkord commit` through an extended
                 attribute (control.py), and their replies
"""

from .area import STAGING_TIMEOUT, Handle, StagingArea

__all__ = ["Handle", "STAGING_TIMEOUT", "StagingArea"]
