"""The anomaly findings of a time range, counted by the database where it can.

:func:`certbroker.audit.lookups.read_lookups` + :func:`certbroker.audit.anomalies.find_lookups`
bring every lookup of the range into Python (one record each) and count there: about 125 ms of
one CPU for a day of 20,000 lookups, above the 100 ms an auditor's screen may take. Here, for
the version 2 rows (``audit_entries``), the counting rules run as SQL over the range, a few
statements on one snapshot:

- ``OUTSIDE_HOURS``: each office's opening windows
  (:func:`~certbroker.audit.anomalies.office_hours`, from the policy in force) become a
  condition on the entry's time, so only the sequences of the lookups outside them come back,
  grouped per clerk;
- ``MANY_SUBJECTS`` and ``REPEATED_SUBJECT``: ``GROUP BY`` clerk (and citizen) with the
  thresholds in ``HAVING``; only the groups that fire come back;
- ``NO_CASE_NUMBER``, ``DENIAL_BURST`` and ``QUOTA_EXCEEDED`` read few entries (no case number,
  denied, refused past a quota): those come back as records and the rules of
  :mod:`certbroker.audit.anomalies` run on them unchanged.

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
        self._span = (
            None
            if criteria.since is None or criteria.until is None
            else (
                compact.time_ms(iso_time(criteria.since)),
                compact.time_ms(iso_time(criteria.until)),
            )
        )
        self._where = " AND ".join(clauses)

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
        missing, late, many, denying = self._per_clerk(deny)
        few = self._few(deny, denying)
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

    def _lookups(self, condition: str = "") -> tuple[str, list[object]]:
        """The ``WHERE`` conditions of the range's lookups (``AND condition``: trusted SQL
        over the columns of ``audit_entries``), with their values."""
        where = f"{self._where} AND kind = ?" + (f" AND ({condition})" if condition else "")
        return where, [*self._values, self._kind]

    def _day(self, columns: Iterable[str], condition: str = "") -> tuple[str, list[object]]:
        """``SELECT columns FROM`` the range's lookups (:meth:`_lookups`), with its values."""
        where, values = self._lookups(condition)
        # Every name is fixed in this module; every value is a bound parameter.
        return f"SELECT {', '.join(columns)} FROM audit_entries WHERE {where}", values  # noqa: S608

    # -- the rules that read few entries: records, the Python rules --------------------------

    def _few(self, deny: int | None, clerks: Sequence[int]) -> list[Lookup]:
        """The denied lookups of ``clerks``, and those refused past a quota."""
        quota = self._terms.find(self._conn, anomalies.QUOTA_EXCEEDED)
        parts: list[str] = []
        chosen: list[object] = []
        if deny is not None and clerks:
            parts.append(f"(decision = ? AND clerk IN ({_list(clerks)}))")
            chosen.append(deny)
        if quota is not None:
            parts.append("outcome = ?")
            chosen.append(quota)
        if not parts:
            return []
        where, values = self._lookups(" OR ".join(parts))
        return lookup_rows(self._conn, self._terms, where, [*values, *chosen])

    # -- the counting rules: SQL --------------------------------------------------------------

    def _per_clerk(
        self, deny: int | None
    ) -> tuple[list[Finding], list[Finding], list[Finding], list[int]]:
        """``NO_CASE_NUMBER``, ``OUTSIDE_HOURS`` and ``MANY_SUBJECTS``, and the clerks with
        enough denials for a ``DENIAL_BURST``: one statement grouped by clerk."""
        hours = self._office_hours()
        for _ in range(2):  # a second time only if the range has offices not seen before
            outside = _outside(hours, self._span)
            # On SQLite, whose columns hold any type, also whether a row has a value of the
            # wrong type (the Python path checks each record it builds).
            check = (
                "0"
                if self._conn.backend.typed_columns
                else "max(typeof(time) <> 'integer' OR typeof(subject_id) <> 'text' "
                "OR typeof(case_number) <> 'text')"
            )
            new = f"CASE WHEN office NOT IN ({_list(hours)}) THEN office END" if hours else "office"
            sql, values = self._day(
                [
                    "clerk",
                    "count(*)",
                    self._concat(f"CASE WHEN {outside} THEN seq END"),
                    # Not DISTINCT: a distinct aggregate sorts every group (PostgreSQL),
                    # where the plain ones hash; the few ids per clerk are made a set here,
                    # and distinct citizens are counted apart, for the clerks that could fire.
                    self._concat(f"CASE WHEN {outside} THEN office END"),
                    self._concat(new),
                    check,
                    self._concat("CASE WHEN case_number = '' THEN seq END"),
                    "count(CASE WHEN decision = ? THEN 1 END)",
                ]
            )
            values = [deny if deny is not None else -1, *values]
            rows = self._conn.execute(sql + " GROUP BY clerk", values).fetchall()
            unseen = {o for row in rows if row[4] is not None for o in _ids(row[4], what="offices")}
            if not unseen:
                break
            for office in unseen:
                name = self._name(office)
                hours[office] = anomalies.office_hours(
                    self._policy, name, self._limits.default_hours
                )
        limit = self._limits.many_subjects
        subjects = self._subjects([clerk for clerk, count, *_ in rows if count >= limit])
        missing, late, many, denying = [], [], [], []
        for clerk, _, seqs, offices, _, malformed, uncased, denied in rows:
            if malformed:
                raise ValueError("an audit entry of the range is malformed; run verify")
            name = self._name(clerk)
            if uncased is not None:
                found = tuple(sorted(_ids(uncased, what="sequences")))
                text = f"{len(found)} lookup(s) without a case number"
                missing.append(Finding(anomalies.NO_CASE_NUMBER, name, text, found))
            # A burst needs that many denied calls, so at least that many denied entries.
            if denied >= self._limits.denial_burst:
                denying.append(int(clerk))
            if seqs is not None:
                late_seqs = _ids(seqs, what="sequences")
                # Thousands of ids, a few offices: made distinct before they are read.
                if not isinstance(offices, str):
                    raise ValueError("audit entries' offices are malformed; run verify")
                places = {self._name(int(o)) for o in set(offices.split(","))}
                where = ", ".join(sorted(places))
                text = f"{len(late_seqs)} lookup(s) outside the opening hours of {where}"
                late.append(Finding(anomalies.OUTSIDE_HOURS, name, text, tuple(sorted(late_seqs))))
            if subjects.get(clerk, 0) >= limit:
                text = f"{subjects[clerk]} distinct citizens looked up (threshold {limit})"
                many.append(Finding(anomalies.MANY_SUBJECTS, name, text, self._sequences_of(clerk)))
        by_clerk = lambda finding: finding.clerk  # noqa: E731
        return (
            sorted(missing, key=by_clerk),
            sorted(late, key=by_clerk),
            sorted(many, key=by_clerk),
            denying,
        )

    def _subjects(self, clerks: Sequence[int]) -> dict[int, int]:
        """How many distinct citizens each of ``clerks`` looked up in the range."""
        if not clerks:
            return {}
        sql, values = self._day(
            ["clerk", "count(DISTINCT NULLIF(subject_id, ''))"], f"clerk IN ({_list(clerks)})"
        )
        return {int(c): int(n) for c, n in self._conn.execute(sql + " GROUP BY clerk", values)}

    def _sequences_of(self, clerk: object) -> tuple[int, ...]:
        """Every lookup of ``clerk`` in the range (a clerk with a finding: few)."""
        sql, values = self._day(["seq"], "clerk = ?")
        return tuple(sorted(int(seq) for (seq,) in self._conn.execute(sql, [*values, clerk])))

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


def _outside(hours: dict[int, tuple[Hours, ...]], span: tuple[int, int] | None) -> str:
    """SQL true when a lookup's ``time`` is outside the opening windows of its ``office``
    (offices open around the clock, or not in ``hours``, never are). ``span``: the range's
    bounds in epoch ms, when it has both."""
    offices: dict[tuple[Hours, ...], list[int]] = defaultdict(list)
    for office, windows in hours.items():
        if windows:
            offices[windows].append(office)
    parts = [
        f"(office IN ({_list(ids)}) AND NOT ({_inside(windows, span)}))"
        for windows, ids in offices.items()
    ]
    return "(" + " OR ".join(parts) + ")" if parts else "1 = 0"


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
