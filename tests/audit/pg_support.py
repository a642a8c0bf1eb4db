"""The real PostgreSQL on 127.0.0.1:5432 for audit tests: a fresh schema per test, and tampering.

Unreachable server: the test is skipped -- or fails under ``CI=true``, where it must be there.
Every schema is ``t_<random>`` and dropped afterwards, so tests run in parallel (xdist).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest

from certbroker.config import AuditLocation, PostgresLocation

#: Tried in order; the first that connects is used (trust auth on the test server).
URLS = [
    os.environ.get("CERTBROKER_TEST_POSTGRES", ""),
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql://root@127.0.0.1:5432/test",
]


def admin_url() -> str:
    """A superuser URL of the test server; skips (fails under CI=true) when there is none."""
    try:
        import psycopg
    except ImportError as exc:  # the postgres extra is part of dev; CI must have it
        _unavailable(f"psycopg not installed: {exc}")
    errors = []
    for url in filter(None, URLS):
        try:
            with psycopg.connect(url, connect_timeout=3):
                return url
        except psycopg.OperationalError as exc:
            errors.append(f"{url}: {str(exc).strip().splitlines()[0]}")
    _unavailable("PostgreSQL unreachable: " + "; ".join(errors))


def _unavailable(message: str) -> Any:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def fresh_schema() -> Iterator[PostgresLocation]:
    """A location in a schema nobody else uses (created by the store), dropped afterwards."""
    import psycopg

    url = admin_url()
    location = PostgresLocation(url, f"t_{secrets.token_hex(6)}")
    try:
        yield location
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA IF EXISTS {location.schema} CASCADE")


def _pg(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


@contextmanager
def attacker(location: AuditLocation) -> Iterator[Any]:
    """A connection to the live log that bypasses the append-only triggers, as someone with
    the database's (or the file's) own rights could; ``?`` placeholders on both backends.

    Commits when the block ends.
    """
    if isinstance(location, Path):
        with closing(sqlite3.connect(location, isolation_level=None)) as conn:
            yield conn
        return
    import psycopg

    with psycopg.connect(location.dsn, autocommit=True) as raw:
        raw.execute(f"SET search_path TO {location.schema}")
        raw.execute("SET session_replication_role = replica")  # superuser: no triggers fire

        class Conn:
            def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
                return raw.execute(_pg(sql) if params else sql, list(params) or None)

        yield Conn()


def run_sql(location: AuditLocation, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    """Rows of one statement on the live log, as its owner (triggers DO fire here)."""
    if isinstance(location, Path):
        with closing(sqlite3.connect(location, isolation_level=None)) as conn:
            return conn.execute(sql, params).fetchall()
    import psycopg

    with psycopg.connect(location.dsn, autocommit=True) as raw:
        raw.execute(f"SET search_path TO {location.schema}")
        cursor = raw.execute(_pg(sql) if params else sql, list(params) or None)
        return cursor.fetchall() if cursor.description else []
