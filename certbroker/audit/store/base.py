"""The audit store's backend interface: everything that differs between SQLite and PostgreSQL.

The audit log is one format (:mod:`certbroker.audit.events`) in one set of tables, kept in one
of two databases:

- **SQLite** (the embedded default): a file, named by a plain :class:`~pathlib.Path`
  (:class:`certbroker.audit.store.sqlite.SQLiteBackend`).
- **PostgreSQL**: a :class:`~certbroker.config.PostgresLocation` (libpq DSN + schema), for
  several broker processes writing ONE log
  (:class:`certbroker.audit.store.postgres.PostgresBackend`).

A :class:`Backend` is chosen once, from the location, by
:func:`certbroker.audit.store.db.backend_for`; nothing else looks at which one it is. Code above
the store is written once against :class:`Connection` (``conn.execute(sql, params)`` with ``?``
placeholders, a cursor with ``fetchone``/``fetchall``/iteration) and asks the backend for
whatever its database does differently: connecting, the write lock, DDL, bulk inserts and
upserts, streaming reads, the Merkle tables' bookkeeping. Every connection a backend hands out
knows it (:attr:`Connection.backend`), so functions given only a connection can ask too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from certbroker.config import AuditLocation

#: A stored Merkle tree node: (level, index, hash); level 0 holds the leaf hashes.
Node = tuple[int, int, bytes]

DAY_MS = 86_400_000
#: An entry's UTC day, as the SQLite indexes on subject and clerk lead with it
#: (:meth:`Backend.day_clause`); the exact expression the indexes are declared on.
DAY_KEY = f"time / {DAY_MS}"


@dataclass(frozen=True)
class UndecodableText:
    """A stored text value whose bytes are not UTF-8, as :meth:`Backend.keep_undecodable_text`
    returns it: neither a ``str`` nor a ``bytes``, so a reader expecting either notices."""

    raw: bytes


class Cursor(Protocol):
    """What readers use of a cursor (sqlite3 and psycopg cursors both fit)."""

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """The connection interface audit code is written against (``?`` placeholders)."""

    @property
    def backend(self) -> Backend:
        """The backend this connection belongs to: ask it where SQL dialects differ."""
        ...

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any: ...

    def close(self) -> None: ...


class WriterSession(Protocol):
    """The long-lived connection of the one writer thread that appends entries.

    Opening it (:meth:`Backend.open_writer`) creates the schema if needed and sets the
    durability settings a committed entry relies on.
    """

    def transaction(self) -> AbstractContextManager[Connection]:
        """The connection inside a transaction holding the log's write lock: committed when
        the block ends, rolled back if it raises (the session stays usable)."""
        ...

    def exclusive(self) -> AbstractContextManager[object]:
        """Be the next writer of the log while this is held (re-entrant).

        The group-commit writer holds it while it collects a batch, so entries queue up here
        instead of behind another process's lock; a no-op where the database queues writers
        fairly by itself."""
        ...

    def settings(self) -> dict[str, object]:
        """The durability settings of the connection as the database reports them."""
        ...

    def close(self) -> None:
        """Close the connection."""
        ...


class Backend(Protocol):
    """One audit log in one kind of database. See the module docstring."""

    @property
    def location(self) -> AuditLocation:
        """Where the log is (``Config.audit_location``)."""
        ...

    @property
    def display(self) -> str:
        """The location for messages and logs (never a password)."""
        ...

    def exists(self) -> bool:
        """Whether there is an audit log at the location."""
        ...

    def connect_read(self) -> Connection:
        """A read-only connection (it can never modify the log). Close it when done.

        ``FileNotFoundError`` when there is no log; ``certbroker.errors.Unavailable``
        (``AUDIT_UNAVAILABLE``) when the database cannot be reached.
        """
        ...

    def write_transaction(
        self, *, busy_timeout: float = 10.0
    ) -> AbstractContextManager[Connection]:
        """A new connection inside a transaction holding the log's write lock (the one
        appends take), waiting at most ``busy_timeout`` seconds for it.

        Commits when the block ends, rolls back if it raises. For maintenance writes next to
        the appends: checkpoints, archival. The log must exist (no schema is created here).
        """
        ...

    def open_writer(self, *, busy_timeout: float = 10.0) -> WriterSession:
        """The appending side: connect, create the schema if needed, continue the log.

        ``busy_timeout`` is how long a batch waits for another writer's lock.
        """
        ...

    # --- where SQL dialects differ ----------------------------------------------------------

    def snapshot(self, conn: Connection) -> None:
        """Make the following reads on a reader connection one consistent snapshot."""
        ...

    def stream(self, conn: Connection, sql: str, parameters: Sequence[Any] = ()) -> Iterator[Any]:
        """The rows of a query, without loading them all (a large log is never in memory)."""
        ...

    def insert_many(
        self,
        conn: Connection,
        table: str,
        columns: Sequence[str],
        types: Sequence[str],
        rows: Sequence[Sequence[Any]],
    ) -> None:
        """Insert ``rows`` (tuples in ``columns`` order) into ``table``, trusted names only, in
        as few statements as the database allows. ``types`` are the columns' SQL types
        (``bigint``, ``text``, ``bytea``...) for a backend that needs them."""
        ...

    def has_table(self, conn: Connection, name: str) -> bool:
        """Whether the log has table ``name`` (an old SQLite file may lack newer tables)."""
        ...

    # --- SQL that differs between the databases (trusted fragments, for the log's readers) ---

    #: Whether columns hold only their declared type (PostgreSQL), or any value (SQLite): a
    #: reader of the latter checks the types of what it counts.
    typed_columns: bool

    def day_clause(
        self, conn: Connection, since: int | None, until: int | None
    ) -> tuple[str, list[object]] | None:
        """A condition on ``audit_entries`` (and its values) true for the UTC days
        (:data:`DAY_KEY`) of the log's entries with ``since <= time < until`` (epoch ms, None:
        unbounded), for a backend whose subject and clerk indexes lead with the day; None
        where they do not, or where the days cannot be listed (an entry dated before 1970).

        Why: an index on ``subject_id`` alone takes each new entry at a random leaf, so in a
        log of millions every append writes pages no other append shares; keyed by the day
        first, a day's appends share the few pages of that day's part of the index, as they
        do in a small log. A lookup by subject then probes each day the log holds."""
        ...

    def json_element(self, column: str, index: int, *, integer: bool = False) -> str:
        """SQL for element ``index`` of the JSON array text in ``column``: as text, or as an
        integer when ``integer``; NULL when the array is shorter."""
        ...

    def text_agg(self, expr: str) -> str:
        """SQL aggregating ``expr`` over a group as one comma-separated text (NULLs left
        out; NULL for a group of NULLs)."""
        ...

    def keep_undecodable_text(self, conn: Connection) -> None:
        """From now on, have reader ``conn`` return a text value that is not valid UTF-8 as
        :class:`UndecodableText` instead of failing the whole query.

        For the verifier, which reads rows an attacker may have written and must say which
        row and column is bad rather than stop with a decoding error."""
        ...

    # --- the Merkle tree's tables (certbroker.audit.integrity.tree) --------------------------

    def save_tree(
        self, conn: Connection, nodes: Sequence[Node], size: int, frontier: Sequence[bytes]
    ) -> None:
        """Store the perfect-subtree ``nodes`` an append completed, and the tree's new
        ``size`` and ``frontier`` where the backend caches them; inside the append's
        transaction."""
        ...

    def load_tree(self, conn: Connection) -> tuple[int, bytes | None]:
        """(stored tree size, its frontier hashes concatenated) -- the frontier ``None`` when
        the backend keeps no cache of it (it is then read from the nodes)."""
        ...

    def read_nodes(self, conn: Connection, positions: Sequence[tuple[int, int]]) -> list[bytes]:
        """The hashes of the nodes at ``positions`` (level, index), in order; ``KeyError`` if
        one is not stored."""
        ...
