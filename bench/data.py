"""The benchmark's data set: generated once, deterministically, from a seed.

    DATA/tree/                 ~250 MB, ~7,700 files in nested directories
    DATA/tree-changed/         the same tree with 1% of its files changed
    DATA/big/random-1GiB.bin   1 GiB of incompressible pseudo-random bytes
    DATA/manifest.json         parameters and figures; its presence marks a complete set
    DATA/history/01..19/       (made only for the retention rows) a history of the tree:
                               step k is step k-1 with 1% of its files changed
                               (step 0 is tree/); its own manifest.json

Content comes from keyed BLAKE3 output streams (XOF), so every byte depends
only on the seed and the file's index.  "Text" files are phrases drawn from a
seeded vocabulary by that stream: they compress about 3x with zstd, like
source code or logs, yet never repeat across files.  "Binary" files are the raw
stream (incompressible, like media or archives).  A few files are empty and a
few are exact duplicates of others, as in real trees.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import blake3

GENERATOR_VERSION = 1
MB = 1_000_000
BIG_NAME = "random-1GiB.bin"


@dataclass(frozen=True)
class Params:
    seed: int = 1
    files: int = 7_700
    tree_bytes: int = 250 * MB
    big_bytes: int = 1 << 30
    change_fraction: float = 0.01


@dataclass
class FileSpec:
    path: str  # relative to the tree root
    size: int
    kind: str  # "text" or "binary"
    key: bytes  # content stream key
    mtime_ns: int
    change: str = ""  # how tree-changed differs: "", "patch", "append", "rewrite"
    changed_size: int = 0
    changed_key: bytes = b""
    patch_at: int = 0


@dataclass
class DataSet:
    root: Path
    params: Params
    tree_files: int = 0
    tree_bytes: int = 0
    tree_dirs: int = 0
    changed_files: int = 0
    changed_tree_bytes: int = 0
    big_bytes: int = 0
    extra: dict = field(default_factory=dict)
    #: the retention rows' history (generate_history): each step's folder and bytes
    history: list[tuple[Path, int]] = field(default_factory=list)
    #: the scale rows' many small files (generate_scale), when they run
    scale: ScaleSet | None = None

    @property
    def tree(self) -> Path:
        return self.root / "tree"

    @property
    def tree_changed(self) -> Path:
        return self.root / "tree-changed"

    @property
    def big(self) -> Path:
        return self.root / "big" / BIG_NAME


# --- content streams -------------------------------------------------------------

class _Text:
    """Seeded phrase table; text is a sequence of phrases picked by a byte stream."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(f"{seed}-vocabulary")
        letters = "etaoinshrdlcumwfgypbvkjxqz"
        weights = list(range(26, 0, -1))
        words = []
        for _ in range(4096):
            n = min(12, int(rng.expovariate(1 / 4.5)) + 1)
            words.append("".join(rng.choices(letters, weights=weights, k=n)))
        seps = [" "] * 12 + ["\n", ", ", ". ", " = ", "(", ")\n", ";\n", "\n\n"]
        self.table = [(" ".join(rng.choices(words, k=4)) + rng.choice(seps)).encode() for _ in range(65536)]
        self.mean = sum(map(len, self.table)) / len(self.table)

    def make(self, key: bytes, size: int) -> bytes:
        if size == 0:
            return b""
        count = int(size / self.mean * 1.1) + 16
        raw = blake3.blake3(key, max_threads=1).digest(length=2 * count)
        out = b"".join(map(self.table.__getitem__, memoryview(raw).cast("H")))
        while len(out) < size:  # unlucky draw of short phrases
            out += self.make(key + b"+", size - len(out))
        return out[:size]


def _binary(key: bytes, size: int) -> bytes:
    return blake3.blake3(key).digest(length=size) if size else b""


