"""The PostgreSQL audit backend: several broker processes appending to ONE verifiable log.

Chosen by ``[audit] dsn`` (and ``schema``, default ``certbroker``). Same canonical body, chain
hash and Merkle leaves as SQLite (:func:`certbroker.audit.append.append_rows` writes both), so
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
    ``merkle_nodes`` (:meth:`PostgresBackend.load_tree`). PUBLIC gets no privileges; the
    broker's own role should get exactly :func:`grant_statements` (SELECT and INSERT; the
    archiver also DELETE on ``audit_log`` and INSERT on ``audit_archives``). Owners and
    superusers can still disable triggers: what catches them is the chain, the tree and the
    signed checkpoints.
Schema
    Created idempotently by the first writer, under the same advisory lock, so two brokers
    starting at once do not race. A role without CREATE rights works once it exists.

psycopg 3 (the ``postgres`` extra) is imported inside the functions that talk to the server,
never at module level: this module is imported with the rest of the package, and an
SQLite-only install needs nothing beyond the standard library.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, LiteralString

from certbroker.audit.events import AUDIT_UNAVAILABLE
from certbroker.audit.store import pgpool
from certbroker.audit.store.base import Connection, Cursor, Node
from certbroker.audit.store.rows import OUTBOX_DDL
from certbroker.config import PostgresLocation
from certbroker.errors import Unavailable

SCHEMA_VERSION = "2"
_TABLES = (
    "audit_log",
    "merkle_nodes",
    "checkpoints",
    "audit_archives",
    "audit_meta",
    "audit_entries",
    "audit_terms",
    "audit_tombstones",
)
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
    # The notice outbox (certbroker.audit.outbox): unqualified, the session's search_path is
    # the schema. Older schemas get it from the writer's hook.
    *OUTBOX_DDL,
    # Entry format version 2 (certbroker.audit.store.compact), partitioned by month of `time`
    # (declarative partitioning: archiving a month detaches its partition, see
    # certbroker.audit.archive). Indexes are what the readers need and no more, as bytes per
    # entry are the point: a B-tree on seq (walks, exports, previous hashes), the subject
    # (citizen report) and (clerk, time) (an auditor's day); BRIN on time and entry_id (both
    # grow with the rows' physical order, so a block range's min/max finds them for a few
    # bytes per hundreds of rows). No unique constraint: on a partitioned table it would have
    # to include the month, and seq and entry_id are unique by construction under the
    # writers' lock; a duplicate sequence breaks the chain and `audit verify` reports it.
    """CREATE TABLE IF NOT EXISTS {s}.audit_entries (
        seq         BIGINT NOT NULL,
        entry_id    BYTEA NOT NULL,
        time        BIGINT NOT NULL,
        clerk       INTEGER NOT NULL,
        subject_id  TEXT NOT NULL,
        matter_code INTEGER NOT NULL,
        record_type INTEGER NOT NULL,
        decision    INTEGER NOT NULL,
        kind        INTEGER NOT NULL,
        office      INTEGER NOT NULL,
        case_number TEXT NOT NULL,
        outcome     INTEGER NOT NULL,
        rest        TEXT NOT NULL,
        entry_hash  BYTEA NOT NULL
    ) PARTITION BY RANGE (time)""",
    "CREATE INDEX IF NOT EXISTS audit_entries_seq ON {s}.audit_entries (seq)",
    "CREATE INDEX IF NOT EXISTS audit_entries_subject ON {s}.audit_entries (subject_id)",
    "CREATE INDEX IF NOT EXISTS audit_entries_clerk ON {s}.audit_entries (clerk, time)",
    "CREATE INDEX IF NOT EXISTS audit_entries_time ON {s}.audit_entries USING brin (time) "
    "WITH (pages_per_range = 8)",
    "CREATE INDEX IF NOT EXISTS audit_entries_id ON {s}.audit_entries USING brin (entry_id) "
    "WITH (pages_per_range = 8)",
    """CREATE TABLE IF NOT EXISTS {s}.audit_terms (
        id   INTEGER PRIMARY KEY,
        term TEXT NOT NULL UNIQUE
    )""",
    # Archive files removed under retention (certbroker.audit.retention): signed tombstones.
    """CREATE TABLE IF NOT EXISTS {s}.audit_tombstones (
        last_seq        BIGINT PRIMARY KEY,
        first_seq       BIGINT NOT NULL,
        last_entry_hash TEXT NOT NULL,
        file_name       TEXT NOT NULL,
        file_sha256     TEXT NOT NULL,
        removed_at      TEXT NOT NULL,
        checkpoint      TEXT NOT NULL,
        signature       TEXT NOT NULL
    )""",
    # The one trigger function. DELETE from audit_log is let through only for archived rows.
    """CREATE OR REPLACE FUNCTION {s}.audit_append_only() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        -- A row trigger fires on the partition: its name is audit_entries_<month>.
        IF TG_OP = 'DELETE' AND (TG_TABLE_NAME = 'audit_log'
                OR TG_TABLE_NAME LIKE 'audit\\_entries%') THEN
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


