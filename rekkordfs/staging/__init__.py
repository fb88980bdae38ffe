"""A writable staging tree for one channel, journaled on local disk (no FUSE here).

State lives in a folder per repository and channel:

    tree.db     SQLite (WAL): inodes, directory entries, metadata, and the
                content of small written files (up to INLINE_MAX); every
                operation is one transaction, so a killed process loses nothing
                that was written before it
    data/<ino>  content of larger files written since the base snapshot
    frozen/     content captured by a running commit (see capture.py)
    reserve     space freed when the disk is full, so deletions can still be journaled

The tree starts as a copy-on-write view of a base snapshot: directories keep
their stored record ID until first touched ("expanded"), files keep their chunk
list until written. Unchanged parts thus cost nothing and are committed as the
very same records. Errors are OSError with an errno; the FUSE adapter replies
with it.

The parts, each a module of this package:

    inode.py        an inode row, and Content: where a file's content lives
    journal.py      tree.db: transactions, the inode row cache, the reserve, recovery
    copyonwrite.py  seeding from a snapshot, expanding stored directories
    names.py        directory entries, and the kernel's references that keep unlinked inodes
    content.py      reading and changing content (inline, data file or stored)
    uploads.py      which content version is uploaded (write-behind's and commits' results)
    capture.py      a commit's capture of the tree, and its result becoming the new base
    tree.py         StagingTree, which holds them all; attributes and extended attributes
"""

from .capture import Capture
from .content import INLINE_MAX, remove_files
from .inode import ROOT, Content, Inode
from .names import RENAME_EXCHANGE, RENAME_NOREPLACE
from .tree import StagingTree
from .uploads import Uploads

STORED, DATA_FILE, INLINE = Content.STORED, Content.DATA_FILE, Content.INLINE

__all__ = ["Capture", "Content", "DATA_FILE", "INLINE", "INLINE_MAX", "Inode", "RENAME_EXCHANGE",
           "RENAME_NOREPLACE", "ROOT", "STORED", "StagingTree", "Uploads", "remove_files"]
