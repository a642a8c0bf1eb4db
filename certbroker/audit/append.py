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
from certbroker.audit.integrity.tree import TreeWriter, backfill
from certbroker.audit.store.base import Backend, Connection, WriterSession
from certbroker.audit.store.rows import INDEXED_COLUMNS, StoredRow, insert_rows, read_tail


@dataclass(frozen=True)
class Head:
    """What a writer committed last: the tail entry and the tree frontier of ``seq`` leaves."""

    seq: int
    entry_hash: str
    frontier: tuple[bytes, ...]


def append_rows(
    conn: Connection, bodies: Sequence[Mapping[str, object]], known: Head | None = None
) -> tuple[list[StoredRow], Head]:
    """Chain ``bodies`` onto the stored tail and insert them with their Merkle leaves.

    Call inside a transaction that already holds the log's write lock (the writer sessions
    do), so nobody can append between reading the tail and inserting: the chain cannot fork and
    the sequence has no gaps or duplicates. Each body gets ``seq`` and ``v`` added. ``known`` is
    the :class:`Head` the caller's previous batch returned: when the stored tail is still that
    entry, nobody appended since and its frontier is reused instead of read back. Returns the
    rows and the new head (for the caller to keep only once its transaction commits).
    """
    seq, prev = read_tail(conn)
    if known is not None and (known.seq, known.entry_hash) == (seq, prev):
        tree = TreeWriter(conn, (seq, list(known.frontier)))
    else:
        tree = TreeWriter(conn)
        if tree.range.size != seq:
            raise RuntimeError(f"merkle tree has {tree.range.size} leaves, log {seq} entries")
    rows: list[StoredRow] = []
    for fields in bodies:
        seq += 1
        body = canonical_body({**fields, "seq": seq, "v": FORMAT_VERSION})
        entry_hash = chain_hash(prev, body)
        columns = {name: str(fields[name]) for name in INDEXED_COLUMNS}
        rows.append(StoredRow(seq, body, prev, entry_hash, columns))
        tree.append(body)
        prev = entry_hash
    insert_rows(conn, rows)
    tree.flush()  # the tree's nodes commit with the entries, or not at all
    return rows, Head(seq, prev, tree.range.frontier)


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

    def __init__(self, session: WriterSession, hook: AppendHook | None = None) -> None:
        self.session = session
        self._hook = hook
        self._head: Head | None = None  # what this store committed last (see append_rows)
        try:
            with session.transaction() as conn:
                backfill(conn)
                if hook is not None:
                    hook.prepare(conn)
        except BaseException:
            session.close()
            raise

    @classmethod
    def open(
        cls, backend: Backend, *, busy_timeout: float = 10.0, hook: AppendHook | None = None
    ) -> ChainStore:
        """Open ``backend``'s writer session (creating the log if needed) and continue it;
        ``hook`` writes more rows in every batch's transaction."""
        return cls(backend.open_writer(busy_timeout=busy_timeout), hook)

    def write_batch(self, bodies: Sequence[Mapping[str, object]]) -> list[StoredRow]:
        """Append ``bodies`` as consecutive entries in ONE transaction (one fsync), under the
        log's write lock: either all rows commit or, on any error, none and the error
        propagates."""
        try:
            with self.session.transaction() as conn:
                rows, head = append_rows(conn, bodies, self._head)
                if self._hook is not None:
                    self._hook.rows_appended(conn, bodies, rows)
        except BaseException:
            self._head = None  # whatever the database holds now, it is read back next time
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
