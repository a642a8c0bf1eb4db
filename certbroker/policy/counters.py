"""Counting what quotas limit (:mod:`certbroker.policy.quota`): a :class:`QuotaCounter` decides
and records admissions in one step, so a check can never be raced past its limit.

Three counters, picked by :func:`open_counter` (the one place that chooses):

* :class:`MemoryQuotaCounter`: a broker that is one process with no PostgreSQL (the common
  deployment). The same semantics in this process's memory, checked inline on the event loop
  (no thread hop, no I/O): a few µs per call. Counts do not survive a restart of the broker
  (controls do; see docs/design.md, "Quotas").

Two stores hold the counts of brokers that are several processes, with the same tables and the
same statements (:func:`_admit`; one transaction per :meth:`QuotaCounter.admit_many`, which the
broker feeds with the admissions that queued meanwhile, :mod:`certbroker.lookup.admission`):

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

import bisect
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
    "MemoryQuotaCounter",
    "PostgresQuotaCounter",
    "QuotaCounter",
    "SqliteQuotaCounter",
    "open_counter",
    "refusal",
]


#: One call's admission: (clerk, the citizen of each lookup in order, the quotas, now).
Admission = tuple[str, Sequence[str], Sequence[Quota], float]


class QuotaCounter(Protocol):
    """Where admitted lookups are counted (this process's memory, a broker's SQLite file, or the
    cluster's PostgreSQL)."""

    #: True when :meth:`admit` never blocks (no I/O, no lock held for long): the broker calls
    #: it on the event loop itself instead of batching it onto a worker thread.
    inline: bool

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


def _decide(
    subjects: Sequence[str],
    quotas: Sequence[Quota],
    now: float,
    last_of: Callable[[str], float | None],
    count_of: Callable[[Quota], int],
) -> tuple[list[Quota | None], list[str], int]:
    """The decision every counter makes, whatever holds the counts: ``last_of(citizen)`` is the
    clerk's last admitted lookup of that citizen (None: none kept), ``count_of(quota)`` the
    quota's count in its window before this call. Returns the verdicts (None: admitted, else
    the first quota exceeded), the citizens admitted (in order) and how many lookups were."""
    counts: dict[str, int] = {}  # quota id -> its count in its window, this call's admissions in

    def count(quota: Quota) -> int:
        if quota.id not in counts:
            counts[quota.id] = count_of(quota)
        return counts[quota.id]

    seen: dict[str, float | None] = {}  # citizen -> last admitted lookup by this clerk
    fresh: dict[str, None] = {}  # the citizens admitted by this call, in order
    verdicts: list[Quota | None] = []
    admitted = 0
    for subject in subjects:
        if subject not in seen:
            seen[subject] = last_of(subject)
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
            fresh[subject] = None
            admitted += 1
    return verdicts, list(fresh), admitted


def _admit(
    execute: Execute, clerk: str, subjects: Sequence[str], quotas: Sequence[Quota], now: float
) -> list[Quota | None]:
    """The counting itself, the same on both stores (see the module docstring)."""
    horizon = now - MAX_PER_S
    execute("DELETE FROM quota_lookups WHERE clerk = ? AND at <= ?", (clerk, horizon))
    execute("DELETE FROM quota_subjects WHERE clerk = ? AND last_at <= ?", (clerk, horizon))
    last_at, total = _latest(execute, clerk)

    def last_of(subject: str) -> float | None:
        sql = "SELECT last_at FROM quota_subjects WHERE clerk = ? AND subject = ?"
        rows = execute(sql, (clerk, subject))
        return float(rows[0][0]) if rows else None

    def count_of(quota: Quota) -> int:
        cutoff = now - quota.per_s
        if quota.kind == "distinct_subjects":
            sql = "SELECT COUNT(*) FROM quota_subjects WHERE clerk = ? AND last_at > ?"
            return int(execute(sql, (clerk, cutoff))[0][0])
        return total - _total_at(execute, clerk, cutoff)

    verdicts, fresh, admitted = _decide(subjects, quotas, now, last_of, count_of)
    for subject in fresh:
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


class _Clerk:
    """One clerk's admissions in a :class:`MemoryQuotaCounter` (the two tables' rows, in memory)."""

    __slots__ = ("at", "before", "cum", "first", "latest", "subjects")

    def __init__(self) -> None:
        # quota_lookups: one row per admitting call, ``at`` never decreasing, ``cum`` the running
        # total after it; rows before ``first`` are pruned (``before``: the total before
        # ``first``), compacted now and then.
        self.at: list[float] = []
        self.cum: list[int] = []
        self.first = 0
        self.before = 0
        # quota_subjects: citizen -> stamp of its last admitted lookup, oldest first (a citizen
        # admitted again moves to the end; stamps never decrease, so the order is the stamps').
        self.subjects: dict[str, float] = {}
        self.latest = float("-inf")  # the last stamp given (rows are never stamped earlier)

    def total(self) -> int:
        return self.cum[-1] if len(self.cum) > self.first else self.before

    def total_at(self, cutoff: float) -> int:
        """The running total at ``cutoff`` (lookups admitted at or before it)."""
        i = bisect.bisect_right(self.at, cutoff, lo=self.first)
        return self.cum[i - 1] if i > self.first else self.before

    def distinct_after(self, cutoff: float) -> int:
        """Citizens whose last admitted lookup is after ``cutoff`` (newest first, so at most the
        quota's limit of them are visited)."""
        n = 0
        for stamp in reversed(self.subjects.values()):
            if stamp <= cutoff:
                break
            n += 1
        return n

    def prune(self, lookups_s: int, subjects_s: int, now: float) -> None:
        """Forget rows no window of the quotas in force can reach: lookups older than the longest
        ``lookups`` window, citizens older than the longest ``distinct_subjects`` one."""
        i = bisect.bisect_right(self.at, now - lookups_s, lo=self.first)
        if i > self.first:
            self.before, self.first = self.cum[i - 1], i
            if i > 64 and i * 2 > len(self.at):  # compact: amortized O(1) per row
                del self.at[:i], self.cum[:i]
                self.first = 0
        horizon = now - subjects_s
        while self.subjects:
            subject, stamp = next(iter(self.subjects.items()))
            if stamp > horizon:
                break
            del self.subjects[subject]


class MemoryQuotaCounter:
    """The counts of a broker that is ONE process, in its memory: the stores' semantics
    (:func:`_decide`) without SQL, cheap enough to run inline on the event loop.

    Exact for that process (every admission passes here, under one lock). Bounded: each call
    first forgets what the quotas in force can no longer see (a clerk's lookups older than its
    longest ``lookups`` window, its citizens older than its longest ``distinct_subjects``
    window), so a clerk holds at most about its largest limit of rows; clerks idle for a day
    are dropped by a sweep once a minute. Two differences from the stores, both documented in
    docs/design.md ("Quotas"): counts are lost when the process ends, and after a policy reload
    that lengthens a window (or adds a quota kind) the earlier admissions are known only as far
    back as the previous windows reached. Rows are stamped no earlier than the clerk's last
    (a clock stepping back delays a row's leaving its window, as in the stores).
    """

    inline = True
    #: How often (in the callers' clock) idle clerks are swept.
    SWEEP_S = 60.0

    def __init__(self) -> None:
        self._clerks: dict[str, _Clerk] = {}
        self._lock = threading.Lock()  # admissions come from the event loop; policy tests too
        self._next_sweep = float("-inf")

    def __len__(self) -> int:
        """Clerks held (for tests and metrics)."""
        return len(self._clerks)

    def admit(
        self, clerk: str, subjects: Sequence[str], quotas: Sequence[Quota], now: float
    ) -> list[Quota | None]:
        with self._lock:
            return self._admit(clerk, subjects, quotas, now)

    def admit_many(self, calls: Sequence[Admission]) -> list[list[Quota | None]]:
        with self._lock:
            return [self._admit(*call) for call in calls]

    def close(self) -> None:
        with self._lock:
            self._clerks.clear()

    def _admit(
        self, clerk: str, subjects: Sequence[str], quotas: Sequence[Quota], now: float
    ) -> list[Quota | None]:
        if now >= self._next_sweep:
            self._sweep(now)
        state = self._clerks.get(clerk)
        if state is None:
            state = self._clerks[clerk] = _Clerk()
        distinct_s = max((q.per_s for q in quotas if q.kind == "distinct_subjects"), default=0)
        state.prune(
            max((q.per_s for q in quotas if q.kind == "lookups"), default=0), distinct_s, now
        )
        total = state.total()

        def count_of(quota: Quota) -> int:
            cutoff = now - quota.per_s
            if quota.kind == "distinct_subjects":
                return state.distinct_after(cutoff)
            return total - state.total_at(cutoff)

        verdicts, fresh, admitted = _decide(subjects, quotas, now, state.subjects.get, count_of)
        if admitted:
            stamp = state.latest = max(now, state.latest)
            for subject in fresh if distinct_s else ():  # citizens: only if a quota counts them
                state.subjects.pop(subject, None)  # to the end: the newest
                state.subjects[subject] = stamp
            state.at.append(stamp)
            state.cum.append(total + admitted)
        return verdicts

    def _sweep(self, now: float) -> None:
        """Drop clerks with nothing admitted for a day (no window is longer)."""
        horizon = now - MAX_PER_S
        for clerk in [c for c, state in self._clerks.items() if state.latest <= horizon]:
            del self._clerks[clerk]
        self._next_sweep = now + self.SWEEP_S


class SqliteQuotaCounter:
    """The counts of one broker in an SQLite file (shared by its worker processes), or in
    memory (``":memory:"``, for policy tests)."""

    inline = False

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

    inline = False

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


def open_counter(audit_location: AuditLocation, state_dir: Path, *, workers: int) -> QuotaCounter:
    """A broker's counter: in its audit log's PostgreSQL when it has one (shared by every broker
    of the cluster); else, for ``workers`` > 1 processes (``serve --workers N``),
    ``<state_dir>/quotas.sqlite`` (shared by them); else (one process) in memory, exact and
    checked inline, forgotten at a restart -- the one choice that drops persistence, made here
    only (docs/design.md, "Quotas")."""
    if isinstance(audit_location, PostgresLocation):
        return PostgresQuotaCounter(audit_location)
    if workers > 1:
        return SqliteQuotaCounter(state_dir / "quotas.sqlite")
    return MemoryQuotaCounter()


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