#: audit_meta is append-only, so each schema version records itself under its own key (a
#: version 1 schema has "schema_version" = "1" and is upgraded in place by the DDL above).
_VERSION_KEY = f"schema_version_{SCHEMA_VERSION}"


def lock_key(schema: str) -> int:
    """The advisory lock key of a schema's log (a signed 64-bit int from its name)."""
    digest = hashlib.sha256(f"certbroker-audit:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


_CURSOR_NAMES = itertools.count(1)  # server-side cursor names must be unique per session


@functools.lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    # Our SQL never has "?" or "%" inside string literals, so a plain replace is exact.
    return sql.replace("%", "%%").replace("?", "%s")


class PgConnection:
    """A psycopg 3 connection seen through :class:`~.base.Connection` (``?`` → ``%s``).

    ``raw`` is the psycopg connection itself, for transaction control and PostgreSQL-only
    calls. Its transactions are explicit: psycopg opens one at the first statement and the
    owner commits or rolls back.
    """

    def __init__(self, raw: Any, backend: PostgresBackend, pool_key: str | None = None) -> None:
        self.raw = raw
        self.backend = backend
        self.schema = backend.location.schema
        # A reader's session goes back to certbroker.audit.store.pgpool when closed.
        self._pool_key = pool_key

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

        Needs the open transaction that readers always have (see
        :meth:`PostgresBackend.connect_read`).
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
        """Close the connection; an open transaction is rolled back. A pooled reader's
        session ends its transaction and is kept for the next reader instead, if healthy."""
        import psycopg

        key, self._pool_key = self._pool_key, None
        if key is not None and not self.raw.closed:
            with contextlib.suppress(psycopg.Error):
                self.raw.rollback()
                if self.raw.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                    pgpool.give_back(key, self.raw)
                    return
        self.raw.close()


def _own(conn: Connection) -> PgConnection:
    """``conn`` as the PostgreSQL connection it is: only this backend's connections reach its
    methods (they are called as ``conn.backend.method(conn, ...)``)."""
    if not isinstance(conn, PgConnection):
        raise TypeError(f"not a PostgreSQL audit connection: {type(conn).__name__}")
    return conn


@dataclass(frozen=True)
class PostgresBackend:
    """The audit log in a PostgreSQL schema (:class:`~.base.Backend`)."""

    location: PostgresLocation

    @property
    def display(self) -> str:
        """Host, database and schema (the DSN may hold a password)."""
        return self.location.display

    def _connect(
        self, *, read_only: bool, lock_timeout: float = 10.0, pool_key: str | None = None
    ) -> PgConnection:
        """A session on the log's schema; ``Unavailable`` if the server cannot be reached.

        Readers get one REPEATABLE READ, READ ONLY snapshot for every statement they run
        (export, verify); writers ``synchronous_commit = on``.
        """
        import psycopg
        from psycopg import sql

        try:
            raw = psycopg.connect(self.location.dsn, autocommit=False, connect_timeout=10)
        except psycopg.Error as exc:
            raise Unavailable(
                AUDIT_UNAVAILABLE, f"cannot connect to the audit store ({self.display})"
            ) from exc
        try:
            if read_only:
                raw.read_only = True
                raw.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            search_path = sql.Identifier(self.location.schema).as_string(raw)
            raw.execute(
                "SELECT set_config('search_path', %s, false), "
                "set_config('synchronous_commit', 'on', false), "
                "set_config('lock_timeout', %s, false)",
                (search_path, f"{max(1, int(lock_timeout * 1000))}ms"),
            )
            raw.commit()  # session settings survive only a committed transaction
        except BaseException:
            raw.close()
            raise
        return PgConnection(raw, self, pool_key)

    def exists(self) -> bool:
        """Whether the schema holds an audit log."""
        with contextlib.closing(self._connect(read_only=True)) as conn:
            return _has_log(conn)

    def connect_read(self) -> PgConnection:
        """A REPEATABLE READ, READ ONLY connection; FileNotFoundError if there is no log.

        An idle reader session of this log is reused (:mod:`~.pgpool`); closing the
        connection hands it back."""
        import psycopg

        key = f"{self.location.dsn}\n{self.location.schema}"
        raw = pgpool.take(key)
        if raw is not None:
            conn = PgConnection(raw, self, key)
            try:  # its first statement also tells whether the session is still alive
                found = _has_log(conn)
            except psycopg.Error:
                raw.close()  # dropped by the server meanwhile: connect anew
            else:
                if not found:
                    conn.close()
                    raise FileNotFoundError(f"no audit log in {self.display}")
                return conn
        conn = self._connect(read_only=True, pool_key=key)
        try:
            if not _has_log(conn):
                raise FileNotFoundError(f"no audit log in {self.display}")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def write_transaction(self, *, busy_timeout: float = 10.0) -> Iterator[Connection]:
        """A writer connection in a transaction holding the log's lock; commits at the end."""
        import psycopg

        conn = self._connect(read_only=False, lock_timeout=busy_timeout)
        try:
            if not _has_log(conn):
                raise FileNotFoundError(f"no audit log in {self.display}")
            take_lock(conn)
            yield conn
            conn.commit()
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
            raise
        finally:
            conn.close()

    def open_writer(self, *, busy_timeout: float = 10.0) -> PostgresWriter:
        """The writer connection; creates the schema if needed."""
        return PostgresWriter(self, lock_timeout=busy_timeout)

    # --- dialect -----------------------------------------------------------------------------

    def snapshot(self, conn: Connection) -> None:
        """Nothing to do: readers already run in a REPEATABLE READ, READ ONLY transaction."""

    def stream(self, conn: Connection, sql: str, parameters: Sequence[Any] = ()) -> Iterator[Any]:
        """Through a server-side cursor (:meth:`PgConnection.stream`)."""
        return _own(conn).stream(sql, parameters)

    def insert_many(
        self,
        conn: Connection,
        table: str,
        columns: Sequence[str],
        types: Sequence[str],
        rows: Sequence[Sequence[Any]],
    ) -> None:
        """ONE statement over column arrays (``INSERT ... SELECT * FROM unnest(...)``, ``types``
        the arrays' element types): per-statement overhead, not bytes, dominates an audit
        batch here."""
        if not rows:
            return
        if table == "audit_entries":  # partitioned by month: the months must exist
            ensure_partitions(_own(conn), (int(row[2]) for row in rows))
        arrays = [list(column) for column in zip(*rows, strict=True)]
        # %b: binary parameters; text arrays in text format are escaped element by element.
        casts = ", ".join(f"%b::{kind}[]" for kind in types)
        sql = f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({casts})"  # noqa: S608
        _own(conn).raw.execute(sql, arrays)

    typed_columns = True

    def day_clause(
        self, conn: Connection, since: int | None, until: int | None
    ) -> tuple[str, list[object]] | None:
        """None: each month's partition has its own indexes, so appends already share the
        current month's pages."""
        return None

    def json_element(self, column: str, index: int, *, integer: bool = False) -> str:
        """``->>`` on the text cast to ``json`` (text out; cast for an integer)."""
        return f"({column}::json ->> {int(index)}){'::integer' if integer else ''}"

    def text_agg(self, expr: str) -> str:
        """``string_agg`` of the values as text."""
        return f"string_agg(({expr})::text, ',')"

    def has_table(self, conn: Connection, name: str) -> bool:
        """Looked up with ``to_regclass`` in the log's schema."""
        (found,) = conn.execute(
            "SELECT to_regclass(?) IS NOT NULL", (f'"{self.location.schema}".{name}',)
        ).fetchone()
        return bool(found)

    def keep_undecodable_text(self, conn: Connection) -> None:
        """Nothing to do: the server refuses text that is not valid in the database's
        encoding, so every text value decodes."""

    def save_tree(
        self, conn: Connection, nodes: Sequence[Node], size: int, frontier: Sequence[bytes]
    ) -> None:
        """The nodes only, as a plain INSERT: a node that already exists means the tree and
        the log disagree, and the primary key then fails the batch (fail closed) instead of
        rewriting it. Size and frontier are not kept: the tables are append-only."""
        columns = ("level", "idx", "hash")
        self.insert_many(conn, "merkle_nodes", columns, ("integer", "bigint", "bytea"), nodes)

    def load_tree(self, conn: Connection) -> tuple[int, bytes | None]:
        """The size is the number of entries (live or archived): every entry is a leaf, and a
        compact writer stores no leaf nodes. No frontier cache (``None``)."""
        (top,) = conn.execute(
            "SELECT greatest((SELECT max(seq) FROM audit_entries), "
            "(SELECT max(seq) FROM audit_log), (SELECT max(last_seq) FROM audit_archives))"
        ).fetchone()
        return (0 if top is None else int(top)), None

    def read_nodes(self, conn: Connection, positions: Sequence[tuple[int, int]]) -> list[bytes]:
        """One round trip for all of them: this runs on every append."""
        if not positions:
            return []
        rows = conn.execute(
            "SELECT level, idx, hash FROM merkle_nodes WHERE (level, idx) IN "
            "(SELECT * FROM unnest(?::integer[], ?::bigint[]))",
            ([level for level, _ in positions], [index for _, index in positions]),
        ).fetchall()
        found = {(int(level), int(index)): bytes(digest) for level, index, digest in rows}
        missing = [p for p in positions if p not in found]
        if missing:
            raise KeyError(f"merkle nodes {missing} not stored")
        return [found[p] for p in positions]


#: Partitions known to exist, per schema (created once, never dropped while a writer runs
#: except by archival, which forgets them here).
_PARTITIONS: dict[str, set[str]] = {}
_MONTHS_AHEAD = 2  # partitions are created this many months ahead of the entries


def partition_name(millis: int) -> tuple[str, int, int]:
    """(name, first ms, end ms) of the monthly partition holding time ``millis``."""
    moment = datetime.fromtimestamp(millis / 1000, tz=UTC)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    end = datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)
    return (
        f"audit_entries_p{start:%Y%m}",
        int(start.timestamp()) * 1000,
        int(end.timestamp()) * 1000,
    )


