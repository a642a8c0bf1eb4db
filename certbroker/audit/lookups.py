"""Read the lookups of a time range as the anomaly rules need them, without rebuilding bodies.

:func:`certbroker.audit.scan.scan` rebuilds each version 2 entry whole (every term, the
``rest`` array, the previous hash) and the rules then read ten of its values: a day at city
density took seconds. Here a version 2 row yields only those values: its columns (``seq``,
``time``, ``clerk``, ``subject_id``, ``decision``, ``office``, ``case_number``, ``outcome``)
and, extracted by the database's own JSON functions, the two ``rest`` elements the rules read
(``bundle_id``, ``rule_id``), with the ``kind`` filter applied in SQL. Version 1
rows (``audit_log``) are few (the log's oldest live entries) and are read whole by
:func:`~certbroker.audit.events.parse_entry` as before. The records are the same either way (a
test compares them with the full decode).
"""

from __future__ import annotations

from collections import Counter
from contextlib import closing
from datetime import datetime

from certbroker.audit.anomalies import Lookup, lookup_of
from certbroker.audit.events import AuditEntry, parse_entry
from certbroker.audit.scan import Criteria, compact_where, log_sql
from certbroker.audit.store import compact
from certbroker.audit.store.base import Connection
from certbroker.audit.store.db import backend_for
from certbroker.audit.store.rows import has_compact
from certbroker.config import AuditLocation

_KIND = "lookup"
_HOUR_MS = 3_600_000

#: (the hour's start in epoch ms, office, department, decision, outcome): what the Overview
#: counts lookups by.
HourKey = tuple[int, str, str, str, str]


def read_lookups(
    db: AuditLocation,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    before: int = 0,
) -> list[Lookup]:
    """The lookup entries with ``since <= time < until`` (``None``: unbounded) and a sequence
    below ``before`` (0: any), in sequence order, as :class:`Lookup` records. Read-only.

    Raises ``FileNotFoundError`` if there is no log yet and ``ValueError`` for a malformed
    entry (run ``audit verify``).
    """
    criteria = Criteria(kinds=(_KIND,), since=since, until=until, before=before)
    backend = backend_for(db)
    found: list[Lookup] = []
    with closing(backend.connect_read()) as conn:
        backend.snapshot(conn)
        sql, params = log_sql(criteria)
        for seq, body, prev_hash, entry_hash in backend.stream(conn, sql, params):
            entry = parse_entry(int(seq), str(body), str(prev_hash), str(entry_hash))
            if entry.event.kind == _KIND:
                found.append(lookup_of(entry))
        if has_compact(conn):
            found.extend(_compact_lookups(conn, criteria))
    return found


def _compact_lookups(conn: Connection, criteria: Criteria) -> list[Lookup]:
    terms = compact.reader_terms(conn)
    kind = terms.find(conn, _KIND)
    if kind is None:  # no version 2 entry is a lookup
        return []
    clauses, values = compact_where(criteria, {"kind": kind})
    return lookup_rows(conn, terms, " AND ".join(clauses), values)


def lookup_rows(
    conn: Connection, terms: compact.Terms, where: str, values: list[object]
) -> list[Lookup]:
    """The ``audit_entries`` rows that ``where`` (trusted SQL, with bound ``values``) selects,
    in sequence order, as :class:`Lookup` records."""
    columns = ", ".join(
        [
            "seq",
            "time",
            "clerk",
            "subject_id",
            "decision",
            "office",
            "case_number",
            f"COALESCE({compact.rest_element(conn, 'bundle_id')}, '')",
            "outcome",
            compact.rest_element(conn, "rule_id"),
        ]
    )
    sql = f"SELECT {columns} FROM audit_entries WHERE {where} ORDER BY seq"  # noqa: S608
    names: dict[object, str] = {}  # term id -> text, for this read (a few thousand at most)
    out: list[Lookup] = []
    for row in conn.backend.stream(conn, sql, values):
        seq_value, millis, clerk, subject, decision, office, case_number, bundle, outcome, rule = (
            row
        )
        if (
            type(millis) is not int
            or not isinstance(subject, str)
            or not isinstance(case_number, str)
            or not isinstance(bundle, str)
        ):
            raise ValueError(f"audit entry {seq_value} is malformed; run verify")
        texts = []
        for term_id in (clerk, office, decision, outcome, rule):
            text = names.get(term_id)
            if text is None:
                text = names[term_id] = terms.term(conn, term_id)
            texts.append(text)
        out.append(
            Lookup(
                int(seq_value),
                millis,
                texts[0],
                texts[1],
                subject,
                case_number,
                texts[2],
                bundle,
                texts[3],
                texts[4],
            )
        )
    return out


