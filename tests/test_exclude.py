"""Exclude patterns (rekkordfs/exclude.py): the syntax of docs/operations.md,
case by case, and the pattern file format."""

from __future__ import annotations

from pathlib import Path

import pytest

from rekkordfs.errors import UsageError
from rekkordfs.exclude import Excluder, Scope, compile_pattern, read_pattern_file

pytestmark = pytest.mark.fast  # pure: part of the fast tier

SAVED = "/home/me"  # the saved PATH relative patterns are anchored to

# (pattern, absolute path, is a folder, excluded?)
CASES = [
    # no '/': a name at any depth
    ("*.pyc", "/home/me/a.pyc", False, True),
    ("*.pyc", "/home/me/src/deep/b.pyc", False, True),
    ("*.pyc", "/home/me/a.pyc.txt", False, False),
    ("*.pyc", "/home/me/pyc", False, False),
    ("node_modules", "/home/me/web/node_modules", True, True),
    ("node_modules", "/home/me/node_modules", False, True),
    ("node_modules", "/home/me/node_modules2", True, False),
    ("node_modules", "/home/me/my_node_modules", True, False),
    ("*", "/home/me/anything", False, True),
    ("?.txt", "/home/me/a.txt", False, True),
    ("?.txt", "/home/me/ab.txt", False, False),
    ("[abc].log", "/home/me/b.log", False, True),
    ("[abc].log", "/home/me/d.log", False, False),
    ("[a-c].log", "/home/me/c.log", False, True),
    ("[!a-c].log", "/home/me/c.log", False, False),
    ("[!a-c].log", "/home/me/x.log", False, True),
    ("[^a-c].log", "/home/me/x.log", False, True),
    ("[]].log", "/home/me/].log", False, True),
    ("[.log", "/home/me/[.log", False, True),  # an unclosed '[' is a literal
    ("\\*.txt", "/home/me/*.txt", False, True),  # '\' makes the next character literal
    ("\\*.txt", "/home/me/a.txt", False, False),
    ("a.b", "/home/me/axb", False, False),  # '.' is a plain character
    ("(x)+", "/home/me/(x)+", False, True),  # so is every regex metacharacter
    ("**.bak", "/home/me/x.bak", False, True),  # without '/', '**' is like '*'
    ("*.PYC", "/home/me/a.pyc", False, False),  # case matters
    # a trailing '/': folders only
    ("cache/", "/home/me/cache", True, True),
    ("cache/", "/home/me/cache", False, False),
    ("cache/", "/home/me/x/cache", True, True),
    ("/home/me/tmp/", "/home/me/tmp", True, True),
    ("/home/me/tmp/", "/home/me/tmp", False, False),
    # starting with '/': the absolute path, whole
    ("/home/me/tmp", "/home/me/tmp", True, True),
    ("/home/me/tmp", "/home/me/x/tmp", True, False),
    ("/home/me/tmp", "/home/me/tmp2", True, False),
    ("/home/*/cache", "/home/me/cache", True, True),
    ("/home/*/cache", "/home/me/x/cache", True, False),  # '*' does not cross '/'
    ("/home/**/cache", "/home/me/x/cache", True, True),
    ("/home/**/cache", "/home/cache", True, True),  # '**/' is zero or more folders
    ("/home/me/**", "/home/me/a/b/c", False, True),
    ("/home/me/**", "/home/me", True, False),  # what is inside, not the folder itself
    ("//home//me/tmp", "/home/me/tmp", True, True),  # repeated slashes are one
    # with a '/' elsewhere: relative to the saved PATH
    ("build/*.o", "/home/me/build/x.o", False, True),
    ("build/*.o", "/home/me/src/build/x.o", False, False),
    ("./build/*.o", "/home/me/build/x.o", False, True),
    ("src/*/gen", "/home/me/src/a/gen", True, True),
    ("src/*/gen", "/home/me/src/a/b/gen", True, False),
    ("**/gen", "/home/me/gen", True, True),
    ("**/gen", "/home/me/src/a/b/gen", True, True),
    ("src/**/*.tmp", "/home/me/src/x.tmp", False, True),
    ("src/**/*.tmp", "/home/me/src/a/b/x.tmp", False, True),
    ("src/**/*.tmp", "/home/me/other/x.tmp", False, False),
    ("docs/", "/home/me/docs", True, True),  # a trailing '/' alone does not anchor
    ("a/b", "/home/me/a/b", False, True),
    ("a/b", "/home/me/x/a/b", False, False),
    ("a[/]b", "/home/me/a/b", False, False),  # a set never matches "/"
]


