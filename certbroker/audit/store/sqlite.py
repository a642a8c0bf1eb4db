"""The SQLite audit backend (the embedded default): WAL, ``synchronous=FULL``, one writer.

This module owns what is particular to SQLite: the schema, the file's permissions (0600, entries
name citizens), read-only connections (``mode=ro``), the write lock (``BEGIN IMMEDIATE``, with a
lock file in front of it, see :class:`SQLiteWriter`), multi-row INSERTs and the Merkle tree's
cached frontier (``merkle_state``). The rows, chain and tree are written by the backend-neutral
:func:`certbroker.audit.append.append_rows`.

Unlike PostgreSQL (:mod:`certbroker.audit.store.postgres`) the file has no append-only
triggers: anyone who can write the file can also drop a trigger, so for SQLite the protection
is the chain, the Merkle tree and the signed checkpoints, which ``audit verify`` checks.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certbroker.audit.store.base import DAY_KEY, DAY_MS, Connection, Node, UndecodableText
from certbroker.audit.store.rows import OUTBOX_DDL

SCHEMA_VERSION = 4
"""Stored in ``PRAGMA user_version`` so a later migration knows what it is looking at
(2 = with ``audit_archives``, 3 = with the compact ``audit_entries`` and ``audit_terms``,
4 = ``audit_entries``' subject and clerk indexes keyed by the day first)."""

#: Days listed one by one in a day condition (a bounded range); a longer range, or an
#: unbounded one, lists the days the log holds with a walk of the time index.
_LISTED_DAYS = 64

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS audit_log (
        seq         INTEGER PRIMARY KEY,
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
    "CREATE INDEX IF NOT EXISTS audit_log_clerk ON audit_log (clerk)",
    "CREATE INDEX IF NOT EXISTS audit_log_subject ON audit_log (subject_id)",
    "CREATE INDEX IF NOT EXISTS audit_log_time ON audit_log (time)",
    # The Merkle tree (certbroker.audit.integrity.tree). merkle_state is a cache of the size and
    # frontier, one row, so an append reads no node.
    """CREATE TABLE IF NOT EXISTS merkle_state (
        id       INTEGER PRIMARY KEY CHECK (id = 1),
        size     INTEGER NOT NULL,
        frontier BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS merkle_nodes (
        level INTEGER NOT NULL,
        idx   INTEGER NOT NULL,
        hash  BLOB NOT NULL,
        PRIMARY KEY (level, idx)
    ) WITHOUT ROWID""",
    # Signed checkpoints of the Merkle tree (certbroker.audit.integrity.proofs); the note is what
    # auditors get.
    """CREATE TABLE IF NOT EXISTS checkpoints (
        id        INTEGER PRIMARY KEY,
        size      INTEGER NOT NULL,
        root_hash BLOB NOT NULL,
        time      TEXT NOT NULL,
        note      TEXT NOT NULL
    )""",
    # Archived segments (certbroker.audit.archive): the rows first_seq..last_seq left for a file.
    """CREATE TABLE IF NOT EXISTS audit_archives (
        last_seq        INTEGER PRIMARY KEY,
        first_seq       INTEGER NOT NULL,
        last_entry_hash TEXT NOT NULL,
        file_name       TEXT NOT NULL,
        file_sha256     TEXT NOT NULL,
        time            TEXT NOT NULL
    )""",
    # The notice outbox (certbroker.audit.outbox), mutable; written with the entries.
    *OUTBOX_DDL,
    # Entry format version 2 (certbroker.audit.store.compact): every value stored once, typed;
    # the hashed body is rebuilt from the row. Indexes: what the citizen report (subject), the
    # auditor's per-clerk day (clerk, time), time ranges and receipts (entry_id) look up.
    """CREATE TABLE IF NOT EXISTS audit_entries (
        seq         INTEGER PRIMARY KEY,
        entry_id    BLOB NOT NULL,
        time        INTEGER NOT NULL,
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
        entry_hash  BLOB NOT NULL
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS audit_entries_id ON audit_entries (entry_id)",
    # Subject and clerk keyed by the UTC day first (SQLiteBackend.day_clause says why). A file
    # of schema 3 has them without the day: they are replaced when a writer opens it.
    "DROP INDEX IF EXISTS audit_entries_subject",
    "DROP INDEX IF EXISTS audit_entries_clerk",
    "CREATE INDEX IF NOT EXISTS audit_entries_subject_day "
    f"ON audit_entries ({DAY_KEY}, subject_id)",
    f"CREATE INDEX IF NOT EXISTS audit_entries_clerk_day ON audit_entries ({DAY_KEY}, clerk, time)",
    "CREATE INDEX IF NOT EXISTS audit_entries_time ON audit_entries (time)",
    """CREATE TABLE IF NOT EXISTS audit_terms (
        id   INTEGER PRIMARY KEY,
        term TEXT NOT NULL UNIQUE
    )""",
    # Archive files removed under retention (certbroker.audit.retention): signed tombstones.
    """CREATE TABLE IF NOT EXISTS audit_tombstones (
        last_seq        INTEGER PRIMARY KEY,
        first_seq       INTEGER NOT NULL,
        last_entry_hash TEXT NOT NULL,
        file_name       TEXT NOT NULL,
        file_sha256     TEXT NOT NULL,
        removed_at      TEXT NOT NULL,
        checkpoint      TEXT NOT NULL,
        signature       TEXT NOT NULL
    )""",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

#: Rows per multi-row INSERT: bounds the distinct statements (and host parameters).
SQLITE_CHUNK = 64

#: The writer connection's page cache, in KiB (SQLite's default is 2 MiB). Every append
#: inserts into the subject and (clerk, time) indexes at scattered places; in a log of
#: millions of entries their interior pages and the 2,000-odd leaves where each clerk's
#: entries end no longer fit in 2 MiB, and each insert reads them back from the file.
WRITER_CACHE_KIB = 64 * 1024

#: WAL pages (about 4 KiB each) after which a commit copies the WAL back into the database
#: file (SQLite's default: 1,000). In a large log each batch dirties ~40 scattered index
#: leaves; the checkpoint writes every distinct page back in place, so its cost grows with
#: how few of them repeat within one WAL's worth of commits: at 1,000 pages almost none
#: (2.5 random page writes per entry at 1 M entries, against 0.75 at 10 k), at 10,000 the
#: clerks' leaves and every tail page repeat (1.7 at 1 M, 0.15 at 10 k) and the checkpoint's
#: own fsyncs come ten times less often. Durability is the same: each commit is fsynced in
#: the WAL (``synchronous=FULL``); what this moves is only when it is copied. The WAL file
#: stays at its largest size, about 40 MiB, for reuse.
WAL_CHECKPOINT_PAGES = 10_000


class SQLiteConnection(sqlite3.Connection):
    """An ``sqlite3`` connection that knows its backend (:class:`~.base.Connection`).

    A subclass rather than a wrapper: the writer's hot path calls ``execute`` directly.
    """

    backend: SQLiteBackend


@dataclass(frozen=True)
class SQLiteBackend:
    """The audit log in the SQLite file ``location`` (:class:`~.base.Backend`)."""

    location: Path

    @property
    def display(self) -> str:
        """The file's path."""
        return str(self.location)

    def exists(self) -> bool:
        """Whether the file exists."""
        return self.location.is_file()

    def _connect(self, *, uri: str | None = None, **options: Any) -> SQLiteConnection:
        """A connection to the file (or to ``uri``) that knows this backend."""
        if uri is None:
            conn = sqlite3.connect(self.location, factory=SQLiteConnection, **options)
        else:
            conn = sqlite3.connect(uri, factory=SQLiteConnection, uri=True, **options)
        conn.backend = self
        return conn

    def connect_read(self) -> SQLiteConnection:
        """Open the file read-only (``mode=ro``): readers can never modify the log."""
        if not self.location.is_file():
            raise FileNotFoundError(f"audit log {self.location} does not exist")
        return self._connect(uri=f"{self.location.resolve().as_uri()}?mode=ro")

    @contextlib.contextmanager
    def write_transaction(self, *, busy_timeout: float = 10.0) -> Iterator[Connection]:
        """A connection in a ``BEGIN IMMEDIATE`` transaction; commits when the block ends."""
        if not self.location.is_file():
            raise FileNotFoundError(f"audit log {self.location} does not exist")
        with (
            contextlib.closing(self._connect(timeout=busy_timeout, isolation_level=None)) as conn,
            _immediate(conn),
        ):
            yield conn

    def open_writer(self, *, busy_timeout: float = 10.0) -> SQLiteWriter:
        """The writer connection: creates the file (0600) and schema, WAL, ``synchronous=FULL``."""
        return SQLiteWriter(self, busy_timeout=busy_timeout)

    # --- dialect -----------------------------------------------------------------------------

    def snapshot(self, conn: Connection) -> None:
        """``BEGIN``: a read transaction, one snapshot until the connection is closed."""
        conn.execute("BEGIN")

    def stream(self, conn: Connection, sql: str, parameters: Sequence[Any] = ()) -> Iterator[Any]:
        """An SQLite cursor already fetches row by row."""
        return iter(conn.execute(sql, parameters))

    def insert_many(
        self,
        conn: Connection,
        table: str,
        columns: Sequence[str],
        types: Sequence[str],
        rows: Sequence[Sequence[Any]],
    ) -> None:
        """Multi-row ``INSERT ... VALUES`` statements (:func:`sqlite_insert`); no types needed."""
        sqlite_insert(conn, f"INSERT INTO {table} ({', '.join(columns)})", len(columns), rows)

    typed_columns = False

    def day_clause(
        self, conn: Connection, since: int | None, until: int | None
    ) -> tuple[str, list[object]] | None:
        """The days of a short bounded range listed; else the days the log holds, found by a
        recursive walk of the time index (one step per day present, so a clock that once
        jumped years ahead costs one step, not a step per empty day)."""
        if since is not None and until is not None and 0 <= since < until:
            first_day, last_day = since // DAY_MS, (until - 1) // DAY_MS
            if last_day - first_day < _LISTED_DAYS:
                days = ", ".join(str(d) for d in range(first_day, last_day + 1))
                return f"{DAY_KEY} IN ({days})", []
        (first,) = conn.execute("SELECT min(time) FROM audit_entries").fetchone()
        if first is None:
            return "1 = 0", []
        if not isinstance(first, int) or first < 0:
            return None  # integer division truncates below 0: no day condition, a full scan
        values: list[object] = [max(first, since or 0) // DAY_MS]
        bound = ""
        if until is not None:
            bound = " AND time < ?"
            values.append(until)
        # Fixed SQL; the day and the bound are parameters.
        walk = (
            "WITH RECURSIVE d(day) AS (SELECT ? UNION ALL "  # noqa: S608
            f"SELECT (SELECT {DAY_KEY} FROM audit_entries WHERE time >= (d.day + 1) * {DAY_MS}"
            f"{bound} ORDER BY time LIMIT 1) FROM d WHERE d.day IS NOT NULL) "
            "SELECT day FROM d WHERE day IS NOT NULL"
        )
        return f"{DAY_KEY} IN ({walk})", values

    def json_element(self, column: str, index: int, *, integer: bool = False) -> str:
        """``json_extract``: a JSON number comes out as an SQL integer, a string as text."""
        return f"json_extract({column}, '$[{int(index)}]')"

    def text_agg(self, expr: str) -> str:
        """``group_concat`` (comma-separated by default)."""
        return f"group_concat({expr})"

    def has_table(self, conn: Connection, name: str) -> bool:
        """Looked up in ``sqlite_master``: a file written by an older version may lack it."""
        row = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return row is not None

    def keep_undecodable_text(self, conn: Connection) -> None:
        """A ``text_factory`` that decodes itself: SQLite stores whatever bytes it is given as
        TEXT, and the module's own decoding raises mid-query without naming the row."""
        if not isinstance(conn, sqlite3.Connection):
            raise TypeError(f"not an SQLite audit connection: {type(conn).__name__}")
        conn.text_factory = _decode_text

    def save_tree(
        self, conn: Connection, nodes: Sequence[Node], size: int, frontier: Sequence[bytes]
    ) -> None:
        """The nodes (replacing equal ones) and the one ``merkle_state`` row, upserted."""
        sqlite_insert(conn, "INSERT OR REPLACE INTO merkle_nodes (level, idx, hash)", 3, nodes)
        conn.execute(
            "INSERT OR REPLACE INTO merkle_state (id, size, frontier) VALUES (1, ?, ?)",
            (size, b"".join(frontier)),
        )

    def load_tree(self, conn: Connection) -> tuple[int, bytes | None]:
        """From the ``merkle_state`` cache; (0, b"") for an empty or pre-Merkle log."""
        row = conn.execute("SELECT size, frontier FROM merkle_state WHERE id = 1").fetchone()
        return (0, b"") if row is None else (int(row[0]), bytes(row[1]))

    def read_nodes(self, conn: Connection, positions: Sequence[tuple[int, int]]) -> list[bytes]:
        """One indexed lookup per node: cheap in-process, no round trips to save."""
        hashes = []
        for level, index in positions:
            row = conn.execute(
                "SELECT hash FROM merkle_nodes WHERE level = ? AND idx = ?", (level, index)
            ).fetchone()
            if row is None:
                raise KeyError(f"merkle node ({level}, {index}) not stored")
            hashes.append(bytes(row[0]))
        return hashes


def _decode_text(raw: bytes) -> str | UndecodableText:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return UndecodableText(raw)


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


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back an open transaction, if any; never raises (so it cannot mask the error that
    led here: a failed COMMIT may already have rolled back)."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back if the block raises.

    IMMEDIATE takes the write lock before the first read, so no other writer (thread or
    process) can append between reading the tail and inserting: the chain always continues
    from the row that really is last, and the sequence cannot fork.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


class SQLiteWriter:
    """The writer side of an SQLite audit file (:class:`~.base.WriterSession`): one connection.

    Opening creates the file (mode 0600: entries name citizens) and the schema. The connection
    is handed to a single writer thread afterwards (hence ``check_same_thread=False``).
    """

    def __init__(self, backend: SQLiteBackend, *, busy_timeout: float = 10.0) -> None:
        path = backend.location
        if not path.exists():
            # Create it ourselves so it never exists world-readable; SQLite gives its -wal and
            # -shm files the same permissions as the database.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        # isolation_level=None: we issue BEGIN/COMMIT ourselves; the module's implicit
        # transactions would start with a deferred BEGIN, which is wrong for a chain.
        self._conn = backend._connect(
            timeout=busy_timeout,
            isolation_level=None,
            check_same_thread=False,
            # Multi-row INSERTs (sqlite_insert): one statement per chunk size.
            cached_statements=256,
        )
        # Writers take this lock file before asking SQLite for its write lock. SQLite's own
        # wait for a busy database sleeps 1 ms growing to 100 ms between tries, so two worker
        # processes' writers would mostly sleep (see _take_lock). It is released when its
        # holder exits, even by SIGKILL. SQLite's lock still guards the file against writers
        # that skip this (an archiver, the CLI), with busy_timeout as their wait.
        self._lock_fd = os.open(f"{path}-writer.lock", os.O_CREAT | os.O_RDWR, 0o600)
        self._lock_depth = 0
        self._busy_timeout = busy_timeout
        self._lock_requests: queue.SimpleQueue[concurrent.futures.Future[None]] | None = None
        self._pending_lock: concurrent.futures.Future[None] | None = None
        try:
            self._configure()
        except BaseException:
            self._conn.close()
            os.close(self._lock_fd)
            raise

    def _configure(self) -> None:
        conn = self._conn
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        # FULL: the WAL is fsynced at every commit, so a committed entry survives power loss.
        # (NORMAL, the usual WAL choice, may lose the last commits, breaking "no audit, no
        # answer".) It is per connection, so it is set on every open.
        conn.execute("PRAGMA synchronous = FULL")
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode!r}, WAL required")
        # Per connection too: appends to a log of millions of entries stay as fast as to a
        # small one only with these (see WRITER_CACHE_KIB, WAL_CHECKPOINT_PAGES).
        conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
        with _immediate(conn):
            for statement in SCHEMA:
                conn.execute(statement)

    def settings(self) -> dict[str, object]:
        """``journal_mode`` and ``synchronous`` (durability), ``cache_size`` and
        ``wal_autocheckpoint`` (speed at scale) as the writer connection reports them."""
        return {
            name: self._conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("journal_mode", "synchronous", "cache_size", "wal_autocheckpoint")
        }

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """The writer connection in ``BEGIN IMMEDIATE``, behind the lock file."""
        with self.exclusive(), _immediate(self._conn):
            yield self._conn

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the writer lock file (re-entrant): other processes' writers queue behind it.

        The group-commit writer holds it around collecting and writing a batch."""
        if self._lock_depth == 0:
            self._take_lock()
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _take_lock(self) -> None:
        # Contended, we wait in the kernel, which hands a released lock on at once (polling
        # would wake this thread, and take the GIL, hundreds of times a second). A blocking
        # flock has no timeout, so it runs on a helper thread and we wait for it at most
        # busy_timeout: a stuck writer elsewhere ends in "database is locked"
        # (AUDIT_UNAVAILABLE), not a hang. A wait that timed out stays pending and the next
        # batch waits on it (flock belongs to the open file, so the helper's lock is ours).
        pending = self._pending_lock
        if pending is None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            if self._lock_requests is None:
                self._lock_requests = queue.SimpleQueue()
                threading.Thread(
                    target=_lock_waiter,
                    args=(self._lock_fd, self._lock_requests),
                    name="certbroker-audit-lock",
                    daemon=True,  # may be blocked for good by a stuck writer elsewhere
                ).start()
            pending = self._pending_lock = concurrent.futures.Future()
            self._lock_requests.put(pending)
        try:
            pending.result(timeout=self._busy_timeout)
        except concurrent.futures.TimeoutError:
            raise sqlite3.OperationalError("database is locked") from None
        finally:
            if pending.done():
                self._pending_lock = None

    def close(self) -> None:
        """Close the connection (the last one to close checkpoints the WAL)."""
        try:
            self._conn.close()
        finally:
            os.close(self._lock_fd)


def _lock_waiter(fd: int, requests: queue.SimpleQueue[concurrent.futures.Future[None]]) -> None:
    """Take the flock on ``fd`` for each request, blocking; the requester waits with a timeout."""
    while True:
        request = requests.get()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # the store was closed meanwhile
            request.set_exception(exc)
            return
        request.set_result(None)
