"""Counting what quotas limit (:mod:`certbroker.policy.quota`): a :class:`QuotaCounter` decides
and records admissions in one step, so a check can never be raced past its limit.

Two stores hold the counts, with the same tables and the same statements
(:func:`_admit`; one transaction per :meth:`QuotaCounter.admit_many`, which the broker
feeds with the admissions that queued meanwhile, :mod:`certbroker.lookup.admission`):

* :class:`SqliteQuotaCounter`, ``<state_dir>/quotas.sqlite``: one broker. Every worker process of
  ``serve --workers N`` opens the same file, and ``BEGIN IMMEDIATE`` serializes their
  admissions, so the quotas are exact across workers too (and survive restarts). ``:memory:``
  serves ``certbroker policy test``, which thereby runs the broker's own code.
* :class:`PostgresQuotaCounter`, tables in the audit schema: every broker of a cluster that
  shares the PostgreSQL audit log. Each call takes a transaction-scoped advisory lock on the
  clerk, so two brokers admitting the same clerk's lookups queue behind each other: no overshoot
  at all. Windows are measured on each broker's clock (skew between brokers shifts a window's
  edge by the skew, not the count).

Tables: ``quota_subjects (clerk, subject, last_at)`` (the last admitted lookup of each citizen
by each clerk) and ``quota_lookups (clerk, at, n, cum)`` (admitted lookups, one row per call;
``cum`` is the clerk's running total, so the lookups within a window are two index probes --
the latest total less the total at the window's start -- however many calls the window holds).
A clerk's ``at`` never goes backwards (a row is stamped no earlier than the clerk's previous
one: another broker's clock may be a little ahead), which keeps ``at`` and ``cum`` in the same
order; the cost is that such a row leaves the window a little later, never earlier.
``distinct_subjects`` counts the rows of ``quota_subjects`` in the window: never more than the
quota's limit, since only admitted citizens are written.
Rows older than the longest window a quota may have (a day) are deleted as the clerk's next
call is admitted, so neither table holds more than a day of anyone's activity.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from certbroker.config import AuditLocation, PostgresLocation
from certbroker.contract.reasons import QUOTA_UNAVAILABLE
from certbroker.errors import Unavailable
from certbroker.policy.model import Decision, PolicySet
from certbroker.policy.quota import MAX_PER_S, QUOTA_EXCEEDED, Quota

__all__ = [
    "Admission",
    "PostgresQuotaCounter",
    "QuotaCounter",
    "SqliteQuotaCounter",
    "open_counter",
    "refusal",
]


#: One call's admission: (clerk, the citizen of each lookup in order, the quotas, now).
Admission = tuple[str, Sequence[str], Sequence[Quota], float]


class QuotaCounter(Protocol):
    """Where admitted lookups are counted (a broker's SQLite file, or the cluster's PostgreSQL)."""

    def admit(
        self, clerk: str, subjects: Sequence[str], quotas: Sequence[Quota], now: float
    ) -> list[Quota | None]:
        """Admit lookups of ``clerk`` at ``now`` (POSIX seconds), one per entry of ``subjects``
        (the citizen each is about), in order, under ``quotas``; for each, None when admitted
        (and counted) or the first quota it would exceed (not counted). One transaction: the
        counts a later call sees include every admission of this one."""
        ...

    def admit_many(self, calls: Sequence[Admission]) -> list[list[Quota | None]]:
        """:meth:`admit` for several calls, one after the other in ONE transaction (each sees
        the admissions of those before it): what concurrent lookups share, so that a burst
        pays for one commit."""
        ...

    def close(self) -> None: ...


_TABLES = (
    "CREATE TABLE IF NOT EXISTS quota_subjects (clerk TEXT NOT NULL, subject TEXT NOT NULL,"
    " last_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (clerk, subject))",
    "CREATE INDEX IF NOT EXISTS quota_subjects_at ON quota_subjects (clerk, last_at)",
    "CREATE TABLE IF NOT EXISTS quota_lookups (clerk TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,"
    " n BIGINT NOT NULL, cum BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS quota_lookups_at ON quota_lookups (clerk, at, cum)",
)

#: ``execute(sql with ? placeholders, parameters) -> rows``, inside the caller's transaction.
Execute = Callable[[str, Sequence[Any]], list[Any]]


def _admit(
    execute: Execute, clerk: str, subjects: Sequence[str], quotas: Sequence[Quota], now: float
) -> list[Quota | None]:
    """The counting itself, the same on both stores (see the module docstring)."""
    horizon = now - MAX_PER_S
    execute("DELETE FROM quota_lookups WHERE clerk = ? AND at <= ?", (clerk, horizon))
    execute("DELETE FROM quota_subjects WHERE clerk = ? AND last_at <= ?", (clerk, horizon))
    counts: dict[str, int] = {}  # quota id -> its count in its window, this call's admissions in
    last_at, total = _latest(execute, clerk)

    def count(quota: Quota) -> int:
        if quota.id not in counts:
            cutoff = now - quota.per_s
            if quota.kind == "distinct_subjects":
                sql = "SELECT COUNT(*) FROM quota_subjects WHERE clerk = ? AND last_at > ?"
                counts[quota.id] = int(execute(sql, (clerk, cutoff))[0][0])
            else:
                counts[quota.id] = total - _total_at(execute, clerk, cutoff)
        return counts[quota.id]

    seen: dict[str, float | None] = {}  # citizen -> last admitted lookup by this clerk
    verdicts: list[Quota | None] = []
    admitted = 0
    for subject in subjects:
        if subject not in seen:
            rows = execute(
                "SELECT last_at FROM quota_subjects WHERE clerk = ? AND subject = ?",
                (clerk, subject),
            )
            seen[subject] = float(rows[0][0]) if rows else None
        last = seen[subject]
        # A quota a lookup adds to: every `lookups` quota; a `distinct_subjects` quota unless
        # the citizen was already looked up within its window.
        adds = [q for q in quotas if q.kind == "lookups" or last is None or last <= now - q.per_s]
        refused = next((q for q in adds if count(q) + 1 > q.limit), None)
        verdicts.append(refused)
        if refused is None:
            for quota in adds:
                counts[quota.id] = count(quota) + 1
            seen[subject] = now
            admitted += 1
    for subject, last in seen.items():
        if last == now:
            execute(
                "INSERT INTO quota_subjects (clerk, subject, last_at) VALUES (?, ?, ?)"
                " ON CONFLICT (clerk, subject) DO UPDATE SET last_at = excluded.last_at",
                (clerk, subject, now),
            )
    if admitted:
        execute(
            "INSERT INTO quota_lookups (clerk, at, n, cum) VALUES (?, ?, ?, ?)",
            (clerk, max(now, last_at), admitted, total + admitted),
        )
    return verdicts


def _latest(execute: Execute, clerk: str) -> tuple[float, int]:
    """The clerk's last row: its time and the running total of admitted lookups (0s: none)."""
    rows = execute(
        "SELECT at, cum FROM quota_lookups WHERE clerk = ? ORDER BY at DESC, cum DESC LIMIT 1",
        (clerk,),
    )
    return (float(rows[0][0]), int(rows[0][1])) if rows else (float("-inf"), 0)


