"""`forget`: remove snapshots from the listings, by ID or by policy.

A forget writes a signed record of the snapshot IDs it removes (marks.py),
then deletes their tags. Their records and data stay until `prune` finds that
nothing needs them; `check` tells a forgotten snapshot (a record names it) from
a tag deleted behind the repository's back (nothing does).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from .codec import snapshot_key
from .errors import NotFound, UsageError
from .format import Tag
from .keys import Capability
from .marks import FORGOTTEN_PREFIX, NAME_SIZE, Forgotten, encode_forgotten
from .repository import Repository
from .retention import Decision, Policy, decide


@dataclass
class ForgetPlan:
    """Every listed snapshot (of the channels concerned) with its decision."""

    decisions: list[tuple[Tag, Decision]] = field(default_factory=list)
    unlisted: list[bytes] = field(default_factory=list)  # records without a tag (check names them)

    @property
    def removed(self) -> list[Tag]:
        return [tag for tag, decision in self.decisions if not decision.keep]


async def plan_by_policy(repo: Repository, policy: Policy, channels: list[str] | None) -> ForgetPlan:
    listing = await repo.list_snapshots()
    by_channel: dict[str, list[Tag]] = {}
    for tag in listing.tags:
        if not channels or tag.channel in channels:
            by_channel.setdefault(tag.channel, []).append(tag)
    missing = [c for c in channels or [] if c not in by_channel]
    if missing:
        raise NotFound(f"no snapshot in channel '{missing[0]}'")
    plan = ForgetPlan()
    for channel in sorted(by_channel):
        tags = by_channel[channel]
        for tag, decision in zip(tags, decide([t.time_ns for t in tags], policy)):
            plan.decisions.append((tag, decision))
    return plan


async def plan_by_ids(repo: Repository, specs: list[str]) -> ForgetPlan:
    """Snapshots named by full ID or unique prefix (never a channel name: too easy to mistype)."""
    listing = await repo.list_snapshots()
    chosen: dict[bytes, Tag] = {}
    unlisted: list[bytes] = []
    for spec in specs:
        lowered = spec.lower()
        if len(lowered) < 8 or any(c not in "0123456789abcdef" for c in lowered):
            raise UsageError(f"'{spec}' is not a snapshot ID: forget takes IDs (8 or more hex digits) "
                             "or --keep-* rules")
        matches = [t for t in listing.tags if t.id_hex.startswith(lowered)]
        if not matches and len(lowered) == 64 and await repo.storage.exists(snapshot_key(bytes.fromhex(lowered))):
            unlisted.append(bytes.fromhex(lowered))  # a record whose tag is gone: check names it in full
            continue
        if not matches:
            raise NotFound(f"no snapshot with ID '{spec}'")
        if len(matches) > 1:
            raise NotFound(f"snapshot ID prefix '{spec}' is ambiguous")
        chosen[matches[0].snapshot_id] = matches[0]
    return ForgetPlan([(tag, Decision(tag.time_ns)) for tag in sorted(chosen.values(), key=lambda t: t.time_ns)],
                      unlisted)


async def forget(repo: Repository, plan: ForgetPlan) -> list[Tag]:
    """Remove the plan's snapshots from the listings; returns them."""
    repo.keys.require(Capability.FORGET)
    removed = plan.removed
    if not removed and not plan.unlisted:
        return []
    record = Forgotten(time.time_ns(), tuple(tag.snapshot_id for tag in removed) + tuple(plan.unlisted))
    name = FORGOTTEN_PREFIX + os.urandom(NAME_SIZE).hex()
    await repo.storage.put(name, encode_forgotten(record, repo.keys, repo.config.repo_id))
    await repo.storage.flush()  # the record first: a tag never goes without one
    keys = await repo.tag_keys()
    # at once: a round trip each on a server, and the record already names them all
    await repo.for_each([key for tag in removed for key in keys.get(tag.snapshot_id, [])], repo.storage.delete)
    return removed
