"""The anomaly scan's fast paths give the findings of the full decode of every entry
(certbroker.audit.scan + the rules of certbroker.audit.anomalies), on a log mixing entry
formats 1 and 2 where every rule fires: certbroker.audit.lookups (the columns and a light
decode) reads the same lookups; certbroker.audit.anomaly_scan (the rules counted in SQL)
finds the same findings, in the same order."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certbroker import config, policy
from certbroker.audit import anomaly_scan, open_audit_log
from certbroker.audit.anomalies import (
    DENIAL_BURST,
    MANY_SUBJECTS,
    NO_CASE_NUMBER,
    OUTSIDE_HOURS,
    QUOTA_EXCEEDED,
    REPEATED_SUBJECT,
    Thresholds,
    find,
    find_lookups,
    lookup_of,
)
from certbroker.audit.anomaly_scan import find_in_store
from certbroker.audit.lookups import count_by_hour, read_lookups
from certbroker.audit.scan import Criteria, scan
from certbroker.audit.store.db import backend_for
from certbroker.config import AuditLocation
from tests.audit.pg_support import fresh_schema
from tests.audit.test_audit import StepClock, make_event

# Wednesday 2023-11-15 16:00 at UTC+08:00: the halls close at 17:30, during the log's format 2
# part (from about 16:50), so the counted rules see lookups inside and outside the hours.
START = datetime(2023, 11, 15, 8, 0, tzinfo=UTC)
STEP = 45.0  # seconds between entries
OLD, NEW = 70, 90  # appends in format 1, then in format 2
LIMITS = Thresholds(many_subjects=6, repeated_cases=3, denial_burst=4)
#: The rules over lookups (the disputes are citizen entries, tested in tests/citizen).
EVERY_RULE = {
    NO_CASE_NUMBER,
    OUTSIDE_HOURS,
    MANY_SUBJECTS,
    REPEATED_SUBJECT,
    DENIAL_BURST,
    QUOTA_EXCEEDED,
}
OFFICES = ("hall-07", "gz-haizhu-24h-01", "gz-tianhe-hall-01", "温州-大厅-3")


def fill(location: AuditLocation, clock: StepClock, first: int, count: int, fmt: int) -> None:
    rng = random.Random(first)

    async def go() -> None:
        async with open_audit_log(location, clock=clock, entry_format=fmt) as log:
            for i in range(first, first + count):
                event = make_event(
                    clerk=f"clerk-{rng.randrange(4)}",
                    office=rng.choice(OFFICES),
                    subject_id=rng.choice(("", *(f"33030219900101{n:04d}" for n in range(9)))),
                    case_number=rng.choice(("", "温-案-1", "CASE-2", f"CASE-{i}")),
                    decision="deny" if rng.random() < 0.4 else "allow",
                    department=("public_security", "civil_affairs")[i % 2],
                )
                if i % 7 == 3 and event.decision == "allow":  # allowed, the department down
                    event = dataclasses.replace(event, outcome="ADAPTER_UNAVAILABLE")
                if i % 13 == 0:  # refused past a quota of the policy
                    event = dataclasses.replace(
                        event, decision="deny", outcome=QUOTA_EXCEEDED, rule_id=f"quota-{i % 2}"
                    )
                if i % 6 == 0:  # a bundle: its items share a bundle id, then a closing entry
                    bundle = f"bundle-{i}"
                    items = (
                        dataclasses.replace(event, bundle_id=bundle),
                        dataclasses.replace(event, bundle_id=bundle, subject_id=""),
                    )
                    await log.append_many(
                        items,
                        link=lambda ids: make_event(
                            kind="bundle", item_entry_ids=tuple(ids), outcome_counts={"OK": 2}
                        ),
                    )
                else:
                    await log.append(event)

    asyncio.run(go())


Mixed = tuple[AuditLocation, int]  # the log, the last sequence in format 1


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def mixed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mixed]:
    def build(location: AuditLocation) -> Mixed:
        clock = StepClock(START.timestamp(), step=STEP)
        fill(location, clock, 0, OLD, 1)
        last_old = scan(location, Criteria())[-1].sequence
        fill(location, clock, OLD, NEW, 2)
        return location, last_old

    if request.param == "sqlite":
        yield build(tmp_path_factory.mktemp("lookups") / "audit.sqlite")
        return
    with fresh_schema() as pg:
        yield build(pg)


@pytest.mark.parametrize(
    ("since", "until", "before"),
    [
        (None, None, 0),  # the whole log
        (START + timedelta(minutes=20), START + timedelta(hours=1, minutes=50), 0),
        (START, START + timedelta(hours=3), 120),  # a sequence bound, as the service sets
    ],
)
def test_the_fast_path_reads_what_the_full_decode_reads(
    mixed: Mixed, since: datetime | None, until: datetime | None, before: int
) -> None:
    location, last_old = mixed
    rules = policy.load(config.DEFAULT_POLICY_DIR)
    criteria = Criteria(kinds=("lookup",), since=since, until=until, before=before)
    entries = scan(location, criteria)
    lookups = read_lookups(location, since=since, until=until, before=before)
    assert lookups == [lookup_of(e) for e in entries]
    assert {e.sequence <= last_old for e in entries} == {True, False}  # both formats read
    assert find_lookups(lookups, rules, LIMITS) == find(entries, rules, LIMITS)


def test_every_rule_fires_on_both_formats(mixed: Mixed) -> None:
    location, last_old = mixed
    rules = policy.load(config.DEFAULT_POLICY_DIR)
    findings = find_lookups(read_lookups(location), rules, LIMITS)
    assert findings == find(scan(location, Criteria()), rules, LIMITS)
    fired = {f.rule for f in findings}
    assert fired == EVERY_RULE
    boundary = {(f.rule, min(f.sequences) <= last_old < max(f.sequences)) for f in findings}
    assert {rule for rule, spans in boundary if spans} >= {NO_CASE_NUMBER, MANY_SUBJECTS}
    # Bundled denials count once: some burst holds two entries of one bundle.
    bursts = [f for f in findings if f.rule == DENIAL_BURST]
    assert any(len(f.sequences) > int(f.description.split()[0]) for f in bursts)


def test_an_empty_or_missing_log(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_lookups(tmp_path / "none.sqlite")
    rules = policy.load(config.DEFAULT_POLICY_DIR)
    with pytest.raises(FileNotFoundError):
        find_in_store(tmp_path / "none.sqlite", rules)


def _format_2_start(mixed: Mixed) -> datetime:
    """The time of the first entry in format 2."""
    location, last_old = mixed
    return datetime.fromisoformat(scan(location, Criteria(after=last_old), limit=1)[0].time)


LIMITS_VARIED = [
    LIMITS,
    Thresholds(many_subjects=4, repeated_cases=2, denial_burst=2),
    Thresholds(many_subjects=9, repeated_cases=4, denial_burst=6, burst_window=timedelta(hours=1)),
]


@pytest.mark.parametrize("limits", LIMITS_VARIED, ids=["default", "low", "high"])
@pytest.mark.parametrize(
    "window", ["format 2", "format 2, sequence bound", "format 2, no end", "mixed"]
)
def test_the_rules_counted_in_sql_find_what_the_python_rules_find(
    mixed: Mixed, limits: Thresholds, window: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    location, last_old = mixed
    rules = policy.load(config.DEFAULT_POLICY_DIR)
    since = START if window == "mixed" else _format_2_start(mixed)
    # A bounded range tests the opening hours as intervals of time; one without an end, by
    # weekday and time of day.
    until = None if window == "format 2, no end" else since + timedelta(hours=3)
    before = last_old + 60 if window == "format 2, sequence bound" else 0
    criteria = Criteria(kinds=("lookup", "citizen"), since=since, until=until, before=before)
    expected = find(scan(location, criteria), rules, limits)
    python_path = []
    monkeypatch.setattr(
        anomaly_scan, "read_lookups", lambda *a, **k: python_path.append(1) or read_lookups(*a, **k)
    )
    found = find_in_store(location, rules, limits, since=since, until=until, before=before)
    assert found == expected
    # A range of format 2 entries is counted in SQL; one holding format 1 entries is not.
    assert bool(python_path) == (window == "mixed")
    if limits == LIMITS and window == "format 2":
        assert {f.rule for f in found} == EVERY_RULE


def test_counting_twice_and_under_another_policy_gives_the_same_as_python(
    mixed: Mixed, tmp_path: Path
) -> None:
    """The office windows are kept between reads per policy: a second read, and a read under
    a policy whose hours differ, still match the Python rules."""
    location, _ = mixed
    since = _format_2_start(mixed)
    until = since + timedelta(hours=4)
    criteria = Criteria(kinds=("lookup", "citizen"), since=since, until=until)
    entries = scan(location, criteria)
    shipped = policy.load(config.DEFAULT_POLICY_DIR)
    always = Thresholds(default_hours=())  # offices no rule names: open around the clock
    for rules, limits in ((shipped, LIMITS), (shipped, LIMITS), (shipped, always)):
        found = find_in_store(location, rules, limits, since=since, until=until)
        assert found == find(entries, rules, limits)


def test_a_malformed_counted_value_is_an_error_not_a_wrong_answer(tmp_path: Path) -> None:
    location = tmp_path / "audit.sqlite"
    clock = StepClock(START.timestamp(), step=STEP)
    fill(location, clock, 0, 20, 2)
    backend = backend_for(location)
    with backend.write_transaction() as conn:
        conn.execute("UPDATE audit_entries SET case_number = X'07' WHERE seq = 5")
    rules = policy.load(config.DEFAULT_POLICY_DIR)
    with pytest.raises(ValueError, match="malformed"):
        find_in_store(location, rules, LIMITS)


@pytest.mark.parametrize(
    ("office", "since", "until", "before"),
    [
        (None, None, None, 0),  # the whole log, both formats
        (None, START + timedelta(minutes=50), START + timedelta(hours=2, minutes=10), 0),
        ("温州-大厅-3", None, None, 0),
        ("hall-07", START, START + timedelta(hours=3), 150),
        ("no-such-hall", None, None, 0),
    ],
)
def test_the_overview_counted_by_the_database_is_the_entries_counted_one_by_one(
    mixed: Mixed, office: str | None, since: datetime | None, until: datetime | None, before: int
) -> None:
    location, _ = mixed
    criteria = Criteria(office=office, since=since, until=until, before=before)
    expected: Counter[tuple[int, str, str, str, str]] = Counter()
    for entry in scan(location, criteria):
        e = entry.event
        if e.kind == "lookup":
            at = datetime.fromisoformat(entry.time).replace(minute=0, second=0, microsecond=0)
            hour = (at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
            expected[(hour, e.office, e.department, e.decision, e.outcome)] += 1
    assert count_by_hour(location, criteria) == expected
    if office != "no-such-hall":
        assert len({key[2] for key in expected}) == 2  # both departments
        assert {key[4] for key in expected} >= {"OK", "ADAPTER_UNAVAILABLE"}


def test_a_malformed_time_in_the_overview_is_an_error(tmp_path: Path) -> None:
    location = tmp_path / "audit.sqlite"
    fill(location, StepClock(START.timestamp(), step=STEP), 0, 10, 2)
    with backend_for(location).write_transaction() as conn:
        conn.execute("UPDATE audit_entries SET time = 'soon' WHERE seq = 4")
    with pytest.raises(ValueError, match="malformed"):
        count_by_hour(location, Criteria())
