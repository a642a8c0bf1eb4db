"""Where the audit log's rows live: one :class:`Backend` interface, SQLite and PostgreSQL
behind it.

- :mod:`~certbroker.audit.store.base`: the interface (:class:`Backend`, :class:`Connection`,
  :class:`WriterSession`).
- :mod:`~certbroker.audit.store.db`: :func:`backend_for`, the one place a location
  (``Config.audit_location``) picks its backend.
- :mod:`~certbroker.audit.store.sqlite` / :mod:`~certbroker.audit.store.postgres`: the two
  backends (psycopg is imported only when PostgreSQL is used).
- :mod:`~certbroker.audit.store.rows`: the ``audit_log`` rows, read back and checked, on any
  backend.
"""

from certbroker.audit.store.base import Backend, Connection, Cursor, WriterSession
from certbroker.audit.store.db import (
    as_location,
    backend_for,
    connect_read,
    describe,
    exists,
    write_transaction,
)
from certbroker.audit.store.postgres import PostgresBackend
from certbroker.audit.store.rows import StoredRow
from certbroker.audit.store.sqlite import SQLiteBackend

__all__ = [
    "Backend",
    "Connection",
    "Cursor",
    "PostgresBackend",
    "SQLiteBackend",
    "StoredRow",
    "WriterSession",
    "as_location",
    "backend_for",
    "connect_read",
    "describe",
    "exists",
    "write_transaction",
]
