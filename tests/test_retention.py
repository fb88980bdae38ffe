"""Forget policies (retention.py): restic's semantics, checked against the table
in docs/operations.md."""

from __future__ import annotations

from datetime import UTC, datetime, timezone

import pytest

from rekkordfs.errors import UsageError
from rekkordfs.retention import Duration, Policy, decide

pytestmark = pytest.mark.fast  # pure: part of the fast tier

# docs/operations.md, "forget": the example history (UTC)
HISTORY = {
    1: "2026-01-01 10:00", 2: "2026-01-01 22:00", 3: "2026-01-02 09:00", 4: "2026-01-05 09:00",
    5: "2026-01-12 09:00", 6: "2026-02-03 09:00", 7: "2026-03-01 09:00", 8: "2026-03-01 09:30",
    9: "2026-03-01 10:15",
}


def ns(text: str) -> int:
    moment = datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
    return int(moment.timestamp()) * 10**9


def kept(policy: Policy, history: dict[int, str] = HISTORY) -> dict[int, list[str]]:
    numbers = list(history)
    decisions = decide([ns(history[n]) for n in numbers], policy)
    return {n: d.reasons for n, d in zip(numbers, decisions) if d.keep}


@pytest.mark.parametrize("policy, expected", [
    (Policy(last=2, daily=3, weekly=2, monthly=3), {5, 6, 8, 9}),
    (Policy(last=2), {8, 9}),
    (Policy(daily=3), {5, 6, 9}),
    (Policy(weekly=2), {6, 9}),
    (Policy(monthly=3), {5, 6, 9}),
    (Policy(hourly=2), {8, 9}),
    (Policy(yearly=1), {9}),
    (Policy(within=Duration.parse("2d")), {7, 8, 9}),
    (Policy(within=Duration.parse("1m")), {6, 7, 8, 9}),  # 2026-02-01 10:15 and later
    (Policy(daily=100), {2, 3, 4, 5, 6, 9}),  # every day that has snapshots, its newest
])
def test_policy_table(policy: Policy, expected: set[int]) -> None:
    assert set(kept(policy)) == expected


def test_reasons_name_every_rule_that_keeps() -> None:
    reasons = kept(Policy(last=2, daily=3, weekly=2, monthly=3))
    assert reasons[9] == ["newest", "last", "daily", "weekly", "monthly"]
    assert reasons[8] == ["last"]
    assert reasons[6] == ["daily", "weekly", "monthly"]
    assert reasons[5] == ["daily", "monthly"]


def test_the_newest_snapshot_is_always_kept() -> None:
    assert set(kept(Policy(within=Duration.parse("1h")))) == {8, 9}
    assert kept(Policy(hourly=1)) == {9: ["newest", "hourly"]}
    assert kept(Policy(within=Duration.parse("1h")), {1: "2026-01-01 10:00", 2: "2026-03-01 10:00"}) == {
        2: ["newest", "within 1h"]}


def test_order_of_the_input_does_not_matter() -> None:
    shuffled = dict(sorted(HISTORY.items(), key=lambda item: (item[0] * 7) % 9))
    assert set(kept(Policy(last=2, daily=3, weekly=2, monthly=3), shuffled)) == {5, 6, 8, 9}


def test_weeks_are_iso_weeks_in_utc() -> None:
    # Sunday 23:30 and Monday 00:30 UTC are in different ISO weeks
    history = {1: "2026-03-01 23:30", 2: "2026-03-02 00:30"}
    assert set(kept(Policy(weekly=2), history)) == {1, 2}
    assert set(kept(Policy(weekly=1), history)) == {2}


def test_an_empty_policy_is_refused() -> None:
    with pytest.raises(UsageError):
        decide([1], Policy())
    with pytest.raises(UsageError):
        Policy(last=-1)


@pytest.mark.parametrize("text, seconds", [
    ("0", 0), ("24h", 86400), ("7d", 7 * 86400), ("2w", 14 * 86400), ("1y6m", (365 + 180) * 86400),
    ("1d12h", 36 * 3600),
])
def test_durations(text: str, seconds: int) -> None:
    assert Duration.parse(text).seconds == seconds


@pytest.mark.parametrize("text", ["", "12", "1x", "1d1d", "d", "-1d", "1.5d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UsageError):
        Duration.parse(text)


def test_calendar_months() -> None:
    moment = datetime(2026, 3, 31, 12, tzinfo=UTC)
    assert Duration.parse("1m").before(moment) == datetime(2026, 2, 28, 12, tzinfo=UTC)
    assert Duration.parse("1y").before(datetime(2028, 2, 29, tzinfo=UTC)) == datetime(
        2027, 2, 28, tzinfo=UTC)
