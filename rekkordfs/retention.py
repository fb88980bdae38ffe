"""Which snapshots a `forget` policy keeps (pure functions, no I/O).

restic's semantics (docs/operations.md has a worked table):

- each channel is decided on its own;
- `--keep-last N` keeps the N newest snapshots;
- `--keep-hourly/daily/weekly/monthly/yearly N` keep, for each of the N most
  recent hours (days, ISO weeks, months, years) that hold snapshots, the
  newest snapshot of that period; periods are in UTC;
- `--keep-within DURATION` keeps every snapshot at most DURATION older than
  the channel's newest snapshot;
- a snapshot kept by any rule stays, and the newest snapshot of a channel is
  always kept (only `forget ID` removes it).
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from .errors import UsageError

_DURATION = re.compile(r"(\d+)([ymwdh])")
_UNITS = {"y": "years", "m": "months", "w": "weeks", "d": "days", "h": "hours"}


@dataclass(frozen=True)
class Duration:
    """A span like 1y6m, 2w, 36h (years, months, weeks, days, hours)."""

    years: int = 0
    months: int = 0
    weeks: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> Duration:
        value = text.strip().lower()
        if value == "0":
            return cls()
        parts = _DURATION.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise UsageError(f"invalid duration '{text}': use a number and a unit, e.g. 24h, 7d, 2w, 6m, 1y, 1y6m")
        amounts: dict[str, int] = {}
        for number, unit in parts:
            name = _UNITS[unit]
            if name in amounts:
                raise UsageError(f"invalid duration '{text}': '{unit}' given twice")
            amounts[name] = int(number)
        return cls(**amounts)

    def before(self, moment: datetime) -> datetime:
        """moment minus this span, months and years by the calendar."""
        month_index = moment.year * 12 + (moment.month - 1) - self.years * 12 - self.months
        year, month = divmod(month_index, 12)
        day = min(moment.day, calendar.monthrange(year, month + 1)[1])
        shifted = moment.replace(year=year, month=month + 1, day=day)
        return shifted - timedelta(weeks=self.weeks, days=self.days, hours=self.hours)

    @property
    def seconds(self) -> float:
        """Its length, with years of 365 days and months of 30 (for grace periods)."""
        return timedelta(days=self.years * 365 + self.months * 30 + self.weeks * 7 + self.days,
                         hours=self.hours).total_seconds()

    def __str__(self) -> str:
        text = "".join(f"{getattr(self, name)}{unit}" for unit, name in _UNITS.items() if getattr(self, name))
        return text or "0"


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None

    def __post_init__(self) -> None:
        for name in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
            if getattr(self, name) < 0:
                raise UsageError(f"--keep-{name} must be 0 or more")

    @property
    def empty(self) -> bool:
        return self.within is None and not any((self.last, self.hourly, self.daily, self.weekly, self.monthly,
                                                self.yearly))


@dataclass
class Decision:
    """What the policy decided for one snapshot, and which rules keep it."""

    time_ns: int
    reasons: list[str] = field(default_factory=list)

    @property
    def keep(self) -> bool:
        return bool(self.reasons)


def _utc(time_ns: int) -> datetime:
    return datetime.fromtimestamp(time_ns / 1e9, tz=UTC)


_PERIODS: list[tuple[str, Callable[[datetime], object]]] = [
    ("hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("daily", lambda t: (t.year, t.month, t.day)),
    ("weekly", lambda t: t.isocalendar()[:2]),
    ("monthly", lambda t: (t.year, t.month)),
    ("yearly", lambda t: t.year),
]


def decide(times_ns: Sequence[int], policy: Policy) -> list[Decision]:
    """One channel's snapshots (any order) -> a decision for each, in the same order."""
    if policy.empty:
        raise UsageError("no --keep-* rule given: nothing would be kept (forget snapshots by ID instead)")
    decisions = [Decision(t) for t in times_ns]
    newest_first = sorted(range(len(times_ns)), key=lambda i: times_ns[i], reverse=True)
    if not newest_first:
        return decisions
    decisions[newest_first[0]].reasons.append("newest")
    for index in newest_first[:policy.last]:
        decisions[index].reasons.append("last")
    for name, period in _PERIODS:
        budget = getattr(policy, name)
        seen: set[object] = set()
        for index in newest_first:
            if len(seen) >= budget:
                break
            bucket = period(_utc(times_ns[index]))
            if bucket not in seen:
                seen.add(bucket)
                decisions[index].reasons.append(name)
    if policy.within is not None:
        newest = _utc(times_ns[newest_first[0]])
        limit = policy.within.before(newest)
        for index in newest_first:
            if _utc(times_ns[index]) >= limit:
                decisions[index].reasons.append(f"within {policy.within}")
    return decisions
