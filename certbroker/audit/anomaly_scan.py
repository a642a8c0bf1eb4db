"""The anomaly findings of a time range, counted by the database where it can.

:func:`certbroker.audit.lookups.read_lookups` + :func:`certbroker.audit.anomalies.find_lookups`
bring every lookup of the range into Python (one record each) and count there: about 125 ms of
one CPU for a day of 20,000 lookups, above the 100 ms an auditor's screen may take. Here, for
the version 2 rows (``audit_entries``), the counting rules run as SQL over the range, a few
statements on one snapshot:

- one statement grouped by clerk and office reads each lookup of the range once: the
  ``NO_CASE_NUMBER`` sequences, the lookup, denial and quota-refusal counts per clerk;
- ``OUTSIDE_HOURS``: the offices seen get their opening windows
  (:func:`~certbroker.audit.anomalies.office_hours`, from the policy in force) and only the
  lookups outside them are read: over a bounded range the gaps between the opening intervals
  are ranges of the time index;
- ``MANY_SUBJECTS`` and ``REPEATED_SUBJECT``: distinct citizens counted for the clerks with
  enough lookups; ``GROUP BY`` clerk and citizen with the threshold in ``HAVING`` over the
  citizens seen often enough, on a second reader at the same time;
- ``DENIAL_BURST`` and ``QUOTA_EXCEEDED`` read the few entries of the clerks that can fire,
  through the clerk index, and the rules of :mod:`certbroker.audit.anomalies` run on them
  unchanged.

The findings are the same as the Python rules' (a test compares them on logs where every rule
fires). A range holding version 1 rows (the oldest entries of a log that predates format 2), an
opening window whose UTC offset is not whole milliseconds, or thresholds below 1 take the
Python path; so do the disputes (``citizen`` entries, few), read by
:func:`~certbroker.audit.scan.scan`.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Final

from certbroker.audit import anomalies
from certbroker.audit.anomalies import Finding, Lookup, Thresholds
from certbroker.audit.events import AuditEntry, iso_time
from certbroker.audit.lookups import lookup_rows, read_lookups
from certbroker.audit.scan import Criteria, compact_where, log_sql, scan
from certbroker.audit.store import compact
from certbroker.audit.store.base import Connection
from certbroker.audit.store.db import backend_for
from certbroker.audit.store.rows import has_compact
from certbroker.config import AuditLocation
from certbroker.policy.model import Hours, PolicySet

_DAY_MS: Final = 86_400_000
#: Added to local times before dividing, so that integer division is floor division for any
#: time a log can hold; a whole number of weeks, so the weekday is unchanged.
_SHIFT_MS: Final = 7 * _DAY_MS * 1_000_000
#: 1970-01-01, day 0 of the epoch, was a Thursday (``datetime.weekday()`` 3).
_EPOCH_WEEKDAY: Final = 3
_MS: Final = timedelta(milliseconds=1)
#: Per log (its reader :class:`~certbroker.audit.store.compact.Terms`) and policy, each office
#: term's opening windows (:func:`_Counted._office_hours`).
_HOURS: weakref.WeakKeyDictionary[
    compact.Terms, dict[tuple[str, tuple[Hours, ...]], dict[int, tuple[Hours, ...]]]
] = weakref.WeakKeyDictionary()


def find_in_store(
    db: AuditLocation,
    policy: PolicySet,
    thresholds: Thresholds | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    before: int = 0,
) -> list[Finding]:
    """The findings of :func:`certbroker.audit.anomalies.find_lookups` over the lookups (and
    the disputes) with ``since <= time < until`` and a sequence below ``before`` (0: any), in
    the same order. Read-only.

    Raises ``FileNotFoundError`` if there is no log yet and ``ValueError`` for a malformed
    entry (run ``audit verify``).
    """
    limits = thresholds or Thresholds()
    criteria = Criteria(kinds=("lookup",), since=since, until=until, before=before)
    disputes = scan(db, replace(criteria, kinds=("citizen",)))
    backend = backend_for(db)
    with closing(backend.connect_read()) as conn:
        backend.snapshot(conn)
        if _countable(conn, criteria, policy, limits):
            # The grouping per citizen (REPEATED_SUBJECT) runs at the same time on a reader
            # of its own (in its own thread: a SQLite connection stays in the thread that
            # made it); both databases work without the GIL. The range is a committed,
            # append-only prefix bounded by `until` and `before` (the Audit service sets it
            # to its call's own entry), so both readers see the same rows.
            def repeated() -> list[Finding]:
                with closing(backend.connect_read()) as other:
                    backend.snapshot(other)
                    return _Counted(other, criteria, policy, limits).repeated_subject()

            with ThreadPoolExecutor(1, thread_name_prefix="anomaly-scan") as pool:
                side = pool.submit(repeated)
                return _Counted(conn, criteria, policy, limits).findings(disputes, side.result)
    lookups = read_lookups(db, since=since, until=until, before=before)
    return anomalies.find_lookups(lookups, policy, limits, citizen=disputes)


def _countable(conn: Connection, criteria: Criteria, policy: PolicySet, limits: Thresholds) -> bool:
    """Whether the SQL path gives the Python rules' answer for this range."""
    if min(limits.many_subjects, limits.repeated_cases, limits.denial_burst) < 1:
        return False
    hours = [*limits.default_hours, *(h for rule in policy.rules for h in rule.conditions.hours)]
    if any(h.utc_offset % _MS for h in hours):
        return False
    if not has_compact(conn):
        return False
    sql, params = log_sql(criteria)
    return conn.execute(f"SELECT 1 FROM ({sql}) AS v1 LIMIT 1", params).fetchone() is None  # noqa: S608