class Content:
    def __init__(self, seed: int) -> None:
        self.text = _Text(seed)

    def make(self, kind: str, key: bytes, size: int) -> bytes:
        return self.text.make(key, size) if kind == "text" else _binary(key, size)


# --- planning ----------------------------------------------------------------------

TEXT_EXT = [".txt", ".c", ".h", ".py", ".md", ".json", ".log", ".html", ".csv", ".xml"]
BINARY_EXT = [".jpg", ".png", ".gz", ".zip", ".bin", ".pdf", ".mp3", ".o"]


def _loguniform(rng: random.Random, lo: float, hi: float) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def plan_tree(p: Params) -> tuple[list[str], list[FileSpec]]:
    """Directories and files of the tree, without touching the disk."""
    rng = random.Random(f"{p.seed}-tree")
    vocab = [w.decode() for w in _Text(p.seed).table[:2000]]
    names = sorted({w.split()[0] for w in vocab if 2 <= len(w.split()[0]) <= 10})

    # directories: a random tree, at most 6 levels deep, ~1 per 18 files
    dirs = [""]
    depth = {"": 0}
    for i in range(max(1, p.files // 18)):
        parent = rng.choice([d for d in dirs if depth[d] < 6])
        name = rng.choice(names)
        path = f"{parent}/{name}" if parent else name
        if path in depth:
            path = f"{path}-{i}"
        dirs.append(path)
        depth[path] = depth[parent] + 1

    n_large = max(1, p.files * 18 // 7700)
    n_medium = max(1, p.files * 385 // 7700)
    n_small = p.files - n_medium - n_large
    sizes: list[tuple[int, str]] = []
    for _ in range(n_small):
        size = 0 if rng.random() < 0.01 else _loguniform(rng, 64, 48 << 10)
        sizes.append((size, "text" if rng.random() < 0.75 else "binary"))
    for _ in range(n_medium):
        sizes.append((_loguniform(rng, 64 << 10, 1 << 20), "text" if rng.random() < 0.5 else "binary"))
    large = [(_loguniform(rng, 1 << 20, 8 << 20), "text" if rng.random() < 0.5 else "binary") for _ in range(n_large)]
    rest = p.tree_bytes - sum(s for s, _ in sizes)
    scale = max(rest, n_large << 20) / sum(s for s, _ in large)
    sizes += [(int(s * scale), k) for s, k in large]
    rng.shuffle(sizes)

    used: set[str] = set()
    files: list[FileSpec] = []
    epoch = 1_600_000_000
    for index, (size, kind) in enumerate(sizes):
        folder = rng.choice(dirs)
        ext = rng.choice(TEXT_EXT if kind == "text" else BINARY_EXT)
        name = rng.choice(names) + ext
        path = f"{folder}/{name}" if folder else name
        if path in used:
            path = f"{folder}/{index:05d}-{name}" if folder else f"{index:05d}-{name}"
        used.add(path)
        key = f"{p.seed}:file:{index}".encode()
        mtime_ns = (epoch + rng.randrange(100_000_000)) * 1_000_000_000 + rng.randrange(1_000_000_000)
        files.append(FileSpec(path, size, kind, key, mtime_ns))

    # ~2% exact duplicates of another file (same content, other name)
    for spec in rng.sample(files, len(files) // 50):
        other = rng.choice(files)
        if other.size <= 8 << 20:
            spec.size, spec.kind, spec.key = other.size, other.kind, other.key

    # the 1% change
    crng = random.Random(f"{p.seed}-change")
    candidates = [f for f in files if f.size > 0]
    for n, spec in enumerate(crng.sample(candidates, max(1, round(p.files * p.change_fraction)))):
        spec.change = crng.choice(["patch", "patch", "append", "append", "rewrite"])
        spec.changed_key = f"{p.seed}:change:{n}".encode()
        if spec.change == "patch":
            spec.patch_at = crng.randrange(spec.size)
            spec.changed_size = spec.size
        elif spec.change == "append":
            spec.changed_size = spec.size + crng.randint(1, 16 << 10)
        else:
            spec.changed_size = max(1, int(spec.size * crng.uniform(0.9, 1.1)))
    return dirs, files


def changed_content(content: Content, spec: FileSpec, original: bytes) -> bytes:
    if spec.change == "patch":
        n = min(4096, spec.size - spec.patch_at)
        return original[: spec.patch_at] + _binary(spec.changed_key, n) + original[spec.patch_at + n :]
    if spec.change == "append":
        return original + content.make(spec.kind, spec.changed_key, spec.changed_size - spec.size)
    return content.make(spec.kind, spec.changed_key, spec.changed_size)


# --- writing -----------------------------------------------------------------------

def _set_dir_times(root: Path, dirs: list[str], seed: int) -> None:
    rng = random.Random(f"{seed}-dirtimes")
    for d in sorted(dirs, key=lambda x: -x.count("/")):
        t = (1_650_000_000 + rng.randrange(10_000_000)) * 1_000_000_000
        os.utime(root / d if d else root, ns=(t, t))


def generate(root: Path, p: Params, log=print) -> DataSet:
    """Writes the data set into ROOT (kept if a complete one with the same parameters is there)."""
    root = Path(root)
    manifest = root / "manifest.json"
    wanted = {"version": GENERATOR_VERSION, "params": asdict(p)}
    if manifest.exists():
        data = json.loads(manifest.read_text())
        if {k: data.get(k) for k in wanted} == wanted:
            return _load(root, p, data)
        log(f"data set in {root} has other parameters: regenerating")
    started = time.monotonic()
    log(f"generating the data set in {root} (seed {p.seed}) ...")
    if root.exists():
        for name in ("tree", "tree-changed", "big", "manifest.json", "partial"):
            target = root / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    partial = root / "partial"
    tree, changed, bigdir = partial / "tree", partial / "tree-changed", partial / "big"
    content = Content(p.seed)
    dirs, files = plan_tree(p)
    for top in (tree, changed):
        for d in dirs:
            (top / d).mkdir(parents=True, exist_ok=True)
    total = changed_total = 0
    for spec in files:
        data = content.make(spec.kind, spec.key, spec.size)
        target = tree / spec.path
        target.write_bytes(data)
        os.utime(target, ns=(spec.mtime_ns, spec.mtime_ns))
        total += spec.size
        other = changed / spec.path
        if spec.change:
            new = changed_content(content, spec, data)
            other.write_bytes(new)
            t = spec.mtime_ns + 3600 * 1_000_000_000
            os.utime(other, ns=(t, t))
            changed_total += len(new)
        else:
            os.link(target, other)  # nothing ever writes into the data set
            changed_total += spec.size
    _set_dir_times(tree, dirs, p.seed)
    _set_dir_times(changed, dirs, p.seed)

    bigdir.mkdir(parents=True)
    with open(bigdir / BIG_NAME, "wb") as out:
        stream = blake3.blake3(f"{p.seed}:big".encode())
        step = 64 << 20
        for offset in range(0, p.big_bytes, step):
            out.write(stream.digest(length=min(step, p.big_bytes - offset), seek=offset))
    os.utime(bigdir / BIG_NAME, ns=(1_650_000_000 * 10**9,) * 2)

    for name in ("tree", "tree-changed", "big"):
        os.rename(partial / name, root / name)
    partial.rmdir()
    data = dict(wanted)
    data.update(
        tree={"files": len(files), "bytes": total, "dirs": len(dirs)},
        changed={"files": sum(1 for f in files if f.change), "bytes": changed_total,
                 "kinds": {k: sum(1 for f in files if f.change == k) for k in ("patch", "append", "rewrite")}},
        big={"bytes": p.big_bytes},
        text_files=sum(1 for f in files if f.kind == "text"),
        empty_files=sum(1 for f in files if f.size == 0),
    )
    manifest.write_text(json.dumps(data, indent=2) + "\n")
    log(f"data set ready in {time.monotonic() - started:.1f} s: {len(files)} files, "
        f"{total / MB:.1f} MB, {len(dirs)} directories; 1 GiB file; "
        f"{data['changed']['files']} files changed")
    return _load(root, p, data)


# --- the history of the retention rows ----------------------------------------------

HISTORY_VERSION = 1
HISTORY_STEPS = 20


def generate_history(ds: DataSet, steps: int = HISTORY_STEPS, log=print) -> list[tuple[Path, int]]:
    """A history of STEPS versions of the tree, for the retention rows: step 0 is tree/,
    step k (DATA/history/NN) is step k-1 with 1% of its files changed (the same mix as
    tree-changed: 2/5 a 4 KiB patch, 2/5 appended to, 1/5 rewritten), chosen and filled
    from the seed; a changed file's mtime is the original's plus k hours. Unchanged
    files are hard links to the previous step's. Made once (about 6 s in all) and
    kept while the seed and the parameters stay; returns [(folder, bytes)] per step."""
    p = ds.params
    root = ds.root / "history"
    manifest = root / "manifest.json"
    wanted = {"version": HISTORY_VERSION, "params": asdict(p), "steps": steps,
              "tree": ds.extra.get("tree")}
    if manifest.exists():
        data = json.loads(manifest.read_text())
        if {k: data.get(k) for k in wanted} == wanted:
            ds.history = [(ds.tree, ds.tree_bytes)] + [(root / f"{k:02d}", data["bytes"][k - 1])
                                                        for k in range(1, steps)]
            return ds.history
    started = time.monotonic()
    log(f"generating a history of {steps} versions of the tree in {root} ...")
    if root.exists():
        shutil.rmtree(root)
    partial = ds.root / "history.partial"
    if partial.exists():
        shutil.rmtree(partial)
    content = Content(p.seed)
    dirs, files = plan_tree(p)
    sizes = {spec.path: spec.size for spec in files}
    kinds = {spec.path: spec.kind for spec in files}
    mtimes = {spec.path: spec.mtime_ns for spec in files}
    previous = ds.tree
    totals = []
    for k in range(1, steps):
        rng = random.Random(f"{p.seed}-history-{k}")
        candidates = sorted(path for path, size in sizes.items() if size > 0)
        changed = {}
        for n, path in enumerate(rng.sample(candidates, max(1, round(p.files * p.change_fraction)))):
            how = rng.choice(["patch", "patch", "append", "append", "rewrite"])
            key = f"{p.seed}:history:{k}:{n}".encode()
            size = sizes[path]
            if how == "patch":
                at = rng.randrange(size)
                old = (previous / path).read_bytes()
                m = min(4096, size - at)
                new = old[:at] + _binary(key, m) + old[at + m:]
            elif how == "append":
                new = (previous / path).read_bytes() + content.make(kinds[path], key, rng.randint(1, 16 << 10))
            else:
                new = content.make(kinds[path], key, max(1, int(size * rng.uniform(0.9, 1.1))))
            changed[path] = new
        step = partial / f"{k:02d}"
        for d in dirs:
            (step / d).mkdir(parents=True, exist_ok=True)
        for spec in files:
            target = step / spec.path
            if spec.path in changed:
                target.write_bytes(changed[spec.path])
                sizes[spec.path] = len(changed[spec.path])
                mtimes[spec.path] = spec.mtime_ns + k * 3600 * 1_000_000_000
                os.utime(target, ns=(mtimes[spec.path], mtimes[spec.path]))
            else:
                os.link(previous / spec.path, target)  # nothing ever writes into the data set
        _set_dir_times(step, dirs, p.seed)
        totals.append(sum(sizes.values()))
        previous = step
    partial.rename(root)
    data = dict(wanted)
    data["bytes"] = totals
    manifest.write_text(json.dumps(data, indent=2) + "\n")
    log(f"history ready in {time.monotonic() - started:.1f} s")
    ds.history = [(ds.tree, ds.tree_bytes)] + [(root / f"{k:02d}", totals[k - 1]) for k in range(1, steps)]
    return ds.history


def _load(root: Path, p: Params, data: dict) -> DataSet:
    return DataSet(
        root=root, params=p,
        tree_files=data["tree"]["files"], tree_bytes=data["tree"]["bytes"], tree_dirs=data["tree"]["dirs"],
        changed_files=data["changed"]["files"], changed_tree_bytes=data["changed"]["bytes"],
        big_bytes=data["big"]["bytes"], extra=data,
    )


# --- the scale data set (--scale): many small files ---------------------------------

SCALE_VERSION = 1
SCALE_FILES = 100_000
SCALE_TOP = 10  # top folders, each with SCALE_SUB subfolders: 1,000 leaf folders
SCALE_SUB = 100
SCALE_MAX = 2048  # file sizes are uniform in 0..SCALE_MAX bytes


@dataclass
class ScaleSet:
    """FILES files of 0-2 KiB in 1,000 folders (DATA/scale-FILES/tree)."""

    root: Path
    files: int
    bytes: int
    dirs: int  # folders below the tree's root

    @property
    def tree(self) -> Path:
        return self.root / "tree"


def generate_scale(root: Path, files: int = SCALE_FILES, seed: int = 1, log=print) -> ScaleSet:
    """FILES small files (0-2 KiB, uniform; 3/4 text, 1/4 incompressible, like the
    tree's small files) spread evenly over 10 x 100 folders (t0/s00 ... t9/s99), all
    from the seed; kept while its manifest matches. 100,000 files take about a minute."""
    root = Path(root)
    manifest = root / "manifest.json"
    wanted = {"version": SCALE_VERSION, "seed": seed, "files": files, "max": SCALE_MAX}
    if manifest.exists():
        data = json.loads(manifest.read_text())
        if {k: data.get(k) for k in wanted} == wanted:
            return ScaleSet(root, files, data["bytes"], data["dirs"])
    started = time.monotonic()
    log(f"generating {files} small files in {root} (seed {seed}) ...")
    if root.exists():
        shutil.rmtree(root)
    partial = root / "partial"
    partial.mkdir(parents=True)
    content = Content(seed)
    rng = random.Random(f"{seed}-scale")
    folders = [f"t{t}/s{s:02d}" for t in range(SCALE_TOP) for s in range(SCALE_SUB)]
    for folder in folders:
        (partial / folder).mkdir(parents=True)
    total = 0
    epoch = 1_600_000_000
    for index in range(files):
        folder = folders[index % len(folders)]
        kind = "text" if rng.random() < 0.75 else "binary"
        size = rng.randint(0, SCALE_MAX)
        ext = rng.choice(TEXT_EXT if kind == "text" else BINARY_EXT)
        target = partial / folder / f"f{index:07d}{ext}"
        data = content.make(kind, f"{seed}:scale:{index}".encode(), size)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        mtime_ns = (epoch + rng.randrange(100_000_000)) * 1_000_000_000 + rng.randrange(1_000_000_000)
        os.utime(target, ns=(mtime_ns, mtime_ns))
        total += size
    _set_dir_times(partial, [""] + [f"t{t}" for t in range(SCALE_TOP)] + folders, seed)
    os.rename(partial, root / "tree")
    dirs = SCALE_TOP + len(folders)
    manifest.write_text(json.dumps({**wanted, "bytes": total, "dirs": dirs}, indent=2) + "\n")
    log(f"scale data set ready in {time.monotonic() - started:.1f} s: {files} files, {total / MB:.1f} MB, "
        f"{dirs} folders")
    return ScaleSet(root, files, total, dirs)
