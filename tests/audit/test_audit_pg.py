"""The PostgreSQL audit store: append-only enforced by the database, one chain for many writers.

Against the real server on 127.0.0.1:5432, each test in a schema of its own (pg_support).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from certbroker.audit import (
    BatchingAuditLog,
    PostgresAuditLog,
    Receipt,
    open_audit_log,
)
from certbroker.audit.append import ChainStore
from certbroker.audit.archive import archive_older_than
from certbroker.audit.export import verify_db
from certbroker.audit.integrity import proofs as audit_proofs
from certbroker.audit.store import postgres as audit_pg
from certbroker.audit.verify.chain import verify
from certbroker.config import PostgresLocation
from certbroker.errors import Unavailable
from tests.audit.pg_support import admin_url, fresh_schema, run_sql
from tests.audit.test_audit import make_event

psycopg = pytest.importorskip("psycopg")
pytestmark = pytest.mark.postgres

TABLES = ("audit_log", "merkle_nodes", "checkpoints", "audit_archives", "audit_meta")
COMPACT_TABLES = ("audit_entries", "audit_terms", "audit_tombstones")  # test_audit_compact.py


@pytest.fixture
def pg() -> Iterator[PostgresLocation]:
    with fresh_schema() as location:
        yield location


def append(location: PostgresLocation, n: int, clerk: str = "clerk") -> list[Receipt]:
    async def go() -> list[Receipt]:
        async with open_audit_log(location) as log:
            return [await log.append(make_event(clerk=f"{clerk}-{i}")) for i in range(n)]

    return asyncio.run(go())


def test_writer_commits_synchronously_and_the_schema_is_its_own(pg: PostgresLocation) -> None:
    async def go() -> dict[str, str]:
        async with PostgresAuditLog(pg) as log:
            await log.append(make_event())
            return log.settings

    assert asyncio.run(go()) == {"synchronous_commit": "on"}
    tables = run_sql(
        pg,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = ?",
        (pg.schema,),
    )
    # The append-only tables, and the notice outbox (mutable: certbroker.audit.outbox).
    assert {t for (t,) in tables} == {*TABLES, *COMPACT_TABLES, "audit_outbox"}
    assert run_sql(pg, "SELECT count(*) FROM audit_log") == [(1,)]


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize(
    "statement",
    ["UPDATE {t} SET {c} = {c}", "DELETE FROM {t}", "TRUNCATE {t}"],
    ids=["update", "delete", "truncate"],
)
def test_even_the_owner_cannot_update_delete_or_truncate(
    pg: PostgresLocation, table: str, statement: str
) -> None:
    append(pg, 3)
    signer = audit_proofs.CheckpointSigner(Ed25519PrivateKey.generate(), Path("unused"))
    audit_proofs.sign_checkpoint(pg, signer)
    if table == "audit_archives":  # give it a row: row triggers fire only on rows
        run_sql(
            pg,
            "INSERT INTO audit_archives VALUES (0, 1, 'h', 'f', 's', 't')",
        )
    column = {"audit_log": "clerk", "merkle_nodes": "hash", "checkpoints": "note"}.get(
        table, "time" if table == "audit_archives" else "value"
    )
    before = run_sql(pg, f"SELECT count(*) FROM {table}")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        run_sql(pg, statement.format(t=table, c=column))
    assert run_sql(pg, f"SELECT count(*) FROM {table}") == before


@dataclass
class Role:
    name: str
    location: PostgresLocation  # the log, as this role


@pytest.fixture
def broker_role(pg: PostgresLocation) -> Iterator[Role]:
    """A LOGIN role with exactly the documented broker grants (the schema made first)."""
    append(pg, 2)  # the owner creates the schema
    name = f"cb_{secrets.token_hex(6)}"
    admin = psycopg.connect(admin_url(), autocommit=True)
    try:
        admin.execute(f"CREATE ROLE {name} LOGIN")
        for statement in audit_pg.grant_statements(pg.schema, name):
            admin.execute(statement.encode())
        dsn = psycopg.conninfo.make_conninfo(pg.dsn, user=name)
        yield Role(name, PostgresLocation(dsn, pg.schema))
    finally:
        admin.execute(f"DROP OWNED BY {name}")
        admin.execute(f"DROP ROLE IF EXISTS {name}")
        admin.close()


def test_a_broker_role_with_select_and_insert_appends_and_verifies(broker_role: Role) -> None:
    receipts = append(broker_role.location, 5, clerk="limited")
    assert [r.sequence for r in receipts] == [3, 4, 5, 6, 7]
    signer = audit_proofs.CheckpointSigner(Ed25519PrivateKey.generate(), Path("unused"))
    assert audit_proofs.sign_checkpoint(broker_role.location, signer).size == 7
    assert verify_db(broker_role.location, signer.public_key).ok


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET clerk = 'x'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
        "UPDATE checkpoints SET note = ''",
        "DELETE FROM merkle_nodes",
        "INSERT INTO audit_archives VALUES (99, 1, 'h', 'f', 's', 't')",
    ],
)
def test_the_broker_role_is_refused_anything_but_appending(
    broker_role: Role, statement: str
) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
        run_sql(broker_role.location, statement)
    assert verify(broker_role.location).entries == 2


def test_an_archiver_may_delete_archived_rows_only(pg: PostgresLocation, tmp_path: Path) -> None:
    append(pg, 6)
    name = f"cb_{secrets.token_hex(6)}"
    admin = psycopg.connect(admin_url(), autocommit=True)
    try:
        admin.execute(f"CREATE ROLE {name} LOGIN")
        for statement in audit_pg.grant_statements(pg.schema, name, archiver=True):
            admin.execute(statement.encode())
        archiver = PostgresLocation(psycopg.conninfo.make_conninfo(pg.dsn, user=name), pg.schema)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            run_sql(archiver, "DELETE FROM audit_log WHERE seq = 1")  # not archived: refused
        signer = audit_proofs.CheckpointSigner.load(tmp_path)
        made = archive_older_than(archiver, signer, tmp_path / "archive", 1, clock=_days_later(2))
        assert made is not None
        assert (made.first_seq, made.last_seq) == (1, 6)
        assert run_sql(pg, "SELECT count(*) FROM audit_log") == [(0,)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            run_sql(archiver, "UPDATE audit_archives SET file_name = 'x'")
    finally:
        admin.execute(f"DROP OWNED BY {name}")
        admin.execute(f"DROP ROLE IF EXISTS {name}")
        admin.close()


def _days_later(days: float) -> Callable[[], float]:
    now = time.time() + days * 86400
    return lambda: now


def test_several_logs_in_one_process_append_one_chain(pg: PostgresLocation) -> None:
    # Stand-ins for broker processes (those are in test_audit_pg_brokers): each log has its own
    # connection and writer thread, so their batches interleave under the advisory lock.
    async def go() -> list[Receipt]:
        logs = [open_audit_log(pg) for _ in range(3)]
        try:
            return await asyncio.gather(
                *(log.append(make_event(clerk=f"w{n}")) for n in range(60) for log in logs)
            )
        finally:
            for log in logs:
                await log.aclose()

    receipts = asyncio.run(go())
    assert sorted(r.sequence for r in receipts) == list(range(1, 181))
    report = verify(pg)
    assert (report.ok, report.entries) == (True, 180), report


def test_two_stores_creating_the_schema_at_once_both_work(pg: PostgresLocation) -> None:
    barrier = threading.Barrier(4)
    stores: list[ChainStore] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        barrier.wait(30)
        try:
            stores.append(ChainStore.open(audit_pg.PostgresBackend(pg)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        assert len(stores) == 4
        body = {"entry_id": "e", "time": "t", "clerk": "c", "subject_id": "s"}
        body |= {"matter_code": "m", "record_type": "r", "decision": "allow"}
        rows = [s.write_batch([{**body, "entry_id": f"e{i}"}])[0] for i, s in enumerate(stores)]
        assert sorted(r.seq for r in rows) == [1, 2, 3, 4]
    finally:
        for store in stores:
            store.close()


def test_a_lost_connection_fails_that_batch_and_the_next_reconnects(pg: PostgresLocation) -> None:
    session = audit_pg.PostgresBackend(pg).open_writer()
    pid = session.backend_pid()
    store = ChainStore(session)

    async def go() -> list[int]:
        async with BatchingAuditLog(store) as log:
            await log.append(make_event())
            # Kill the writer's server process, as a restart would (waits until it is gone).
            assert run_sql(pg, "SELECT pg_terminate_backend(?, 30000)", (pid,)) == [(True,)]
            results = []
            for _ in range(3):
                try:
                    results.append((await log.append(make_event())).sequence)
                except Unavailable as exc:  # fail closed: that lookup gets no answer
                    assert exc.reason == "AUDIT_UNAVAILABLE"
                    results.append(0)
            return results

    assert asyncio.run(go()) == [0, 2, 3]
    assert verify(pg).entries == 3
    assert verify(pg).ok


def test_unreachable_postgres_is_audit_unavailable() -> None:
    location = PostgresLocation("postgresql://nobody:secret@127.0.0.1:1/none", "certbroker")
    with pytest.raises(Unavailable) as info:
        open_audit_log(location)
    assert info.value.reason == "AUDIT_UNAVAILABLE"
    assert "secret" not in str(info.value)
    assert "secret" not in repr(location)
