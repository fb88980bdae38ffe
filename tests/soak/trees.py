"""Random source trees from a seeded generator, and random changes to them.

What a tree holds: names of any bytes but '/' and NUL (up to 255 bytes), deep
and wide folders, empty and sparse files, sizes from 0 to tens of MiB (with
some right at the boundaries that matter to rekkordfs: inline content, small
files, chunk sizes), hardlinks across folders, symlinks (dangling, absolute,
long), FIFOs and device nodes, modes with set-ID and sticky bits, owners,
nanosecond times (some before 1970), user xattrs and POSIX ACLs.

Every change gives what it touches a new mtime: rsync's quick check (size and
mtime) must see it, or the staging copy would rightly keep the old content.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
PATH_BUDGET = 1800  # bytes of a relative path: the mount and restore add their prefixes
SPECIAL_NAMES = [b"-dash", b" space ", b".hidden", b"new\nline", b"tab\there", b"\xff\xfe\xfd", b"*?[]{}",
                 b"\\back", b"'quote\"", b"...", b"\x01\x7f", "é-ü-😀".encode(), b"a" * 255]
FILE_MODES = [0o644, 0o644, 0o600, 0o755, 0o640, 0o444, 0o000, 0o4755, 0o2750, 0o1644]
DIR_MODES = [0o755, 0o755, 0o700, 0o2775, 0o1777, 0o555, 0o750]
OWNERS = [0, 0, 1000, 65534, 123456]
# interesting sizes: around the journal's inline limit (128 KiB), the small-file
# limit (2 MiB), the chunker's minimum (256 KiB) and maximum (4 MiB)
EDGE_SIZES = [1, 4095, 4096, (128 << 10) - 1, 128 << 10, (128 << 10) + 1, 256 << 10, 2 * MiB, 2 * MiB + 1,
              4 * MiB, 4 * MiB + 1]


@dataclass
class Shape:
    """How big a fresh tree may get."""

    max_bytes: int = 48 * MiB  # content actually written (holes excluded)
    max_entries: int = 400
    max_depth: int = 7
    max_width: int = 14


@dataclass
class _Budget:
    bytes_left: int
    entries_left: int
    files: list[bytes] = field(default_factory=list)  # relative paths of regular files
    dirs: list[bytes] = field(default_factory=list)
    others: list[bytes] = field(default_factory=list)  # symlinks, FIFOs, devices


def random_name(rng: random.Random, taken: set[bytes], room: int) -> bytes:
    """A name not in taken, at most `room` bytes (and 255)."""
    limit = max(1, min(255, room))
    while True:
        pick = rng.random()
        if pick < 0.5:
            plain = "abcdefghijklmnopqrstuvwxyz0123456789_.-"
            name = "".join(rng.choice(plain) for _ in range(rng.randint(1, 16))).encode()
        elif pick < 0.8:
            name = bytes(rng.choice([b for b in range(1, 256) if b != 0x2F]) for _ in range(rng.randint(1, 40)))
        elif pick < 0.88:
            name = bytes(rng.choice(b"abcXYZ\xc3\xa9\xff ") for _ in range(rng.randint(200, 255)))
        else:
            name = rng.choice(SPECIAL_NAMES)
        name = name[:limit]
        if name not in (b".", b"..") and name not in taken:
            taken.add(name)
            return name


def _content_size(rng: random.Random, budget: _Budget) -> int:
    pick = rng.random()
    if pick < 0.15:
        size = 0
    elif pick < 0.55:
        size = rng.randint(1, 8192)
    elif pick < 0.7:
        size = rng.choice(EDGE_SIZES)
    elif pick < 0.9:
        size = rng.randint(8192, 3 * MiB)
    else:
        size = rng.randint(3 * MiB, 24 * MiB)
    return max(0, min(size, budget.bytes_left))


def content(rng: random.Random, size: int) -> bytes:
    """Random, compressible or repetitive bytes (repeats deduplicate)."""
    pick = rng.random()
    if pick < 0.5:
        return rng.randbytes(size)
    if pick < 0.8:
        words = [rng.randbytes(rng.randint(1, 8)).hex().encode() for _ in range(64)]
        out = bytearray()
        while len(out) < size:
            out += rng.choice(words) + b" "
        return bytes(out[:size])
    block = rng.randbytes(rng.choice([4096, 65536, 1 << 20]))
    return (block * (size // len(block) + 1))[:size]


def write_file(path: bytes, rng: random.Random, budget: _Budget) -> None:
    if rng.random() < 0.08 and budget.bytes_left > 64 << 10:
        _write_sparse(path, rng, budget)
        return
    size = _content_size(rng, budget)
    budget.bytes_left -= size
    with open(path, "wb") as handle:
        handle.write(content(rng, size))


def _write_sparse(path: bytes, rng: random.Random, budget: _Budget) -> None:
    """Holes with a few islands of data, maybe a hole at the end too."""
    length = rng.randint(1 * MiB, 64 * MiB)
    with open(path, "wb") as handle:
        for _ in range(rng.randint(0, 4)):
            island = min(rng.randint(1, 256 << 10), budget.bytes_left)
            budget.bytes_left -= island
            handle.seek(rng.randrange(length))
            handle.write(rng.randbytes(island))
        handle.truncate(length)


def _acl(rng: random.Random, default: bool = False) -> bytes:
    """A valid POSIX ACL in the kernel's xattr encoding (version 2)."""
    entries = [(0x01, rng.randint(0, 7), 0xFFFFFFFF)]  # user::
    users = sorted(rng.sample([1000, 1001, 4242, 65534], rng.randint(0, 2)))
    entries += [(0x02, rng.randint(0, 7), uid) for uid in users]
    entries.append((0x04, rng.randint(0, 7), 0xFFFFFFFF))  # group::
    if users:
        entries.append((0x10, rng.randint(0, 7), 0xFFFFFFFF))  # mask::
    entries.append((0x20, rng.randint(0, 7), 0xFFFFFFFF))  # other::
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