def _ids(values: object, *, what: str) -> list[int]:
    """The integers of a ``group_concat`` / ``string_agg`` text."""
    if not isinstance(values, str):
        raise ValueError(f"audit entries' {what} are malformed; run verify")
    return list(map(int, values.split(",")))


class _Counted:
    """One range's counting, on one reader connection and snapshot."""

    def __init__(
        self, conn: Connection, criteria: Criteria, policy: PolicySet, limits: Thresholds
    ) -> None:
        self._conn = conn
        self._policy = policy
        self._limits = limits
        self._terms = compact.reader_terms(conn)
        self._kind = self._terms.find(conn, "lookup")
        clauses, self._values = compact_where(criteria, {})
        since, until = (
            None if bound is None else compact.time_ms(iso_time(bound))
            for bound in (criteria.since, criteria.until)
        )
        self._span = None if since is None or until is None else (since, until)
        self._where = " AND ".join(clauses)
        # The same range for a read that names narrower ranges of time (_outside_hours).
        self._where_narrowed = " AND ".join(compact_where(criteria, {}, time_index=False)[0])
        # What the reads of a few clerks add, so that they search the clerk index (on SQLite
        # keyed by the day first), not the whole range.
        self._by_clerk = conn.backend.day_clause(conn, since, until) or ("1 = 1", [])

    def _name(self, term_id: object) -> str:
        return self._terms.term(self._conn, term_id)

    def _concat(self, expr: str) -> str:
        return self._conn.backend.text_agg(expr)

    def findings(
        self, disputes: Sequence[AuditEntry], repeated: Callable[[], list[Finding]]
    ) -> list[Finding]:
        """The findings in :func:`~certbroker.audit.anomalies.find_lookups`' order, with
        ``repeated()`` giving :meth:`repeated_subject`'s."""
        if self._kind is None:  # no version 2 entry is a lookup
            return anomalies.find_lookups([], self._policy, self._limits, citizen=disputes)
        deny = self._terms.find(self._conn, "deny")
        missing, late, many, denying, refused = self._per_clerk(deny)
        few = self._few(deny, denying, refused)
        return [
            *missing,
            *late,
            *many,
            *repeated(),
            *anomalies.denial_bursts(few, self._limits),
            *anomalies.citizen_disputes(disputes),
            *anomalies.quota_refusals(few),
        ]

    # -- the range, as a subquery --------------------------------------------------------------

    def _lookups(self, condition: str = "", *, narrowed: bool = False) -> tuple[str, list[object]]:
        """The ``WHERE`` conditions of the range's lookups (``AND condition``: trusted SQL
        over the columns of ``audit_entries``), with their values; ``narrowed``: the condition
        has the ranges of time to search."""
        where = self._where_narrowed if narrowed else self._where
        where += " AND kind = ?" + (f" AND ({condition})" if condition else "")
        return where, [*self._values, self._kind]

    def _day(
        self, columns: Iterable[str], condition: str = "", *, narrowed: bool = False
    ) -> tuple[str, list[object]]:
        """``SELECT columns FROM`` the range's lookups (:meth:`_lookups`), with its values."""
        where, values = self._lookups(condition, narrowed=narrowed)
        # Every name is fixed in this module; every value is a bound parameter.
        return f"SELECT {', '.join(columns)} FROM audit_entries WHERE {where}", values  # noqa: S608

    # -- the rules that read few entries: records, the Python rules --------------------------

    def _few(
        self, deny: int | None, denying: Sequence[int], refused: Sequence[int]
    ) -> list[Lookup]:
        """The denied lookups of the clerks ``denying``, and the lookups refused past a quota
        (by the clerks ``refused``): found through the clerk index."""
        quota = self._terms.find(self._conn, anomalies.QUOTA_EXCEEDED)
        parts: list[str] = []
        chosen: list[object] = []
        if deny is not None and denying:
            parts.append(f"(decision = ? AND clerk IN ({_list(denying)}))")
            chosen.append(deny)
        if quota is not None and refused:
            parts.append("outcome = ?")
            chosen.append(quota)
        if not parts:
            return []
        days, more = self._by_clerk
        clerks = _list({*denying, *refused})
        where, values = self._lookups(f"{days} AND clerk IN ({clerks}) AND ({' OR '.join(parts)})")
        return lookup_rows(self._conn, self._terms, where, [*values, *more, *chosen])

    # -- the counting rules: SQL --------------------------------------------------------------

    def _per_clerk(
        self, deny: int | None
    ) -> tuple[list[Finding], list[Finding], list[Finding], list[int], list[int]]:
        """``NO_CASE_NUMBER``, ``OUTSIDE_HOURS`` and ``MANY_SUBJECTS``, the clerks with
        enough denials for a ``DENIAL_BURST`` and those refused past a quota: one statement
        grouped by clerk and office (a clerk works at one office or a few), then the lookups
        outside each office's hours."""
        # On SQLite, whose columns hold any type, also whether a row has a value of the wrong
        # type (the Python path checks each record it builds).
        check = (
            "0"
            if self._conn.backend.typed_columns
            else "max(typeof(time) <> 'integer' OR typeof(subject_id) <> 'text' "
            "OR typeof(case_number) <> 'text')"
        )
        quota = self._terms.find(self._conn, anomalies.QUOTA_EXCEEDED)
        sql, values = self._day(
            [
                "clerk",
                "office",
                "count(*)",
                self._concat("CASE WHEN case_number = '' THEN seq END"),
                "count(CASE WHEN decision = ? THEN 1 END)",
                "count(CASE WHEN outcome = ? THEN 1 END)",
                check,
            ]
        )
        values = [-1 if deny is None else deny, -1 if quota is None else quota, *values]
        rows = self._conn.execute(sql + " GROUP BY clerk, office", values).fetchall()
        counts: dict[int, int] = defaultdict(int)
        uncased: dict[int, list[int]] = defaultdict(list)
        denied: dict[int, int] = defaultdict(int)
        refused: set[int] = set()
        offices: dict[int, set[int]] = defaultdict(set)
        for clerk, office, count, no_case, denials, quotas, malformed in rows:
            if malformed:
                raise ValueError("an audit entry of the range is malformed; run verify")
            counts[clerk] += int(count)
            denied[clerk] += int(denials)
            if quotas:
                refused.add(int(clerk))
            offices[int(office)].add(clerk)
            if no_case is not None:
                uncased[clerk].extend(_ids(no_case, what="sequences"))
        late = self._outside_hours(offices)
        limit = self._limits.many_subjects
        subjects = self._subjects([clerk for clerk, count in counts.items() if count >= limit])
        missing, outside, many = [], [], []
        for clerk, seqs in uncased.items():
            text = f"{len(seqs)} lookup(s) without a case number"
            missing.append(
                Finding(anomalies.NO_CASE_NUMBER, self._name(clerk), text, _sorted(seqs))
            )
        for clerk, (late_seqs, places) in late.items():
            where = ", ".join(sorted({self._name(o) for o in places}))
            text = f"{len(late_seqs)} lookup(s) outside the opening hours of {where}"
            found = _sorted(late_seqs)
            outside.append(Finding(anomalies.OUTSIDE_HOURS, self._name(clerk), text, found))
        for clerk, distinct in subjects.items():
            if distinct >= limit:
                text = f"{distinct} distinct citizens looked up (threshold {limit})"
                found = self._sequences_of(clerk)
                many.append(Finding(anomalies.MANY_SUBJECTS, self._name(clerk), text, found))
        # A burst needs that many denied calls, so at least that many denied entries.
        denying = [int(c) for c, n in denied.items() if n >= self._limits.denial_burst]
        by_clerk = lambda finding: finding.clerk  # noqa: E731
        return (
            sorted(missing, key=by_clerk),
            sorted(outside, key=by_clerk),
            sorted(many, key=by_clerk),
            denying,
            sorted(refused),
        )

    def _outside_hours(self, offices: dict[int, set[int]]) -> dict[int, tuple[list[int], set[int]]]:
        """Per clerk, the lookups outside their office's opening windows and those offices:
        the offices (with the clerks seen there) grouped by their windows, then per group of
        offices one read of the range's times outside the windows only (a bounded range: a
        few intervals of the time index, not the whole range)."""
        hours = self._office_hours()
        by_windows: dict[tuple[Hours, ...], list[int]] = defaultdict(list)
        for office in offices:
            if office not in hours:
                name = self._name(office)
                hours[office] = anomalies.office_hours(
                    self._policy, name, self._limits.default_hours
                )
            if hours[office]:  # else open around the clock
                by_windows[hours[office]].append(office)
        late: dict[int, tuple[list[int], set[int]]] = {}
        for windows, ids in by_windows.items():
            gaps = _gaps(windows, self._span)
            outside = f"NOT ({_inside(windows, self._span)})" if gaps is None else gaps
            sql, values = self._day(
                ["clerk", "office", "seq"],
                f"({outside}) AND office IN ({_list(ids)})",
                narrowed=gaps is not None,
            )
            for clerk, office, seq in self._conn.execute(sql, values):
                seqs, places = late.setdefault(clerk, ([], set()))
                seqs.append(int(seq))
                places.add(int(office))
        return late

    def _subjects(self, clerks: Sequence[int]) -> dict[int, int]:
        """How many distinct citizens each of ``clerks`` looked up in the range."""
        if not clerks:
            return {}
        days, more = self._by_clerk
        sql, values = self._day(
            ["clerk", "count(DISTINCT NULLIF(subject_id, ''))"],
            f"{days} AND clerk IN ({_list(clerks)})",
        )
        found = self._conn.execute(sql + " GROUP BY clerk", [*values, *more])
        return {int(c): int(n) for c, n in found}

    def _sequences_of(self, clerk: object) -> tuple[int, ...]:
        """Every lookup of ``clerk`` in the range (a clerk with a finding: few)."""
        days, more = self._by_clerk
        sql, values = self._day(["seq"], f"{days} AND clerk = ?")
        found = self._conn.execute(sql, [*values, *more, clerk])
        return tuple(sorted(int(seq) for (seq,) in found))

    def _office_hours(self) -> dict[int, tuple[Hours, ...]]:
        """Opening windows per office term id, as far as known (shared by the reads of one
        log under one policy: offices are few and their terms never change)."""
        per_log = _HOURS.setdefault(self._terms, {})
        key = (self._policy.version, self._limits.default_hours)
        if key not in per_log:
            per_log.clear()  # one policy at a time
        return per_log.setdefault(key, {})

    def repeated_subject(self) -> list[Finding]:
        """``REPEATED_SUBJECT``: the (clerk, citizen) pairs over enough case numbers."""
        limit = self._limits.repeated_cases
        cased = "case_number <> '' AND subject_id <> ''"
        # Most citizens of a day are looked up once or twice: only those looked up at least
        # `limit` times with a case number can fire, so they are found first (a cheap count)
        # and only their lookups are grouped per clerk with a distinct count.
        often, values = self._day(["subject_id"], cased)
        often += " GROUP BY subject_id HAVING count(*) >= ?"
        sql, more = self._day(
            ["clerk", "subject_id", "count(DISTINCT case_number)", self._concat("seq")],
            f"{cased} AND subject_id IN ({often})",
        )
        having = " GROUP BY clerk, subject_id HAVING count(DISTINCT case_number) >= ?"
        firing = []
        found_rows = self._conn.execute(sql + having, [*more, *values, limit, limit])
        for clerk, subject, cases, seqs in found_rows:
            text = f"citizen {subject} looked up under {cases} different case numbers"
            found = tuple(sorted(_ids(seqs, what="sequences")))
            name = self._name(clerk)
            firing.append(
                ((name, str(subject)), Finding(anomalies.REPEATED_SUBJECT, name, text, found))
            )
        # The Python rule's order: by clerk, then citizen.
        return [finding for _, finding in sorted(firing, key=lambda item: item[0])]


