"""`prune`: delete what no snapshot needs and repack packs that are mostly
unused, while backups keep running (docs/format.md, "Pruning").

No lock. Two phases, each run doing both:
- sweep: prune records (marks.py) whose grace period is over are carried out:
  their packs that are still unused now are deleted (a backup that ran
  meanwhile may have started using one: that one stays);
- mark: the packs no snapshot uses, or uses little of (their used blobs are
  first copied into new packs, listed in indexes this key signs), are
  condemned in a new signed record with the time of the listing and the grace.
Writers skip condemned packs and refuse to publish a snapshot using a pack
whose grace is over (Repository.check_before_publish); packs younger than the
grace are never condemned (a backup may be writing them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import trio

from .codec import (
    INDEX_PREFIX,
    PACKS_PREFIX,
    SNAPSHOTS_PREFIX,
    pack_id_from_key,
    pack_key,
    snapshot_id_from_key,
    snapshot_key,
)
from .errors import CorruptedData, ObjectMissing
from .format import BlobKind, Location, Snapshot, Tag, decode_snapshot, directory_refs
from .keys import Capability
from .marks import (
    CONDEMNED_PREFIX,
    FORGOTTEN_PREFIX,
    MARK_KEPT_NS,
    NAME_SIZE,
    Condemned,
    Forgotten,
    decode_forgotten,
    encode_condemned,
)
from .packs import COALESCE_GAP, Sealed
from .rawruns import coalesce
from .repository import Repository
from .retention import Duration
from .storage.base import ObjectInfo
from .tasks import task_group
from .tuning import RECORD_BATCH, repack_packs

DEFAULT_GRACE = Duration(days=1)
DEFAULT_REPACK_BELOW = 0.9  # a pack less used than this is rewritten

# pack -> offset -> (blob ID, kind, length): what snapshots use
Uses = dict[bytes, dict[int, tuple[bytes, BlobKind, int]]]


@dataclass
class PruneOptions:
    grace: Duration = DEFAULT_GRACE
    repack_below: float = DEFAULT_REPACK_BELOW
    dry_run: bool = False


@dataclass
class PruneReport:
    records_deleted: int = 0  # records of forgotten snapshots
    packs_deleted: int = 0
    bytes_deleted: int = 0
    objects_deleted: int = 0  # packs, indexes, records and maintenance records
    packs_repacked: int = 0
    bytes_copied: int = 0
    packs_condemned: int = 0  # by this run, deleted once the grace is over
    bytes_condemned: int = 0
    packs_waiting: int = 0  # condemned by earlier runs, grace not over yet
    bytes_waiting: int = 0
    bytes_stored: int = 0  # in packs, after this run
    problems: list[str] = field(default_factory=list)


class _Listed(NamedTuple):
    """What a prune starts from."""

    packs: dict[bytes, ObjectInfo]
    index_packs: dict[str, bytes]  # index name -> its pack
    marks: dict[str, Condemned]
    forgotten: dict[str, Forgotten]
    records: set[bytes]  # snapshot records stored
    tags: dict[bytes, Tag]  # snapshot ID -> its verified tag


class Pruner:
    def __init__(self, repo: Repository, options: PruneOptions,
                 progress: Callable[[str], None] | None = None, clock: Callable[[], int] = time.time_ns) -> None:
        repo.keys.require(Capability.FORGET)
        self.repo = repo
        self.clock = clock  # the time prune records are dated with (tests move it)
        self.options = options
        self.progress = progress or (lambda _m: None)
        self.report = PruneReport()
        self.grace_ns = int(options.grace.seconds * 1e9)

    def problem(self, message: str) -> None:
        self.report.problems.append(message)
        self.progress(f"problem: {message}")

    async def _delete(self, key: str) -> None:
        self.report.objects_deleted += 1
        if not self.options.dry_run:
            await self.repo.storage.delete(key)

    async def _delete_all(self, keys: list[str]) -> None:
        """_delete() of each, at once (no order among them)."""
        await self.repo.for_each(keys, self._delete)

    async def run(self) -> PruneReport:
        listed_at = self.clock()  # everything is listed after it: the grace is counted from it
        packs, index_packs, marks, forgotten, records, tags = await self._list_everything()
        gone = {i for record in forgotten.values() for i in record.snapshot_ids} - set(tags)

        uses: Uses = {}
        roots = await self._roots(records - gone, tags)
        await self._walk(roots, uses)
        condemned_before = {pack for mark in marks.values() for pack in mark.packs}
        live = await self._effective(uses, set(packs), condemned_before)

        await self._sweep(marks, packs, live, index_packs, listed_at)
        await self._mark(packs, uses, live, condemned_before, index_packs, listed_at)
        # the records first, then the forget records naming them (a record never outlives its forget record)
        await self._delete_all([snapshot_key(i) for i in gone & records])
        self.report.records_deleted += len(gone & records)
        await self._delete_all([name for name, record in forgotten.items()
                                if not set(record.snapshot_ids) & (records - gone)])

        async with task_group() as nursery:  # every pack is deleted already: these two are independent
            nursery.start_soon(self._delete_stray_indexes, packs, index_packs, listed_at)
            nursery.start_soon(self._measure, packs)
        return self.report

    async def _list_everything(self) -> _Listed:
        """What the repository holds, listed and read at once (one round trip, not six, on a server)."""
        packs: dict[bytes, ObjectInfo] = {}
        index_packs: dict[str, bytes] = {}
        marks: dict[str, Condemned] = {}
        forgotten: dict[str, Forgotten] = {}
        records: set[bytes] = set()
        tags: dict[bytes, Tag] = {}

        repo, storage = self.repo, self.repo.storage

        async def list_packs() -> None:
            packs.update((pack, info) for key, info in (await storage.list_details(PACKS_PREFIX)).items()
                         if (pack := pack_id_from_key(key)) is not None)

        async def indexes() -> None:
            await repo.sync_indexes()
            index_packs.update(await trio.to_thread.run_sync(repo.cache.index_packs))

        async def load_marks() -> None:
            marks.update(zip(*await self._marks()))

        async def load_forgotten() -> None:
            forgotten.update(await self._forgotten())

        async def list_records() -> None:
            names = await storage.list(SNAPSHOTS_PREFIX)
            records.update(i for k in names if (i := snapshot_id_from_key(k)) is not None)

        async def list_tags() -> None:
            tags.update((tag.snapshot_id, tag) for tag in (await repo.list_snapshots()).tags)

        async with task_group() as nursery:
            for step in (list_packs, indexes, load_marks, load_forgotten, list_records, list_tags):
                nursery.start_soon(step)
        return _Listed(packs, index_packs, marks, forgotten, records, tags)

    async def _measure(self, packs: dict[bytes, ObjectInfo]) -> None:
        """The bytes stored after the prune (before it, in a dry run)."""
        if not self.options.dry_run:
            await trio.to_thread.run_sync(self.repo.remember_session)  # the packs repacking wrote
            after = await self.repo.storage.list_details(PACKS_PREFIX)
            self.report.bytes_stored = sum(info.size for info in after.values())
        else:
            self.report.bytes_stored = sum(info.size for info in packs.values())

    async def _delete_stray_indexes(self, packs: dict[bytes, ObjectInfo], index_packs: dict[str, bytes],
                                    listed_at: int) -> None:
        """Indexes of packs that are gone (deleted by hand, or an interrupted
        sweep): a writer trusting one would refer to nothing. Only old ones: a
        writer stores its pack, then its index."""
        details = await self.repo.storage.list_details(INDEX_PREFIX)
        await self._delete_all([name for name, pack in index_packs.items()
                                if (info := details.get(name)) is not None and pack and pack not in packs
                                and info.mtime_ns < listed_at - self.grace_ns])

    # --- what is there ------------------------------------------------------------

    async def _marks(self) -> tuple[list[str], list[Condemned]]:
        await self.repo.load_condemned()
        items = list(self.repo.condemned.items())
        return [name for name, _ in items], [mark for _, mark in items]

    async def _forgotten(self) -> dict[str, Forgotten]:
        found: dict[str, Forgotten] = {}

        async def load(name: str) -> None:
            try:
                found[name] = decode_forgotten(await self.repo.storage.get(name), self.repo.keys,
                                               self.repo.config.repo_id, name)
            except (CorruptedData, ObjectMissing) as exc:
                self.problem(f"ignoring {exc.message}")

        await self.repo.for_each(await self.repo.storage.list(FORGOTTEN_PREFIX), load)
        return found

    async def _roots(self, kept: set[bytes], tags: dict[bytes, Tag]) -> list[Snapshot]:
        """The records whose trees must be kept: every snapshot listed, and every
        record no forget names (a tag deleted behind the repository's back must
        not cost its data)."""
        found: dict[bytes, Snapshot] = {}

        async def load(snapshot_id: bytes) -> None:
            try:
                if snapshot_id in tags:
                    found[snapshot_id] = await self.repo.load_snapshot(tags[snapshot_id])
                else:
                    raw = await self.repo.storage.get(snapshot_key(snapshot_id))
                    found[snapshot_id] = decode_snapshot(await self.repo.run_cpu(
                        self.repo.codec.open_alone, BlobKind.SNAPSHOT, raw))
            except (CorruptedData, ObjectMissing) as exc:
                self.problem(f"snapshot record {snapshot_id.hex()} cannot be read ({exc.message}): "
                             "what only it uses is not protected")

        await self.repo.for_each(sorted(kept), load)
        for tag_id in set(tags) - kept:
            self.problem(f"snapshot {tag_id.hex()} has no record: run 'rekkord check'")
        return [found[i] for i in sorted(kept) if i in found]

    async def _walk(self, roots: list[Snapshot], uses: Uses) -> None:
        """Every place each tree refers to, each distinct record read once."""
        frontier: dict[bytes, Location] = {}
        for snapshot in roots:
            ref = snapshot.root_ref
            uses.setdefault(ref.location.pack, {})[ref.location.offset] = (ref.id, BlobKind.DIRECTORY,
                                                                           ref.location.length)
            frontier[ref.id] = ref.location
        seen: set[bytes] = set(frontier)
        while frontier:
            items = list(frontier.items())
            frontier = {}
            for start in range(0, len(items), RECORD_BATCH):
                batch = items[start:start + RECORD_BATCH]
                results = await self.repo.open_many(BlobKind.DIRECTORY, batch, then=directory_refs)
                for (record_id, _), result in zip(batch, results):
                    if isinstance(result, Exception):
                        self.problem(f"directory {record_id.hex()} cannot be read ({result}): what only it "
                                     "uses is not protected")
                        continue
                    dirs, chunks = result
                    for blob_id, pack, offset, length in dirs:
                        uses.setdefault(pack, {})[offset] = (blob_id, BlobKind.DIRECTORY, length)
                        if blob_id not in seen:
                            seen.add(blob_id)
                            frontier[blob_id] = Location(pack, offset, length)
                    for blob_id, pack, offset, length in chunks:
                        uses.setdefault(pack, {})[offset] = (blob_id, BlobKind.CHUNK, length)

    async def _effective(self, uses: Uses, present: set[bytes], condemned: set[bytes]) -> set[bytes]:
        """The packs that must stay: those used, except that a use of a pack that
        is condemned or gone is served by a copy a trusted writer (a repack)
        stored elsewhere, when there is one (readers find it the same way)."""
        live: set[bytes] = set()
        moved: list[tuple[bytes, bytes]] = []  # (pack, blob ID) to find elsewhere
        for pack, blobs in list(uses.items()):
            if pack in present and pack not in condemned:
                live.add(pack)
            else:
                moved.extend((pack, blob_id) for blob_id, _, _ in blobs.values())
        if not moved:
            return live
        cache = self.repo.cache
        cache.excluded_packs = frozenset(condemned)
        try:
            copies = await trio.to_thread.run_sync(cache.lookup_blobs, list({blob_id for _, blob_id in moved}))
        finally:
            await self.repo.load_condemned()  # back to what writers of this session must skip
        for pack, blob_id in moved:
            copy = copies.get(blob_id)
            if copy is not None and copy.location.pack in present:
                live.add(copy.location.pack)
                kind = next(k for b, k, _ in uses[pack].values() if b == blob_id)
                uses.setdefault(copy.location.pack, {})[copy.location.offset] = (blob_id, kind, copy.location.length)
            elif pack in present:
                live.add(pack)  # no copy: a backup used a condemned pack, which stays
            else:
                self.problem(f"blob {blob_id.hex()} is gone (pack {pack.hex()}): run 'rekkord check'")
        return live

    # --- the two phases -----------------------------------------------------------------

    async def _sweep(self, marks: dict[str, Condemned], packs: dict[bytes, ObjectInfo], live: set[bytes],
                     index_packs: dict[str, bytes], now: int) -> None:
        due: set[bytes] = set()
        for mark in marks.values():
            if not mark.due(now):
                waiting = [p for p in mark.packs if p in packs]
                self.report.packs_waiting += len(waiting)
                self.report.bytes_waiting += sum(packs[p].size for p in waiting)
            else:
                due.update(p for p in mark.packs if p in packs and p not in live)
        await self._delete_packs(sorted(due), packs, index_packs)
        # a record goes only once its packs are (an interrupted sweep is finished by the next prune)
        await self._delete_all([name for name, mark in marks.items()
                                if now >= mark.time_ns + mark.grace_ns + MARK_KEPT_NS])

    async def _delete_packs(self, doomed: list[bytes], packs: dict[bytes, ObjectInfo],
                            index_packs: dict[str, bytes]) -> None:
        """Each pack's indexes first (writers stop learning its blobs), then the
        pack; many packs at once."""
        indexes: dict[bytes, list[str]] = {}
        for name, pack in index_packs.items():
            indexes.setdefault(pack, []).append(name)

        async def delete_pack(pack: bytes) -> None:
            await self._delete_all(indexes.get(pack, []))
            await self._delete(pack_key(pack))
            self.report.packs_deleted += 1
            self.report.bytes_deleted += packs.pop(pack).size

        await self.repo.for_each(doomed, delete_pack)

    async def _mark(self, packs: dict[bytes, ObjectInfo], uses: Uses, live: set[bytes], condemned_before: set[bytes],
                    index_packs: dict[str, bytes], listed_at: int) -> None:
        young = listed_at - self.grace_ns
        dead, sparse = [], []
        for pack, info in packs.items():
            if pack in condemned_before or info.mtime_ns > young:
                continue  # condemned already, or maybe still being written by a backup
            used = sum(length for _, _, length in uses.get(pack, {}).values()) if pack in live else 0
            if used == 0:
                dead.append(pack)
            elif used < self.options.repack_below * info.size:
                sparse.append(pack)
        repacked = await self._repack(sparse, uses)
        condemn = dead + repacked
        if not condemn:
            return
        self.report.packs_condemned += len(condemn)
        self.report.bytes_condemned += sum(packs[p].size for p in condemn)
        mark = Condemned(listed_at, self.grace_ns, tuple(condemn))
        if not self.options.dry_run:
            name = CONDEMNED_PREFIX + os.urandom(NAME_SIZE).hex()
            await self.repo.storage.put(name, encode_condemned(mark, self.repo.keys, self.repo.config.repo_id))
            await self.repo.storage.flush()
        if self.grace_ns == 0:  # nobody writes, says the user: carry it out now
            await self._delete_packs(condemn, packs, index_packs)
            self.report.packs_condemned = self.report.bytes_condemned = 0

    async def _repack(self, sparse: list[bytes], uses: Uses) -> list[bytes]:
        """Copy the used blobs of these packs into new ones; returns the packs
        whose every used blob was read, verified and copied durably. A storage
        failure while writing ends the prune before anything is condemned."""
        copied: dict[bytes, list[bytes]] = {}
        for pack in sparse:
            self.report.packs_repacked += 1
            self.report.bytes_copied += sum(length for _, _, length in uses[pack].values())
        if self.options.dry_run:
            return list(sparse)
        slots = trio.Semaphore(repack_packs(self.repo.threads, self.repo.storage.remote))

        async def one(pack: bytes) -> None:
            async with slots:
                try:
                    copied[pack] = await self._repack_pack(pack, uses[pack])
                except (CorruptedData, ObjectMissing) as exc:
                    self.problem(f"pack {pack.hex()} is kept as it is: {exc.message}")

        async with task_group() as nursery:
            for pack in sparse:
                nursery.start_soon(one, pack)
        await self.repo.flush_packs()
        await self.repo.storage.flush()
        return [pack for pack in sparse if pack in copied and all(map(self.repo.stored_now, copied[pack]))]

    async def _repack_pack(self, pack: bytes, used: dict[int, tuple[bytes, BlobKind, int]]) -> list[bytes]:
        """Copy the used blobs of one pack into the open packs; their IDs. The
        used parts are read with a few ranged requests (neighbours share one),
        and every blob is checked and sealed again, still compressed, in one
        worker thread hop; a bad blob keeps the whole pack (CorruptedData)."""
        blobs = sorted(used.items())
        locations = [Location(pack, offset, length) for offset, (_, _, length) in blobs]
        runs = coalesce(locations, COALESCE_GAP if self.repo.storage.remote else 0)
        key = pack_key(pack)
        datas = await self.repo.storage.get_ranges([(key, start, length) for _, start, length, _ in runs])

        def reseal_all() -> list[tuple[bytes, BlobKind, Sealed]]:
            out: list[tuple[bytes, BlobKind, Sealed]] = []
            try:
                for (_, start, _, members), data in zip(runs, datas):
                    view = memoryview(data)
                    for index in members:
                        location = locations[index]
                        blob_id, kind, _ = blobs[index][1]
                        begin = location.offset - start
                        raw = view[begin:begin + location.length]
                        if len(raw) != location.length:  # the pack ends early
                            raise CorruptedData(f"blob {blob_id.hex()}: pack {pack.hex()} is truncated")
                        out.append((blob_id, kind, self.repo.reseal(kind, blob_id, location, raw)))
            except BaseException:
                self.repo.discard([sealed for _, _, sealed in out])
                raise
            return out

        resealed = await self.repo.run_cpu(reseal_all)
        for blob_id, kind, sealed in resealed:
            self.repo.store(kind, blob_id, sealed)
        await self.repo.upload_ready()
        return [blob_id for blob_id, _, _ in resealed]