def random_time(rng: random.Random) -> int:
    if rng.random() < 0.05:
        return -rng.randint(1, 300_000_000) * 1_000_000_000 - rng.randint(0, 999_999_999)  # before 1970
    return rng.randint(1_000_000_000, 1_900_000_000) * 1_000_000_000 + rng.randint(0, 999_999_999)


def set_metadata(path: bytes, rng: random.Random, is_dir: bool, is_link: bool = False) -> None:
    """Owner, mode, xattrs, ACLs, then times (last: the rest would not change them,
    but the order says what matters)."""
    os.chown(path, rng.choice(OWNERS), rng.choice(OWNERS), follow_symlinks=False)
    if is_link:
        os.utime(path, ns=(random_time(rng), random_time(rng)), follow_symlinks=False)
        return
    os.chmod(path, rng.choice(DIR_MODES if is_dir else FILE_MODES))
    if not is_dir and not stat.S_ISREG(os.lstat(path).st_mode):
        touch(path, rng)  # user xattrs belong to files and folders only
        return
    for _ in range(rng.choice([0, 0, 0, 1, 2, 3])):
        name = b"user." + rng.randbytes(rng.randint(1, 12)).hex().encode()
        os.setxattr(path, name, rng.randbytes(rng.randint(0, 300)))
    if rng.random() < 0.08:
        os.setxattr(path, "system.posix_acl_access", _acl(rng))
    if is_dir and rng.random() < 0.04:
        os.setxattr(path, "system.posix_acl_default", _acl(rng, default=True))
    touch(path, rng)


def touch(path: bytes, rng: random.Random) -> None:
    os.utime(path, ns=(random_time(rng), random_time(rng)), follow_symlinks=False)