def _list(ids: Iterable[int]) -> str:
    """SQL list of integers (``ids`` not empty)."""
    return ", ".join(str(int(i)) for i in ids)


def _sorted(ids: Iterable[int]) -> tuple[int, ...]:
    return tuple(sorted(ids))


def _gaps(hours: Sequence[Hours], span: tuple[int, int] | None) -> str | None:
    """SQL true when ``time`` (epoch ms) is outside the windows ``hours``, over a short
    ``span``: the gaps between its opening intervals, as ranges of ``time`` the index finds
    (after hours are few lookups); None when the span is unbounded or long."""
    if span is None:
        return None
    intervals = _intervals(hours, *span)
    if intervals is None:
        return None
    gaps, start = [], span[0]
    for a, b in [*intervals, (span[1], span[1])]:
        if a > start:
            gaps.append(f"(time >= {start} AND time < {a})")
        start = max(start, b)
    return " OR ".join(gaps) or "1 = 0"


#: A range with more opening intervals than this (weeks) tests the windows arithmetically.
_MAX_INTERVALS: Final = 64


def _inside(hours: Sequence[Hours], span: tuple[int, int] | None) -> str:
    """SQL true when ``time`` (epoch ms) is inside any of the windows :meth:`Hours.contains`
    accepts: its weekday is one of ``days`` and its local time of day is in
    ``[start_min, end_min)``. Over a short ``span`` (an auditor's day) that is a few
    intervals of ``time`` (two comparisons each); else weekday and time of day are computed."""
    if span is not None:
        intervals = _intervals(hours, *span)
        if intervals is not None:
            found = " OR ".join(f"(time >= {a} AND time < {b})" for a, b in intervals)
            return found or "1 = 0"
    parts = []
    for window in hours:
        if not window.days:
            continue
        local = f"(time + {window.utc_offset // _MS + _SHIFT_MS})"
        weekday = f"(({local} / {_DAY_MS} + {_EPOCH_WEEKDAY}) % 7)"
        of_day = f"({local} % {_DAY_MS})"
        days = ", ".join(str(int(d)) for d in window.days)
        parts.append(
            f"({weekday} IN ({days}) AND {of_day} >= {window.start_min * 60_000} "
            f"AND {of_day} < {window.end_min * 60_000})"
        )
    return " OR ".join(parts) if parts else "1 = 0"


