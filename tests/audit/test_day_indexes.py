"""SQLite's subject and clerk indexes keyed by the day first (``SQLiteBackend.day_clause``).

Why they exist is a benchmark's business (appends to a log of millions stay as fast as to a
small one, docs/benchmarks.md "Audit log at scale"); what a user relies on is tested here: a
citizen report and a clerk's range find exactly the entries they did with plain indexes, over
many days, a clock that jumped years ahead, an entry dated before 1970, and in a file written
with the old indexes, which a writer replaces.
"""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from certbroker.audit import open_audit_log
from certbroker.audit.scan import Criteria, scan
from certbroker.audit.store import compact
from certbroker.audit.store.db import backend_for
from certbroker.audit.store.sqlite import SCHEMA_VERSION
from tests.audit.test_audit import make_event

DAY = 86_400.0
START = datetime(2026, 3, 2, tzinfo=UTC).timestamp()
#: Entry times: 150 days of entries (more than are listed one by one), then a clock that
#: jumped 180 years ahead, then one that went back before 1970.
TIMES = [START + d * DAY + h * 3600.0 for d in range(0, 150, 7) for h in (1, 5)]
FUTURE = START + 180 * 365 * DAY
PAST = -5 * DAY
SUBJECTS = ("330302199001010011", "330302199001010022", "330302199001010033")


def fill(path: Path, times: list[float]) -> None:
    """One lookup per time, clerks and subjects taking turns."""
    clock = iter(times)

    async def go() -> None:
        async with open_audit_log(path, clock=lambda: next(clock), entry_format=2) as log:
            for i in range(len(times)):
                await log.append(
                    make_event(clerk=f"clerk-{i % 2}", subject_id=SUBJECTS[i % len(SUBJECTS)])
                )

    asyncio.run(go())


def expected(path: Path, *, since: datetime | None = None, until: datetime | None = None,
             **equals: str) -> list[int]:  # fmt: skip
    """The sequences a plain read of every entry selects (no index involved)."""
    found = []
    for entry in scan(path, Criteria()):
        at = datetime.fromisoformat(entry.time)
        if (since is not None and at < since) or (until is not None and at >= until):
            continue
        if all(getattr(entry.event, name) == value for name, value in equals.items()):
            found.append(entry.sequence)
    return found


def sequences(path: Path, criteria: Criteria) -> list[int]:
    return [entry.sequence for entry in scan(path, criteria)]


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def test_reports_by_citizen_and_by_clerk_find_every_entry_across_days_and_a_clock_jump(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.sqlite"
    fill(path, [*TIMES, FUTURE, FUTURE + 60])
    for subject in SUBJECTS:
        found = sequences(path, Criteria(subject_id=subject))
        assert found == expected(path, subject_id=subject)
        assert len(found) >= len(TIMES) // len(SUBJECTS)
    # The future entries are found (the walk steps to the next day present, not day by day).
    assert expected(path, subject_id=SUBJECTS[len(TIMES) % 3])[-1] == len(TIMES) + 1
    # A clerk's two days (listed), 100 days (walked, with a bound) and all time.
    ranges = [
        (at(START + 14 * DAY), at(START + 16 * DAY)),
        (at(START + 10 * DAY), at(START + 110 * DAY)),
        (None, None),
        (at(START + 140 * DAY), None),
    ]
    for since, until in ranges:
        for clerk in ("clerk-0", "clerk-1"):
            found = sequences(path, Criteria(clerk=clerk, since=since, until=until))
            assert found == expected(path, since=since, until=until, clerk=clerk)
            assert found, (clerk, since, until)
    assert sequences(path, Criteria(subject_id="330302199001019999")) == []


def test_an_entry_dated_before_1970_is_still_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    fill(path, [PAST, *TIMES[:6]])
    assert sequences(path, Criteria(subject_id=SUBJECTS[0])) == [1, 4, 7]
    assert sequences(path, Criteria(clerk="clerk-0")) == [1, 3, 5, 7]


def test_a_range_without_entries_answers_empty(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    fill(path, [START])
    assert sequences(path, Criteria(clerk="clerk-0", since=at(FUTURE))) == []
    assert sequences(path, Criteria(clerk="clerk-0", until=at(START - DAY))) == []


def test_the_reads_search_the_day_keyed_indexes(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    fill(path, TIMES)
    backend = backend_for(path)
    with closing(backend.connect_read()) as conn:
        for since, until, column, index in (
            (None, None, "subject_id", "audit_entries_subject_day"),
            (START, START + 2 * DAY, "clerk", "audit_entries_clerk_day"),
            (START, START + 120 * DAY, "clerk", "audit_entries_clerk_day"),
        ):
            bounds = [None if b is None else int(b * 1000) for b in (since, until)]
            clause = backend.day_clause(conn, *bounds)
            assert clause is not None
            sql = compact.select_sql([clause[0], f"{column} = ?"])
            plan = conn.execute(f"EXPLAIN QUERY PLAN {sql}", [*clause[1], 1]).fetchall()
            assert any(f"INDEX {index} " in str(row[-1]) for row in plan), plan


def test_a_writer_replaces_the_indexes_of_an_older_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    fill(path, TIMES[:10])
    with closing(sqlite3.connect(path)) as conn:  # as schema 3 left it
        conn.executescript(
            "DROP INDEX audit_entries_subject_day; DROP INDEX audit_entries_clerk_day;"
            "CREATE INDEX audit_entries_subject ON audit_entries (subject_id);"
            "CREATE INDEX audit_entries_clerk ON audit_entries (clerk, time);"
            "PRAGMA user_version = 3;"
        )
    # Readers of the old file get the same answers (the day condition is only a filter there).
    assert sequences(path, Criteria(subject_id=SUBJECTS[1])) == [2, 5, 8]
    fill(path, [START + 200 * DAY])
    with closing(sqlite3.connect(path)) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    assert {"audit_entries_subject_day", "audit_entries_clerk_day"} <= names
    assert not {"audit_entries_subject", "audit_entries_clerk"} & names
    assert version == SCHEMA_VERSION == 4
    assert sequences(path, Criteria(subject_id=SUBJECTS[1])) == [2, 5, 8]
    assert sequences(path, Criteria(clerk="clerk-0", until=at(START + DAY * 300))) == [
        1, 3, 5, 7, 9, 11
    ]  # fmt: skip


@pytest.mark.parametrize("days", [0, 1, 63, 64, 65])
def test_a_bounded_range_lists_its_days_or_walks_them(tmp_path: Path, days: int) -> None:
    path = tmp_path / "audit.sqlite"
    times = [START + d * DAY for d in range(0, 70)]
    fill(path, times)
    since, until = at(START + 2 * DAY), at(START + (2 + days) * DAY + 1)
    found = sequences(path, Criteria(clerk="clerk-1", since=since, until=until))
    assert found == expected(path, since=since, until=until, clerk="clerk-1")
    # Entry d + 1 is at day d; clerk-1 wrote the odd days.
    assert found == [d + 1 for d in range(2, 3 + days) if d % 2 == 1]