def count_by_hour(db: AuditLocation, criteria: Criteria) -> Counter[HourKey]:
    """The lookups ``criteria`` selects (its time and sequence bounds and ``office``) counted
    per :data:`HourKey`: by the database for version 2 rows (a day at city density is tens of
    thousands of entries; nothing is rebuilt), version 1 rows read whole. Read-only.

    Raises ``FileNotFoundError`` if there is no log yet and ``ValueError`` for a malformed
    entry (run ``audit verify``).
    """
    criteria = Criteria(
        kinds=(_KIND,),
        office=criteria.office,
        since=criteria.since,
        until=criteria.until,
        after=criteria.after,
        before=criteria.before,
    )
    backend = backend_for(db)
    counts: Counter[HourKey] = Counter()
    with closing(backend.connect_read()) as conn:
        backend.snapshot(conn)
        sql, params = log_sql(criteria)
        for seq, body, prev_hash, entry_hash in backend.stream(conn, sql, params):
            entry = parse_entry(int(seq), str(body), str(prev_hash), str(entry_hash))
            if entry.event.kind == _KIND and criteria.office in (None, entry.event.office):
                counts[_hour_key(entry)] += 1
        if has_compact(conn):
            _count_compact(conn, criteria, counts)
    return counts


def _hour_key(entry: AuditEntry) -> HourKey:
    millis = compact.time_ms(entry.time)
    e = entry.event
    return (millis - millis % _HOUR_MS, e.office, e.department, e.decision, e.outcome)


def _count_compact(conn: Connection, criteria: Criteria, into: Counter[HourKey]) -> None:
    terms = compact.reader_terms(conn)
    equals = (
        {"kind": _KIND} if criteria.office is None else {"kind": _KIND, "office": criteria.office}
    )
    stored = compact.term_ids(conn, terms, equals)
    if stored is None:  # no version 2 entry is a lookup (of that office)
        return
    clauses, values = compact_where(criteria, stored)
    # Floor division for any time (SQL's truncates toward zero below the epoch). On SQLite,
    # whose columns hold any type, a time that is not an integer is malformed.
    hour = f"(time - (((time % {_HOUR_MS}) + {_HOUR_MS}) % {_HOUR_MS}))"
    check = "0" if conn.backend.typed_columns else "max(typeof(time) <> 'integer')"
    department = compact.rest_element(conn, "department")
    sql = (
        f"SELECT {hour}, office, {department}, decision, outcome, count(*), {check} "  # noqa: S608
        f"FROM audit_entries WHERE {' AND '.join(clauses)} GROUP BY 1, 2, 3, 4, 5"
    )
    names: dict[object, str] = {None: ""}  # a department left out: none
    for start, *ids, count, malformed in conn.execute(sql, values).fetchall():
        if malformed or type(start) is not int:
            raise ValueError("an audit entry of the range is malformed; run verify")
        texts = []
        for term_id in ids:
            text = names.get(term_id)
            if text is None:
                text = names[term_id] = terms.term(conn, term_id)
            texts.append(text)
        office, department_name, decision, outcome = texts
        into[(start, office, department_name, decision, outcome)] += int(count)