def _intervals(hours: Sequence[Hours], since: int, until: int) -> list[tuple[int, int]] | None:
    """The windows' opening times within ``[since, until)`` as merged ``[a, b)`` epoch-ms
    intervals; None when there are more than :data:`_MAX_INTERVALS`."""
    found: list[tuple[int, int]] = []
    for window in hours:
        offset = window.utc_offset // _MS
        if window.end_min <= window.start_min:
            continue  # an empty window (contains() is never true)
        # Every local day that can overlap the span: the local day of `since` (one before,
        # for offsets ahead of UTC) to that of `until`.
        first = (since + offset) // _DAY_MS - 1
        last = (until + offset) // _DAY_MS + 1
        if (last - first) * len(window.days) > 2 * _MAX_INTERVALS:
            return None
        for day in range(first, last + 1):
            if (day + _EPOCH_WEEKDAY) % 7 not in window.days:
                continue
            midnight = day * _DAY_MS - offset  # the local midnight, in UTC epoch ms
            a = max(since, midnight + window.start_min * 60_000)
            b = min(until, midnight + window.end_min * 60_000)
            if a < b:
                found.append((a, b))
    merged: list[tuple[int, int]] = []
    for a, b in sorted(found):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged if len(merged) <= _MAX_INTERVALS else None
