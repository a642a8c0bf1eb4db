"""Where the audit log lives, and the one small connection interface all its code uses.

Two backends sit behind the same functions:

- **SQLite** (the embedded default): a file, named by a plain :class:`~pathlib.Path`.
- **PostgreSQL**: a :class:`PostgresLocation` (libpq DSN + schema), for several broker
  processes writing ONE log (:mod:`certbroker.audit.store.postgres`).

Readers and writers are written once against :class:`Connection`: ``conn.execute(sql, params)``
returning a cursor with ``fetchone``/``fetchall``/iteration, SQL written with ``?`` placeholders.
``sqlite3.Connection`` is one as it is; :class:`PgConnection` wraps a psycopg 3 connection and
translates the placeholders. The few statements that differ between the two (DDL, upserts,
the write lock) branch on :func:`is_postgres`.

psycopg is imported lazily (only when a PostgreSQL location is used), so an SQLite-only
install needs nothing beyond the standard library.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from certbroker.config import AuditLocation, PostgresLocation


def as_location(db: AuditLocation | str) -> AuditLocation:
    """``db`` as a location: a ``str`` is an SQLite path (what callers passed before)."""
    if isinstance(db, PostgresLocation | Path):
        return db
    if isinstance(db, str):
        return Path(db)
    raise TypeError(f"not an audit location: {type(db).__name__}")


def describe(db: AuditLocation) -> str:
    """A location for messages (a PostgreSQL DSN without credentials)."""
    return db.display if isinstance(db, PostgresLocation) else str(db)


class Cursor(Protocol):
    """What readers use of a cursor (sqlite3 and psycopg cursors both fit)."""

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """The connection interface audit code is written against (``?`` placeholders)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any: ...

    def close(self) -> None: ...


_CURSOR_NAMES = itertools.count(1)  # server-side cursor names must be unique per session


@functools.lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    # Our SQL never has "?" or "%" inside string literals, so a plain replace is exact.
    return sql.replace("%", "%%").replace("?", "%s")


class PgConnection:
    """A psycopg 3 connection seen through :class:`Connection` (``?`` → ``%s``).

    ``raw`` is the psycopg connection itself, for transaction control and PostgreSQL-only
    calls. Its transactions are explicit: psycopg opens one at the first statement and the
    owner commits or rolls back.
    """

    def __init__(self, raw: Any, schema: str) -> None:
        self.raw = raw
        self.schema = schema

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        """Run one statement; ``?`` placeholders bind ``parameters`` in order."""
        if parameters:
            cursor: Cursor = self.raw.execute(_pg_sql(sql), list(parameters))
        else:
            cursor = self.raw.execute(sql)
        return cursor

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> None:
        """Run one statement per parameter row (psycopg pipelines them: one round trip)."""
        rows = [list(p) for p in parameters]
        if rows:
            with self.raw.cursor() as cursor:
                cursor.executemany(_pg_sql(sql), rows)

    def stream(self, sql: str, parameters: Sequence[Any] = ()) -> Iterator[Any]:
        """Rows of a query through a server-side cursor: a large log is never held in memory.

        Needs the open transaction that readers always have (see :func:`connect_read`).
        """
        with self.raw.cursor(name=f"certbroker_audit_{next(_CURSOR_NAMES)}") as cursor:
            cursor.itersize = 2000
            cursor.execute(_pg_sql(sql), list(parameters) if parameters else None)
            yield from cursor

    def commit(self) -> None:
        """Commit the open transaction."""
        self.raw.commit()

    def rollback(self) -> None:
        """Roll back the open transaction (a no-op on a broken connection)."""
        if not self.raw.closed:
            self.raw.rollback()

    def close(self) -> None:
        """Close the connection; an open transaction is rolled back."""
        self.raw.close()


def is_postgres(conn: Connection) -> bool:
    """True for a PostgreSQL connection (where SQL dialects differ)."""
    return isinstance(conn, PgConnection)


def stream(conn: Connection, sql: str, parameters: Sequence[Any] = ()) -> Iterator[Any]:
    """Iterate the rows of a query without loading them all (SQLite cursors already stream)."""
    if isinstance(conn, PgConnection):
        return conn.stream(sql, parameters)
    return iter(conn.execute(sql, parameters))


