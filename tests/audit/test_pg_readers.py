"""PostgreSQL readers reuse an idle session (certbroker.audit.store.pgpool) instead of
connecting per read: each read still sees a fresh snapshot, and a session the server dropped
meanwhile is replaced."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import closing

import pytest

from certbroker.audit import open_audit_log
from certbroker.audit.scan import Criteria, scan
from certbroker.audit.store import pgpool
from certbroker.audit.store.db import backend_for
from certbroker.config import PostgresLocation
from tests.audit.pg_support import admin_url, fresh_schema
from tests.audit.test_audit import StepClock, make_event

pytestmark = pytest.mark.postgres


@pytest.fixture
def location() -> Iterator[PostgresLocation]:
    with fresh_schema() as pg:
        yield pg
    pgpool.close_all()


def append(location: PostgresLocation, count: int) -> None:
    async def go() -> None:
        async with open_audit_log(location, clock=StepClock(), entry_format=2) as log:
            for _ in range(count):
                await log.append(make_event())

    asyncio.run(go())


def reader_pid(location: PostgresLocation) -> int:
    with closing(backend_for(location).connect_read()) as conn:
        (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()
    return int(pid)


def test_reads_share_one_session_and_each_sees_a_fresh_snapshot(
    location: PostgresLocation,
) -> None:
    append(location, 2)
    first = reader_pid(location)
    assert len(scan(location, Criteria())) == 2
    append(location, 3)  # committed between two reads on the same session
    assert len(scan(location, Criteria())) == 5
    assert reader_pid(location) == first


def test_a_session_the_server_dropped_is_replaced(location: PostgresLocation) -> None:
    import psycopg

    append(location, 1)
    dropped = reader_pid(location)
    with psycopg.connect(admin_url(), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (dropped,))
    assert len(scan(location, Criteria())) == 1
    assert reader_pid(location) != dropped


def test_a_reader_whose_statement_failed_is_rolled_back_and_reused_read_only(
    location: PostgresLocation,
) -> None:
    import psycopg

    append(location, 1)
    backend = backend_for(location)
    with closing(backend.connect_read()) as conn:
        failed = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
        with pytest.raises(psycopg.Error):
            conn.execute("SELECT no_such_column FROM audit_entries")
    # Rolled back on close, the session is healthy again and is reused, still read-only.
    assert reader_pid(location) == failed
    with (
        closing(backend.connect_read()) as conn,
        pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
    ):
        conn.execute("DELETE FROM audit_terms")
    assert len(scan(location, Criteria())) == 1
