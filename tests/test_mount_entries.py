"""The per-entry shortcuts a mount's listings take (issue 15, `find` over
100,000 files) give what the plain ways give: a folder's inode numbers, the
checks on decoded records, a listing's name index."""

from __future__ import annotations

import struct

import pytest

from rekkordfs.blobcache import DirectoryListing
from rekkordfs.errors import CorruptedData
from rekkordfs.format import (
    RECORD_VERSION,
    BlobRef,
    Entry,
    EntryKind,
    Location,
    _encode_entry,
    decode_directory,
    encode_directory,
)
from rekkordfs.nodes import child_inos, tree_ino

SNAPSHOT = bytes(range(32))


def _entries() -> list[Entry]:
    ref = BlobRef(b"\x01" * 32, Location(b"\x02" * 32, 0, 10))
    return [
        Entry(EntryKind.FILE, b"a.txt", size=3),
        Entry(EntryKind.FILE, b"hard-1", nlink=2, link_id=7),
        Entry(EntryKind.FILE, b"hard-2", nlink=2, link_id=7),
        Entry(EntryKind.DIRECTORY, b"sub", dir_ref=ref),
        Entry(EntryKind.SYMLINK, b"z-link", target=b"a.txt"),
    ]


@pytest.mark.parametrize("folder", [b"", b"/one", b"/one/two words/\xff"])
def test_child_inos_are_tree_inos(folder: bytes) -> None:
    entries = _entries()
    inos = child_inos(SNAPSHOT, folder, entries)
    assert inos == [tree_ino(SNAPSHOT, folder + b"/" + e.name, e) for e in entries]
    assert inos[1] == inos[2]  # hardlinks share their group's
    assert len(set(inos)) == len(entries) - 1
    assert child_inos(SNAPSHOT[::-1], folder, entries)[0] != inos[0]  # another snapshot, other numbers


def test_decoded_records_round_trip() -> None:
    entries = _entries()
    entries[0].xattrs = [(b"user.a", b"1"), (b"user.empty", b"")]
    entries[0].chunks_raw = bytes(range(72))
    assert decode_directory(encode_directory(entries)) == entries
    assert decode_directory(encode_directory([])) == []


def test_every_cut_or_extended_record_is_refused() -> None:
    """The decoder checks bounds by offsets (no slice measured): a record cut
    anywhere, or with bytes after its last entry, is still refused as corrupt."""
    entries = _entries()
    entries[0].xattrs = [(b"user.a", b"1")]
    raw = encode_directory(entries)
    for cut in range(len(raw)):
        with pytest.raises(CorruptedData):
            decode_directory(raw[:cut])
    with pytest.raises(CorruptedData, match="trailing bytes"):
        decode_directory(raw + b"\0")


def _record(names: list[bytes], kind: int = int(EntryKind.FILE)) -> bytes:
    """A record of plain files with these names, in this order, unchecked
    (encode_directory would sort them)."""
    raw = bytearray(struct.pack("<BI", RECORD_VERSION, len(names)))
    for name in names:
        entry = Entry(EntryKind.FILE, name)
        start = len(raw)
        _encode_entry(entry, raw)
        struct.pack_into("<B", raw, start, kind)
    return bytes(raw)


@pytest.mark.parametrize("names", [[b"."], [b".."], [b"a/b"], [b"a\0b"], [b""], [b"b", b"a"], [b"a", b"a"]])
def test_decoding_refuses_bad_names_and_order(names: list[bytes]) -> None:
    with pytest.raises(CorruptedData):
        decode_directory(_record(names))


def test_decoding_accepts_what_it_should() -> None:
    assert [e.name for e in decode_directory(_record([b"...", b"a", b"b.c"]))] == [b"...", b"a", b"b.c"]


@pytest.mark.parametrize("kind", [0, 8, 255])
def test_decoding_refuses_unknown_kinds(kind: int) -> None:
    with pytest.raises(CorruptedData):
        decode_directory(_record([b"a"], kind))


def test_listing_index_is_built_on_demand_and_right() -> None:
    entries = _entries()
    listing = DirectoryListing(entries)
    assert listing.subdirs == 1
    assert listing.index == {e.name: i for i, e in enumerate(entries)}
    assert listing.index is listing.index  # built once
