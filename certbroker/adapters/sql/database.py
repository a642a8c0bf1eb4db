"""Read-only connections to a department's database: SQLite (stdlib) or PostgreSQL (psycopg 3).

Both run one query at a time behind a lock on one connection: look-ups are small and quick, and
one connection is one thing to reconnect. A broken PostgreSQL connection (the server restarted)
is reopened once per call before the call fails with ``SOURCE_UNAVAILABLE``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

import grpc

from certbroker.adapters.sdk.core import AdapterError
from certbroker.adapters.sql.params import SUBJECT_PARAM, to_pyformat

log = logging.getLogger("certbroker.adapters.sql")


class SourceUnavailable(AdapterError):
    """The department's database cannot be reached (UNAVAILABLE ``SOURCE_UNAVAILABLE``)."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str = "the department's database is unavailable") -> None:
        super().__init__("SOURCE_UNAVAILABLE", message)


class Result(Protocol):
    """Column names and rows of one query."""

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]


class _Result:
    def __init__(self, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.columns, self.rows = columns, rows


class Database(Protocol):
    """Runs a query with ``:subject_id`` bound."""

    def query(self, sql: str, subject_id: str) -> Result:
        """Column names and all rows."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


class SqliteDatabase:
    """A SQLite file opened read-only (``mode=ro``): the adapter can never change it."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise ValueError(f"database file not found: {path}")
        uri = path.resolve().as_uri() + "?mode=ro"
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    def query(self, sql: str, subject_id: str) -> Result:
        """Column names and rows; sqlite3 binds ``:subject_id`` itself."""
        try:
            with self._lock:
                cursor = self._conn.execute(sql, {SUBJECT_PARAM: subject_id})
                rows = cursor.fetchall()
                columns = [d[0] for d in cursor.description or ()]
        except sqlite3.OperationalError as exc:
            # Locked, disk gone, corrupt: a source problem, reported without the SQL's text.
            log.warning("sqlite query failed: %s", type(exc).__name__)
            raise SourceUnavailable() from exc
        return _Result(columns, rows)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()


class PostgresDatabase:
    """A PostgreSQL connection in autocommit, every statement read-only and time-limited."""

    def __init__(self, url: str, *, statement_timeout_ms: int) -> None:
        try:
            import psycopg
        except ImportError:  # an optional dependency: the extra "postgres"
            raise ValueError(
                "PostgreSQL needs psycopg 3: pip install 'certbroker[postgres]'"
            ) from None
        self._url = url
        self._timeout_ms = statement_timeout_ms
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        try:
            self._connect()
        except psycopg.OperationalError as exc:
            # Fail at start with the server's reason; a password in the URL is not repeated.
            raise ValueError(f"cannot connect to PostgreSQL: {first_line(exc)}") from None

    def _connect(self) -> None:
        import psycopg

        conn = psycopg.connect(self._url, autocommit=True, connect_timeout=5)
        # Session defaults, so they hold for autocommit's implicit transactions too.
        conn.execute("SET default_transaction_read_only = on")
        conn.execute("SELECT set_config('statement_timeout', %s, false)", (str(self._timeout_ms),))
        self._conn = conn

    def query(self, sql: str, subject_id: str) -> Result:
        """Column names and rows, reconnecting once if the connection broke."""
        import psycopg

        translated = to_pyformat(sql)
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._conn is None or self._conn.closed:
                        self._connect()
                    assert self._conn is not None
                    with self._conn.cursor() as cursor:
                        cursor.execute(translated, {SUBJECT_PARAM: subject_id})
                        columns = [d.name for d in cursor.description or ()]
                        return _Result(columns, cursor.fetchall())
                except psycopg.errors.QueryCanceled as exc:
                    log.warning("postgres query cancelled (statement_timeout)")
                    raise SourceUnavailable("the department's database timed out") from exc
                except psycopg.OperationalError as exc:
                    broken = self._conn is None or self._conn.closed or self._conn.broken
                    log.warning(
                        "postgres unavailable (attempt %d): %s", attempt, type(exc).__name__
                    )
                    if self._conn is not None:
                        self._conn.close()
                    self._conn = None
                    if attempt == 2 or not broken:
                        raise SourceUnavailable() from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def open_database(url: str, *, base_dir: Path, statement_timeout_ms: int = 5000) -> Database:
    """Open ``sqlite:///PATH`` (relative to ``base_dir``; ``sqlite:////abs``) or
    ``postgresql://...`` (any libpq URI). ``ValueError`` when it cannot be opened."""
    if url.startswith("sqlite:///"):
        path = Path(unquote(url.removeprefix("sqlite:///")))
        return SqliteDatabase(path if path.is_absolute() else base_dir / path)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url, statement_timeout_ms=statement_timeout_ms)
    raise ValueError(f"unsupported database URL scheme: {url.split(':', 1)[0]}")


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (its type name if it has none): driver errors run on."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
