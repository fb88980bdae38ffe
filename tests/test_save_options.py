"""`save` options, run as a user would: excludes, cache folders, filesystem
boundaries, dry runs, standard input, missing paths, -v and -q. Each test
checks exactly which paths landed in the snapshot (`list -r -f json`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REKKORD, ROOT, Rekkord

CACHEDIR_TAG = b"Signature: 8a477f597d28d172789f06886806bc55\n# a cache folder\n"


def files(root: Path, *paths: str) -> Path:
    for relative in paths:
        path = root / relative
        if relative.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"content of {relative}\n".encode())
    return root


def listed(rekkord: Rekkord, snapshot: str, path: Path) -> set[str]:
    """Every path below `path` in the snapshot (folders end with '/')."""
    entries = json.loads(rekkord("list", "-r", "-f", "json", f"{snapshot}:{path}").stdout)
    return {e["path"] + ("/" if e["type"] == "directory" else "") for e in entries}


def repo_objects(rekkord: Rekkord) -> list[str]:
    assert rekkord.repository is not None
    return sorted(str(p.relative_to(rekkord.repository)) for p in Path(rekkord.repository).rglob("*") if p.is_file())


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return files(tmp_path / "src", "main.py", "main.pyc", "lib/util.py", "lib/util.pyc", "lib/__pycache__/x.pyc",
                 "web/node_modules/left-pad/index.js", "web/app.js", "build/out.o", "src/build/keep.o",
                 "notes.tmp", "tmp/", "docs/guide.txt", "docs/cache", "data/cache/blob")


def test_exclude_patterns(local_repo: Rekkord, tree: Path) -> None:
    snapshot = local_repo.save("x", str(tree), "--exclude", "*.pyc", "--exclude", "node_modules",
                               "-e", "build/*.o", "--exclude", "cache/", "--exclude", f"{tree}/tmp",
                               "--exclude", "__pycache__")
    assert listed(local_repo, snapshot, tree) == {
        "main.py", "lib/", "lib/util.py", "web/", "web/app.js", "build/", "src/", "src/build/",
        "src/build/keep.o", "notes.tmp", "docs/", "docs/guide.txt", "docs/cache", "data/",
    }


def test_exclude_file(local_repo: Rekkord, tree: Path, tmp_path: Path) -> None:
    patterns = tmp_path / "excludes.txt"
    patterns.write_text("# generated files\n*.pyc\n\n  __pycache__  \n/nothing/here\n")
    more = tmp_path / "more.txt"
    more.write_text("docs\n")
    snapshot = local_repo.save("x", str(tree), "--exclude-file", str(patterns), "--exclude-file", str(more),
                               "--exclude", "web")
    assert listed(local_repo, snapshot, tree) == {
        "main.py", "lib/", "lib/util.py", "build/", "build/out.o", "src/", "src/build/", "src/build/keep.o",
        "notes.tmp", "tmp/", "data/", "data/cache/", "data/cache/blob",
    }


def test_excluded_saved_path_and_several_paths(local_repo: Rekkord, tree: Path) -> None:
    """Relative patterns are relative to each saved path; a saved path itself can be excluded."""
    snapshot = local_repo.save("x", str(tree / "lib"), str(tree / "web"), str(tree / "docs"),
                               "--exclude", "util.py", "--exclude", "node_modules/", "--exclude", str(tree / "docs"))
    assert listed(local_repo, snapshot, tree) == {
        "lib/", "lib/util.pyc", "lib/__pycache__/", "lib/__pycache__/x.pyc", "web/", "web/app.js",
    }


def test_a_saved_path_through_a_symlinked_folder_is_saved_as_named(local_repo: Rekkord, tmp_path: Path) -> None:
    """`save /home/me/docs` where /home is a symlink to /data/home: the
    folders leading to a saved path are followed (and stored as folders);
    the saved path itself, when a symlink, is stored as one."""
    files(tmp_path / "data" / "home", "docs/a.txt", "docs/sub/b.txt")
    (tmp_path / "home").symlink_to(tmp_path / "data" / "home")
    (tmp_path / "data" / "link").symlink_to("home/docs")
    snapshot = local_repo.save("x", str(tmp_path / "home" / "docs"), str(tmp_path / "data" / "link"))
    assert listed(local_repo, snapshot, tmp_path) == {
        "home/", "home/docs/", "home/docs/a.txt", "home/docs/sub/", "home/docs/sub/b.txt", "data/", "data/link",
    }


def test_exclude_caches(local_repo: Rekkord, tmp_path: Path) -> None:
    src = files(tmp_path / "src", "keep.txt", "cache/a", "cache/sub/b", "fake/x", "wrong/y", "deep/er/cache/z")
    (src / "cache" / "CACHEDIR.TAG").write_bytes(CACHEDIR_TAG)
    (src / "deep" / "er" / "cache" / "CACHEDIR.TAG").write_bytes(CACHEDIR_TAG)
    (src / "fake" / "CACHEDIR.TAG").symlink_to(src / "cache" / "CACHEDIR.TAG")  # a symlink is not a tag
    (src / "wrong" / "CACHEDIR.TAG").write_bytes(b"Signature: not the right one\n")
    snapshot = local_repo.save("x", str(src), "--exclude-caches")
    assert listed(local_repo, snapshot, src) == {
        "keep.txt", "cache/", "cache/CACHEDIR.TAG", "fake/", "fake/x", "fake/CACHEDIR.TAG", "wrong/", "wrong/y",
        "wrong/CACHEDIR.TAG", "deep/", "deep/er/", "deep/er/cache/", "deep/er/cache/CACHEDIR.TAG",
    }
    everything = local_repo.save("x", str(src))  # without the option, caches are saved
    assert "cache/sub/b" in listed(local_repo, everything, src)


def test_one_file_system(local_repo: Rekkord, tmp_path: Path) -> None:
    src = files(tmp_path / "src", "top.txt", "inner/", "other/")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(src / "inner")], check=True)
    try:
        files(src, "inner/on-tmpfs.txt", "inner/deeper/more.txt")
        crossing = local_repo.save("x", str(src))
        assert {"inner/on-tmpfs.txt", "inner/deeper/more.txt"} <= listed(local_repo, crossing, src)
        staying = local_repo.save("x", str(src), "--one-file-system")
        # the mount point is kept as an empty folder, as rsync -x and restic do
        assert listed(local_repo, staying, src) == {"top.txt", "inner/", "other/"}
        # a saved path on another filesystem is saved: the boundary is below each PATH
        inside = local_repo.save("x", str(src / "inner"), "-x")
        assert listed(local_repo, inside, src / "inner") == {"on-tmpfs.txt", "deeper/", "deeper/more.txt"}
    finally:
        subprocess.run(["umount", str(src / "inner")], check=True)


def test_dry_run_writes_nothing(local_repo: Rekkord, tree: Path) -> None:
    before = repo_objects(local_repo)
    result = local_repo("save", "-n", "x", str(tree), "--exclude", "*.pyc")
    assert repo_objects(local_repo) == before
    assert local_repo("snapshots", "-f", "json").stdout.strip() == "[]"
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Would save:   10 files (") and "directories" in lines[0]
    assert lines[1].startswith("Would read:   10 files (")

    local_repo.save("x", str(tree))  # now the stat cache knows every file...
    (tree / "main.py").write_text("changed, and longer than before\n")  # ...but this one
    again = json.loads(local_repo("save", "--dry-run", "x", str(tree), "-f", "json").stdout)
    assert again["dry_run"] is True
    assert (again["files"], again["files_to_read"]) == (13, 1)
    assert again["bytes_to_read"] == len("changed, and longer than before\n")
    assert len(json.loads(local_repo("snapshots", "-f", "json").stdout)) == 1


def test_dry_run_verbose_lists_what_would_be_saved(local_repo: Rekkord, tree: Path) -> None:
    result = local_repo("save", "-n", "-v", "x", str(tree / "lib"), "-e", "__pycache__")
    *paths, _, _ = result.stdout.splitlines()  # then the two summary lines
    ancestors = [str(p) for p in reversed((tree / "lib").parents) if str(p) != "/"]
    assert paths == ancestors + [str(tree / "lib"), str(tree / "lib" / "util.py"), str(tree / "lib" / "util.pyc")]


def test_verbose_and_quiet(local_repo: Rekkord, tree: Path) -> None:
    verbose = local_repo("save", "-v", "x", str(tree / "docs"))
    lines = verbose.stdout.splitlines()
    assert str(tree / "docs" / "guide.txt") in lines and str(tree / "docs" / "cache") in lines
    assert lines[-1] == json.loads(local_repo("snapshots", "-f", "json").stdout)[-1]["id"]
    quiet = local_repo("-q", "save", "x", str(tree / "docs"))
    assert quiet.stdout.splitlines() == [json.loads(local_repo("snapshots", "-f", "json").stdout)[-1]["id"]]
    assert quiet.stderr == ""
    as_json = local_repo("save", "-v", "-f", "json", "x", str(tree / "docs"))
    assert json.loads(as_json.stdout)["files"] == 2  # the paths went to stderr
    assert str(tree / "docs" / "guide.txt") in as_json.stderr


def test_missing_paths(local_repo: Rekkord, tree: Path, tmp_path: Path) -> None:
    result = local_repo("save", "x", str(tree / "docs"), str(tmp_path / "gone"), "-f", "json", check=False)
    assert result.returncode == 3, result.stderr
    assert f"rekkord: warning: cannot save '{tmp_path / 'gone'}': No such file or directory; skipped" in result.stderr
    assert "1 file or folder could not be read and is missing from the snapshot" in result.stderr
    document = json.loads(result.stdout)
    assert document["skipped"] == 1
    assert listed(local_repo, document["id"], tree / "docs") == {"guide.txt", "cache"}

    for paths in ([str(tmp_path / "gone")], [str(tmp_path / "gone"), str(tmp_path / "also-gone")]):
        nothing = local_repo("save", "x", *paths, check=False)
        assert nothing.returncode == 2
        assert len(nothing.stderr.splitlines()) == 1 and "gone': No such file or directory" in nothing.stderr
        assert "Traceback" not in nothing.stderr
    assert len(json.loads(local_repo("snapshots", "-f", "json").stdout)) == 1


def _save_stdin(rekkord: Rekkord, data: bytes, *args: str) -> subprocess.CompletedProcess:
    argv = [*REKKORD, "-R", str(rekkord.repository), "-K", str(rekkord.key_file), "save", *args]
    env = {**os.environ, "REKKORD_CACHE_DIR": str(rekkord.cache_dir), "PYTHONPATH": str(ROOT)}
    return subprocess.run(argv, input=data, capture_output=True, env=env)


def test_save_standard_input(local_repo: Rekkord, tmp_path: Path) -> None:
    data = os.urandom(5 << 20) + b"tail"  # several chunks
    result = _save_stdin(local_repo, data, "db", "-", "--stdin-filename", "dump.sql")
    assert result.returncode == 0, result.stderr
    snapshot = result.stdout.decode().splitlines()[-1]
    entries = json.loads(local_repo("list", "-f", "json", snapshot).stdout)
    assert [(e["path"], e["type"], e["size"], e["mode"]) for e in entries] == [("dump.sql", "file", len(data), "0644")]
    local_repo("restore", f"{snapshot}:dump.sql", str(tmp_path / "dump.sql"))
    assert (tmp_path / "dump.sql").read_bytes() == data
    empty = _save_stdin(local_repo, b"", "db", "-", "--stdin-filename", "empty", "-q")
    assert empty.returncode == 0 and len(empty.stdout.split()) == 1
    assert local_repo("check", "--read-data").returncode == 0

    for args, fragment in [(["-"], "needs --stdin-filename"),
                           (["-", str(tmp_path)], "must be the only PATH"),
                           ([str(tmp_path), "--stdin-filename", "x"], "goes with the single PATH '-'"),
                           (["-", "--stdin-filename", "a/b"], "is not a file name"),
                           (["-", "--stdin-filename", ".."], "is not a file name"),
                           (["-", "--stdin-filename", "x", "--exclude", "*.o"], "do not apply to standard input")]:
        refused = _save_stdin(local_repo, b"data", "db", *args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert fragment in refused.stderr.decode() and len(refused.stderr.splitlines()) == 1
