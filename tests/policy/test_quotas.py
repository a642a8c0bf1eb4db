"""Quotas: the policy section (load errors with path:line), the counters' semantics on SQLite and
on the real PostgreSQL (same statements), exactness across workers and brokers, and quota cases
in ``certbroker policy test``."""

from __future__ import annotations

import contextlib
import shutil
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from certbroker import config, errors, policy
from certbroker.policy.counters import (
    PostgresQuotaCounter,
    QuotaCounter,
    SqliteQuotaCounter,
    open_counter,
)
from certbroker.policy.quota import Quota, duration_text, parse_duration
from tests.audit.pg_support import fresh_schema

T0 = 1_800_000_000.0
CITIZENS = Quota("citizens", ("window_clerk",), "distinct_subjects", 3, 3600)
LOOKUPS = Quota("lookups", ("window_clerk",), "lookups", 5, 60)


# ---- the policy section ----


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(config.DEFAULT_POLICY_DIR, target)
    return target


def test_shipped_quotas_load() -> None:
    loaded = policy.load(config.DEFAULT_POLICY_DIR)
    ids = {q.id: q for q in loaded.quotas}
    assert ids["clerk-citizens-per-hour"].describe() == "at most 60 distinct citizens per 1h"
    assert ids["clerk-lookups-per-minute"].describe() == "at most 120 lookups per 1m"
    assert loaded.quotas_for(("window_clerk",)) == loaded.quotas
    assert loaded.quotas_for(("auditor",)) == ()


@pytest.mark.parametrize(
    ("body", "marker", "message"),
    [
        ("roles: [nobody]\n    lookups: 5\n    per: 1m", "nobody", "unknown role 'nobody'"),
        ("roles: [window_clerk]\n    per: 1m", "- id: q", "exactly one of distinct_subjects"),
        (
            "roles: [window_clerk]\n    lookups: 5\n    distinct_subjects: 5\n    per: 1m",
            "- id: q",
            "exactly one of distinct_subjects",
        ),
        ("roles: [window_clerk]\n    lookups: 0\n    per: 1m", "lookups: 0", "must be 1 or more"),
        ("roles: [window_clerk]\n    lookups: many\n    per: 1m", "many", "expected an integer"),
        ("roles: [window_clerk]\n    lookups: 5\n    per: 2d", "per: 2d", "1 second to 1 day"),
        ("roles: [window_clerk]\n    lookups: 5\n    per: 0s", "per: 0s", "1 second to 1 day"),
        ("roles: [window_clerk]\n    lookups: 5\n    per: soon", "soon", "1 second to 1 day"),
        ("roles: [window_clerk]\n    lookups: 5", "- id: q", "missing required key 'per'"),
        (
            "roles: [window_clerk]\n    lookups: 5\n    per: 1m\n    burst: 3",
            "burst",
            "unknown key",
        ),
    ],
)
def test_malformed_quota_is_refused_at_its_line(
    policy_dir: Path, body: str, marker: str, message: str
) -> None:
    path = policy_dir / "zz-extra.yaml"
    path.write_text(f"quotas:\n  - id: q\n    {body}\n", "utf-8")
    line = (
        next(i for i, text in enumerate(body.splitlines(), 3) if marker in text)
        if (marker != "- id: q")
        else 2
    )
    problems = policy.check([policy_dir])
    assert any(p.startswith(f"{path}:{line}: ") and message in p for p in problems), problems