def insert_many(
    conn: Connection,
    table: str,
    columns: Sequence[str],
    pg_types: Sequence[str],
    rows: Sequence[Sequence[Any]],
) -> None:
    """Insert ``rows`` (tuples in ``columns`` order) into ``table``: trusted names only.

    PostgreSQL: ONE statement over column arrays (``INSERT ... SELECT * FROM unnest(...)``;
    ``pg_types`` are the array element types), because per-statement overhead, not bytes,
    dominates an audit batch there. SQLite: :func:`sqlite_insert`.
    """
    if not rows:
        return
    names = ", ".join(columns)
    if isinstance(conn, PgConnection):
        arrays = [list(column) for column in zip(*rows, strict=True)]
        # %b: binary parameters; text arrays in text format are escaped element by element.
        casts = ", ".join(f"%b::{kind}[]" for kind in pg_types)
        sql = f"INSERT INTO {table} ({names}) SELECT * FROM unnest({casts})"  # noqa: S608
        conn.raw.execute(sql, arrays)
        return
    sqlite_insert(conn, f"INSERT INTO {table} ({names})", len(columns), rows)


#: Rows per multi-row SQLite INSERT: bounds the distinct statements (and host parameters).
SQLITE_CHUNK = 64


def sqlite_insert(conn: Connection, head: str, width: int, rows: Sequence[Sequence[Any]]) -> None:
    """Run ``head`` (``INSERT [OR ...] INTO t (cols)``) over ``rows`` as multi-row VALUES.

    One statement per :data:`SQLITE_CHUNK` rows rather than ``executemany``'s one step per row:
    the module releases and re-takes the GIL around every step, and on the audit writer thread
    each re-take waits for the busy event loop thread, all while holding the write lock.
    """
    group = "(" + ", ".join("?" * width) + ")"
    for start in range(0, len(rows), SQLITE_CHUNK):
        chunk = rows[start : start + SQLITE_CHUNK]
        values = ", ".join([group] * len(chunk))
        conn.execute(f"{head} VALUES {values}", [v for row in chunk for v in row])


def snapshot(conn: Connection) -> None:
    """Make the following reads on a reader connection one consistent snapshot.

    SQLite: ``BEGIN`` (a read transaction). PostgreSQL readers already run in a REPEATABLE
    READ, READ ONLY transaction (:func:`connect_read`), so there is nothing to do.
    """
    if not is_postgres(conn):
        conn.execute("BEGIN")


def connect_readonly(path: Path) -> sqlite3.Connection:
    """Open an audit file read-only (``mode=ro``): readers can never modify the log."""
    if not path.is_file():
        raise FileNotFoundError(f"audit log {path} does not exist")
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def connect_read(db: AuditLocation | str) -> Connection:
    """A read-only connection: SQLite ``mode=ro``, or a PostgreSQL READ ONLY transaction.

    ``FileNotFoundError`` when there is no SQLite file or no audit tables in the schema;
    ``certbroker.errors.Unavailable`` (``AUDIT_UNAVAILABLE``) when PostgreSQL cannot be reached.
    Close it when done (``contextlib.closing``).
    """
    location = as_location(db)
    if isinstance(location, Path):
        return connect_readonly(location)
    from certbroker.audit.store import postgres as audit_pg

    return audit_pg.connect_reader(location)


def exists(db: AuditLocation | str) -> bool:
    """Whether there is an audit log at ``db`` (file, or tables in the schema)."""
    location = as_location(db)
    if isinstance(location, Path):
        return location.is_file()
    from certbroker.audit.store import postgres as audit_pg

    return audit_pg.schema_exists(location)


def sqlite_has_table(conn: Connection, name: str) -> bool:
    """Whether an SQLite database has table ``name`` (an old file may lack newer tables)."""
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back an open SQLite transaction, if any; never raises (so it cannot mask the error
    that led here: a failed COMMIT may already have rolled back)."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


@contextlib.contextmanager
def write_transaction(
    db: AuditLocation | str, *, busy_timeout: float = 10.0
) -> Iterator[Connection]:
    """A connection inside a transaction holding the log's write lock (the one appends take).

    Commits when the block ends, rolls back if it raises. For maintenance writes next to the
    appends: checkpoints, archival. The log must exist (no schema is created here).
    """
    location = as_location(db)
    if isinstance(location, PostgresLocation):
        from certbroker.audit.store import postgres as audit_pg

        with audit_pg.write_transaction(location, lock_timeout=busy_timeout) as pg:
            yield pg
        return
    if not location.is_file():
        raise FileNotFoundError(f"audit log {location} does not exist")
    conn = sqlite3.connect(location, timeout=busy_timeout, isolation_level=None)
    try:
        # IMMEDIATE: the write lock before the first read, as SQLiteStore.write_batch does.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
    finally:
        conn.close()
