"""The staging area against a local folder: the same system calls, the same
outcomes (tests/posix_cases.py, run by tests/posix_diff.py). What still differs
is listed in KNOWN, each difference with its reason (docs/mount.md too): the
test fails when a new one appears and when a known one goes away."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from .mounting import mounted
from .posix_cases import CASES
from .posix_diff import compare, run

# Differences that remain (docs/mount.md, "Differences from a local filesystem"):
# the FUSE library (pyfuse3) has no fallocate, lseek or tmpfile operations,
# so the kernel answers for them; the other two are choices.
KNOWN: dict[str, str] = {
    "fallocate": "EOPNOTSUPP: pyfuse3 does not pass fallocate on (posix_fallocate falls back to writing)",
    "SEEK_DATA from 0": "holes are not reported: without an lseek operation the whole file is data",
    "SEEK_HOLE from 0": "the same: the only hole is at the end",
    "O_TMPFILE": "EOPNOTSUPP: no tmpfile operation",
    "folder size": "folders report size 0 (ext4 reports its 4096-byte blocks, tmpfs another number)",
    "block size": "st_blksize is 1 MiB so that cp and friends move large blocks",
    "ls -a of an empty folder": "readdir does not list . and .. (POSIX allows either)",
    "reading moves an old atime (relatime)": "staging never updates access times on read",
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory):
    """(local root, staging root): a folder on the test's disk, one in staging."""
    from .conftest import Rekkord

    folder = tmp_path_factory.mktemp("posix")
    rekkord = Rekkord(cache_dir=folder / "cache", repository=str(folder / "repo"), key_file=str(folder / "master.key"))
    rekkord.cache_dir.mkdir()
    rekkord.env["REKKORD_STATE_DIR"] = str(folder / "state")
    rekkord("init", "-K", rekkord.key_file)
    with mounted(rekkord, folder / "mnt") as mnt:
        staging = mnt / "staging" / "posix"
        staging.mkdir()
        local = folder / "local"
        local.mkdir()
        yield os.fsencode(local), os.fsencode(staging)


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_staging_answers_like_a_local_folder(roots, case) -> None:
    local, staging = roots
    name = os.fsencode(case.__name__)
    expected = run(case, local + b"/" + name)
    actual = run(case, staging + b"/" + name)
    problems = compare(expected, actual)
    unknown = [p for p in problems if p.split(":")[0] not in KNOWN]
    assert unknown == [], "\n".join(unknown)
    labels = {label for label, _ in expected}
    fixed = [label for label in KNOWN if label in labels and not any(p.startswith(label + ":") for p in problems)]
    assert fixed == [], f"no longer different (remove from KNOWN and docs/mount.md): {fixed}"


FOLDERS = [b"", b"a", b"a/b", b"a/c", b"a/c/d", b"a/c/e", b"a/c/f", b"g"]


def _links(root: bytes, rels: list[bytes]) -> dict[bytes, int]:
    return {rel: os.lstat(root + b"/" + rel if rel else root).st_nlink for rel in rels}


def test_folder_link_counts_in_snapshots_and_in_copy_on_write_staging(local_repo, tmp_path: Path) -> None:
    """2 + subfolders everywhere: snapshot folders (from their records), staged
    folders not expanded yet (from the base's records), after changes (from
    the journal), and the mount's own folders."""
    local_repo.env["REKKORD_STATE_DIR"] = str(tmp_path / "state")
    src = tmp_path / "src"
    for rel in FOLDERS:
        os.makedirs(os.fsencode(src) + b"/" + rel, exist_ok=True)
    (src / "a" / "c" / "file").write_text("x")
    snapshot = local_repo.save("links", str(src))
    source = os.fsencode(src)
    expected = _links(source, FOLDERS)
    assert expected[b"a/c"] == 5 and expected[b""] == 4
    with mounted(local_repo, tmp_path / "mnt") as mnt:
        inside = os.fsencode(src).lstrip(b"/")
        latest = os.fsencode(mnt / "channels" / "links" / "latest") + b"/" + inside
        staged = os.fsencode(mnt / "staging" / "links") + b"/" + inside
        assert _links(latest, FOLDERS) == expected
        assert _links(staged, FOLDERS) == expected
        assert os.lstat(mnt / "ids" / snapshot).st_nlink == 3  # the snapshot root holds "tmp"
        with pytest.raises(OSError) as failure:
            os.lstat(latest + b"/" + b"n" * 256)
        assert failure.value.errno == errno.ENAMETOOLONG  # snapshots too
        mount_folders = {"": 5, "channels": 3, "ids": 3, "channels/links": 3, "staging": 3}
        assert {rel: os.lstat(mnt / rel).st_nlink for rel in mount_folders} == mount_folders
        for root in (source, staged):
            os.mkdir(root + b"/a/c/new")
            os.rename(root + b"/a/c/d", root + b"/a/d2")
            os.rmdir(root + b"/g")
            os.rename(root + b"/a/b", root + b"/a/c/e/b")
        after = [b"", b"a", b"a/c", b"a/c/e", b"a/c/e/b", b"a/c/new", b"a/d2", b"a/c/f"]
        assert _links(staged, after) == _links(source, after)