def ensure_partitions(conn: PgConnection, times: Iterable[int]) -> None:
    """Create the monthly partitions of ``audit_entries`` for ``times`` (ms) and the months
    after them, with the TRUNCATE trigger and REVOKE every partition needs (row triggers are
    cloned from the parent by PostgreSQL itself). Inside the caller's locked transaction."""
    from psycopg import sql

    known = _PARTITIONS.setdefault(conn.schema, set())
    wanted: dict[str, tuple[int, int]] = {}
    for millis in set(times):
        name, start, end = partition_name(millis)
        for _ in range(_MONTHS_AHEAD + 1):
            if name not in known:
                wanted[name] = (start, end)
            name, start, end = partition_name(end)
    for name, (start, end) in sorted(wanted.items()):
        ident, part = sql.Identifier(conn.schema), sql.Identifier(name)
        (found,) = conn.execute(
            "SELECT to_regclass(?) IS NOT NULL", (f'"{conn.schema}".{name}',)
        ).fetchone()
        if found:  # made ahead by the owner: a broker role without CREATE still appends
            known.add(name)
            continue
        conn.raw.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {s}.{p} PARTITION OF {s}.audit_entries "
                "FOR VALUES FROM ({a}) TO ({b})"
            ).format(s=ident, p=part, a=sql.Literal(start), b=sql.Literal(end))
        )
        for statement in _TRIGGERS[1:]:  # TRUNCATE trigger, REVOKE: not inherited
            conn.raw.execute(sql.SQL(statement).format(s=ident, t=part))
        known.add(name)


