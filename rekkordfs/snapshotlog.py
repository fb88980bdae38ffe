"""The repository's snapshot log: publishing a snapshot (record, then signed
tag), finishing publications a crash cut short, listing and verifying tags,
loading records, resolving a name to a snapshot; and the prune records a
writer must respect before it publishes (docs/format.md).

`SnapshotLog` is a base class of `Repository`: it uses the repository's
storage, keys, codec and cache, declared below for the type checker.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

import trio

from . import crypto
from .codec import PACKS_PREFIX, TAGS_PREFIX, pack_id_from_key, snapshot_key
from .errors import CorruptedData, NotFound, ObjectMissing, RepositoryError
from .format import BlobKind, Snapshot, Tag, decode_snapshot, decode_tag
from .keys import Capability
from .marks import CONDEMNED_PREFIX, MARK_KEPT_NS, Condemned, decode_condemned
from .testhooks import stop_point

if TYPE_CHECKING:
    from .cache import LocalCache
    from .codec import BlobCodec
    from .keys import Keyset
    from .packs import PackWriter
    from .repository import RepoConfig
    from .storage.base import Storage

T = TypeVar("T")
log = logging.getLogger(__name__)

# A snapshot dated further ahead than this is not listed: it would stay the
# newest of its channel for years (a wrong clock, or a writer gone rogue).
FUTURE_TOLERANCE_NS = 24 * 3600 * 10**9
# Writers treat a prune record as due this much before its grace ends (clocks
# differ between machines, and a tag is written a moment after the check).
WRITER_MARGIN_NS = 10 * 60 * 10**9
# Prune records stay at least this long after they are due (marks.py); a writer
# that has run longer may have missed one, so it checks that its packs exist.
LONG_SESSION_NS = MARK_KEPT_NS


def tag_key(sealed: bytes) -> str:
    """The signed summary is too long for one file name (255 bytes): two halves."""
    name = base64.urlsafe_b64encode(sealed).decode().rstrip("=")
    half = (len(name) + 1) // 2
    return f"{TAGS_PREFIX}{name[:half]}/{name[half:]}"


def _tag_from_key(key: str) -> bytes:
    name = key[len(TAGS_PREFIX):].replace("/", "")
    return base64.urlsafe_b64decode(name + "=" * (-len(name) % 4))


@dataclass(frozen=True)
class TagListing:
    """Every snapshot that verifies, oldest first, and what was left out and why."""

    tags: list[Tag]
    rejected: list[str]  # one line per tag that does not verify



class SnapshotLog:
    if TYPE_CHECKING:  # provided by Repository
        storage: Storage
        keys: Keyset
        config: RepoConfig
        codec: BlobCodec
        session_start_ns: int | None
        _packer: PackWriter

        @property
        def cache(self) -> LocalCache: ...

        async def run_cpu(self, fn: Callable[..., T], *args: object) -> T: ...

        async def flush_packs(self) -> None: ...

        async def for_each(self, items: list[T], fn: Callable[[T], object], limit: int = 16) -> None: ...

    def _init_snapshot_log(self) -> None:
        # tag object name -> its verified tag, or why it was rejected (each is checked once)
        self._tag_results: dict[str, Tag | str] = {}
        self._snapshots: dict[bytes, Snapshot] = {}  # records loaded and matched with their tags
        self.unusable: dict[bytes, str] = {}  # snapshot ID -> why its record cannot be used
        self._condemned: dict[str, Condemned] = {}  # prune records in force, by object name
        self._interrupted: set[bytes] = set()  # snapshots whose publication failed after their record may have landed

    # --- prune records a writer respects -------------------------------------

    async def load_condemned(self) -> list[Condemned]:
        """The prune records in force (those that verify); their packs are
        excluded from deduplication from now on."""
        names = await self.storage.list(CONDEMNED_PREFIX)

        async def load(name: str) -> None:
            try:
                self._condemned[name] = decode_condemned(await self.storage.get(name), self.keys,
                                                         self.config.repo_id, name)
            except (CorruptedData, ObjectMissing) as exc:
                log.warning("ignoring %s", exc.message)

        await self.for_each([n for n in names if n not in self._condemned], load)
        for gone in set(self._condemned) - set(names):
            del self._condemned[gone]
        marks = list(self._condemned.values())
        self.cache.excluded_packs = frozenset(pack for mark in marks for pack in mark.packs)
        return marks

    @property
    def condemned(self) -> dict[str, Condemned]:
        """The prune records in force when load_condemned() last ran, by name."""
        return dict(self._condemned)

    async def check_before_publish(self, uses: set[bytes]) -> None:
        """Refuse to publish a snapshot that uses a pack a prune may delete now
        (docs/format.md, "Pruning beside running writers")."""
        marks = await self.load_condemned()
        now = time.time_ns()
        due = {pack for mark in marks if mark.due(now, WRITER_MARGIN_NS) for pack in mark.packs}
        if uses & due:
            raise RepositoryError(
                "a prune condemned data this snapshot uses while it was being made, and may delete it now; "
                "nothing was published: run it again")
        started = self.session_start_ns or now
        if now - started >= LONG_SESSION_NS:
            # marks of prunes long past may be gone: check that every pack is still there
            existing = {pack_id_from_key(key) for key in await self.storage.list(PACKS_PREFIX)}
            missing = uses - existing - set(self._packer.written_indexes.values())
            if missing:
                raise RepositoryError(
                    f"{len(missing)} pack{'s' if len(missing) > 1 else ''} this snapshot uses were pruned while it "
                    "was being made; nothing was published: run it again")

    # --- snapshots -----------------------------------------------------------

    async def publish_snapshot(self, snapshot: Snapshot, uses: set[bytes]) -> Tag:
        """Store a snapshot record, then its signed tag (the commit point).
        `uses`: every pack the snapshot refers to (check_before_publish)."""
        self.keys.require(Capability.WRITE)
        snapshot.writer = self.keys.key_id
        await self.flush_packs()
        await self.storage.flush()  # everything the snapshot refers to is durable first
        stop_point("publish")
        await self.check_before_publish(uses)
        record = snapshot.encode()

        def seal() -> tuple[bytes, bytes]:
            return self.codec.blob_id(BlobKind.SNAPSHOT, record), self.codec.seal_alone(BlobKind.SNAPSHOT, record)

        record_id, raw = await self.run_cpu(seal)
        tag = Tag(record_id, snapshot.channel, snapshot.time_ns, snapshot.size, snapshot.stored, snapshot.files,
                  self.keys.signer)
        tag = replace(tag, signature=self.keys.sign(tag.signature_message(self.config.repo_id)))
        sealed = crypto.seal_to(self.keys.log_public, tag.encode())
        # if this process dies between the record and its tag, the next writer
        # of this key on this machine writes the tag (finish_pending)
        await trio.to_thread.run_sync(self.cache.add_pending, tag.snapshot_id, sealed)
        try:
            # a Ctrl-C (a cancellation) waits for the tag: a record without one
            # would stay unlisted until the next save here; a second Ctrl-C still ends at once
            with trio.CancelScope(shield=True):
                if not await self.storage.put(snapshot_key(tag.snapshot_id), raw):
                    raise RepositoryError(f"snapshot record {tag.id_hex} exists already")
                await self.storage.flush()
                stop_point("snapshot-tag")
                await self.storage.put(tag_key(sealed), b"")
                await self.storage.flush()
        except BaseException:
            self._interrupted.add(tag.snapshot_id)
            raise
        await trio.to_thread.run_sync(self.cache.drop_pending, tag.snapshot_id)
        return tag

    async def finish_pending(self, only: set[bytes] | None = None) -> None:
        """Publishes an earlier process of this key left half done: a record
        written, its tag not. The record is complete (written last of all but
        the tag), so its tag is written now. `only`: just these snapshots."""
        for snapshot_id, sealed in await trio.to_thread.run_sync(self.cache.pending):
            if only is not None and snapshot_id not in only:
                continue
            if await self.storage.exists(snapshot_key(snapshot_id)):
                await self.storage.put(tag_key(sealed), b"")  # put-if-absent: a tag already there stays
                await self.storage.flush()
                log.warning("snapshot %s: its publication was interrupted; it is listed now", snapshot_id.hex())
            await trio.to_thread.run_sync(self.cache.drop_pending, snapshot_id)
            self._interrupted.discard(snapshot_id)

    async def list_snapshots(self) -> TagListing:
        """Every snapshot whose tag verifies, each once, oldest first; the tags that
        do not verify are named in `rejected` (a bad tag never spoils a listing)."""
        self.keys.require(Capability.LIST)
        keys = await self.storage.list(TAGS_PREFIX)
        fresh = [key for key in keys if key not in self._tag_results]
        if fresh:
            for key, result in zip(fresh, await self.run_cpu(self._verify_tags, fresh)):
                self._tag_results[key] = result
        tags: dict[bytes, Tag] = {}
        rejected: list[str] = []
        now = time.time_ns()
        for key in keys:
            result = self._tag_results[key]
            if isinstance(result, str):
                rejected.append(result)
            elif result.time_ns > now + FUTURE_TOLERANCE_NS:
                rejected.append(f"snapshot {result.id_hex} of channel '{result.channel}' is dated "
                                f"{time.strftime('%Y-%m-%d', time.gmtime(result.time_ns // 10**9))}, in the future: "
                                f"not listed (is that machine's clock wrong?)")
            else:
                tags.setdefault(result.snapshot_id, result)
        return TagListing(sorted(tags.values(), key=lambda t: (t.time_ns, t.snapshot_id)), rejected)

    def _verify_tags(self, keys: list[str]) -> list[Tag | str]:
        assert self.keys.log_secret is not None
        signers: dict[bytes, str | None] = {}  # each signer's certificate is checked once
        results: list[Tag | str] = []
        for key in keys:
            try:
                tag = decode_tag(crypto.open_sealed(self.keys.log_public, self.keys.log_secret, _tag_from_key(key)))
            except (CorruptedData, binascii.Error, ValueError):
                results.append(f"snapshot tag '{key}' is unreadable: ignored")
                continue
            signer = tag.signer.encode()
            if signer not in signers:
                signers[signer] = tag.signer.certificate_problem(self.keys)
            problem = signers[signer] or tag.signer.signature_problem(
                tag.signature_message(self.config.repo_id), tag.signature)
            if problem:
                results.append(f"snapshot {tag.id_hex} of channel '{tag.channel}': its tag {problem}: ignored")
            else:
                results.append(tag)
        return results

    async def tag_keys(self) -> dict[bytes, list[str]]:
        """The tag objects of every snapshot that verifies (forget deletes them)."""
        keys = await self.storage.list(TAGS_PREFIX)
        await self.list_snapshots()
        found: dict[bytes, list[str]] = {}
        for key in keys:
            result = self._tag_results.get(key)
            if isinstance(result, Tag):
                found.setdefault(result.snapshot_id, []).append(key)
        return found

    async def list_tags(self, warn: Callable[[str], None] | None = None) -> list[Tag]:
        """list_snapshots(), telling warn() about every tag left out."""
        listing = await self.list_snapshots()
        if warn is not None:
            for line in listing.rejected:
                warn(line)
        return listing.tags

    async def load_snapshot(self, tag: Tag) -> Snapshot:
        """The record of a listed snapshot, checked against its (verified) tag."""
        self.keys.require(Capability.READ)
        loaded = self._snapshots.get(tag.snapshot_id)
        if loaded is not None:
            return loaded
        if tag.snapshot_id in self.unusable:
            raise CorruptedData(self.unusable[tag.snapshot_id])
        try:
            raw = await self.storage.get(snapshot_key(tag.snapshot_id))
        except ObjectMissing:
            raise ObjectMissing(f"the record of snapshot {tag.id_hex} is missing from the repository") from None
        try:
            data = await self.run_cpu(self.codec.unpack_alone, BlobKind.SNAPSHOT, tag.record_id, raw)
            snapshot = decode_snapshot(data)
            if not snapshot.matches(tag):
                raise CorruptedData("its record does not match its signed tag; refusing to use it")
        except CorruptedData as exc:
            self.unusable[tag.snapshot_id] = f"snapshot {tag.id_hex}: {exc.message}"
            raise CorruptedData(self.unusable[tag.snapshot_id]) from None
        self._snapshots[tag.snapshot_id] = snapshot
        return snapshot

    async def newest_usable(self, tags: list[Tag], warn: Callable[[str], None] | None = None) -> Tag | None:
        """The newest of a channel's tags (oldest first) whose record matches it.
        A key that cannot read records trusts the newest signed tag."""
        if not self.keys.can(Capability.READ):
            return tags[-1] if tags else None
        for tag in reversed(tags):
            try:
                await self.load_snapshot(tag)
                return tag
            except (CorruptedData, ObjectMissing) as exc:
                if warn is not None:
                    warn(exc.message)
        return None

    async def resolve(self, spec: str) -> Tag:
        """A snapshot by full ID, unique ID prefix (8+ hex digits) or channel name
        (its newest usable snapshot)."""
        tags = await self.list_tags()
        lowered = spec.lower()
        id_like = len(lowered) >= 8 and all(c in "0123456789abcdef" for c in lowered)
        if id_like:
            matches = [t for t in tags if t.id_hex.startswith(lowered)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise NotFound(f"snapshot ID prefix '{spec}' is ambiguous")
        in_channel = [t for t in tags if t.channel == spec]
        if in_channel:
            problems: list[str] = []
            newest = await self.newest_usable(in_channel, warn=problems.append)
            if newest is None:
                more = f"; no older snapshot of channel '{spec}' is usable either" if len(problems) > 1 else ""
                raise CorruptedData(problems[0] + more)
            for line in problems:  # an older snapshot stands in for the newest
                log.warning("%s; using %s instead", line, newest.id_hex)
            return newest
        if id_like:
            raise NotFound(f"no snapshot or channel named '{spec}'")
        raise NotFound(f"no channel named '{spec}', and it is not a snapshot ID "
                       "(an ID prefix needs at least 8 hex digits)")
