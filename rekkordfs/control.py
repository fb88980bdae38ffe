"""How `rekkord commit` talks to a running mount: extended attributes of
MNT/staging/<channel>, never listed (so rsync -X skips them).

Kept apart from stagingarea/ so that the command imports nothing heavy.
"""

from __future__ import annotations

CONTROL_CHANNEL = b"user.rekkord.channel"  # get: the channel name (is this a staging root?)
CONTROL_COMMIT = b"user.rekkord.commit"  # set to a token: commit; get CONTROL_COMMIT + b"." + token: result


class CommitReply:
    """The mount's answer to a commit request (JSON in the result attribute):
    the snapshot made, or why there is none. A plain class: `rekkord commit`
    must start fast (no dataclasses)."""

    NUMBERS = ("time_ns", "files", "size", "bytes_new", "bytes_stored", "duration")

    def __init__(self, error: str | None = None, id: str = "", channel: str = "",
                 time_ns: int = 0, files: int = 0, size: int = 0, bytes_new: int = 0, bytes_stored: int = 0,
                 duration: float = 0.0) -> None:
        self.error = error  # None: a snapshot was made
        self.id = id
        self.channel = channel
        self.time_ns = time_ns
        self.files = files
        self.size = size
        self.bytes_new = bytes_new
        self.bytes_stored = bytes_stored
        self.duration = duration

    def encode(self) -> bytes:
        import json

        if self.error is not None:
            return json.dumps({"error": self.error}).encode()
        doc = {"id": self.id, "channel": self.channel} | {name: getattr(self, name) for name in self.NUMBERS}
        return json.dumps(doc).encode()

    @classmethod
    def decode(cls, raw: bytes) -> CommitReply:
        """Raises ValueError for anything but a reply of this form."""
        import json

        doc = json.loads(raw)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return cls(error=doc["error"])
        if not isinstance(doc, dict) or set(doc) != {"id", "channel", *cls.NUMBERS} \
                or not all(isinstance(doc[name], str) for name in ("id", "channel")) \
                or not all(isinstance(doc[name], int | float) for name in cls.NUMBERS):
            raise ValueError("not a commit reply")
        return cls(**doc)
