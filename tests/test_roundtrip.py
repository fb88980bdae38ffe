"""Save then restore trees with every awkward case; listing and JSON output; restore options.

Runs as root, as the whole suite does (owners, devices, trusted.* xattrs). Equality is judged by
`rsync -aHAXnci --delete SRC/ DEST/` (plus --modify-window=-1, so that times
must match to the nanosecond), which must print nothing.
"""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
from datetime import UTC, datetime, timezone
from pathlib import Path

import pytest

from tests.conftest import Rekkord
from tests.fsutil import assert_one_line_error, rsync_diff, tree_digest

GiB = 1 << 30
MiB = 1 << 20

# Names with any byte but '/' and NUL.
AWKWARD_NAMES = [
    b"caf\xe9 latin-1",
    b"\xff\xfe\xfd not utf-8",
    b"new\nline",
    b"tab\tand\rcarriage",
    b"with space",
    b" leading space",
    b"trailing space ",
    b"-leading-dash",
    b"--",
    b"-rf",
    b".hidden",
    b"..dots..",
    b"back\\slash",
    b"*?[glob]{x}",
    b"quote\"'`$(echo)",
    b"\x01\x02\x1bctrl",
    "ünïcødé 日本語 🎉".encode(),
    b"x" * 255,
]


def write(path: bytes | str | Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def set_times(path: bytes | str | Path, mtime_ns: int, atime_ns: int | None = None) -> None:
    os.utime(path, ns=(atime_ns if atime_ns is not None else mtime_ns, mtime_ns), follow_symlinks=False)


def build_awkward_tree(root: Path) -> None:
    """Everything a real filesystem can hold, as root."""
    rng = random.Random(42)
    r = os.fsencode(root)
    root.mkdir()
    # regular files: empty, small, multi-chunk (large-file path), compressible
    write(r + b"/empty", b"")
    write(r + b"/small.txt", b"hello world\n")
    write(r + b"/random-3M", rng.randbytes(3 * MiB + 17))
    write(r + b"/random-9M", rng.randbytes(9 * MiB + 5))
    write(r + b"/zeros-1M", bytes(MiB))
    write(r + b"/text-2M", b"".join(b"line %d of a compressible file\n" % i for i in range(70000)))
    # sparse files: a hole-only file and one with data in the middle and at the end
    with open(r + b"/sparse-hole-only", "wb") as handle:
        handle.truncate(20 * MiB)
    with open(r + b"/sparse-middle", "wb") as handle:
        handle.truncate(12 * MiB)
        handle.seek(6 * MiB + 123)
        handle.write(b"island of data")
        handle.seek(12 * MiB - 3)
        handle.write(b"end")
    # nested directories
    deep = r + b"/a/b/c/d/e"
    os.makedirs(deep)
    write(deep + b"/leaf", b"deep file")
    os.mkdir(r + b"/empty-dir")
    # names with any bytes, as files and as a directory holding a file
    names_dir = r + b"/names"
    os.mkdir(names_dir)
    for name in AWKWARD_NAMES:
        write(names_dir + b"/" + name, name)
    os.mkdir(names_dir + b"/dir \xe9\n")
    write(names_dir + b"/dir \xe9\n/inner \xff", b"inner")
    # symlinks: relative, to a directory, absolute, dangling, non-UTF-8 target, long target
    links = r + b"/links"
    os.mkdir(links)
    os.symlink(b"../small.txt", links + b"/relative")
    os.symlink(b"../a/b", links + b"/to-dir")
    os.symlink(b"/etc/hostname", links + b"/absolute")
    os.symlink(b"/nonexistent/dangling/target", links + b"/dangling")
    os.symlink(b"does-not-exist", links + b"/dangling-relative")
    os.symlink(b"\xff\xfe target \n", links + b"/odd-target")
    os.symlink(b"long/" * 200 + b"end", links + b"/long-target")
    os.symlink(b"self-loop", links + b"/self-loop")
    # hardlinks: within a directory, across directories, a big one, an empty one, one with xattrs
    hard = r + b"/hard"
    os.makedirs(hard + b"/sub")
    write(hard + b"/one", b"shared content")
    os.link(hard + b"/one", hard + b"/two")
    os.link(hard + b"/one", hard + b"/sub/three")
    os.link(hard + b"/one", r + b"/a/b/four")
    write(hard + b"/big", rng.randbytes(5 * MiB))
    os.link(hard + b"/big", hard + b"/sub/big-link")
    write(hard + b"/empty", b"")
    os.link(hard + b"/empty", r + b"/a/empty-link")
    write(hard + b"/attrs", b"linked with xattrs")
    os.setxattr(hard + b"/attrs", "user.linked", b"yes")
    os.link(hard + b"/attrs", hard + b"/sub/attrs-link")
    # modes
    modes = r + b"/modes"
    os.mkdir(modes)
    for name, mode in ((b"setuid", 0o4755), (b"setgid", 0o2755), (b"all-bits", 0o7777), (b"none", 0o000),
                       (b"exec-only", 0o111), (b"write-only", 0o222)):
        write(modes + b"/" + name, name)
        os.chmod(modes + b"/" + name, mode)
    os.mkdir(modes + b"/sticky")
    os.chmod(modes + b"/sticky", 0o1777)
    os.mkdir(modes + b"/setgid-dir")
    os.chmod(modes + b"/setgid-dir", 0o2775)
    os.mkdir(modes + b"/locked")
    write(modes + b"/locked/inside", b"behind a 0000 directory")
    os.mkdir(modes + b"/locked/subdir")
    # owners (other uids/gids, including ones no user has), then modes again (chown clears set-id bits)
    owners = r + b"/owners"
    os.mkdir(owners)
    for name, uid, gid in ((b"u1234", 1234, 5678), (b"nobody", 65534, 65534), (b"big-ids", 4000000000, 3000000000)):
        write(owners + b"/" + name, name)
        os.chown(owners + b"/" + name, uid, gid)
    os.chown(modes + b"/setuid", 1000, 1000)
    os.chmod(modes + b"/setuid", 0o4755)
    os.mkdir(owners + b"/dir")
    os.chown(owners + b"/dir", 4321, 8765)
    os.symlink(b"target", owners + b"/link")
    os.chown(owners + b"/link", 2222, 3333, follow_symlinks=False)
    # xattrs: user.*, binary and empty values, trusted.* (root), on files, directories
    attrs = r + b"/xattrs"
    os.mkdir(attrs)
    write(attrs + b"/file", b"with attributes")
    os.setxattr(attrs + b"/file", "user.comment", "une note é".encode())
    os.setxattr(attrs + b"/file", "user.binary", bytes(range(256)))
    os.setxattr(attrs + b"/file", "user.empty", b"")
    os.setxattr(attrs + b"/file", "trusted.rekkord-test", b"root only")
    os.setxattr(attrs + b"/file", "user." + "n" * 200, b"v" * 3000)
    os.setxattr(attrs, "user.on-dir", b"directory attribute")
    # POSIX ACLs: an access ACL on a file, access + default ACLs on a directory
    write(attrs + b"/acl-file", b"acl")
    subprocess.run(["setfacl", "-m", "u:1234:rw-,g:5678:r--,m::rw-", os.fsdecode(attrs + b"/acl-file")], check=True)
    os.mkdir(attrs + b"/acl-dir")
    subprocess.run(["setfacl", "-m", "u:4321:rwx", os.fsdecode(attrs + b"/acl-dir")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "g:8765:r-x", os.fsdecode(attrs + b"/acl-dir")], check=True)
    write(attrs + b"/acl-dir/plain", b"inherits the default ACL")
    # special files
    specials = r + b"/specials"
    os.mkdir(specials)
    os.mkfifo(specials + b"/fifo", 0o640)
    os.mknod(specials + b"/null-like", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(specials + b"/block-like", 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    # timestamps with nanoseconds, before 1970 and after 2038, set bottom-up so
    # that creating children does not disturb the parents' times
    stamps = [1_234_567_890_123_456_789, 1_700_000_000_000_000_001, 999_999_999, -1_234_567_890_987_654_321,
              4_102_444_800_555_555_555, 1]
    everything: list[bytes] = []
    for folder, dirs, files in os.walk(r, topdown=False):
        everything.extend(folder + b"/" + f for f in files)
        everything.extend(folder + b"/" + d for d in dirs)
    everything.sort(key=lambda p: -p.count(b"/"))  # deepest first
    for index, path in enumerate(everything):
        set_times(path, stamps[index % len(stamps)] + index, 1_600_000_000_000_000_000 + index)
    # the 0000 directory is locked only now that its contents are in place
    os.chmod(modes + b"/locked", 0o000)
    set_times(modes + b"/locked", 1_111_111_111_111_111_111)
    set_times(modes, 1_222_222_222_222_222_222)
    set_times(r, 1_333_333_333_333_333_333)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Rekkord, Path, str]:
    """The awkward tree, saved once in a fresh repository as channel 'rt'."""
    base = tmp_path_factory.mktemp("roundtrip")
    cache = base / "cache"
    cache.mkdir()
    rekkord = Rekkord(cache_dir=cache, repository=str(base / "repo"))
    rekkord("init", "-K", str(base / "master.key"))
    rekkord.key_file = str(base / "master.key")
    src = base / "src"
    build_awkward_tree(src)
    snapshot = rekkord.save("rt", str(src))
    return rekkord, src, snapshot


# --- round trips ----------------------------------------------------------------------------


def test_awkward_tree_round_trip(saved: tuple[Rekkord, Path, str], tmp_path: Path) -> None:
    rekkord, src, snapshot = saved
    dest = tmp_path / "dest"
    rekkord("restore", f"rt:{src}", str(dest))
    assert rsync_diff(src, dest) == ""
    # the same through the full snapshot ID and an ID prefix
    dest2 = tmp_path / "dest2"
    rekkord("restore", f"{snapshot[:12]}:{src}", str(dest2))
    assert rsync_diff(src, dest2) == ""
    # hardlinks are real hardlinks (rsync -H checks this too; be explicit)
    one = os.stat(dest / "hard" / "one")
    assert one.st_nlink == 4
    for other in ("hard/two", "hard/sub/three", "a/b/four"):
        assert os.stat(dest / other).st_ino == one.st_ino
    assert os.stat(dest / "hard/big").st_ino == os.stat(dest / "hard/sub/big-link").st_ino


def test_restore_whole_snapshot_keeps_absolute_layout(saved: tuple[Rekkord, Path, str], tmp_path: Path) -> None:
    rekkord, src, snapshot = saved
    dest = tmp_path / "all"
    rekkord("restore", snapshot, str(dest))
    inside = dest / str(src).lstrip("/")
    assert rsync_diff(src, inside) == ""
    # the parents of the saved path are in the snapshot with their own metadata
    parent = os.stat(src.parent)
    restored_parent = os.stat(inside.parent)
    assert (restored_parent.st_mode, restored_parent.st_uid, restored_parent.st_mtime_ns) == (
        parent.st_mode, parent.st_uid, parent.st_mtime_ns)


def test_restore_subpath(saved: tuple[Rekkord, Path, str], tmp_path: Path) -> None:
    rekkord, src, _ = saved
    for sub in ("a", "names", "modes", "hard/sub", "xattrs/acl-dir", "empty-dir", "names/dir \udce9\n"):
        dest = tmp_path / "sub"
        if dest.exists():
            subprocess.run(["rm", "-rf", str(dest)], check=True)
        rekkord("restore", f"rt:{src}/{sub}", str(dest))
        assert rsync_diff(os.fsencode(src) + b"/" + os.fsencode(sub), dest) == "", sub


def test_restore_single_file(saved: tuple[Rekkord, Path, str], tmp_path: Path) -> None:
    rekkord, src, _ = saved
    cases = ["random-9M", "xattrs/file", "xattrs/acl-file", "modes/setuid", "owners/big-ids",
             "sparse-middle", "links/dangling", "specials/fifo", "names/\udcff\udcfe\udcfd not utf-8"]
    for index, name in enumerate(cases):
        dest = tmp_path / f"restored-{index}"
        rekkord("restore", f"rt:{src}/{name}", str(dest))
        original = os.fsencode(src) + b"/" + os.fsencode(name)
        assert os.path.lexists(dest) and not os.path.isdir(dest), name
        assert rsync_diff(original, dest) == "", name
    # a file restores as DEST itself; an existing DEST needs -f
    for index in (0, 6):
        result = rekkord("restore", f"rt:{src}/{cases[index]}", str(tmp_path / f"restored-{index}"), check=False)
        assert_one_line_error(result, "exists")
    dest = tmp_path / "restored-0"
    os.truncate(dest, 10)
    rekkord("restore", "--force", f"rt:{src}/random-9M", str(dest))
    assert rsync_diff(src / "random-9M", dest) == ""
    # -f replaces a file, but never a whole folder by a file
    folder = tmp_path / "a-folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "precious").write_text("keep")
    for option in ("--force", "--delete"):
        result = rekkord("restore", option, f"rt:{src}/small.txt", str(folder), check=False)
        assert_one_line_error(result, "folder", str(folder / "small.txt"))
        assert (folder / "sub" / "precious").read_text() == "keep"


def test_file_over_4gib(local_repo: Rekkord, tmp_path: Path) -> None:
    """A 5 GiB sparse file with data below and above 4 GiB; restored sparse."""
    src = tmp_path / "big-src"
    src.mkdir()
    big = src / "five-gib"
    markers = {0: b"start of the file", 4 * GiB - 7: b"straddles 4 GiB", 4 * GiB + 512 * MiB: b"beyond 4 GiB",
               5 * GiB - 4: b"end!"}
    with open(big, "wb") as handle:
        handle.truncate(5 * GiB)
        for offset, data in markers.items():
            handle.seek(offset)
            handle.write(data)
    set_times(big, 1_500_000_000_123_456_789)
    snapshot = local_repo.save("big", str(src))
    listing = json.loads(local_repo("list", f"{snapshot}:{src}", "-f", "json").stdout)
    assert [(e["path"], e["size"]) for e in listing] == [("five-gib", 5 * GiB)]
    dest = tmp_path / "five-gib"
    local_repo("restore", f"big:{big}", str(dest))
    st = os.stat(dest)
    assert st.st_size == 5 * GiB
    assert st.st_blocks * 512 < 64 * MiB, "the restored file should keep its holes"
    with open(dest, "rb") as handle:
        for offset, data in markers.items():
            handle.seek(offset)
            assert handle.read(len(data)) == data
    assert same_sparse_content(big, dest)
    # metadata and size (contents were compared above without reading 10 GiB of zeros)
    assert rsync_diff(big, dest, checksum=False) == ""


def same_sparse_content(a: Path, b: Path) -> bool:
    """Compare two sparse files by reading only the data regions of either one."""
    size = os.path.getsize(a)
    if os.path.getsize(b) != size:
        return False
    regions: list[tuple[int, int]] = []
    for path in (a, b):
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while offset < size:
                try:
                    start = os.lseek(fd, offset, os.SEEK_DATA)
                except OSError:
                    break
                end = os.lseek(fd, start, os.SEEK_HOLE)
                regions.append((start, end))
                offset = end
        finally:
            os.close(fd)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in regions:
            fa.seek(start)
            fb.seek(start)
            for pos in range(start, end, 8 * MiB):
                length = min(8 * MiB, end - pos)
                if fa.read(length) != fb.read(length):
                    return False
    return True


# --- listing ---------------------------------------------------------------------------------


def run_bytes(rekkord: Rekkord, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI capturing raw bytes (names need not be UTF-8)."""
    from tests.conftest import REKKORD, ROOT
    argv = [*REKKORD, "-R", str(rekkord.repository), "-K", str(rekkord.key_file), *args]
    full_env = {**os.environ, "REKKORD_CACHE_DIR": str(rekkord.cache_dir), "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(argv, capture_output=True, env=full_env, timeout=300)


@pytest.mark.parametrize("locale_env", [{}, {"LC_ALL": "C.UTF-8"}, {"LC_ALL": "C"}, {"PYTHONIOENCODING": "utf-8"}],
                         ids=["default", "C.UTF-8", "C", "strict-utf8"])
def test_list_json(saved: tuple[Rekkord, Path, str], locale_env: dict[str, str]) -> None:
    rekkord, src, _ = saved
    result = run_bytes(rekkord, "list", f"rt:{src}", "-r", "-f", "json", env=locale_env)
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    document = json.loads(result.stdout.decode("utf-8"))  # valid UTF-8 JSON whatever the names
    entries = {os.fsencode(e["path"]): e for e in document}
    expected: set[bytes] = set()
    for folder, dirs, files in os.walk(os.fsencode(src)):
        rel = os.path.relpath(folder, os.fsencode(src))
        for name in dirs + files:
            expected.add(name if rel == b"." else rel + b"/" + name)
    assert set(entries) == expected
    for name in AWKWARD_NAMES:
        assert b"names/" + name in entries
    small = entries[b"small.txt"]
    st = os.lstat(src / "small.txt")
    assert (small["type"], small["mode"], small["uid"], small["gid"], small["size"]) == (
        "file", f"{stat.S_IMODE(st.st_mode):04o}", st.st_uid, st.st_gid, 12)
    assert parse_utc(small["mtime"]) == datetime.fromtimestamp(st.st_mtime_ns // 1000 / 1e6, tz=UTC)
    assert entries[b"owners/big-ids"]["uid"] == 4000000000
    assert entries[b"modes/setuid"]["mode"] == "4755"
    assert entries[b"modes/locked"]["type"] == "directory" and entries[b"modes/locked"]["mode"] == "0000"
    assert entries[b"links/absolute"]["type"] == "symlink"
    assert entries[b"links/absolute"]["target"] == "/etc/hostname"
    assert os.fsencode(entries[b"links/odd-target"]["target"]) == b"\xff\xfe target \n"
    assert entries[b"specials/fifo"]["type"] == "fifo"
    groups = {entries[p].get("hardlink_group") for p in (b"hard/one", b"hard/two", b"hard/sub/three", b"a/b/four")}
    assert len(groups) == 1 and None not in groups
    assert entries[b"hard/big"].get("hardlink_group") not in (None, *groups)
    # not recursive: only the first level
    result = run_bytes(rekkord, "list", f"rt:{src}", "-f", "json", env=locale_env)
    top = {os.fsencode(e["path"]) for e in json.loads(result.stdout.decode("utf-8"))}
    assert top == set(os.listdir(os.fsencode(src)))


@pytest.mark.parametrize("locale_env", [{}, {"PYTHONIOENCODING": "utf-8"}], ids=["default", "strict-utf8"])
def test_list_plain(saved: tuple[Rekkord, Path, str], locale_env: dict[str, str]) -> None:
    rekkord, src, _ = saved
    result = run_bytes(rekkord, "list", f"rt:{src}/links", env=locale_env)
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    out = result.stdout
    assert b"relative -> ../small.txt" in out
    assert b"absolute -> /etc/hostname" in out
    lines = [line for line in out.splitlines() if b"dangling " in line or line.endswith(b"dangling")]
    assert lines and lines[0].startswith(b"l")
    result = run_bytes(rekkord, "list", f"rt:{src}/names", env=locale_env)
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    assert b"caf\xe9 latin-1" in result.stdout  # names are printed as their bytes
    result = run_bytes(rekkord, "list", f"rt:{src}", env=locale_env)
    assert b"drwx" in result.stdout and b"random-9M" in result.stdout and b"9.0 MiB" in result.stdout


def parse_utc(text: str) -> datetime:
    assert text.endswith("Z"), text
    moment = datetime.fromisoformat(text[:-1] + "+00:00")
    assert moment.utcoffset().total_seconds() == 0
    return moment


def test_snapshots_and_channels_json(local_repo: Rekkord, tmp_path: Path) -> None:
    src = tmp_path / "data"
    src.mkdir()
    write(src / "a", os.urandom(100_000))
    write(src / "b", b"x" * 5000)
    first = local_repo.save("alpha", str(src))
    second = local_repo.save("alpha", str(src))  # unchanged: stores (nearly) nothing new
    write(src / "c", os.urandom(50_000))
    third = local_repo.save("beta", str(src))
    snapshots = json.loads(local_repo("snapshots", "-f", "json").stdout)
    assert [s["id"] for s in snapshots] == [first, second, third]
    for item in snapshots:
        assert set(item) >= {"id", "channel", "time", "size", "stored"}
        assert len(item["id"]) == 64 and int(item["id"], 16) >= 0
        when = parse_utc(item["time"])
        assert abs((datetime.now(UTC) - when).total_seconds()) < 3600
        assert isinstance(item["size"], int) and isinstance(item["stored"], int)
    assert [s["channel"] for s in snapshots] == ["alpha", "alpha", "beta"]
    assert [s["size"] for s in snapshots] == [105_000, 105_000, 155_000]
    assert snapshots[0]["stored"] > 0
    assert snapshots[1]["stored"] < snapshots[0]["stored"]
    assert snapshots[0]["time"] <= snapshots[1]["time"] <= snapshots[2]["time"]
    # -c filters by channel
    only_beta = json.loads(local_repo("snapshots", "-c", "beta", "-f", "json").stdout)
    assert [s["id"] for s in only_beta] == [third]
    assert json.loads(local_repo("snapshots", "-c", "nothing", "-f", "json").stdout) == []
    channels = json.loads(local_repo("channels", "-f", "json").stdout)
    assert [(c["channel"], c["latest"], c["count"]) for c in channels] == [("alpha", second, 2), ("beta", third, 1)]
    for item in channels:
        assert set(item) >= {"channel", "latest", "time", "count"}
        parse_utc(item["time"])
    assert channels[0]["time"] == snapshots[1]["time"]
    # plain output names every snapshot
    plain = local_repo("snapshots").stdout
    assert all(s in plain for s in (first, second, third))
    plain = local_repo("channels").stdout
    assert "alpha" in plain and second in plain and "beta" in plain and third in plain
    # save -f json
    saved_doc = json.loads(local_repo("save", "gamma", str(src), "-f", "json").stdout)
    assert saved_doc["channel"] == "gamma" and len(saved_doc["id"]) == 64 and saved_doc["files"] == 3
    assert saved_doc["size"] == 155_000
    parse_utc(saved_doc["time"])


def test_empty_repository_listings(local_repo: Rekkord) -> None:
    assert json.loads(local_repo("snapshots", "-f", "json").stdout) == []
    assert json.loads(local_repo("channels", "-f", "json").stdout) == []
    result = local_repo("restore", "nothing", "/tmp/never-created-by-rekkord", check=False)
    assert_one_line_error(result, "nothing")
    assert not os.path.exists("/tmp/never-created-by-rekkord")


# --- restore options -------------------------------------------------------------------------


def make_small_tree(root: Path) -> None:
    (root / "dir" / "sub").mkdir(parents=True)
    write(root / "keep.txt", b"keep me")
    write(root / "dir" / "file", b"file in dir")
    write(root / "dir" / "sub" / "deep", os.urandom(300_000))
    os.symlink("keep.txt", root / "link")


def test_dry_run_changes_nothing(local_repo: Rekkord, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_small_tree(src)
    local_repo.save("dry", str(src))
    # into a missing destination: not created
    missing = tmp_path / "missing"
    result = local_repo("restore", "-n", f"dry:{src}", str(missing))
    assert not os.path.lexists(missing)
    assert "keep.txt" in result.stdout  # says what it would do
    # into a populated destination, with --delete and -f: nothing touched
    dest = tmp_path / "dest"
    dest.mkdir()
    write(dest / "extra", b"not in the snapshot")
    write(dest / "keep.txt", b"different content")
    (dest / "extra-dir").mkdir()
    before = tree_digest(dest)
    result = local_repo("restore", "-n", "--delete", f"dry:{src}", str(dest))
    assert "extra" in result.stdout
    assert tree_digest(dest) == before
    local_repo("restore", "-n", "--force", f"dry:{src}", str(dest))
    assert tree_digest(dest) == before
    # a single file
    local_repo("restore", "-n", "--force", f"dry:{src}/keep.txt", str(dest / "keep.txt"))
    result = local_repo("restore", "-n", f"dry:{src}/keep.txt", str(tmp_path / "single"))
    assert tree_digest(dest) == before and not os.path.lexists(tmp_path / "single")
    assert "Would restore 1 file (7 B)" in result.stdout
    # the summary of -n is that of the real restore
    would = local_repo("restore", "-n", f"dry:{src}", str(missing)).stdout.strip().splitlines()[-1]
    did = local_repo("restore", f"dry:{src}", str(missing)).stdout.strip().splitlines()[-1]
    assert would.startswith("Would restore ") and did.startswith("Restored ")
    assert would.removeprefix("Would restore ") == did.removeprefix("Restored "), (would, did)
    assert "3 files" in did and "2 directories" in did and did.endswith(", 1 symlink")


def test_delete_removes_extra_files(local_repo: Rekkord, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_small_tree(src)
    local_repo.save("del", str(src))
    dest = tmp_path / "dest"
    (dest / "dir" / "extra-dir" / "nested").mkdir(parents=True)
    (dest / "top-extra-dir").mkdir()
    write(dest / "extra", b"x")
    write(dest / "dir" / "extra-file", b"y")
    write(dest / "dir" / "extra-dir" / "nested" / "z", b"z")
    write(dest / "keep.txt", b"stale content")
    os.symlink("/etc", dest / "dir" / "sub")  # a symlink where the snapshot has a directory
    os.mkfifo(dest / "dir" / "file")  # a fifo where the snapshot has a file
    (dest / "link").mkdir()  # a directory where the snapshot has a symlink
    local_repo("restore", "--delete", f"del:{src}", str(dest))
    assert rsync_diff(src, dest) == ""
    assert os.path.isdir("/etc") and not os.path.islink(dest / "dir" / "sub")


def test_restore_into_non_empty_destination(local_repo: Rekkord, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_small_tree(src)
    local_repo.save("ne", str(src))
    dest = tmp_path / "dest"
    dest.mkdir()
    write(dest / "precious", b"do not touch")
    before = tree_digest(dest)
    result = local_repo("restore", f"ne:{src}", str(dest), check=False)
    assert_one_line_error(result, "not empty", "--force")
    assert tree_digest(dest) == before
    # a file in the way of a directory restore
    blocker = tmp_path / "blocker"
    write(blocker, b"a file")
    assert_one_line_error(local_repo("restore", f"ne:{src}", str(blocker), check=False), "not a folder")
    assert blocker.read_bytes() == b"a file"
    # with -f: restored next to what was there, which stays
    local_repo("restore", "--force", f"ne:{src}", str(dest))
    assert (dest / "precious").read_bytes() == b"do not touch"
    assert rsync_diff(src, dest, "--exclude=/precious") == ""
    # an empty destination folder is fine without -f
    empty = tmp_path / "empty"
    empty.mkdir()
    local_repo("restore", f"ne:{src}", str(empty))
    assert rsync_diff(src, empty) == ""


def test_restore_never_writes_through_symlinks(local_repo: Rekkord, tmp_path: Path) -> None:
    """Existing symlinks in DEST are replaced, never followed, even with -f."""
    src = tmp_path / "src"
    make_small_tree(src)
    local_repo.save("safe", str(src))
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside / "file", b"outside file")
    write(outside / "keep.txt", b"outside keep")
    before = tree_digest(outside)
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "dir")  # where the snapshot has a directory
    os.symlink(outside / "keep.txt", dest / "keep.txt")  # where the snapshot has a file
    os.link(outside / "file", dest / "hardlinked")  # unrelated hardlink: must not matter
    local_repo("restore", "--force", f"safe:{src}", str(dest))
    assert tree_digest(outside) == before
    assert not os.path.islink(dest / "dir") and (dest / "dir" / "file").read_bytes() == b"file in dir"
    assert not os.path.islink(dest / "keep.txt") and (dest / "keep.txt").read_bytes() == b"keep me"
    # a destination that is itself a symlink to a folder: restoring into it is what was asked
    target = tmp_path / "target"
    target.mkdir()
    os.symlink(target, tmp_path / "dest-link")
    local_repo("restore", f"safe:{src}", str(tmp_path / "dest-link"))
    assert rsync_diff(src, target) == ""


def test_second_save_of_unchanged_tree(saved: tuple[Rekkord, Path, str], tmp_path: Path) -> None:
    """An unchanged re-save stores no new data and restores identically."""
    rekkord, src, first = saved
    doc = json.loads(rekkord("save", "rt2", str(src), "-f", "json").stdout)
    assert doc["bytes_new"] == 0
    dest = tmp_path / "again"
    rekkord("restore", f"rt2:{src}", str(dest))
    assert rsync_diff(src, dest) == ""
