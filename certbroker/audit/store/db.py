"""Where the audit log lives: the one place a location picks its backend.

A location (``Config.audit_location``) is a :class:`~pathlib.Path` for an SQLite file or a
:class:`~certbroker.config.PostgresLocation`; :func:`backend_for` turns it into the
:class:`~certbroker.audit.store.base.Backend` that every other part of the audit code asks
(see :mod:`certbroker.audit.store.base`). The functions below it are shorthands for callers that
need one thing of a location.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from certbroker.audit.store.base import Backend, Connection
from certbroker.audit.store.postgres import PostgresBackend
from certbroker.audit.store.sqlite import SQLiteBackend
from certbroker.config import AuditLocation, PostgresLocation


def as_location(db: AuditLocation | str) -> AuditLocation:
    """``db`` as a location: a ``str`` is an SQLite path (what callers passed before)."""
    if isinstance(db, PostgresLocation | Path):
        return db
    if isinstance(db, str):
        return Path(db)
    raise TypeError(f"not an audit location: {type(db).__name__}")


def backend_for(db: AuditLocation | str) -> Backend:
    """The backend of the audit log at ``db``: PostgreSQL for a
    :class:`~certbroker.config.PostgresLocation`, else SQLite (a path, or a ``str`` path)."""
    location = as_location(db)
    if isinstance(location, PostgresLocation):
        return PostgresBackend(location)
    return SQLiteBackend(location)


def describe(db: AuditLocation | str) -> str:
    """A location for messages (a PostgreSQL DSN without credentials)."""
    return backend_for(db).display


def exists(db: AuditLocation | str) -> bool:
    """Whether there is an audit log at ``db`` (file, or tables in the schema)."""
    return backend_for(db).exists()


def connect_read(db: AuditLocation | str) -> Connection:
    """A read-only connection to the log at ``db`` (:meth:`Backend.connect_read`)."""
    return backend_for(db).connect_read()


@contextmanager
def write_transaction(
    db: AuditLocation | str, *, busy_timeout: float = 10.0
) -> Iterator[Connection]:
    """A connection in a transaction holding the write lock of the log at ``db``
    (:meth:`Backend.write_transaction`)."""
    with backend_for(db).write_transaction(busy_timeout=busy_timeout) as conn:
        yield conn