def forget_partition(schema: str, name: str) -> None:
    """Archival detached partition ``name``: a later entry of that month recreates it."""
    _PARTITIONS.get(schema, set()).discard(name)


def detach_archived(conn: Connection, first: int, last: int) -> list[str]:
    """Detach (and drop) every partition of ``audit_entries`` whose rows all lie in the
    archived range ``first..last``: archiving a month is then one catalog change, not a
    delete of its rows. The caller holds the log's lock, has recorded the archive and verified
    its file. Returns the partitions' names."""
    from psycopg import sql

    own = _own(conn)
    (owner,) = conn.execute(
        "SELECT pg_has_role(current_user, relowner, 'MEMBER') FROM pg_class "
        "WHERE oid = ?::regclass",
        (f'"{own.schema}".audit_entries',),
    ).fetchone()
    if not owner:  # only the owner may detach; an archiver role deletes the rows instead
        return []
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace "
        "WHERE p.relname = 'audit_entries' AND n.nspname = ? ORDER BY c.relname",
        (own.schema,),
    ).fetchall()
    detached = []
    ident = sql.Identifier(own.schema)
    for (name,) in rows:
        part = sql.Identifier(str(name))
        low, high = own.raw.execute(
            sql.SQL("SELECT min(seq), max(seq) FROM {s}.{p}").format(s=ident, p=part)
        ).fetchone()
        if low is None or low < first or high > last:
            continue  # empty (a month ahead), or holding live entries
        own.raw.execute(
            sql.SQL("ALTER TABLE {s}.audit_entries DETACH PARTITION {s}.{p}").format(
                s=ident, p=part
            )
        )
        own.raw.execute(sql.SQL("DROP TABLE {s}.{p}").format(s=ident, p=part))
        forget_partition(own.schema, str(name))
        detached.append(str(name))
    return detached


