"""The scale scenario's generated days are a hall's: in opening hours, Mon–Sat, a little
overtime (what the anomaly scan of a day is measured on, docs/benchmarks.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timezone

from bench import scale
from certbroker import config, policy
from certbroker.audit import anomalies


def test_a_generated_week_is_in_the_offices_hours_but_for_the_overtime_share() -> None:
    rules = policy.load(config.DEFAULT_POLICY_DIR)
    hours = anomalies.office_hours(rules, "wz-hall-007", anomalies.Thresholds().default_hours)
    assert hours == (anomalies.HALL_HOURS,)  # every generated office keeps the hall hours
    times = [scale.entry_time(n) for n in range(0, 7 * scale.PER_DAY, 7)]
    assert times == sorted(times)  # sequences and times rise together, as a broker writes
    moments = [datetime.fromtimestamp(t, tz=UTC) for t in times]
    outside = [m for m in moments if not any(h.contains(m) for h in hours)]
    assert abs(len(outside) / len(moments) - scale.LATE_SHARE) < 0.002
    hall = timezone(anomalies.HALL_HOURS.utc_offset)
    evening = {m.astimezone(hall).hour for m in outside}
    assert evening <= {17, 18, 19, 20, 21}  # overtime after 17:30, local time
    weekdays = {m.astimezone(hall).weekday() for m in moments}
    assert weekdays == {0, 1, 2, 3, 4, 5}  # no Sunday: the halls are closed
    # Six working days fill the first calendar week, the seventh day is the next Monday.
    assert datetime.fromtimestamp(scale.working_day(6), tz=UTC).weekday() == 0
    assert scale.working_day(6) - scale.working_day(5) == 2 * 86_400
