"""Read the newest audit entries matching a filter (``certbroker audit query``, tests, demos).

Read-only, on either backend; bodies are read back by :func:`certbroker.audit.events.parse_entry`
without checking the chain (:func:`certbroker.audit.verify.chain.verify` does that). Rendering
them for a terminal is the CLI's business (:func:`certbroker.cli.table.format_table`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime

from certbroker.audit.events import AuditEntry, iso_time, parse_entry
from certbroker.audit.store.db import backend_for
from certbroker.audit.store.rows import select_rows
from certbroker.config import AuditLocation


@dataclass(frozen=True)
class QueryFilter:
    """Conditions for :func:`query`; ``None`` means any. All given conditions must hold.

    ``decision=""`` selects entries where no decision was reached. ``since`` is inclusive,
    ``until`` exclusive; both must be timezone-aware and compare at millisecond precision.
    ``limit`` keeps the newest matches.
    """

    clerk: str | None = None
    subject_id: str | None = None
    matter_code: str | None = None
    record_type: str | None = None
    decision: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 1000


def query(db: AuditLocation | str, flt: QueryFilter) -> list[AuditEntry]:
    """Entries matching ``flt`` in the live log at ``db`` (SQLite path or PostgreSQL): the
    newest ``flt.limit`` of them, oldest first. Read-only.

    Reads bodies as stored without checking the chain; run ``verify`` for that.
    """
    if flt.limit < 0:
        raise ValueError("limit must not be negative")
    candidates = {
        "clerk": flt.clerk,
        "subject_id": flt.subject_id,
        "matter_code": flt.matter_code,
        "record_type": flt.record_type,
        "decision": flt.decision,
    }
    equals = {column: value for column, value in candidates.items() if value is not None}
    since = None if flt.since is None else iso_time(flt.since)
    until = None if flt.until is None else iso_time(flt.until)
    with contextlib.closing(backend_for(db).connect_read()) as conn:
        rows = select_rows(conn, equals=equals, since=since, until=until, limit=flt.limit)
    return [parse_entry(row.seq, row.body, row.prev_hash, row.entry_hash) for row in rows]
