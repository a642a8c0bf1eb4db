"""Appending entries: chain them onto the stored tail and add their Merkle leaves, in one
transaction, on either backend.

:func:`append_rows` is the one append step; :class:`ChainStore` runs it inside a backend's
writer session (:meth:`certbroker.audit.store.base.Backend.open_writer`) for the group-commit
writer (:mod:`certbroker.audit.writer`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from certbroker.audit.events import FORMAT_VERSION, canonical_body, chain_hash
from certbroker.audit.integrity.tree import STORED_LEVEL, TreeWriter, backfill
from certbroker.audit.store.base import Backend, Connection, WriterSession
from certbroker.audit.store.compact import COMPACT_VERSION, Terms
from certbroker.audit.store.rows import (
    INDEXED_COLUMNS,
    StoredRow,
    insert_compact,
    insert_rows,
    read_tail,
)

ENTRY_FORMATS = (FORMAT_VERSION, COMPACT_VERSION)
"""The entry format versions a writer can append: 1 (JSON body and copied columns, table
``audit_log``) and 2 (compact, :mod:`certbroker.audit.store.compact`)."""


@dataclass(frozen=True)
class Head:
    """What a writer committed last: the tail entry and the tree frontier of ``seq`` leaves."""

    seq: int
    entry_hash: str
    frontier: tuple[bytes, ...]


def append_rows(
    conn: Connection,
    bodies: Sequence[Mapping[str, object]],
    known: Head | None = None,
    *,
    terms: Terms | None = None,
) -> tuple[list[StoredRow], Head]:
    """Chain ``bodies`` onto the stored tail and insert them with their Merkle leaves.

    Call inside a transaction that already holds the log's write lock (the writer sessions
    do), so nobody can append between reading the tail and inserting: the chain cannot fork and
    the sequence has no gaps or duplicates. Each body gets ``seq`` and ``v`` added. ``known`` is
    the :class:`Head` the caller's previous batch returned: when the stored tail is still that
    entry, nobody appended since and its frontier is reused instead of read back. Returns the
    rows and the new head (for the caller to keep only once its transaction commits).

    ``terms`` given: the entries are written in the compact format version 2 (with that term
    cache, :class:`~certbroker.audit.store.compact.Terms`), and the tree stores no node below
    :data:`~certbroker.audit.integrity.tree.STORED_LEVEL`; else in version 1.
    """
    seq, prev = read_tail(conn)
    min_level = 0 if terms is None else STORED_LEVEL
    if known is not None and (known.seq, known.entry_hash) == (seq, prev):
        tree = TreeWriter(conn, (seq, list(known.frontier)), min_level=min_level)
    else:
        tree = TreeWriter(conn, min_level=min_level)
        if tree.range.size != seq:
            raise RuntimeError(f"merkle tree has {tree.range.size} leaves, log {seq} entries")
    version = FORMAT_VERSION if terms is None else COMPACT_VERSION
    rows: list[StoredRow] = []
    for fields in bodies:
        seq += 1
        body = canonical_body({**fields, "seq": seq, "v": version})
        entry_hash = chain_hash(prev, body)
        columns = {name: str(fields[name]) for name in INDEXED_COLUMNS}
        rows.append(StoredRow(seq, body, prev, entry_hash, columns))
        tree.append(body)
        prev = entry_hash
    if terms is None:
        insert_rows(conn, rows)
    else:
        insert_compact(conn, terms, rows, bodies)
    tree.flush()  # the tree's nodes commit with the entries, or not at all
    return rows, Head(seq, prev, tree.range.frontier)


def _has_compact_rows(conn: Connection) -> bool:
    if not conn.backend.has_table(conn, "audit_entries"):
        return False
    return conn.execute("SELECT 1 FROM audit_entries LIMIT 1").fetchone() is not None


class AppendHook(Protocol):
    """More rows written in each append's own transaction (the notice outbox,
    :class:`certbroker.audit.outbox.NoticeOutbox`): stored with the entries, or neither."""

    def prepare(self, conn: Connection) -> None:
        """Create what the hook writes to, in the store's first transaction."""
        ...

    def rows_appended(
        self, conn: Connection, bodies: Sequence[Mapping[str, object]], rows: Sequence[StoredRow]
    ) -> None:
        """Write for the batch's ``rows`` (appended from ``bodies``); raising rolls it back."""
        ...


class ChainStore:
    """The store the group-commit writer appends to (a
    :class:`~certbroker.audit.writer.BatchStore`): :func:`append_rows` in a backend's writer
    session, one transaction per batch.

    Opening also completes the Merkle tree of a log written before it had one (an old SQLite
    file): leaves for stored entries the tree does not cover yet.
    """

    def __init__(
        self,
        session: WriterSession,
        hook: AppendHook | None = None,
        *,
        entry_format: int = FORMAT_VERSION,
    ) -> None:
        if entry_format not in ENTRY_FORMATS:
            session.close()
            raise ValueError(f"entry format must be one of {ENTRY_FORMATS}")
        self.session = session
        self._hook = hook
        self.entry_format = entry_format
        self._head: Head | None = None  # what this store committed last (see append_rows)
        self._terms: Terms | None = None
        try:
            with session.transaction() as conn:
                backfill(conn)
                if hook is not None:
                    hook.prepare(conn)
                if entry_format == FORMAT_VERSION and _has_compact_rows(conn):
                    # Once a log holds compact entries, it goes on compact: readers rely on
                    # every live version 1 entry preceding every version 2 one.
                    self.entry_format = COMPACT_VERSION
        except BaseException:
            session.close()
            raise

    @classmethod
    def open(
        cls,
        backend: Backend,
        *,
        busy_timeout: float = 10.0,
        hook: AppendHook | None = None,
        entry_format: int = FORMAT_VERSION,
    ) -> ChainStore:
        """Open ``backend``'s writer session (creating the log if needed) and continue it,
        appending entries in ``entry_format`` (:data:`ENTRY_FORMATS`); ``hook`` writes more rows in
        every batch's transaction."""
        return cls(backend.open_writer(busy_timeout=busy_timeout), hook, entry_format=entry_format)

    def write_batch(self, bodies: Sequence[Mapping[str, object]]) -> list[StoredRow]:
        """Append ``bodies`` as consecutive entries in ONE transaction (one fsync), under the
        log's write lock: either all rows commit or, on any error, none and the error
        propagates."""
        if self.entry_format == COMPACT_VERSION and self._terms is None:
            self._terms = Terms()
        try:
            with self.session.transaction() as conn:
                rows, head = append_rows(conn, bodies, self._head, terms=self._terms)
                if self._hook is not None:
                    self._hook.rows_appended(conn, bodies, rows)
        except BaseException:
            self._head = None  # whatever the database holds now, it is read back next time
            self._terms = None  # it may hold terms of the batch that was rolled back
            raise
        self._head = head
        return rows

    def exclusive(self) -> AbstractContextManager[object]:
        """The session's writer lock (:meth:`WriterSession.exclusive`), for the writer thread."""
        return self.session.exclusive()

    def settings(self) -> dict[str, object]:
        """The session's durability settings."""
        return self.session.settings()

    def close(self) -> None:
        """Close the session."""
        self.session.close()
