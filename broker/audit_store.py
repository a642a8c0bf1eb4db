"""Storage for the audit log: encoding, SQLite schema, the group-commit writer, chain checks.

This module owns the on-disk format that :mod:`broker.audit` specifies for auditors (canonical
body, hash chain, genesis hash) but not the event model: a body is a plain mapping of JSON
values, so the chain code serves every event kind, and a later PostgreSQL store can reuse
:func:`canonical_body`, :func:`chain_hash` and :func:`check_chain` unchanged and only swap the
SQL (it must satisfy :class:`BatchStore`). :class:`GroupCommitWriter` is store-agnostic too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from broker.audit_tree import TREE_SCHEMA, TreeWriter, backfill
from broker.errors import Unavailable

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
"""``prev_hash`` of the first entry."""

FORMAT_VERSION = 1
"""Value of the ``v`` key in every body; bump it if the body's meaning ever changes."""

SCHEMA_VERSION = 1
"""Stored in ``PRAGMA user_version`` so a later migration knows what it is looking at."""

INDEXED_COLUMNS = (
    "entry_id",
    "time",
    "clerk",
    "subject_id",
    "matter_code",
    "record_type",
    "decision",
)
"""Body keys copied into their own columns so queries can use indexes. They are not covered by
the hash directly, so :func:`check_chain` compares each one with the hashed body."""

