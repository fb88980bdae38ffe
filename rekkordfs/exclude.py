"""Exclude patterns for `save`: shell-style globs over paths.

The syntax (documented with examples in docs/operations.md):

- `*` matches any characters but `/`, `?` one character but `/`, `[abc]`,
  `[a-z]` and `[!abc]` (or `[^abc]`) one character of (not of) a set, and `\\`
  makes the next character literal;
- `**` matches anything, `/` included: `**/` at the start of a pattern or after
  a `/` stands for zero or more folders;
- a pattern without `/` matches a name at any depth (`*.pyc`, `node_modules`);
- a pattern with `/` is anchored: one starting with `/` is matched against the
  absolute path, any other against the path below the saved PATH it was found
  under (`build/*.o` skips PATH/build/x.o, not PATH/src/build/x.o);
- a trailing `/` restricts a pattern to folders (`cache/`).

A pattern matches a whole name or path, never a part of one. Paths are bytes,
so patterns are compiled to bytes regular expressions.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass

from .errors import UsageError


class Scope(enum.Enum):
    NAME = "name"  # no '/': the entry's name, at any depth
    ABSOLUTE = "absolute"  # starts with '/': the absolute path
    RELATIVE = "relative"  # has a '/': the path below the saved PATH


@dataclass(frozen=True)
class Pattern:
    text: str  # as written, for messages
    scope: Scope
    dirs_only: bool
    regex: bytes  # source of a bytes regular expression matching the whole target
    glob: bytes = b""  # as matched: '//' collapsed, without a trailing '/' or leading './'


def _class(glob: bytes, start: int) -> tuple[bytes, int] | None:
    """The regex for the set starting at glob[start] == '[', and the index after
    it; None when the set is never closed (the '[' is then literal)."""
    i = start + 1
    negate = glob[i:i + 1] in (b"!", b"^")
    if negate:
        i += 1
    body_start = i
    if glob[i:i + 1] == b"]":  # a ']' first is a member, not the end
        i += 1
    end = glob.find(b"]", i)
    if end < 0:
        return None
    body = glob[body_start:end]
    members = b"".join(c if c == b"-" else re.escape(c) for c in (body[k:k + 1] for k in range(len(body))))
    # a set never matches '/': a path separator is not a character of a name
    regex = b"[^/" + members + b"]" if negate else b"(?!/)[" + members + b"]"
    return regex, end + 1


def _translate(glob: bytes) -> bytes:
    out: list[bytes] = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i:i + 1]
        if c == b"*":
            j = i
            while j < n and glob[j:j + 1] == b"*":
                j += 1
            if j - i == 1:
                out.append(b"[^/]*")
            elif (i == 0 or glob[i - 1:i] == b"/") and glob[j:j + 1] == b"/":
                out.append(b"(?:.*/)?")  # '**/': zero or more folders
                j += 1
            else:
                out.append(b".*")
            i = j
        elif c == b"?":
            out.append(b"[^/]")
            i += 1
        elif c == b"[":
            found = _class(glob, i)
            if found is None:
                out.append(re.escape(c))
                i += 1
            else:
                out.append(found[0])
                i = found[1]
        elif c == b"\\" and i + 1 < n:
            out.append(re.escape(glob[i + 1:i + 2]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return b"".join(out)


def compile_pattern(raw: str | bytes, what: str = "exclude pattern") -> Pattern:
    """One pattern; a usage error (naming it as `what`) for one that could
    match nothing sensible."""
    text = os.fsdecode(raw)
    glob = os.fsencode(raw)
    if b"\0" in glob:
        raise UsageError(f"{what} '{text}' contains a NUL byte")
    glob = re.sub(rb"/{2,}", b"/", glob)
    dirs_only = glob.endswith(b"/") and glob != b"/"
    glob = glob.rstrip(b"/") if dirs_only else glob
    while glob.startswith(b"./"):
        glob = glob[2:]
    if not glob or glob in (b"/", b"."):
        raise UsageError(f"{what} '{text}' is empty or names the whole tree")
    if glob.startswith(b"/"):
        scope = Scope.ABSOLUTE
    elif b"/" in glob:
        scope = Scope.RELATIVE
    else:
        scope = Scope.NAME
    return Pattern(text, scope, dirs_only, _translate(glob), glob)


def components(glob: bytes) -> list[bytes]:
    """A pattern's parts between the '/' that separate folders (a '/' inside a
    [set] or after '\\' separates nothing), each to be compiled by
    component_regex()."""
    parts: list[bytes] = []
    start = i = 0
    while i < len(glob):
        c = glob[i:i + 1]
        if c == b"[":
            found = _class(glob, i)
            i = found[1] if found is not None else i + 1
        elif c == b"\\":
            i += 2
        elif c == b"/":
            parts.append(glob[start:i])
            start = i = i + 1
        else:
            i += 1
    parts.append(glob[start:])
    return parts


def component_regex(part: bytes) -> bytes:
    """The regular expression of one part of a pattern, matching one name
    (a part holding '**' may match across folders: see the module's rules)."""
    return _translate(part)


def read_pattern_file(path: str) -> list[Pattern]:
    """Patterns from a file: one per line; blank lines and lines starting with
    '#' are ignored; spaces around a pattern are not part of it."""
    try:
        with open(path, "rb") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read exclude file '{path}': {exc.strerror}") from None
    patterns = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith(b"#"):
            patterns.append(compile_pattern(line))
    return patterns


class Excluder:
    """Decides whether a path is left out; the patterns of one kind are
    combined into one regular expression, so each entry costs a few matches."""

    def __init__(self, patterns: list[Pattern]) -> None:
        self.patterns = patterns
        self._any: dict[tuple[Scope, bool], re.Pattern[bytes]] = {}
        for scope in Scope:
            for dirs_only in (False, True):
                sources = [p.regex for p in patterns if p.scope == scope and p.dirs_only == dirs_only]
                if sources:
                    self._any[(scope, dirs_only)] = re.compile(b"|".join(b"(?:" + s + b")" for s in sources),
                                                               re.DOTALL)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def excluded(self, name: bytes, path: bytes, relative: bytes, is_dir: bool) -> bool:
        """name: the entry's name; path: absolute; relative: below the saved PATH
        (b"" for a saved PATH itself, which relative patterns never match)."""
        for (scope, dirs_only), regex in self._any.items():
            if dirs_only and not is_dir:
                continue
            if scope == Scope.NAME:
                target = name
            elif scope == Scope.ABSOLUTE:
                target = path
            elif relative:
                target = relative
            else:
                continue
            if regex.fullmatch(target):
                return True
        return False
