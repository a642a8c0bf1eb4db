"""The notice outbox in the audit store, on SQLite and PostgreSQL: a notice per access in the
entry's own transaction (a notice that cannot be written takes its entries with it), nothing
for other entries, the relay's reads and marks -- and, on PostgreSQL, all of it as a broker role
with exactly the documented grants."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from certbroker import audit
from certbroker.audit.events import AuditEvent
from certbroker.audit.outbox import NoticeOutbox, mark_sent, pending, read_notices
from certbroker.audit.store import postgres as audit_pg
from certbroker.audit.store.db import backend_for
from certbroker.citizen.notices import notices_of, now_iso
from certbroker.config import DEFAULT_POLICY_DIR, AuditLocation, PostgresLocation
from certbroker.errors import Unavailable
from certbroker.policy import load
from tests.audit.pg_support import admin_url, fresh_schema
from tests.audit.test_audit import make_event

POLICY = load(DEFAULT_POLICY_DIR)
SUBJECT = "110101199003077774"


def access(decision: str = "allow", **changes: object) -> AuditEvent:
    fields = {"subject_id": SUBJECT, "matter_code": "BDC-ZY-001", "record_type": "marriage"}
    return make_event(**(fields | {"decision": decision} | changes))


def hook() -> NoticeOutbox:
    return NoticeOutbox(notices_of(lambda: POLICY))


def write(location: AuditLocation, events: list[AuditEvent], outbox: NoticeOutbox) -> list[str]:
    async def go() -> list[str]:
        async with audit.open_audit_log(location, hook=outbox) as log:
            return [r.entry_id for r in await log.append_many(events)]

    return asyncio.run(go())


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuditLocation]:
    if request.param == "sqlite":
        yield tmp_path / "audit.sqlite"
        return
    with fresh_schema() as pg:
        yield pg


def test_one_notice_per_access_in_the_same_transaction(location: AuditLocation) -> None:
    events = [
        access("allow"),
        access("deny"),
        access("", outcome="BAD_SUBJECT_ID"),  # no decision: no access, no notice
        replace(access("allow"), kind="citizen"),  # the citizen's own call: no notice
    ]
    ids = write(location, events, hook())
    backend = backend_for(location)
    notices = list(read_notices(backend))
    assert [n["entry_id"] for n in notices] == ids[:2]
    assert {n["decision"] for n in notices} == {"allow", "deny"}
    assert all(n["sent"] is None for n in notices)
    due = pending(backend, now_iso(), 10)
    assert [p.entry_id for p in due] == ids[:2]
    mark_sent(backend, [ids[0]], now_iso())
    assert [p.entry_id for p in pending(backend, now_iso(), 10)] == [ids[1]]


class Broken(NoticeOutbox):
    def rows_appended(self, conn: object, bodies: object, rows: object) -> None:  # type: ignore[override]
        raise RuntimeError("the notice cannot be written")


def test_a_notice_that_cannot_be_written_takes_its_entries_with_it(location: AuditLocation) -> None:
    write(location, [access()], hook())  # the log and the outbox exist
    with pytest.raises(Unavailable):
        write(location, [access(), access("deny")], Broken(notices_of(lambda: POLICY)))
    entries = audit.query(location, audit.QueryFilter())
    assert len(entries) == 1  # no access without its notice
    assert len(list(read_notices(backend_for(location)))) == 1


def test_a_log_written_before_the_outbox_gets_it_when_the_writer_opens(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite"
    write(db, [access()], hook())
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("DROP TABLE audit_outbox")
    ids = write(db, [access()], hook())
    assert [n["entry_id"] for n in read_notices(backend_for(db))] == ids


def test_a_broker_role_with_the_documented_grants_writes_and_marks_notices() -> None:
    with fresh_schema() as pg:
        write(pg, [access()], hook())  # the owner creates the schema
        name = f"cb_{secrets.token_hex(6)}"
        admin = psycopg.connect(admin_url(), autocommit=True)
        try:
            admin.execute(f"CREATE ROLE {name} LOGIN".encode())
            for statement in audit_pg.grant_statements(pg.schema, name):
                admin.execute(statement.encode())
            role = PostgresLocation(psycopg.conninfo.make_conninfo(pg.dsn, user=name), pg.schema)
            ids = write(role, [access("deny")], hook())
            backend = backend_for(role)
            mark_sent(backend, ids, now_iso())
            sent: Mapping[str, object] = {n["entry_id"]: n["sent"] for n in read_notices(backend)}
            assert sent[ids[0]] is not None
        finally:
            admin.execute(f"DROP OWNED BY {name}".encode())
            admin.execute(f"DROP ROLE IF EXISTS {name}".encode())
            admin.close()


def test_the_outbox_benchmark_runs_in_smoke_mode() -> None:
    from bench import outbox
    from bench.harness import Options

    result = outbox.run(Options(smoke=True))
    sqlite_rows = [row for row in result.rows if row[0] == "SQLite"]
    assert [row[1] for row in sqlite_rows] == ["1", "32"]
    assert all(float(cell) >= 0 for row in sqlite_rows for cell in row[2:6])