_SCHEMA = (
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
    # Signed checkpoints of the Merkle tree (broker.audit_proofs); the note is what auditors get.
    """CREATE TABLE IF NOT EXISTS checkpoints (
        id        INTEGER PRIMARY KEY,
        size      INTEGER NOT NULL,
        root_hash BLOB NOT NULL,
        time      TEXT NOT NULL,
        note      TEXT NOT NULL
    )""",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
_ROW_COLUMNS = "seq, body, prev_hash, entry_hash, " + ", ".join(INDEXED_COLUMNS)
# Column order matches (seq, *INDEXED_COLUMNS, body, prev_hash, entry_hash) in write_batch.
_INSERT = """INSERT INTO audit_log
    (seq, entry_id, time, clerk, subject_id, matter_code, record_type, decision,
     body, prev_hash, entry_hash)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""


def canonical_body(fields: Mapping[str, object]) -> str:
    """The canonical JSON text of an entry body: sorted keys, no whitespace, raw UTF-8."""
    return json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def chain_hash(prev_hash: str, body: str) -> str:
    """``SHA-256(prev_hash_hex + body)`` over UTF-8, as lowercase hex."""
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def iso_time(moment: datetime) -> str:
    """An aware datetime as the stored time text: UTC, millisecond precision, ``Z`` suffix.

    Fixed width, so text order is time order and range queries compare strings.
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("audit times must be timezone-aware")
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.removesuffix("+00:00") + "Z"


def epoch_time(seconds: float) -> str:
    """:func:`iso_time` of a POSIX timestamp (what an injected clock returns)."""
    return iso_time(datetime.fromtimestamp(seconds, tz=UTC))


@dataclass(frozen=True)
class StoredRow:
    """One row as stored. ``columns`` holds the :data:`INDEXED_COLUMNS` values."""

    seq: int
    body: str
    prev_hash: str
    entry_hash: str
    columns: Mapping[str, str]


class BatchStore(Protocol):
    """What the group-commit writer needs from a store. Called from one thread only."""

    def write_batch(self, bodies: Sequence[Mapping[str, object]]) -> list[StoredRow]:
        """Append ``bodies`` in order, all in one durable transaction, or none of them."""
        ...

    def close(self) -> None:
        """Release the store's connection."""
        ...


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
            path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._configure()
        except BaseException:
            self._conn.close()
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
            for statement in _SCHEMA:
                conn.execute(statement)
            backfill(conn)  # a log written before the Merkle tables: add its leaves
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
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
        # IMMEDIATE takes the write lock before we read the tail, so no other writer (thread or
        # process) can append between our read and our inserts: the chain always continues
        # from the row that really is last, and the sequence cannot fork.
        conn.execute("BEGIN IMMEDIATE")
        try:
            tail = conn.execute(
                "SELECT seq, entry_hash FROM audit_log ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            seq, prev = (0, GENESIS_HASH) if tail is None else (int(tail[0]), str(tail[1]))
            tree = TreeWriter(conn)
            if tree.range.size != seq:
                raise RuntimeError(f"merkle tree has {tree.range.size} leaves, log {seq} entries")
            rows: list[StoredRow] = []
            for fields in bodies:
                seq += 1
                body = canonical_body({**fields, "seq": seq, "v": FORMAT_VERSION})
                entry_hash = chain_hash(prev, body)
                columns = {name: str(fields[name]) for name in INDEXED_COLUMNS}
                conn.execute(_INSERT, (seq, *columns.values(), body, prev, entry_hash))
                rows.append(StoredRow(seq, body, prev, entry_hash, columns))
                tree.append(body)
                prev = entry_hash
            tree.flush()  # the tree's nodes commit with the entries, or not at all
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        return rows

    def close(self) -> None:
        """Close the connection (the last one to close checkpoints the WAL)."""
        self._conn.close()


def _rollback(conn: sqlite3.Connection) -> None:
    # A failed COMMIT may already have rolled back; never let ROLLBACK mask the real error.
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


AUDIT_UNAVAILABLE = "AUDIT_UNAVAILABLE"
"""The reason code of every append that could not be stored."""


@dataclass
class _Pending:
    bodies: Sequence[Mapping[str, object]]  # one caller's entries: stored together or not at all
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[StoredRow]]

    def settle(self, result: list[StoredRow] | BaseException) -> None:
        """Hand ``result`` to the waiting caller; called from the writer thread."""

        def apply() -> None:
            if self.future.done():  # the caller was cancelled; its entry is stored anyway
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        # A closed loop means nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(apply)


class GroupCommitWriter:
    """One dedicated thread writing queued bodies to a :class:`BatchStore`, a batch at a time.

    Callers on any event loop ``await write(fields)``; the event loop never touches the disk.
    ``commits`` counts committed batches.
    """

    def __init__(self, store: BatchStore, *, max_batch: int = 256) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._store = store
        self._max_batch = max_batch
        # None is the stop marker. The lock makes "check closed, then enqueue" atomic with
        # "mark closed, then enqueue stop", so nothing is ever queued behind the stop marker.
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self.commits = 0
        self._thread = threading.Thread(
            target=self._run, name="certbroker-audit-writer", daemon=True
        )
        self._thread.start()

    async def write(self, fields: Mapping[str, object]) -> StoredRow:
        """Queue one body and wait for its stored row; ``Unavailable`` if it was not stored."""
        (row,) = await self.write_many([fields])
        return row

    async def write_many(self, bodies: Sequence[Mapping[str, object]]) -> list[StoredRow]:
        """Queue ``bodies`` as consecutive entries of ONE transaction (all stored, or none and
        ``Unavailable``) and wait for their rows, in order."""
        loop = asyncio.get_running_loop()
        pending = _Pending(list(bodies), loop, loop.create_future())
        with self._lock:
            if self._closed:
                raise Unavailable(AUDIT_UNAVAILABLE, "audit log is closed")
            self._queue.put(pending)
        return await pending.future

    async def aclose(self) -> None:
        """Write everything already queued, then stop the thread and close the store."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        try:
            stop = False
            while not stop:
                first = self._queue.get()
                if first is None:
                    break
                batch = [first]
                # Whatever queued up while the previous batch was being fsynced goes into
                # this one: that is the group commit, and it needs no timer.
                while len(batch) < self._max_batch:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._write(batch)
        finally:
            with self._lock:
                self._closed = True
            self._fail_leftovers()
            try:
                self._store.close()
            except Exception:
                log.exception("closing the audit store failed")

    def _write(self, batch: list[_Pending]) -> None:
        bodies = [body for p in batch for body in p.bodies]
        try:
            rows = self._store.write_batch(bodies)
            if len(rows) != len(
                bodies
            ):  # a store bug; fail closed rather than leave callers hanging
                raise RuntimeError(f"store returned {len(rows)} rows for {len(bodies)} entries")
        except Exception as exc:
            # The store rolled back: nothing of this batch is stored, so every caller fails.
            log.error("audit write of %d entries failed", len(bodies), exc_info=exc)
            for pending in batch:
                pending.settle(_unavailable("audit log unavailable", exc))
            return
        self.commits += 1
        start = 0
        for pending in batch:
            pending.settle(rows[start : start + len(pending.bodies)])
            start += len(pending.bodies)

    def _fail_leftovers(self) -> None:
        # Only reachable if the loop above died; normally nothing is queued behind the stop.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.settle(_unavailable("audit log is closed", None))


def _unavailable(message: str, cause: BaseException | None) -> Unavailable:
    # A fresh exception per caller: one instance raised in many tasks would share a traceback.
    err = Unavailable(AUDIT_UNAVAILABLE, message)
    err.__cause__ = cause
    return err


def connect_readonly(path: Path) -> sqlite3.Connection:
    """Open an audit file read-only (``mode=ro``): readers can never modify the log."""
    if not path.is_file():
        raise FileNotFoundError(f"audit log {path} does not exist")
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def _row(values: Sequence[Any]) -> StoredRow:
    seq, body, prev_hash, entry_hash, *indexed = values
    return StoredRow(
        seq=int(seq),
        body=str(body),
        prev_hash=str(prev_hash),
        entry_hash=str(entry_hash),
        columns={name: str(value) for name, value in zip(INDEXED_COLUMNS, indexed, strict=True)},
    )


def iter_rows(conn: sqlite3.Connection) -> Iterator[StoredRow]:
    """Every row in ``seq`` order. One SELECT: one consistent snapshot even while writing."""
    for values in conn.execute(f"SELECT {_ROW_COLUMNS} FROM audit_log ORDER BY seq"):  # noqa: S608
        yield _row(values)


def select_rows(
    conn: sqlite3.Connection,
    *,
    equals: Mapping[str, str],
    since: str | None,
    until: str | None,
    limit: int,
) -> list[StoredRow]:
    """The newest ``limit`` rows matching all conditions, returned oldest first.

    ``equals`` keys must be :data:`INDEXED_COLUMNS`; ``since`` is inclusive, ``until`` exclusive.
    """
    clauses: list[str] = []
    params: list[object] = []
    for column, value in equals.items():
        if column not in INDEXED_COLUMNS:
            raise ValueError(f"cannot filter on {column!r}")
        clauses.append(f"{column} = ?")
        params.append(value)
    if since is not None:
        clauses.append("time >= ?")
        params.append(since)
    if until is not None:
        clauses.append("time < ?")
        params.append(until)
    where = " AND ".join(clauses) or "1"
    # Column names come from the fixed allow-list above; every value is a bound parameter.
    sql = (
        f"SELECT * FROM (SELECT {_ROW_COLUMNS} FROM audit_log WHERE {where} "  # noqa: S608
        "ORDER BY seq DESC LIMIT ?) ORDER BY seq"
    )
    return [_row(values) for values in conn.execute(sql, (*params, limit))]


@dataclass(frozen=True)
class ChainResult:
    """Outcome of :func:`check_chain`; ``head_hash`` is the last entry's hash when intact."""

    entries: int
    first_bad: int | None
    problem: str
    head_hash: str


def check_chain(rows: Iterable[StoredRow]) -> ChainResult:
    """Recompute the chain over ``rows`` (in stored order) and find the first bad entry.

    Positions count from 1 and equal the sequence an intact entry there must carry, so a
    missing, inserted or swapped entry shows up as the first position whose entry does not fit.
    Rows after the first bad one are only counted.
    """
    prev = GENESIS_HASH
    count = 0
    remaining_rows = iter(rows)
    for row in remaining_rows:
        count += 1
        problem = _row_problem(count, prev, row)
        if problem:
            remaining = sum(1 for _ in remaining_rows)
            return ChainResult(count + remaining, count, f"entry {count}: {problem}", "")
        prev = row.entry_hash
    return ChainResult(count, None, "", prev)


def _row_problem(position: int, prev: str, row: StoredRow) -> str:
    """Why ``row`` cannot be entry ``position`` following hash ``prev``; "" if it can."""
    if row.seq != position:
        return f"stored sequence is {row.seq} (entry missing, inserted or out of order)"
    try:
        data = json.loads(row.body)
    except ValueError:
        return "body is not valid JSON"
    if not isinstance(data, dict):
        return "body is not a JSON object"
    body_seq = data.get("seq")
    if type(body_seq) is not int or body_seq != position:
        return f"body carries sequence {body_seq!r} (entry moved or inserted)"
    if row.prev_hash != prev:
        return "prev_hash does not match the previous entry's hash"
    if chain_hash(row.prev_hash, row.body) != row.entry_hash:
        return "entry_hash does not match the entry's contents (entry edited)"
    for name in INDEXED_COLUMNS:
        if data.get(name) != row.columns[name]:
            return f"column {name} differs from the hashed body (entry edited)"
    return ""
