"""diff, dump, find, stats and check's new options, run as a user runs them
(subprocess, real repositories) on a repository with a known history, on a
local folder and, for what touches the storage, on SeaweedFS and sshd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from rekkordfs.cli.output import human_size
from tests.conftest import REKKORD, ROOT, Rekkord
from tests.fsutil import assert_one_line_error, rsync_diff
from tests.trees import make_awkward_tree

T1 = 1_600_000_000_111_222_333  # fixed times, so folders change only when meant to
T2 = 1_700_000_000_444_555_666
ALPHA = b"alpha\n" * 1000


@dataclass
class History:
    """Three snapshots with known differences; `src` holds the second state."""

    rekkord: Rekkord
    src: Path
    first: str  # channel hist
    second: str  # channel hist: first + the changes of change()
    other: str  # channel other: src/docs only, as in the second
    alpha_v1: bytes


def fix_folder_times(root: Path) -> None:
    for folder, dirs, _ in os.walk(root):
        for name in dirs:
            os.utime(os.path.join(folder, name), ns=(T1, T1))
    os.utime(root, ns=(T1, T1))


def make_first(src: Path) -> None:
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.txt").write_bytes(ALPHA)
    (src / "docs" / "b.txt").write_bytes(b"bravo\n")
    (src / "docs" / "touched.txt").write_bytes(b"same content\n")
    os.setxattr(src / "docs" / "a.txt", "user.tag", b"v1")
    for month in range(1, 13):
        folder = src / "photos" / "2018" / f"m{month:02d}"
        folder.mkdir(parents=True)
        (folder / "img.jpg").write_bytes(os.urandom(2000))
    (src / "photos" / "2019").mkdir()
    (src / "photos" / "2019" / "x.jpg").write_bytes(os.urandom(3000))
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    os.symlink("docs/a.txt", src / "link")
    (src / "hard1").write_bytes(b"linked\n")
    os.link(src / "hard1", src / "hard2")
    (src / "empty-dir").mkdir()
    with open(os.fsencode(src) + b"/\xff name", "wb") as handle:
        handle.write(b"not utf-8")
    for path in src.rglob("*"):
        os.utime(path, ns=(T1, T1), follow_symlinks=False)
    fix_folder_times(src)


def change(src: Path) -> None:
    (src / "docs" / "a.txt").write_bytes(b"alpha, second version\n")
    os.utime(src / "docs" / "a.txt", ns=(T1, T1))  # content only
    (src / "docs" / "b.txt").chmod(0o600)  # metadata only: mode
    os.utime(src / "docs" / "touched.txt", ns=(T2, T2))  # metadata only: time
    for path in sorted((src / "photos" / "2019").rglob("*"), reverse=True):
        path.unlink()
    (src / "photos" / "2019").rmdir()
    (src / "new").mkdir()
    (src / "new" / "c.txt").write_bytes(b"charlie\n")
    (src / "link").unlink()
    (src / "link").write_bytes(b"a file now\n")  # a symlink became a file
    for folder in (src / "new", src / "photos", src):  # folders whose times the changes moved
        os.utime(folder, ns=(T1, T1))


def save(rekkord: Rekkord, channel: str, path: Path) -> str:
    """A save after a first one, which is forgotten: the first one reads every
    changed file, which may set its access time (stored in records); later
    saves of an unchanged tree store equal records, as backups do."""
    warm_up = rekkord.save(channel, str(path))
    saved = rekkord.save(channel, str(path))
    rekkord("forget", warm_up, "-q")
    return saved


def build_history(rekkord: Rekkord, tmp_path: Path) -> History:
    src = tmp_path / "src"
    make_first(src)
    first = save(rekkord, "hist", src)
    change(src)
    second = save(rekkord, "hist", src)
    other = save(rekkord, "other", src / "docs")
    return History(rekkord, src, first, second, other, ALPHA)


@pytest.fixture
def history(local_repo: Rekkord, tmp_path: Path) -> History:
    """A history of its own, for tests that change the repository."""
    return build_history(local_repo, tmp_path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> History:
    """One history for the tests that only read it (building one takes six saves)."""
    tmp = tmp_path_factory.mktemp("history")
    (tmp / "cache").mkdir()
    rekkord = Rekkord(cache_dir=tmp / "cache", repository=str(tmp / "repo"))
    rekkord("init", "-K", str(tmp / "master.key"))
    rekkord.key_file = str(tmp / "master.key")
    return build_history(rekkord, tmp)


def parse_plain_diff(stdout: str) -> set[tuple[str, str]]:
    """(code, path) of each change line of a plain diff (paths end a line, before notes)."""
    found = set()
    for line in stdout.splitlines():
        if not line or line[0] not in "+-MUT" or line[1] != " ":
            continue
        path = line[28:].split("  (")[0]  # code, space, size in 24 columns, two spaces
        found.add((line[0], path))
    return found


# --- diff -----------------------------------------------------------------------------------


def test_diff_of_a_known_history(shared: History) -> None:
    rekkord, src = shared.rekkord, shared.src
    result = rekkord("diff", f"{shared.first}:{src}", f"hist:{src}")
    assert parse_plain_diff(result.stdout) == {
        ("M", "docs/a.txt"), ("U", "docs/b.txt"), ("U", "docs/touched.txt"), ("T", "link"),
        ("+", "new/"), ("+", "new/c.txt"), ("-", "photos/2019/"), ("-", "photos/2019/x.jpg"),
    }
    assert f"{human_size(len(ALPHA))} -> 22 B  docs/a.txt" in result.stdout
    assert "docs/b.txt  (mode)" in result.stdout and "docs/touched.txt  (mtime)" in result.stdout
    assert "link  (symlink -> file)" in result.stdout
    assert "Added:   1 file (8 B), 1 directory" in result.stdout
    assert "Removed: 1 file (2.9 KiB), 1 directory" in result.stdout

    doc = json.loads(rekkord("diff", f"{shared.first}:{src}", f"hist:{src}", "-f", "json").stdout)
    assert doc["old"]["id"] == shared.first and doc["new"]["id"] == shared.second
    assert doc["new"]["channel"] == "hist" and doc["new"]["path"] == str(src)
    by_path = {c["path"]: c for c in doc["changes"]}
    a = by_path["docs/a.txt"]
    assert a["change"] == "changed" and a["kinds"] == ["content"] and a["fields"] == []
    assert a["old"]["size"] == len(ALPHA) and a["new"]["size"] == 22 and a["type"] == "file"
    assert by_path["docs/b.txt"]["kinds"] == ["metadata"] and by_path["docs/b.txt"]["fields"] == ["mode"]
    assert by_path["docs/b.txt"]["old"]["mode"] == "0644" and by_path["docs/b.txt"]["new"]["mode"] == "0600"
    assert by_path["link"]["kinds"] == ["type"] and by_path["link"]["old"]["type"] == "symlink"
    assert by_path["new/c.txt"]["change"] == "added" and by_path["new/c.txt"]["old"] is None
    assert by_path["photos/2019/x.jpg"]["change"] == "removed" and by_path["photos/2019/x.jpg"]["new"] is None
    assert doc["summary"]["added"] == {"files": 1, "directories": 1, "other": 0, "size": 8}
    assert doc["summary"]["changed"]["content"] == 1 and doc["summary"]["changed"]["metadata"] == 2
    # the 12 unchanged month folders and their parent are equal records: never read
    # read: src, docs, photos (both sides), new, photos/2019; equal: photos/2018, empty-dir
    assert doc["directories_read"] == 8 and doc["directories_skipped"] == 2

    same = json.loads(rekkord("diff", f"hist:{src}", f"{shared.second}:{src}", "-f", "json").stdout)
    assert same["changes"] == [] and same["directories_read"] == 0
    other = json.loads(rekkord("diff", f"hist:{src}/docs", f"other:{src}/docs", "-f", "json").stdout)
    assert other["changes"] == []  # another channel, the same folder: equal records
    one_file = rekkord("diff", f"{shared.first}:{src}/docs/a.txt", f"hist:{src}/docs/a.txt", "-q").stdout
    assert parse_plain_diff(one_file) == {("M", "a.txt")} and "Added" not in one_file


def test_diff_bad_input_is_one_line(shared: History) -> None:
    rekkord, src = shared.rekkord, shared.src
    assert_one_line_error(rekkord("diff", "hist", "nosuch", check=False), "no channel named 'nosuch'")
    assert_one_line_error(rekkord("diff", f"hist:{src}/missing", "hist", check=False), "does not exist")
    assert_one_line_error(rekkord("diff", ":x", "hist", check=False), "names no snapshot")
    usage = rekkord("diff", "hist", check=False)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


# --- dump -----------------------------------------------------------------------------------


def run_raw(rekkord: Rekkord, *args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """The CLI with bytes on stdout (rekkord() decodes text)."""
    env = {**os.environ, "REKKORD_CACHE_DIR": str(rekkord.cache_dir), "PYTHONPATH": str(ROOT)}
    argv = [*REKKORD, "-R", str(rekkord.repository), "-K", str(rekkord.key_file), *args]
    return subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE, env=env, timeout=600)


def test_dump_a_file_and_a_folder(shared: History, tmp_path: Path) -> None:
    rekkord, src = shared.rekkord, shared.src
    first = run_raw(rekkord, "dump", f"{shared.first}:{src}/docs/a.txt")
    assert first.returncode == 0 and first.stdout == ALPHA and first.stderr == b""
    big = run_raw(rekkord, "dump", f"hist:{src}/big.bin")
    assert big.stdout == (src / "big.bin").read_bytes()
    # a folder: a tar stream, extracted by GNU tar as the original
    out = tmp_path / "out"
    out.mkdir()
    with subprocess.Popen(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", "-", "-C", str(out)],
                          stdin=subprocess.PIPE, stderr=subprocess.PIPE) as tar:
        dumped = run_raw(rekkord, "dump", f"hist:{src}", stdout=tar.stdin)
        tar.stdin.close()  # type: ignore[union-attr]
        assert tar.wait() == 0 and tar.stderr.read() == b""  # type: ignore[union-attr]
    assert dumped.returncode == 0 and dumped.stderr == b""
    assert rsync_diff(src, out) == ""


def test_dump_of_every_kind_of_entry_round_trips_through_tar(local_repo: Rekkord, tmp_path: Path) -> None:
    src = make_awkward_tree(tmp_path / "awkward")
    os.chmod(src, 0o750)
    local_repo.save("awkward", str(src))
    archive = tmp_path / "awkward.tar"
    with open(archive, "wb") as handle:
        assert run_raw(local_repo, "dump", f"awkward:{src}", stdout=handle).returncode == 0
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", str(archive), "-C",
                    str(out)], check=True, capture_output=True)
    assert rsync_diff(src, out) == ""
    with tarfile.open(archive) as opened:  # names are relative and never climb out
        names = opened.getnames()
    assert all(not n.startswith("/") and ".." not in n.split("/") for n in names)
    assert sum(1 for n in names if os.fsencode(n).startswith(b"\xff\xfe")) == 1
    assert_one_line_error(local_repo("dump", f"awkward:{src}/fifo", check=False), "fifo", "nothing to dump")


def test_dump_streams_with_flat_memory_and_stops_when_the_reader_goes(local_repo: Rekkord, tmp_path: Path) -> None:
    src = tmp_path / "large"
    src.mkdir()
    with open(src / "file.bin", "wb") as handle:
        for _ in range(40):
            handle.write(os.urandom(8 << 20))  # 320 MiB
    local_repo.save("large", str(src))
    # the peak memory of the dump alone: measured by a parent that starts only it
    env = {**os.environ, "REKKORD_CACHE_DIR": str(local_repo.cache_dir), "PYTHONPATH": str(ROOT)}
    argv = [*REKKORD, "-R", str(local_repo.repository), "-K", str(local_repo.key_file), "dump",
            f"large:{src}/file.bin"]
    out = tmp_path / "out.bin"
    measure = ("import resource, subprocess, sys\n"
               f"with open({str(out)!r}, 'wb') as out:\n"
               f"    code = subprocess.run({argv!r}, stdout=out).returncode\n"
               "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    code, peak_kib = subprocess.run([sys.executable, "-c", measure], env=env, capture_output=True, text=True,
                                    check=True).stdout.split()
    assert code == "0"
    assert subprocess.run(["cmp", str(src / "file.bin"), str(out)]).returncode == 0
    assert int(peak_kib) < 200 * 1024, f"dump of 320 MiB peaked at {int(peak_kib) // 1024} MiB"
    out.unlink()
    # a reader that stops early: the status of SIGPIPE, and not a word
    piped = subprocess.run(f"{' '.join(map(repr, argv))} | head -c 1000 | wc -c", shell=True, env=env,
                           capture_output=True, text=True, executable="/bin/bash")
    assert piped.stdout.strip() == "1000" and piped.stderr == ""
    folder = subprocess.run(["bash", "-c", f"{' '.join(map(repr, argv[:-1]))} large:{src} | head -c 1000 "
                             "> /dev/null; echo ${PIPESTATUS[0]}"], env=env, capture_output=True, text=True)
    assert folder.stdout.strip() == "141" and folder.stderr == ""


def test_dump_bad_input_is_one_line(shared: History, tmp_path: Path) -> None:
    rekkord, src = shared.rekkord, shared.src
    assert_one_line_error(rekkord("dump", f"hist:{src}/nothing", check=False), "does not exist")
    assert_one_line_error(rekkord("dump", "nosuch:/x", check=False), "no channel named 'nosuch'")
    log = tmp_path / "log.key"
    rekkord("derive", "-t", "LogOnly", "-O", str(log))
    assert_one_line_error(rekkord("dump", f"hist:{src}/docs/a.txt", key=str(log), check=False),
                          "LogOnly key cannot")


# --- find -----------------------------------------------------------------------------------


def matches(rekkord: Rekkord, *args: str) -> list[tuple[str, str, str]]:
    doc = json.loads(rekkord("find", *args, "-f", "json").stdout)
    return sorted((m["id"], m["channel"], m["path"]) for m in doc)


def test_find_across_the_history(shared: History) -> None:
    rekkord, src = shared.rekkord, shared.src
    jpgs = matches(rekkord, "*.jpg")
    assert [m[2] for m in jpgs if m[0] == shared.first] == sorted(
        [f"{src}/photos/2018/m{month:02d}/img.jpg" for month in range(1, 13)] + [f"{src}/photos/2019/x.jpg"])
    assert len([m for m in jpgs if m[0] == shared.second]) == 12
    assert not [m for m in jpgs if m[0] == shared.other]
    assert matches(rekkord, "c.txt") == [(shared.second, "hist", f"{src}/new/c.txt")]
    assert matches(rekkord, "c.txt", "-c", "other") == []
    anchored = matches(rekkord, f"{src}/docs/*.txt")  # with its leading '/'
    assert anchored == matches(rekkord, f"{str(src)[1:]}/docs/*.txt")  # or without
    assert {(m[0], m[2].rsplit("/", 1)[1]) for m in anchored} == {
        (snapshot, name) for snapshot in (shared.first, shared.second, shared.other)
        for name in ("a.txt", "b.txt", "touched.txt")}
    assert matches(rekkord, "**/2019/*") == [(shared.first, "hist", f"{src}/photos/2019/x.jpg")]
    folders = json.loads(rekkord("find", "photos/", "-f", "json").stdout)
    assert {(m["id"], m["type"]) for m in folders} == {(shared.first, "directory"), (shared.second, "directory")}
    one = json.loads(rekkord("find", "c.txt", "-f", "json").stdout)[0]
    assert one["type"] == "file" and one["size"] == 8 and one["time"].endswith("Z")
    assert set(one) == {"id", "channel", "time", "path", "type", "size", "mtime"}
    names = json.loads(rekkord("find", "\udcff name", "-f", "json").stdout)
    assert [os.fsencode(m["path"]) for m in names] == [os.fsencode(f"{src}/") + b"\xff name"] * 2

    plain = rekkord("find", "c.txt").stdout.splitlines()
    assert plain[0].split() == ["ID", "Channel", "Time", "Type", "Size", "Path"]
    assert plain[1].startswith(shared.second[:12]) and plain[1].endswith(f"{src}/new/c.txt")
    assert plain[-1] == "1 match in 1 of 3 snapshots"
    assert rekkord("find", "nothing-like-this").stdout == "0 matches in 0 of 3 snapshots\n"
    assert_one_line_error(rekkord("find", "", check=False), "pattern '' is empty")


# --- stats ----------------------------------------------------------------------------------


def test_stats_of_the_history(shared: History, tmp_path: Path) -> None:
    rekkord = shared.rekkord
    listed = json.loads(rekkord("snapshots", "-f", "json").stdout)
    doc = json.loads(rekkord("stats", "-f", "json").stdout)
    packs = [p for p in (Path(str(rekkord.repository)) / "packs").rglob("*") if p.is_file()]
    assert doc["snapshots"] == 3 and doc["channels"] == 2
    assert doc["logical_size"] == sum(s["size"] for s in listed)
    assert doc["files"] == sum(s["files"] for s in listed)
    assert doc["packs"] == len(packs) and doc["stored_size"] == sum(p.stat().st_size for p in packs)
    assert doc["average_pack_size"] == doc["stored_size"] // doc["packs"]
    assert 0 < doc["distinct_size"] < doc["logical_size"] * 0.6  # two snapshots of nearly one tree
    assert doc["dedup_ratio"] == pytest.approx(doc["logical_size"] / doc["distinct_size"], rel=1e-3)
    assert doc["stored_ratio"] == pytest.approx(doc["logical_size"] / doc["stored_size"], rel=1e-3)
    per = {c["channel"]: c for c in doc["per_channel"]}
    assert per["hist"]["snapshots"] == 2 and per["hist"]["latest"] == shared.second
    assert per["other"]["latest"] == shared.other
    assert per["hist"]["logical_size"] == sum(s["size"] for s in listed if s["channel"] == "hist")
    plain = rekkord("stats").stdout
    assert "Snapshots:     3 in 2 channels" in plain and "Dedup ratio:" in plain and "hist" in plain

    log, write = tmp_path / "log.key", tmp_path / "write.key"
    rekkord("derive", "-t", "LogOnly", "-O", str(log))
    rekkord("derive", "-t", "WriteOnly", "-O", str(write))
    logged = json.loads(rekkord("stats", "-f", "json", key=str(log)).stdout)
    assert logged["distinct_size"] is None and logged["dedup_ratio"] is None
    assert logged["logical_size"] == doc["logical_size"] and logged["stored_size"] == doc["stored_size"]
    assert "Dedup ratio" not in rekkord("stats", key=str(log)).stdout
    assert_one_line_error(rekkord("stats", key=str(write), check=False), "WriteOnly key cannot list")


# --- check ----------------------------------------------------------------------------------


def test_check_read_data_subsets_and_json(history: History) -> None:
    rekkord = history.rekkord
    clean = json.loads(rekkord("check", "--read-data-subset", "1/3", "-f", "json").stdout)
    # group N of M: the packs whose ID (its first 8 bytes, a number) is N - 1 modulo M
    pack_ids = [bytes.fromhex(p.name) for p in (Path(str(rekkord.repository)) / "packs").rglob("*") if p.is_file()]
    in_first = sum(1 for pack in pack_ids if int.from_bytes(pack[:8], "big") % 3 == 0)
    assert clean["problems"] == [] and clean["read_data"] == "1/3"
    assert clean["packs"] == len(pack_ids) and clean["packs_read"] == in_first
    assert set(clean) == {"snapshots", "directories", "files", "chunks", "read_data", "packs", "packs_read",
                          "chunks_read", "bytes_read", "problems"}
    structure = json.loads(rekkord("check", "-f", "json").stdout)
    assert structure["read_data"] is None and structure["chunks_read"] == 0 and structure["snapshots"] == 3
    # damage the largest pack (chunks of big.bin): exactly one group of three reads it
    packs = sorted((p for p in (Path(str(rekkord.repository)) / "packs").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    with open(packs[-1], "r+b") as handle:
        handle.seek(packs[-1].stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    results = [rekkord("check", "--read-data-subset", f"{n}/3", "-f", "json", check=False) for n in (1, 2, 3)]
    assert sorted(r.returncode for r in results) == [0, 0, 1]
    bad = next(r for r in results if r.returncode == 1)
    problems = json.loads(bad.stdout)["problems"]
    assert problems and all("big.bin" in p or "pack index" in p for p in problems)
    assert sum(json.loads(r.stdout)["packs_read"] for r in results) == clean["packs"]
    full = rekkord("check", "--read-data-subset", "100%", check=False)
    assert full.returncode == 1 and full.stderr.splitlines()[-1].endswith("found")
    assert rekkord("check", "-q").returncode == 0  # the structure is intact: only data was damaged
    assert_one_line_error(rekkord("check", "--read-data-subset", "0/3", check=False), "N%", "N/M")
    both = rekkord("check", "--read-data", "--read-data-subset", "5%", check=False)
    assert both.returncode == 2 and "not allowed with" in both.stderr


# --- on every backend -----------------------------------------------------------------------


def test_inspect_commands_on_each_backend(backend_repo, tmp_path: Path) -> None:
    """What touches the storage (records, chunks, pack listings) on local, S3 and SFTP."""
    history = build_history(backend_repo, tmp_path)
    rekkord, src = backend_repo, history.src
    changes = json.loads(rekkord("diff", f"{history.first}:{src}", f"hist:{src}", "-f", "json").stdout)["changes"]
    assert {c["path"] for c in changes} == {"docs/a.txt", "docs/b.txt", "docs/touched.txt", "link", "new",
                                            "new/c.txt", "photos/2019", "photos/2019/x.jpg"}
    dumped = subprocess.run(  # Rekkord runners decode text: run the dump with bytes
        [*REKKORD, "-C", rekkord.config_file, "-K", str(rekkord.key_file), "dump",
         f"{history.first}:{src}/docs/a.txt"],
        capture_output=True, env={**os.environ, "REKKORD_CACHE_DIR": str(rekkord.cache_dir),
                                  "PYTHONPATH": str(ROOT)}, timeout=300)
    assert dumped.returncode == 0 and dumped.stdout == ALPHA, dumped.stderr
    assert len(matches(rekkord, "*.jpg")) == 13 + 12
    stats = json.loads(rekkord("stats", "-f", "json").stdout)
    assert stats["packs"] > 0 and stats["stored_size"] > stats["distinct_size"] / 2
    assert json.loads(rekkord("check", "--read-data-subset", "50%", "-f", "json").stdout)["problems"] == []
