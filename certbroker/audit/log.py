"""The audit log objects the server appends to: group commit over an SQLite or PostgreSQL store.

:func:`open_audit_log` picks the backend from the location (``Config.audit_location``) through
:func:`certbroker.audit.store.db.backend_for`; :class:`SQLiteAuditLog` and
:class:`PostgresAuditLog` name one directly. The event model and its checks are
:mod:`certbroker.audit.events`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self, TypedDict, Unpack

from certbroker.audit.append import AppendHook, ChainStore
from certbroker.audit.events import (
    AUDIT_UNAVAILABLE,
    AuditEvent,
    Receipt,
    epoch_time,
    event_fields,
)
from certbroker.audit.store.base import Backend
from certbroker.audit.store.db import backend_for
from certbroker.audit.store.postgres import PostgresBackend
from certbroker.audit.store.sqlite import SQLiteBackend
from certbroker.audit.writer import BatchStore, CommitHook, GroupCommitWriter, LockHook
from certbroker.config import AuditLocation, PostgresLocation
from certbroker.errors import BrokerError, Unavailable
from certbroker.ids import new_id


class WriterOptions(TypedDict, total=False):
    """How an audit log writes; every key optional (defaults in :func:`_writer`).

    ``max_batch``: entries per transaction at most (256). ``max_wait_s``: how long a batch is
    held open for company after its first entry (0). ``clock``: epoch seconds for entry times
    (``time.time``). ``busy_timeout``: seconds a batch waits for another writer's lock (10).
    ``on_commit(entries, seconds)``: called after each committed batch (None).
    ``hook``: more rows written in each batch's transaction, e.g. the notice outbox (None).
    ``on_lock_wait(seconds)``: each batch's wait for the log's write lock (None).
    ``entry_format``: the format version of new entries, 1 or 2 (compact) (1).
    """

    max_batch: int
    max_wait_s: float
    clock: Callable[[], float]
    busy_timeout: float
    on_commit: CommitHook | None
    hook: AppendHook | None
    on_lock_wait: LockHook | None
    entry_format: int


class EntryTimes:
    """:func:`~certbroker.audit.events.epoch_time`, the same text, at a fraction of its cost:
    the text up to the second is kept from the previous call (entries come many a second),
    only the milliseconds are formatted anew. Used from one event loop's thread."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._prefix = ""

    def text(self, seconds: float) -> str:
        """The entry time of the POSIX timestamp ``seconds`` (UTC, milliseconds, ``Z``)."""
        # As datetime.fromtimestamp does: the fraction rounded to microseconds (half even),
        # then cut to milliseconds by isoformat.
        fraction, whole = math.modf(seconds)
        micros = round(fraction * 1_000_000)
        second = int(whole)
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        elif micros < 0:  # before 1970: modf keeps the sign
            second, micros = second - 1, micros + 1_000_000
        if second != self._second:
            self._prefix = epoch_time(second)[:-5]  # without ".mmmZ"
            self._second = second
        return f"{self._prefix}.{micros // 1000:03d}Z"


def _writer(store: BatchStore, options: WriterOptions) -> GroupCommitWriter:
    return GroupCommitWriter(
        store,
        max_batch=options.get("max_batch", 256),
        max_wait_s=options.get("max_wait_s", 0.0),
        on_commit=options.get("on_commit"),
        on_lock_wait=options.get("on_lock_wait"),
    )