def test_quota_ids_are_unique_and_never_a_rule_id(policy_dir: Path) -> None:
    path = policy_dir / "zz-extra.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            quotas:
              - {id: window-clerk-hall, roles: [window_clerk], lookups: 5, per: 1m}
              - {id: clerk-lookups-per-minute, roles: [window_clerk], lookups: 5, per: 1m}
              - {id: default-deny, roles: [window_clerk], lookups: 5, per: 1m}
            """
        ),
        "utf-8",
    )
    problems = "\n".join(policy.check([policy_dir]))
    assert f"{path}:2: quota window-clerk-hall: id is already a rule id" in problems
    assert f"{path}:3: duplicate quota id 'clerk-lookups-per-minute'" in problems
    assert f"{path}:4: quota default-deny: id is reserved" in problems


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("1h", 3600), ("1d", 86400), ("90", 90), ("25h", None)],
)
def test_windows(text: str, seconds: int | None) -> None:
    assert parse_duration(text) == seconds
    if seconds is not None:
        assert parse_duration(duration_text(seconds)) == seconds


# ---- the counters: one set of semantics, SQLite and PostgreSQL ----


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def new_counter(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], QuotaCounter]]:
    """Opens counters on one store (each one: a worker, or a broker); all closed afterwards."""
    opened: list[QuotaCounter] = []
    with fresh_schema() if request.param == "postgres" else contextlib.nullcontext() as location:

        def new() -> QuotaCounter:
            # workers=2: the store several processes share (one process counts in memory).
            counter = open_counter(location or Path(), tmp_path / "state", workers=2)
            opened.append(counter)
            return counter

        try:
            yield new
        finally:
            for counter in opened:
                counter.close()


def test_open_counter_follows_the_audit_location(tmp_path: Path) -> None:
    counter = open_counter(tmp_path / "audit.sqlite", tmp_path / "state", workers=2)
    try:
        assert isinstance(counter, SqliteQuotaCounter)
        assert (tmp_path / "state" / "quotas.sqlite").exists()
    finally:
        counter.close()


def test_distinct_citizens_in_a_sliding_window(new_counter: Callable[[], QuotaCounter]) -> None:
    counter = new_counter()
    assert counter.admit("c1", ["a", "b", "c"], [CITIZENS], T0) == [None, None, None]
    assert counter.admit("c1", ["d"], [CITIZENS], T0 + 10) == [CITIZENS]  # the 4th citizen
    assert counter.admit("c1", ["a", "b"], [CITIZENS], T0 + 20) == [None, None]  # seen: admitted
    assert counter.admit("c2", ["d"], [CITIZENS], T0 + 20) == [None]  # per clerk
    # a, b were seen again at T0 + 20; c leaves the window an hour after T0: room for one.
    assert counter.admit("c1", ["d", "e"], [CITIZENS], T0 + 3600) == [None, CITIZENS]


def test_lookups_and_partial_admission_in_order(new_counter: Callable[[], QuotaCounter]) -> None:
    counter = new_counter()
    both = [CITIZENS, LOOKUPS]
    # One call (a bundle): items are admitted in order until a quota is reached.
    verdicts = counter.admit("c1", ["a", "a", "b", "b", "c", "c", "d"], both, T0)
    assert verdicts == [None, None, None, None, None, LOOKUPS, CITIZENS]
    # Refused lookups did not count: a minute later the five admitted ones are out.
    assert counter.admit("c1", ["a"] * 5, both, T0 + 60) == [None] * 5
    assert counter.admit("c1", ["a"], both, T0 + 61) == [LOOKUPS]


def test_counts_persist_across_counters(new_counter: Callable[[], QuotaCounter]) -> None:
    first = new_counter()
    first.admit("c1", ["a", "b", "c"], [CITIZENS], T0)
    first.close()
    assert new_counter().admit("c1", ["d"], [CITIZENS], T0 + 1) == [CITIZENS]  # a restart


def test_exact_when_workers_or_brokers_race(new_counter: Callable[[], QuotaCounter]) -> None:
    """Several counters on one store -- the workers of one broker (SQLite file) or several
    brokers (PostgreSQL) -- admitting one clerk's lookups at once: never one too many."""
    limit = Quota("burst", ("window_clerk",), "lookups", 40, 60)
    counters = [new_counter() for _ in range(4)]
    admitted: list[int] = []
    lock = threading.Lock()

    def work(counter: QuotaCounter, index: int) -> None:
        for call in range(25):
            verdict = counter.admit("c1", [f"s{index}-{call}"], [limit], T0)
            with lock:
                admitted.append(verdict[0] is None)

    threads = [threading.Thread(target=work, args=(c, i)) for i, c in enumerate(counters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(admitted) == 100
    assert sum(admitted) == 40


def test_rows_older_than_a_day_are_deleted(tmp_path: Path) -> None:
    counter = SqliteQuotaCounter(tmp_path / "quotas.sqlite")
    try:
        counter.admit("c1", ["a", "b"], [CITIZENS], T0)
        counter.admit("c1", ["c"], [CITIZENS], T0 + 86400)
        rows = counter._db.execute("SELECT subject FROM quota_subjects").fetchall()
        assert rows == [("c",)]
        assert counter._db.execute("SELECT COUNT(*) FROM quota_lookups").fetchone() == (1,)
    finally:
        counter.close()


@pytest.mark.postgres
def test_unreachable_postgres_is_quota_unavailable() -> None:
    with fresh_schema() as location:
        counter = PostgresQuotaCounter(location)
        try:
            counter._conn.close()  # the server is gone; reconnecting to a dead port fails
            counter._location = config.PostgresLocation(
                "postgresql://postgres@127.0.0.1:1/test", location.schema
            )
            with pytest.raises(errors.Unavailable) as info:
                counter.admit("c1", ["a"], [CITIZENS], T0)
            assert info.value.reason == "QUOTA_UNAVAILABLE"
        finally:
            counter.close()


# ---- policy test cases ----


def _case(policy_dir: Path, history: str, expect: str) -> policy.TestReport:
    tests = policy_dir / "tests"
    shutil.rmtree(tests)
    tests.mkdir()
    (tests / "q.yaml").write_text(
        textwrap.dedent(
            f"""\
            at: "2025-03-03T10:00:00+08:00"
            tests:
              - name: a quota case
                clerk: {{sub: c1, roles: [window_clerk], office: gz-haizhu-hall-01}}
                history: {history}
                request: {{record_type: property, matter: BDC-ZY-001,
                          case_number: GZ20250303-000123, consent: id_card_read}}
                expect: {expect}
            """
        ),
        "utf-8",
    )
    return policy.run_tests(policy_dir)


def test_policy_test_reports_a_quota_it_did_not_expect(policy_dir: Path) -> None:
    report = _case(
        policy_dir,
        '[{at: "2025-03-03T09:30:00+08:00", citizens: 60}]',
        "{decision: allow, rule: window-clerk-hall}",
    )
    assert report.failed == 1
    assert (
        "expected allow, got deny by clerk-citizens-per-hour [QUOTA_EXCEEDED]"
        in (report.failures[0])
    )


def test_policy_test_refuses_a_history_past_a_quota(policy_dir: Path) -> None:
    report = _case(
        policy_dir,
        '[{at: "2025-03-03T09:30:00+08:00", citizens: 61}]',
        "{decision: deny, rule: clerk-citizens-per-hour}",
    )
    assert report.failed == 1
    assert "quota clerk-citizens-per-hour refuses it" in report.failures[0]


def test_policy_test_history_is_checked(policy_dir: Path) -> None:
    report = _case(policy_dir, '[{at: "yesterday"}]', "{decision: allow, rule: window-clerk-hall}")
    assert report.failed == 1
    assert "malformed" in report.failures[0]
    assert "give `citizens` and/or `lookups`" in report.failures[0]
