"""The PostgreSQL audit store: several broker processes appending to ONE verifiable log.

Chosen by ``[audit] dsn`` (and ``schema``, default ``certbroker``). Same canonical body, chain
hash and Merkle leaves as SQLite (:func:`certbroker.audit.store.rows.append_rows` writes both), so
every reader, proof, export and verifier works unchanged on either backend.

One chain, many writers
    Each batch runs in one transaction that first takes a transaction-scoped advisory lock
    (``pg_advisory_xact_lock``, one key per schema), then reads the tail, inserts the chained
    rows and the tree nodes, and commits. The lock is the PostgreSQL twin of SQLite's ``BEGIN
    IMMEDIATE``: no two processes read the same tail, so there are no gaps, duplicates or
    forks; it is released by COMMIT/ROLLBACK, even when a process dies mid-batch.
Durability
    ``synchronous_commit = on`` on every writer connection: COMMIT returns only after the WAL
    is flushed, so "no audit, no answer" holds across a crash.
Append-only, enforced by the database
    Triggers refuse UPDATE, DELETE and TRUNCATE of ``audit_log``, ``merkle_nodes``,
    ``checkpoints``, ``audit_archives`` and ``audit_meta``, whoever asks, with one exception:
    DELETE of ``audit_log`` rows at or below the archived watermark (the highest
    ``audit_archives.last_seq``), which is how :mod:`certbroker.audit.archive` moves rows to an
    archive file. There is no mutable state: the tree's size and frontier are read from
    ``merkle_nodes`` (:mod:`certbroker.audit.integrity.tree`). PUBLIC gets no privileges; the
    broker's own
    role should get exactly :func:`grant_statements` (SELECT and INSERT; the archiver also
    DELETE on ``audit_log`` and INSERT on ``audit_archives``). Owners and superusers can still
    disable triggers: what catches them is the chain, the tree and the signed checkpoints.
Schema
    Created idempotently by the first writer, under the same advisory lock, so two brokers
    starting at once do not race. A role without CREATE rights works once it exists.

psycopg 3 (the ``postgres`` extra) is imported here only, and this module only when a
PostgreSQL location is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import LiteralString

import psycopg
from psycopg import sql

from certbroker.audit.store.db import PgConnection
from certbroker.audit.store.rows import AUDIT_UNAVAILABLE, Head, StoredRow, append_rows
from certbroker.config import PostgresLocation
from certbroker.errors import Unavailable

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
_TABLES = ("audit_log", "merkle_nodes", "checkpoints", "audit_archives", "audit_meta")
_DDL: tuple[LiteralString, ...] = (
    "CREATE SCHEMA IF NOT EXISTS {s}",
    """CREATE TABLE IF NOT EXISTS {s}.audit_log (
        seq         BIGINT PRIMARY KEY,
        entry_id    TEXT NOT NULL UNIQUE,
        time        TEXT NOT NULL,
        clerk       TEXT NOT NULL,
        subject_id  TEXT NOT NULL,
        matter_code TEXT NOT NULL,
        record_type TEXT NOT NULL,
        decision    TEXT NOT NULL,
        body        TEXT NOT NULL,
        prev_hash   TEXT NOT NULL,
        entry_hash  TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS audit_log_clerk ON {s}.audit_log (clerk)",
    "CREATE INDEX IF NOT EXISTS audit_log_subject ON {s}.audit_log (subject_id)",
    "CREATE INDEX IF NOT EXISTS audit_log_time ON {s}.audit_log (time)",
    """CREATE TABLE IF NOT EXISTS {s}.merkle_nodes (
        level INTEGER NOT NULL,
        idx   BIGINT NOT NULL,
        hash  BYTEA NOT NULL,
        PRIMARY KEY (level, idx)
    )""",
    """CREATE TABLE IF NOT EXISTS {s}.checkpoints (
        id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        size      BIGINT NOT NULL,
        root_hash BYTEA NOT NULL,
        time      TEXT NOT NULL,
        note      TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS {s}.audit_archives (
        last_seq        BIGINT PRIMARY KEY,
        first_seq       BIGINT NOT NULL,
        last_entry_hash TEXT NOT NULL,
        file_name       TEXT NOT NULL,
        file_sha256     TEXT NOT NULL,
        time            TEXT NOT NULL
    )""",
    "CREATE TABLE IF NOT EXISTS {s}.audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # The one trigger function. DELETE from audit_log is let through only for archived rows.
    """CREATE OR REPLACE FUNCTION {s}.audit_append_only() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'audit_log' THEN
            IF OLD.seq <= (SELECT coalesce(max(last_seq), 0) FROM {s}.audit_archives) THEN
                RETURN OLD;
            END IF;
        END IF;
        RAISE EXCEPTION 'certbroker audit tables are append-only: % on % refused',
            TG_OP, TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
    END
    $$""",
)
_TRIGGERS: tuple[LiteralString, ...] = (
    "CREATE OR REPLACE TRIGGER append_only BEFORE UPDATE OR DELETE ON {s}.{t} "
    "FOR EACH ROW EXECUTE FUNCTION {s}.audit_append_only()",
    "CREATE OR REPLACE TRIGGER append_only_truncate BEFORE TRUNCATE ON {s}.{t} "
    "FOR EACH STATEMENT EXECUTE FUNCTION {s}.audit_append_only()",
    "REVOKE ALL ON {s}.{t} FROM PUBLIC",
)


