"""Keyset-paged, read-only scans of the audit log for the auditor service.

:func:`certbroker.audit.query.query` keeps the *newest* matches and filters only the indexed
columns; auditors page *forward* (oldest first, after a sequence number) and also filter on
office and case number. This module reads the same log read-only (SQLite ``mode=ro`` or a
PostgreSQL read-only transaction, :meth:`~certbroker.audit.store.base.Backend.connect_read`),
filters the indexed columns in SQL and the rest on the parsed entries, and stops as soon as it
has enough. Bodies are read by :func:`certbroker.audit.events.parse_entry`, so missing later
keys read as empty.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime

from certbroker.audit.events import AuditEntry, entry_from_fields, iso_time, parse_entry
from certbroker.audit.store import compact
from certbroker.audit.store.base import Connection
from certbroker.audit.store.db import backend_for
from certbroker.audit.store.rows import has_compact, prev_hashes
from certbroker.config import AuditLocation


@dataclass(frozen=True)
class Criteria:
    """What a scan selects; ``None`` (or an empty ``kinds``) means any.

    ``since`` is inclusive, ``until`` exclusive (aware datetimes, millisecond precision);
    ``after`` selects sequences greater than it, ``before`` (0 = no bound) smaller than it.
    """

    clerk: str | None = None
    office: str | None = None
    subject_id: str | None = None
    matter_code: str | None = None
    case_number: str | None = None
    record_type: str | None = None
    decision: str | None = None
    kinds: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    after: int = 0
    before: int = 0


#: Version 2 rows decoded per batch (their previous hashes are looked up together).
_CHUNK = 256

#: Criteria that are columns of ``audit_log`` (filtered in SQL, using its indexes).
_COLUMNS = ("clerk", "subject_id", "matter_code", "record_type", "decision")
#: Criteria that are columns of ``audit_entries`` (format 2).
_COMPACT_COLUMNS = (*_COLUMNS, "office", "case_number")


def log_sql(criteria: Criteria) -> tuple[str, list[object]]:
    """The query (and its parameters) of the version 1 rows (``audit_log``) the indexed
    ``criteria`` select, in sequence order: ``seq, body, prev_hash, entry_hash``."""
    clauses = ["seq > ?"]
    params: list[object] = [criteria.after]
    if criteria.before > 0:
        clauses.append("seq < ?")
        params.append(criteria.before)
    for column in _COLUMNS:
        value = getattr(criteria, column)
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if criteria.since is not None:
        clauses.append("time >= ?")
        params.append(iso_time(criteria.since))
    if criteria.until is not None:
        clauses.append("time < ?")
        params.append(iso_time(criteria.until))
    # Column names come from the fixed tuple above; every value is a bound parameter.
    sql = (
        "SELECT seq, body, prev_hash, entry_hash FROM audit_log "  # noqa: S608
        f"WHERE {' AND '.join(clauses)} ORDER BY seq"
    )
    return sql, params


def _matches(entry: AuditEntry, criteria: Criteria) -> bool:
    event = entry.event
    if criteria.office is not None and event.office != criteria.office:
        return False
    if criteria.case_number is not None and event.case_number != criteria.case_number:
        return False
    return not criteria.kinds or event.kind in criteria.kinds


def scan(db: AuditLocation, criteria: Criteria, *, limit: int | None = None) -> list[AuditEntry]:
    """Entries matching ``criteria`` in sequence order, at most ``limit`` (None = all).

    Raises ``FileNotFoundError`` if there is no log yet and ``ValueError`` for a malformed
    entry (run ``audit verify``).
    """
    if limit is not None and limit < 0:
        raise ValueError("limit must not be negative")
    sql, params = log_sql(criteria)
    found: list[AuditEntry] = []
    if limit == 0:
        return found
    backend = backend_for(db)
    with closing(backend.connect_read()) as conn:
        backend.snapshot(conn)
        for entry in _entries(conn, sql, params, criteria):
            if _matches(entry, criteria):
                found.append(entry)
                if limit is not None and len(found) >= limit:
                    break
    return found


def _entries(
    conn: Connection, sql: str, params: list[object], criteria: Criteria
) -> Iterator[AuditEntry]:
    """The entries the SQL conditions select: version 1 rows, then version 2 rows."""
    backend = conn.backend
    for seq, body, prev_hash, entry_hash in backend.stream(conn, sql, params):
        yield parse_entry(int(seq), str(body), str(prev_hash), str(entry_hash))
    if not has_compact(conn):
        return
    terms = compact.reader_terms(conn)
    equals = {c: getattr(criteria, c) for c in _COMPACT_COLUMNS if getattr(criteria, c) is not None}
    stored = compact.term_ids(conn, terms, equals)
    if stored is None:
        return
    clauses, values = compact_where(criteria, stored)
    if "subject_id" in stored or "clerk" in stored:
        bounds = [
            None if b is None else compact.time_ms(iso_time(b))
            for b in (criteria.since, criteria.until)
        ]
        days = backend.day_clause(conn, *bounds)
        if days is not None:
            clauses.append(days[0])
            values.extend(days[1])
    if criteria.kinds:
        # The kind filter in SQL too: a day's few "citizen" entries must not cost decoding
        # the day's tens of thousands of lookups.
        kinds = [k for k in (terms.find(conn, kind) for kind in criteria.kinds) if k is not None]
        if not kinds:
            return
        clauses.append(f"kind IN ({', '.join('?' * len(kinds))})")
        values.extend(kinds)
    chunk: list[Sequence[object]] = []
    for row in backend.stream(conn, compact.select_sql(clauses), values):
        chunk.append(row)
        if len(chunk) >= _CHUNK:
            yield from _decoded(conn, terms, chunk)
            chunk = []
    yield from _decoded(conn, terms, chunk)


def compact_where(
    criteria: Criteria, equals: Mapping[str, object], *, time_index: bool = True
) -> tuple[list[str], list[object]]:
    """The conditions (and their values) on ``audit_entries`` rows within the sequence and
    time bounds of ``criteria`` whose SQL expressions ``equals`` (trusted) have the given
    stored values. ``time_index=False``: the time bounds must not be the access path (the
    caller adds narrower ranges of time for the index)."""
    # "+seq": the sequence bound must not pick the primary key as the access path (a walk of
    # every later row); the indexed column or time range is the one to search.
    seq = "+seq" if equals or criteria.since is not None or criteria.until is not None else "seq"
    clauses = [f"{seq} > ?", *(f"{column} = ?" for column in equals)]
    values: list[object] = [criteria.after, *equals.values()]
    if criteria.before > 0:
        clauses.append(f"{seq} < ?")
        values.append(criteria.before)
    for bound, op in ((criteria.since, ">="), (criteria.until, "<")):
        if bound is not None:
            clauses.append(f"{'' if time_index else '+'}time {op} ?")
            values.append(compact.time_ms(iso_time(bound)))
    return clauses, values


def _decoded(
    conn: Connection, terms: compact.Terms, rows: Sequence[Sequence[object]]
) -> Iterator[AuditEntry]:
    """Version 2 ``rows`` as entries; their previous hashes looked up together."""
    before = prev_hashes(conn, [int(str(row[0])) for row in rows])
    for row in rows:
        seq = int(str(row[0]))
        fields = compact.decode(conn, terms, row)
        yield entry_from_fields(seq, fields, before[seq], compact.hash_hex(row[-1]))


def entry_time(entry: AuditEntry) -> datetime:
    """The entry's time as an aware UTC datetime."""
    return datetime.fromisoformat(entry.time)