def _special(path: bytes, rng: random.Random, budget: _Budget, root: bytes) -> None:
    pick = rng.random()
    if pick < 0.6:
        target = _symlink_target(rng, budget, root, path)
        os.symlink(target, path)
    elif pick < 0.8:
        os.mkfifo(path)
    else:
        kind = stat.S_IFCHR if rng.random() < 0.7 else stat.S_IFBLK
        os.mknod(path, kind | 0o600, os.makedev(rng.randint(1, 250), rng.randint(0, 255)))


def _symlink_target(rng: random.Random, budget: _Budget, root: bytes, path: bytes) -> bytes:
    pick = rng.random()
    if pick < 0.4 and budget.files:
        depth = path[len(root) + 1:].count(b"/")
        return b"../" * depth + rng.choice(budget.files)
    if pick < 0.6:
        return b"/no/such/" + rng.randbytes(8).hex().encode()
    if pick < 0.7:
        return b"x/" * rng.randint(100, 500)  # long target
    return bytes(rng.choice([b for b in range(1, 256)]) for _ in range(rng.randint(1, 60)))


def _fill(root: bytes, rel: bytes, depth: int, rng: random.Random, shape: Shape, budget: _Budget) -> None:
    """Entries of a new, empty folder at rel (and below, depth first)."""
    taken: set[bytes] = set()
    width = rng.randint(3 if depth == 0 else 0, shape.max_width)
    for _ in range(width):
        if budget.entries_left <= 0:
            return
        budget.entries_left -= 1
        room = PATH_BUDGET - len(rel) - 1
        if room < 8:
            return
        name = random_name(rng, taken, room)
        child = rel + b"/" + name if rel else name
        path = root + b"/" + child
        pick = rng.random()
        if pick < 0.22 and depth < shape.max_depth:
            os.mkdir(path)
            budget.dirs.append(child)
            _fill(root, child, depth + 1, rng, shape, budget)
        elif pick < 0.88:
            write_file(path, rng, budget)
            budget.files.append(child)
        else:
            _special(path, rng, budget, root)
            budget.others.append(child)