def take_lock(conn: PgConnection) -> None:
    """Take the log's write lock for the rest of the current transaction."""
    conn.execute("SELECT pg_advisory_xact_lock(?)", (lock_key(conn.schema),))


def _has_log(conn: PgConnection) -> bool:
    (found,) = conn.execute(
        "SELECT to_regclass(?) IS NOT NULL", (f'"{conn.schema}".audit_log',)
    ).fetchone()
    return bool(found)


def ensure_schema(conn: PgConnection) -> None:
    """Create the schema, tables and triggers if they are not there (idempotent, race-free)."""
    from psycopg import sql

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
            "INSERT INTO audit_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
            (_VERSION_KEY, SCHEMA_VERSION),
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
    row = conn.execute("SELECT value FROM audit_meta WHERE key = ?", (_VERSION_KEY,)).fetchone()
    return row is not None and str(row[0]) == SCHEMA_VERSION


def grant_statements(schema: str, role: str, *, archiver: bool = False) -> list[str]:
    """The GRANTs for a dedicated broker role: SELECT and INSERT only (no UPDATE, DELETE or
    TRUNCATE anywhere). ``archiver=True`` adds what ``audit archive`` needs: INSERT on
    ``audit_archives`` and DELETE on ``audit_log`` (which the triggers still limit to
    archived rows). Run them as the schema's owner after the schema exists.

    ``ImportError`` without psycopg (it quotes the identifiers)."""
    from psycopg import sql

    s, r = sql.Identifier(schema), sql.Identifier(role)
    statements = [
        sql.SQL("GRANT USAGE ON SCHEMA {s} TO {r}").format(s=s, r=r),
        sql.SQL(
            "GRANT SELECT, INSERT ON {s}.audit_log, {s}.merkle_nodes, {s}.checkpoints, "
            "{s}.audit_entries, {s}.audit_terms TO {r}"
        ).format(s=s, r=r),
        sql.SQL(
            "GRANT SELECT ON {s}.audit_archives, {s}.audit_meta, {s}.audit_tombstones TO {r}"
        ).format(s=s, r=r),
        # The notice outbox (certbroker.audit.outbox) is not append-only: the relay marks
        # notices sent.
        sql.SQL("GRANT SELECT, INSERT, UPDATE ON {s}.audit_outbox TO {r}").format(s=s, r=r),
    ]
    if archiver:
        statements += [
            sql.SQL("GRANT INSERT ON {s}.audit_archives, {s}.audit_tombstones TO {r}").format(
                s=s, r=r
            ),
            sql.SQL("GRANT DELETE ON {s}.audit_log, {s}.audit_entries TO {r}").format(s=s, r=r),
        ]
    return [statement.as_string(None) for statement in statements]


