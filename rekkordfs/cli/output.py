"""Output helpers: sizes, counts, times, tables and JSON."""

from __future__ import annotations

import json
import re
import stat
import sys
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rekkordfs.format import EntryKind


def human_size(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


_IRREGULAR = {"directory": "directories", "entry": "entries", "unreadable entry": "unreadable entries",
              "match": "matches"}


def plural(count: int, noun: str) -> str:
    """'1 file', '2 files', '0 directories'."""
    return f"{count} {noun if count == 1 else _IRREGULAR.get(noun, noun + 's')}"


def iso_time(time_ns: int) -> str:
    """ISO 8601 in UTC with a Z suffix."""
    moment = datetime.fromtimestamp(time_ns // 1_000_000_000, tz=UTC)  # no rounding up
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{(time_ns // 1000) % 1_000_000:06d}Z"


def local_time(time_ns: int) -> str:
    return datetime.fromtimestamp(time_ns // 1_000_000_000).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def mode_string(kind: EntryKind, mode: int) -> str:
    from rekkordfs.fsmeta import FILE_TYPE_BITS  # here: `commit` prints no modes and loads no library

    return stat.filemode(FILE_TYPE_BITS[kind] | mode)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def print_json(document: Any) -> None:
    """One JSON document, always valid UTF-8.

    File names are bytes; os.fsdecode turns the bytes of a non-UTF-8 name into
    lone surrogates (U+DC80..U+DCFF), which no UTF-8 encoder accepts. They are
    written as \\udcXX escapes: valid JSON, and json.loads + os.fsencode give
    back the original bytes.
    """
    text = json.dumps(document, indent=2, ensure_ascii=False)
    text = _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    sys.stdout.write(text + "\n")


def print_json_list(items: Iterable[Any]) -> None:
    """One JSON list, written item by item (one per line), so a long one is
    never held whole as text; valid UTF-8 as print_json() makes it."""
    write = sys.stdout.write
    write("[")
    for index, item in enumerate(items):
        text = _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(item, ensure_ascii=False))
        write(("\n  " if index == 0 else ",\n  ") + text)
    write("\n]\n")


def print_table(rows: Iterable[Iterable[str]], right_align: AbstractSet[int] = frozenset()) -> None:
    table = [list(r) for r in rows]
    if not table:
        return
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for row in table:
        cells = [c.rjust(widths[i]) if i in right_align else c.ljust(widths[i]) for i, c in enumerate(row)]
        print("  ".join(cells).rstrip())