def _total_at(execute: Execute, clerk: str, cutoff: float) -> int:
    """The clerk's running total at ``cutoff`` (the lookups admitted at or before it)."""
    rows = execute(
        "SELECT cum FROM quota_lookups WHERE clerk = ? AND at <= ?"
        " ORDER BY at DESC, cum DESC LIMIT 1",
        (clerk, cutoff),
    )
    if rows:
        return int(rows[0][0])
    # Every row is inside the window (older ones were deleted): the total before the first.
    rows = execute(
        "SELECT cum - n FROM quota_lookups WHERE clerk = ? ORDER BY at, cum LIMIT 1", (clerk,)
    )
    return int(rows[0][0]) if rows else 0


class SqliteQuotaCounter:
    """The counts of one broker in an SQLite file (shared by its worker processes), or in
    memory (``":memory:"``, for policy tests)."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 10.0) -> None:
        if isinstance(path, Path):
            path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, serialized by a lock: admissions run on worker threads.
        self._db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s
        )
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # Survives a crash of the process (WAL); a power cut may lose the last admissions,
            # which errs toward the clerk by at most those: counts are not the audit log.
            self._db.execute("PRAGMA synchronous=NORMAL")
            for statement in _TABLES:
                self._db.execute(statement)

    def admit(
        self, clerk: str, subjects: Sequence[str], quotas: Sequence[Quota], now: float
    ) -> list[Quota | None]:
        return self.admit_many([(clerk, subjects, quotas, now)])[0]

    def admit_many(self, calls: Sequence[Admission]) -> list[list[Quota | None]]:
        def execute(sql: str, parameters: Sequence[Any]) -> list[Any]:
            return self._db.execute(sql, parameters).fetchall()

        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")  # the write lock first: no lost update
            except sqlite3.Error as exc:
                raise _unavailable() from exc
            try:
                verdicts = [_admit(execute, *call) for call in calls]
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return verdicts

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresQuotaCounter:
    """The counts of every broker sharing one PostgreSQL (tables in the audit schema)."""

    def __init__(self, location: PostgresLocation, *, connect_timeout_s: int = 10) -> None:
        self._location = location
        self._timeout = connect_timeout_s
        self._lock = threading.Lock()
        self._conn: Any = None
        with self._lock:
            conn = self._connection()
            # Created by the first broker (the schema's owner, as for the audit tables); a
            # limited role later only needs SELECT, INSERT, UPDATE, DELETE on the two tables.
            found = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", [f"{location.schema}.quota_lookups"]
            ).fetchone()[0]
            if not found:
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {location.schema}")
                for statement in _TABLES:
                    conn.execute(statement)
            conn.commit()

    def _connection(self) -> Any:
        """The open connection, reconnecting after a failure (a restarted server)."""
        import psycopg

        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(
                    self._location.dsn, autocommit=False, connect_timeout=self._timeout
                )
                # The schema name is checked at configuration (lowercase, digits, _).
                self._conn.execute(f"SET search_path TO {self._location.schema}")
                self._conn.commit()
            except psycopg.Error as exc:
                self._conn = None
                raise _unavailable() from exc
        return self._conn

    def admit(
        self, clerk: str, subjects: Sequence[str], quotas: Sequence[Quota], now: float
    ) -> list[Quota | None]:
        return self.admit_many([(clerk, subjects, quotas, now)])[0]

    def admit_many(self, calls: Sequence[Admission]) -> list[list[Quota | None]]:
        import psycopg

        with self._lock:
            conn = self._connection()

            def execute(sql: str, parameters: Sequence[Any]) -> list[Any]:
                cursor = conn.execute(sql.replace("?", "%s"), list(parameters))
                return cursor.fetchall() if cursor.description else []

            try:
                # One clerk's admissions queue behind each other on every broker; other
                # clerks' do not wait. Taken in sorted order (no deadlock between brokers
                # batching the same clerks); released at commit or rollback.
                for clerk in sorted({call[0] for call in calls}):
                    conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtextextended(%s, 7110))", [clerk]
                    )
                verdicts = [_admit(execute, *call) for call in calls]
                conn.commit()
            except psycopg.Error as exc:
                try:
                    conn.rollback()
                except psycopg.Error:
                    conn.close()
                raise _unavailable() from exc
        return verdicts

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()


def open_counter(audit_location: AuditLocation, state_dir: Path) -> QuotaCounter:
    """A broker's counter: in its audit log's PostgreSQL when it has one (shared by every broker
    of the cluster), else ``<state_dir>/quotas.sqlite`` (shared by its worker processes)."""
    if isinstance(audit_location, PostgresLocation):
        return PostgresQuotaCounter(audit_location)
    return SqliteQuotaCounter(state_dir / "quotas.sqlite")


def _unavailable() -> Unavailable:
    return Unavailable(QUOTA_UNAVAILABLE, "the quota counters cannot be reached")


def refusal(policy: PolicySet, decision: Decision, quota: Quota) -> Decision:
    """``decision`` (an allow) turned into the denial a lookup past ``quota`` gets: it names the
    quota where a policy denial names its rule, releases nothing, and withholds what the allow
    would have released (catalogue order)."""
    withheld = {*decision.fields, *decision.withheld}
    return dataclasses.replace(
        decision,
        allowed=False,
        rule_id=quota.id,
        reason=f"quota {quota.id} reached: {quota.describe()} per clerk",
        condition=QUOTA_EXCEEDED,
        fields=(),
        withheld=tuple(
            f for f in policy.record_types[decision.record_type].fields if f in withheld
        ),
        masks={},
    )