class PostgresWriter:
    """The writer side of a PostgreSQL audit log (:class:`~.base.WriterSession`).

    Opening connects and creates the schema if needed. The connection is used by the single
    writer thread; if it breaks (server restart), the failing batch fails closed and the next
    batch reconnects.
    """

    def __init__(self, backend: PostgresBackend, *, lock_timeout: float = 10.0) -> None:
        self._backend = backend
        self._lock_timeout = lock_timeout
        self._conn: PgConnection | None = self._open()

    def _open(self) -> PgConnection:
        conn = self._backend._connect(read_only=False, lock_timeout=self._lock_timeout)
        try:
            ensure_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _connection(self) -> PgConnection:
        if self._conn is None or self._conn.raw.closed:
            self._conn = self._open()
        return self._conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """The writer connection in a transaction under the log's advisory lock."""
        conn = self._connection()
        try:
            take_lock(conn)
            yield conn
            conn.commit()
        except BaseException:
            self._abort(conn)
            raise

    def exclusive(self) -> contextlib.AbstractContextManager[object]:
        """Nothing to hold: PostgreSQL hands its advisory lock on in request order."""
        return contextlib.nullcontext()

    def settings(self) -> dict[str, object]:
        """``synchronous_commit`` as the writer connection sees it."""
        conn = self._connection()
        (value,) = conn.execute("SELECT current_setting('synchronous_commit')").fetchone()
        conn.rollback()
        return {"synchronous_commit": str(value)}

    def backend_pid(self) -> int:
        """The server process of the writer connection (pg_stat_activity, for operators)."""
        return int(self._connection().raw.info.backend_pid)

    def _abort(self, conn: PgConnection) -> None:
        import psycopg

        with contextlib.suppress(psycopg.Error):  # broken: closed below, reopened next batch
            conn.rollback()
        # Partitions created in the rolled-back batch are gone again: look them up anew.
        _PARTITIONS.pop(self._backend.location.schema, None)
        if conn.raw.broken or conn.raw.closed:
            with contextlib.suppress(psycopg.Error):
                conn.close()
            self._conn = None

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
