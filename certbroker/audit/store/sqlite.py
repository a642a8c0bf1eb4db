"""The SQLite audit store (the embedded default): WAL, ``synchronous=FULL``, one writer connection.

The rows, chain and tree are written by the backend-neutral
:func:`certbroker.audit.store.rows.append_rows`;
this module owns the SQLite schema, the file's permissions, and the write lock (``BEGIN
IMMEDIATE``). Unlike PostgreSQL (:mod:`certbroker.audit.store.postgres`) the file has no
append-only triggers:
anyone who can write the file can also drop a trigger, so for SQLite the protection is the
chain, the Merkle tree and the signed checkpoints, which ``audit verify`` checks.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from certbroker.audit.integrity.tree import TREE_SCHEMA, backfill
from certbroker.audit.store.db import rollback
from certbroker.audit.store.rows import Head, StoredRow, append_rows

SCHEMA_VERSION = 2
"""Stored in ``PRAGMA user_version`` so a later migration knows what it is looking at
(2 = with ``audit_archives``)."""

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
    *TREE_SCHEMA,
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
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)


class SQLiteStore:
    """The writer side of an SQLite audit file: WAL, ``synchronous=FULL``, one connection.

    Opening creates the file (mode 0600: entries name citizens) and the schema. The connection
    is handed to a single writer thread afterwards (hence ``check_same_thread=False``).
    """

    def __init__(self, path: Path, *, busy_timeout: float = 10.0) -> None:
        if not path.exists():
            # Create it ourselves so it never exists world-readable; SQLite gives its -wal and
            # -shm files the same permissions as the database.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        # isolation_level=None: we issue BEGIN/COMMIT ourselves; the module's implicit
        # transactions would start with a deferred BEGIN, which is wrong for a chain.
        self._conn = sqlite3.connect(
            path,
            timeout=busy_timeout,
            isolation_level=None,
            check_same_thread=False,
            # Multi-row INSERTs (audit_db.sqlite_insert): one statement per chunk size.
            cached_statements=256,
        )
        self._head: Head | None = None  # what this store committed last
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
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA:
                conn.execute(statement)
            backfill(conn)  # a log written before the Merkle tables: add its leaves
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise

    def pragma(self, name: str) -> object:
        """Read a pragma on the writer connection (``journal_mode``, ``synchronous``...)."""
        if not name.isidentifier():
            raise ValueError(f"bad pragma name {name!r}")
        return self._conn.execute(f"PRAGMA {name}").fetchone()[0]

    def write_batch(self, bodies: Sequence[Mapping[str, object]]) -> list[StoredRow]:
        """Append ``bodies`` as consecutive entries in ONE transaction (one fsync).

        Each body gets ``seq`` and ``v`` added, then is chained onto the stored tail. Either all
        rows commit or, on any error, the transaction is rolled back and the error propagates.
        """
        conn = self._conn
        with self.exclusive():
            # IMMEDIATE takes the write lock before we read the tail, so no other writer
            # (thread or process) can append between our read and our inserts: the chain
            # always continues from the row that really is last, and the sequence cannot fork.
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows, head = append_rows(conn, bodies, self._head)
                conn.execute("COMMIT")
            except BaseException:
                self._head = None
                rollback(conn)
                raise
        self._head = head
        return rows

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