class BatchingAuditLog:
    """An :class:`~certbroker.audit.events.AuditLog` over any
    :class:`~certbroker.audit.writer.BatchStore`, with group commit.

    ``commits`` counts committed transactions (batches), for tests and metrics;
    ``on_commit(entries, seconds)`` is called after each one (its errors never reach callers).
    """

    def __init__(self, store: BatchStore, **options: Unpack[WriterOptions]) -> None:
        self._writer = _writer(store, options)
        self._clock = options.get("clock", time.time)
        self._times = EntryTimes()

    @property
    def commits(self) -> int:
        """Transactions committed so far; fewer than appends when batching works."""
        return self._writer.commits

    async def append(self, event: AuditEvent) -> Receipt:
        """Queue ``event`` for the writer thread and wait until it is durably stored.

        Raises ``Unavailable("AUDIT_UNAVAILABLE")`` if the log is closed or the write fails,
        ``TypeError``/``ValueError`` for a malformed event. Cancelling the caller does not
        withdraw the entry: the lookup happened and is recorded.
        """
        (receipt,) = await self.append_many((event,))
        return receipt

    async def append_many(
        self,
        events: Sequence[AuditEvent],
        *,
        link: Callable[[list[str]], AuditEvent] | None = None,
    ) -> list[Receipt]:
        """Store ``events`` as consecutive entries in ONE transaction: all of them, or none and
        ``Unavailable("AUDIT_UNAVAILABLE")``. Receipts come back in order.

        ``link``, if given, builds one more entry from the entry ids of ``events``, stored right
        after them in the same transaction (a bundle entry naming its items), its receipt last.
        All entries carry the same time. Malformed events raise before anything is queued.
        """
        bodies = [event_fields(event) for event in events]
        for fields in bodies:
            fields["entry_id"] = new_id()
        if link is not None:
            closing = event_fields(link([str(fields["entry_id"]) for fields in bodies]))
            closing["entry_id"] = new_id()
            bodies.append(closing)
        if not bodies:
            return []
        moment = self._times.text(self._clock())
        for fields in bodies:
            fields["time"] = moment
        rows = await self._writer.write_many(bodies)
        return [Receipt(row.columns["entry_id"], row.entry_hash, row.seq) for row in rows]

    async def aclose(self) -> None:
        """Write everything already queued, then stop the writer and close the store."""
        await self._writer.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class BackendAuditLog(BatchingAuditLog):
    """The broker's :class:`BatchingAuditLog`: the log of one store backend
    (:class:`~certbroker.audit.append.ChainStore` over its writer session).

    Opening creates the log if needed and continues an existing chain. Raises
    ``Unavailable("AUDIT_UNAVAILABLE")`` if that fails. ``settings`` are the writer
    connection's durability settings as the database reports them.
    """

    def __init__(self, backend: Backend, **options: Unpack[WriterOptions]) -> None:
        self.backend = backend
        store = _open(
            backend,
            options.get("busy_timeout", 10.0),
            options.get("hook"),
            options.get("entry_format", 1),
        )
        try:
            self.settings = store.settings()
        except BaseException:
            store.close()
            raise
        super().__init__(store, **options)


def _open(
    backend: Backend, busy_timeout: float, hook: AppendHook | None, entry_format: int
) -> ChainStore:
    try:
        return ChainStore.open(
            backend, busy_timeout=busy_timeout, hook=hook, entry_format=entry_format
        )
    except BrokerError:
        raise
    except Exception as exc:  # sqlite3, psycopg or OS errors: say which store, never a DSN
        raise Unavailable(
            AUDIT_UNAVAILABLE, f"cannot open the audit log ({backend.display})"
        ) from exc


class SQLiteAuditLog(BackendAuditLog):
    """The default audit log: an SQLite file in WAL mode with ``synchronous=FULL``.

    Creates the file (mode 0600) and schema if needed and continues an existing chain.
    ``busy_timeout`` is how long a batch waits for another process's write lock.
    """

    def __init__(self, path: Path, **options: Unpack[WriterOptions]) -> None:
        self.path = Path(path)
        super().__init__(SQLiteBackend(self.path), **options)


class PostgresAuditLog(BackendAuditLog):
    """The audit log in PostgreSQL (``[audit] dsn``): one log for several brokers.

    Connects, creates the schema if needed (:mod:`certbroker.audit.store.postgres`) and
    continues the chain. ``busy_timeout`` is how long a batch waits for another broker's lock.
    """

    def __init__(self, location: PostgresLocation, **options: Unpack[WriterOptions]) -> None:
        self.location = location
        super().__init__(PostgresBackend(location), **options)


def open_audit_log(db: AuditLocation | str, **options: Unpack[WriterOptions]) -> BackendAuditLog:
    """The audit log at ``db`` (``Config.audit_location``: an SQLite path or a
    :class:`~certbroker.config.PostgresLocation`), its backend chosen from the location."""
    return BackendAuditLog(backend_for(db), **options)
