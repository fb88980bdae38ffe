"""The commit reply a mount hands `rekkord commit` (rekkordfs/control.py)."""

import pytest

from rekkordfs.control import CommitReply

pytestmark = pytest.mark.fast


def test_a_reply_survives_its_round_trip() -> None:
    sent = CommitReply(id="ab" * 32, channel="laptop", time_ns=1_700_000_000 * 10**9, files=3, size=10,
                       bytes_new=7, bytes_stored=5, duration=0.25)
    got = CommitReply.decode(sent.encode())
    assert got.error is None
    assert (got.id, got.channel, got.time_ns, got.files, got.size, got.bytes_new, got.bytes_stored, got.duration) \
        == (sent.id, sent.channel, sent.time_ns, 3, 10, 7, 5, 0.25)


def test_a_failure_carries_its_message() -> None:
    assert CommitReply.decode(CommitReply(error="disk full").encode()).error == "disk full"


@pytest.mark.parametrize("raw", [b"[]", b'{"id": "x"}', b'{"error": 3}', b"not json",
                                 b'{"id": 1, "channel": "c", "time_ns": 0, "files": 0, "size": 0, '
                                 b'"bytes_new": 0, "bytes_stored": 0, "duration": 0}'])
def test_anything_else_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        CommitReply.decode(raw)