def _hardlinks(root: bytes, rng: random.Random, budget: _Budget) -> None:
    folders = [b""] + budget.dirs
    for _ in range(rng.randint(0, max(1, len(budget.files) // 15))):
        if not budget.files:
            return
        existing = rng.choice(budget.files)
        folder = rng.choice(folders)
        if len(folder) > PATH_BUDGET - 40:
            continue
        name = b"hard-" + rng.randbytes(4).hex().encode()
        rel = folder + b"/" + name if folder else name
        os.link(root + b"/" + existing, root + b"/" + rel)
        budget.files.append(rel)


def _metadata_pass(root: bytes, rng: random.Random) -> None:
    """Deepest first, so setting a folder's times comes after its content."""
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = folder + b"/" + name
            set_metadata(path, rng, is_dir=False, is_link=os.path.islink(path))
        for name in dirs:
            path = folder + b"/" + name
            if os.path.islink(path):
                set_metadata(path, rng, is_dir=False, is_link=True)
            else:
                set_metadata(path, rng, is_dir=True)
    set_metadata(root, rng, is_dir=True)


def generate(root: Path, rng: random.Random, shape: Shape) -> None:
    """A new random tree at root (replacing what was there)."""
    root_b = os.fsencode(root)
    if os.path.lexists(root_b):
        shutil.rmtree(root_b)
    os.makedirs(root_b)
    budget = _Budget(rng.randint(0, shape.max_bytes), rng.randint(1, shape.max_entries))
    _fill(root_b, b"", 0, rng, shape, budget)
    _hardlinks(root_b, rng, budget)
    _metadata_pass(root_b, rng)


# --- changes -------------------------------------------------------------------------------


def _inventory(root: bytes) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """Relative paths of the regular files, folders and other entries."""
    files, dirs, others = [], [], []
    for folder, dir_names, file_names in os.walk(root):
        rel = folder[len(root) + 1:]
        for name in dir_names + file_names:
            child = rel + b"/" + name if rel else name
            mode = os.lstat(root + b"/" + child).st_mode
            (dirs if stat.S_ISDIR(mode) else files if stat.S_ISREG(mode) else others).append(child)
    return files, dirs, others


def _change_file(path: bytes, rng: random.Random) -> None:
    size = os.stat(path).st_size
    pick = rng.random()
    with open(path, "r+b") as handle:
        if pick < 0.3:
            handle.truncate(0)
            handle.write(content(rng, rng.choice([0, 100, 5000, 200_000, 3 * MiB])))
        elif pick < 0.55:
            handle.seek(rng.randint(0, size))
            handle.write(rng.randbytes(rng.randint(1, 300_000)))
        elif pick < 0.75:
            handle.seek(0, os.SEEK_END)
            handle.write(content(rng, rng.randint(1, 2 * MiB)))
        else:
            handle.truncate(rng.randint(0, size * 2 + 1))
    touch(path, rng)


def _new_entry(root: bytes, folder: bytes, rng: random.Random) -> None:
    base = root + b"/" + folder if folder else root
    taken = set(os.listdir(base))
    room = PATH_BUDGET - len(folder) - 1
    if room < 8:
        return
    name = random_name(rng, taken, min(room, 60))
    path = base + b"/" + name
    budget = _Budget(8 * MiB, 30)
    if rng.random() < 0.3:
        os.mkdir(path)
        rel = folder + b"/" + name if folder else name
        _fill(root, rel, 1, rng, Shape(max_depth=3, max_width=4), budget)
        _metadata_pass(path, rng)
    else:
        write_file(path, rng, budget)
        set_metadata(path, rng, is_dir=False)


def _move(root: bytes, source: bytes, dirs: list[bytes], rng: random.Random) -> None:
    targets = [d for d in [b""] + dirs if not (d == source or d.startswith(source + b"/"))]
    folder = rng.choice(targets)
    base = root + b"/" + folder if folder else root
    if len(folder) + 70 > PATH_BUDGET:
        return
    name = random_name(rng, set(os.listdir(base)), 60)
    os.rename(root + b"/" + source, base + b"/" + name)


def _remove(path: bytes) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def mutate(root: Path, rng: random.Random) -> int:
    """Random changes to an existing tree; returns how many were made."""
    root_b = os.fsencode(root)
    files, dirs, others = _inventory(root_b)
    count = rng.randint(1, max(1, (len(files) + len(dirs) + len(others)) // 5))
    for _ in range(count):
        files, dirs, others = _inventory(root_b)
        everything = files + dirs + others
        pick = rng.random()
        if pick < 0.35 and files:
            _change_file(root_b + b"/" + rng.choice(files), rng)
        elif pick < 0.5 and everything:
            _remove(root_b + b"/" + rng.choice(everything))
        elif pick < 0.7:
            _new_entry(root_b, rng.choice([b""] + dirs), rng)
        elif pick < 0.8 and everything:
            _move(root_b, rng.choice(everything), dirs, rng)
        elif pick < 0.9 and everything:
            target = rng.choice(everything)
            path = root_b + b"/" + target
            set_metadata(path, rng, is_dir=target in dirs, is_link=os.path.islink(path))
        elif files and dirs:  # a file becomes a folder, or a hardlink appears
            victim = rng.choice(files)
            if rng.random() < 0.5:
                os.unlink(root_b + b"/" + victim)
                os.mkdir(root_b + b"/" + victim)
                set_metadata(root_b + b"/" + victim, rng, is_dir=True)
            else:
                folder = rng.choice(dirs)
                if len(folder) < PATH_BUDGET - 40:
                    link = root_b + b"/" + folder + b"/hard-" + rng.randbytes(4).hex().encode()
                    os.link(root_b + b"/" + victim, link)
    touch(root_b, rng)
    return count