def _relative(path: str) -> bytes:
    return path[len(SAVED) + 1:].encode() if path.startswith(SAVED + "/") else b""


@pytest.mark.parametrize("pattern, path, is_dir, excluded", CASES,
                         ids=[f"{p}|{path}|{'dir' if d else 'file'}" for p, path, d, _ in CASES])
def test_pattern_table(pattern: str, path: str, is_dir: bool, excluded: bool) -> None:
    excluder = Excluder([compile_pattern(pattern)])
    name = path.rsplit("/", 1)[-1].encode()
    assert excluder.excluded(name, path.encode(), _relative(path), is_dir) is excluded


def test_scopes() -> None:
    assert compile_pattern("*.py").scope == Scope.NAME
    assert compile_pattern("cache/").scope == Scope.NAME
    assert compile_pattern("/srv/x").scope == Scope.ABSOLUTE
    assert compile_pattern("a/b").scope == Scope.RELATIVE
    assert compile_pattern("cache/").dirs_only and not compile_pattern("cache").dirs_only


def test_relative_patterns_never_match_the_saved_path_itself() -> None:
    excluder = Excluder([compile_pattern("**/me")])
    assert not excluder.excluded(b"me", b"/home/me", b"", True)
    assert Excluder([compile_pattern("me")]).excluded(b"me", b"/home/me", b"", True)


def test_several_patterns_combine() -> None:
    excluder = Excluder([compile_pattern(p) for p in ("*.o", "/srv/tmp", "build/", "src/gen")])
    assert excluder.excluded(b"x.o", b"/srv/x.o", b"x.o", False)
    assert excluder.excluded(b"tmp", b"/srv/tmp", b"tmp", True)
    assert excluder.excluded(b"build", b"/srv/a/build", b"a/build", True)
    assert not excluder.excluded(b"build", b"/srv/a/build", b"a/build", False)
    assert excluder.excluded(b"gen", b"/srv/src/gen", b"src/gen", False)
    assert not excluder.excluded(b"keep.c", b"/srv/keep.c", b"keep.c", False)
    assert not Excluder([])


def test_names_that_are_not_utf8() -> None:
    excluder = Excluder([compile_pattern(b"caf\xe9*")])
    assert excluder.excluded(b"caf\xe9-1", b"/x/caf\xe9-1", b"caf\xe9-1", False)
    assert not excluder.excluded(b"cafe", b"/x/cafe", b"cafe", False)


@pytest.mark.parametrize("pattern", ["", "/", ".", "./", "//", "a\0b"])
def test_bad_patterns(pattern: str) -> None:
    with pytest.raises(UsageError, match="exclude pattern"):
        compile_pattern(pattern)


def test_pattern_file(tmp_path: Path) -> None:
    listing = tmp_path / "excludes"
    listing.write_bytes(b"# build products\n*.o\n\n   \n  /srv/tmp  \n# trailing comment\ncache/\nnon-utf8-\xff\n")
    patterns = read_pattern_file(str(listing))
    assert [p.text for p in patterns] == ["*.o", "/srv/tmp", "cache/", "non-utf8-\udcff"]
    with pytest.raises(UsageError, match="cannot read exclude file .*missing"):
        read_pattern_file(str(tmp_path / "missing"))