def lock_key(schema: str) -> int:
    """The advisory lock key of a schema's log (a signed 64-bit int from its name)."""
    digest = hashlib.sha256(f"certbroker-audit:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def take_lock(conn: PgConnection) -> None:
    """Take the log's write lock for the rest of the current transaction."""
    conn.execute("SELECT pg_advisory_xact_lock(?)", (lock_key(conn.schema),))


def _connect(
    location: PostgresLocation, *, read_only: bool, lock_timeout: float = 10.0
) -> PgConnection:
    try:
        raw = psycopg.connect(location.dsn, autocommit=False, connect_timeout=10)
    except psycopg.Error as exc:
        raise Unavailable(
            AUDIT_UNAVAILABLE, f"cannot connect to the audit store ({location.display})"
        ) from exc
    try:
        if read_only:
            # One snapshot for every statement a reader runs (export, verify), and no writes.
            raw.read_only = True
            raw.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        search_path = sql.Identifier(location.schema).as_string(raw)
        raw.execute(
            "SELECT set_config('search_path', %s, false), "
            "set_config('synchronous_commit', 'on', false), "
            "set_config('lock_timeout', %s, false)",
            (search_path, f"{max(1, int(lock_timeout * 1000))}ms"),
        )
        if not read_only:
            raw.commit()  # session settings survive only a committed transaction
    except BaseException:
        raw.close()
        raise
    return PgConnection(raw, location.schema)


def _has_log(conn: PgConnection) -> bool:
    (found,) = conn.execute(
        "SELECT to_regclass(?) IS NOT NULL", (f'"{conn.schema}".audit_log',)
    ).fetchone()
    return bool(found)


def connect_reader(location: PostgresLocation) -> PgConnection:
    """A REPEATABLE READ, READ ONLY connection to the log; FileNotFoundError if there is none."""
    conn = _connect(location, read_only=True)
    try:
        if not _has_log(conn):
            raise FileNotFoundError(f"no audit log in {location.display}")
    except BaseException:
        conn.close()
        raise
    return conn


def schema_exists(location: PostgresLocation) -> bool:
    """Whether the schema holds an audit log."""
    with contextlib.closing(_connect(location, read_only=True)) as conn:
        return _has_log(conn)


def ensure_schema(conn: PgConnection) -> None:
    """Create the schema, tables and triggers if they are not there (idempotent, race-free)."""
    ident = sql.Identifier(conn.schema)
    try:
        take_lock(conn)  # two brokers starting at once: the second waits, then finds it done
        if _schema_current(conn):
            conn.rollback()
            return
        for statement in _DDL:
            conn.raw.execute(sql.SQL(statement).format(s=ident))
        for table in _TABLES:
            for statement in _TRIGGERS:
                conn.raw.execute(sql.SQL(statement).format(s=ident, t=sql.Identifier(table)))
        conn.raw.execute(sql.SQL("REVOKE ALL ON SCHEMA {s} FROM PUBLIC").format(s=ident))
        conn.execute(
            "INSERT INTO audit_meta (key, value) VALUES ('schema_version', ?) "
            "ON CONFLICT (key) DO NOTHING",
            (SCHEMA_VERSION,),
        )
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


def _schema_current(conn: PgConnection) -> bool:
    (found,) = conn.execute(
        "SELECT to_regclass(?) IS NOT NULL", (f'"{conn.schema}".audit_meta',)
    ).fetchone()
    if not found:
        return False
    row = conn.execute("SELECT value FROM audit_meta WHERE key = 'schema_version'").fetchone()
    return row is not None and str(row[0]) == SCHEMA_VERSION


def grant_statements(schema: str, role: str, *, archiver: bool = False) -> list[str]:
    """The GRANTs for a dedicated broker role: SELECT and INSERT only (no UPDATE, DELETE or
    TRUNCATE anywhere). ``archiver=True`` adds what ``audit archive`` needs: INSERT on
    ``audit_archives`` and DELETE on ``audit_log`` (which the triggers still limit to
    archived rows). Run them as the schema's owner after the schema exists."""
    s, r = sql.Identifier(schema), sql.Identifier(role)
    statements = [
        sql.SQL("GRANT USAGE ON SCHEMA {s} TO {r}").format(s=s, r=r),
        sql.SQL(
            "GRANT SELECT, INSERT ON {s}.audit_log, {s}.merkle_nodes, {s}.checkpoints TO {r}"
        ).format(s=s, r=r),
        sql.SQL("GRANT SELECT ON {s}.audit_archives, {s}.audit_meta TO {r}").format(s=s, r=r),
    ]
    if archiver:
        statements += [
            sql.SQL("GRANT INSERT ON {s}.audit_archives TO {r}").format(s=s, r=r),
            sql.SQL("GRANT DELETE ON {s}.audit_log TO {r}").format(s=s, r=r),
        ]
    return [statement.as_string(None) for statement in statements]


@contextlib.contextmanager
def write_transaction(
    location: PostgresLocation, *, lock_timeout: float = 10.0
) -> Iterator[PgConnection]:
    """A writer connection in a transaction holding the log's lock; commits at the end."""
    conn = _connect(location, read_only=False, lock_timeout=lock_timeout)
    try:
        if not _has_log(conn):
            raise FileNotFoundError(f"no audit log in {location.display}")
        take_lock(conn)
        yield conn
        conn.commit()
    except BaseException:
        with contextlib.suppress(psycopg.Error):
            conn.rollback()
        raise
    finally:
        conn.close()


class PostgresStore:
    """The writer side of a PostgreSQL audit log (a
    :class:`~certbroker.audit.store.rows.BatchStore`).

    Opening connects and creates the schema if needed. The connection is used by the single
    writer thread; if it breaks (server restart), the failing batch fails closed and the next
    batch reconnects.
    """

    def __init__(self, location: PostgresLocation, *, lock_timeout: float = 10.0) -> None:
        self.location = location
        self._lock_timeout = lock_timeout
        self._head: Head | None = None  # what this store committed last (see append_rows)
        self._conn: PgConnection | None = self._open()

    def _open(self) -> PgConnection:
        conn = _connect(self.location, read_only=False, lock_timeout=self._lock_timeout)
        try:
            ensure_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def backend_pid(self) -> int:
        """The server process of the writer connection (pg_stat_activity, for operators)."""
        return int(self._connection().raw.info.backend_pid)

    def setting(self, name: str) -> str:
        """A server setting as the writer connection sees it (``synchronous_commit``...)."""
        conn = self._connection()
        (value,) = conn.execute("SELECT current_setting(?)", (name,)).fetchone()
        conn.rollback()
        return str(value)

    def _connection(self) -> PgConnection:
        if self._conn is None or self._conn.raw.closed:
            self._conn = self._open()
        return self._conn

    def write_batch(self, bodies: Sequence[Mapping[str, object]]) -> list[StoredRow]:
        """Append ``bodies`` as consecutive entries in ONE transaction, under the log's lock."""
        conn = self._connection()
        try:
            take_lock(conn)
            rows, head = append_rows(conn, bodies, self._head)
            conn.commit()
        except BaseException:
            self._head = None
            self._abort(conn)
            raise
        self._head = head
        return rows

    def _abort(self, conn: PgConnection) -> None:
        with contextlib.suppress(psycopg.Error):  # broken: closed below, reopened next batch
            conn.rollback()
        if conn.raw.broken or conn.raw.closed:
            with contextlib.suppress(psycopg.Error):
                conn.close()
            self._conn = None

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
