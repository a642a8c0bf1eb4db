"""Opening hours in policies: a window of days and minutes in a fixed UTC offset.

Part of the policy model (:mod:`certbroker.policy.model` re-exports :class:`Hours` and
:data:`DAYS`);
kept apart so the decision engine stays one readable module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

#: Day names used in opening hours; the index is ``datetime.weekday()``.
DAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class Hours:
    """An opening-hours window: ``days`` (0 = Monday), ``[start_min, end_min)`` in local time."""

    days: tuple[int, ...]
    start_min: int
    end_min: int
    utc_offset: timedelta

    def contains(self, now: datetime) -> bool:
        local = now.astimezone(timezone(self.utc_offset))
        # Microseconds since local midnight, so 17:29:59.9 is inside and 17:30:00 is not.
        elapsed = ((local.hour * 60 + local.minute) * 60 + local.second) * 10**6
        elapsed += local.microsecond
        inside = self.start_min * 60 * 10**6 <= elapsed < self.end_min * 60 * 10**6
        return local.weekday() in self.days and inside

    def describe(self) -> str:
        """E.g. ``Mon-Sat 08:30-17:30 (UTC+08:00)``, for denial reasons."""
        span = f"{_hhmm(self.start_min)}-{_hhmm(self.end_min)}"
        return f"{_day_ranges(self.days)} {span} (UTC{_offset(self.utc_offset)})"


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _offset(delta: timedelta) -> str:
    minutes = int(delta.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{_hhmm(abs(minutes))}"


def _day_ranges(days: Sequence[int]) -> str:
    """(0, 1, 2, 3, 4, 5) -> "Mon-Sat"; (0, 2, 3) -> "Mon, Wed-Thu"."""
    runs: list[list[int]] = []
    for day in sorted(set(days)):
        if runs and runs[-1][-1] == day - 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    names = [DAYS[r[0]].title() + ("" if len(r) == 1 else "-" + DAYS[r[-1]].title()) for r in runs]
    return ", ".join(names)
