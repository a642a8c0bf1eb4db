"""Security officers' controls (the ``certbroker.v1.Admin`` service): who and what is stopped now.

A control is one row: a disabled clerk (``clerk``, until a time or indefinitely), a revoked token
(``token``, by its ``jti`` claim), every token of a clerk issued before a time
(``tokens_before``), a disabled office (``office``) or a frozen citizen (``subject``, with the
roles still allowed). :class:`Controls` holds them in memory and enforces them on every call
(:meth:`Controls.check_clerk` right after authentication, :meth:`Controls.check_subject` before
a lookup is authorized); it changes them through a :class:`ControlStore` first, so a change is
durable before it is in force and in force for the very next call on this broker.

The store is a :class:`typing.Protocol`: the SQLite one (:class:`SqliteControlStore`,
``controls.sqlite`` in the state dir) or, in a cluster of brokers, PostgreSQL
(:mod:`certbroker.cluster.controls`). Every change bumps the store's
:meth:`~ControlStore.version`; :meth:`Controls.refresh` reloads when it moved (worker processes
poll it every second; the brokers of a cluster on each change notice, see
:mod:`certbroker.cluster.follow`).

Tokens without a ``jti`` (other issuers may not set one) cannot be revoked one by one; they are
still refused by ``tokens_before`` (their ``iat`` is required) and the clerk and office controls.

This module is part of :mod:`certbroker.auth` (the bottom layer) so that every servicer can
enforce the controls; it raises :mod:`certbroker.errors` only.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from certbroker import errors
from certbroker.auth.principals import Clerk

__all__ = [
    "KINDS",
    "Control",
    "ControlStore",
    "Controls",
    "SqliteControlStore",
]

#: The kinds of control, as stored and as the Admin service names them.
KINDS = ("clerk", "token", "tokens_before", "office", "subject")


@dataclass(frozen=True)
class Control:
    """One control in force. ``until`` (kind clerk) and ``before`` (kind tokens_before) are
    POSIX seconds or ``None``; ``created`` is when the officer set it."""

    kind: str
    target: str
    reason: str
    ticket: str
    officer: str
    created: float
    until: float | None = None
    before: float | None = None
    except_roles: tuple[str, ...] = field(default_factory=tuple)

    def in_force(self, now: float) -> bool:
        """A clerk disabled until a time past is no longer disabled; everything else is."""
        return self.until is None or now < self.until

    def row(self) -> tuple[object, ...]:
        """The stored row (every store's column order: kind, target, reason, ticket, officer,
        created, until, before, except_roles as a JSON array)."""
        return (
            self.kind,
            self.target,
            self.reason,
            self.ticket,
            self.officer,
            self.created,
            self.until,
            self.before,
            json.dumps(list(self.except_roles)),
        )

    @classmethod
    def from_row(cls, row: Sequence[object]) -> Control:
        """The control of a stored row (:meth:`row`)."""
        kind, target, reason, ticket, officer, created, until, before, roles = row
        return cls(
            kind=str(kind),
            target=str(target),
            reason=str(reason),
            ticket=str(ticket),
            officer=str(officer),
            created=float(str(created)),
            until=None if until is None else float(str(until)),
            before=None if before is None else float(str(before)),
            except_roles=tuple(json.loads(str(roles))),
        )


class ControlStore(Protocol):
    """Where the controls are kept durably (SQLite here; PostgreSQL: certbroker.cluster)."""

    def load(self) -> list[Control]:
        """Every stored control."""
        ...

    def put(self, control: Control) -> int:
        """Store ``control``, replacing one of the same kind and target; the new version."""
        ...

    def remove(self, kind: str, target: str) -> tuple[Control | None, int]:
        """Delete the control of ``kind`` on ``target``: the removed one (or ``None``) and
        the version."""
        ...

    def version(self) -> int:
        """A counter bumped on every change (what a broker polls to see another's changes)."""
        ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS controls (
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    reason TEXT NOT NULL,
    ticket TEXT NOT NULL,
    officer TEXT NOT NULL,
    created REAL NOT NULL,
    until REAL,
    before REAL,
    except_roles TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (kind, target)
);
CREATE TABLE IF NOT EXISTS controls_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT OR IGNORE INTO controls_version (id, version) VALUES (1, 0);
"""


class SqliteControlStore:
    """The controls in one SQLite file (table ``controls``), each change one transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Small and rarely written: one connection, serialized by a lock (calls may come from
        # worker threads via asyncio.to_thread).
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def load(self) -> list[Control]:
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, target, reason, ticket, officer, created, until, before,"
                " except_roles FROM controls ORDER BY created, kind, target"
            ).fetchall()
        return [Control.from_row(row) for row in rows]

    def put(self, control: Control) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO controls (kind, target, reason, ticket, officer,"
                    " created, until, before, except_roles) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    control.row(),
                )
                version = self._bump()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return version

    def remove(self, kind: str, target: str) -> tuple[Control | None, int]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT kind, target, reason, ticket, officer, created, until, before,"
                    " except_roles FROM controls WHERE kind = ? AND target = ?",
                    (kind, target),
                ).fetchone()
                if row is not None:
                    self._db.execute(
                        "DELETE FROM controls WHERE kind = ? AND target = ?", (kind, target)
                    )
                    version = self._bump()
                else:
                    version = self._current()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return (None if row is None else Control.from_row(row)), version

    def version(self) -> int:
        with self._lock:
            return self._current()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _bump(self) -> int:
        self._db.execute("UPDATE controls_version SET version = version + 1 WHERE id = 1")
        return self._current()

    def _current(self) -> int:
        row = self._db.execute("SELECT version FROM controls_version WHERE id = 1").fetchone()
        return int(row[0])


class Controls:
    """The controls in force, enforced from memory (no I/O on a lookup), changed through
    ``store``. ``clock`` (POSIX seconds) decides whether a disable ``until`` has passed."""

    def __init__(self, store: ControlStore, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._by_key: dict[tuple[str, str], Control] = {}
        self.version = -1
        self.refresh()

    def refresh(self) -> bool:
        """Reload from the store if its version moved (another broker's change); True if so."""
        version = self._store.version()
        if version == self.version:
            return False
        self._by_key = {(c.kind, c.target): c for c in self._store.load()}
        self.version = version
        return True

    def put(self, control: Control) -> None:
        """Store ``control`` durably, then put it in force (the next call sees it)."""
        self._follow(self._store.put(control))
        self._by_key[(control.kind, control.target)] = control

    def remove(self, kind: str, target: str) -> Control | None:
        """Lift the control of ``kind`` on ``target``; the lifted one, if any was stored."""
        removed, version = self._store.remove(kind, target)
        self._follow(version)
        self._by_key.pop((kind, target), None)
        return removed

    def _follow(self, version: int) -> None:
        # Our own change is the next version: memory holds everything up to it. Any other gap
        # means another worker or broker changed the store in between, which memory does not
        # hold yet: leave the version behind so that the next refresh reloads.
        if version == self.version + 1:
            self.version = version

    def find(self, kind: str, target: str) -> Control | None:
        """The stored control of ``kind`` on ``target``, if any (in force or not)."""
        return self._by_key.get((kind, target))

    def listing(self) -> list[Control]:
        """Every control in force now (a clerk disabled until a past time is left out)."""
        now = self._clock()
        return [c for c in self._by_key.values() if c.in_force(now)]

    def check_clerk(self, clerk: Clerk) -> None:
        """Refuse a call of ``clerk`` that a control stops; the order is the most specific
        first, so the reason says why this token is refused."""
        if not self._by_key:
            return  # the usual case: nothing in force, nothing to look up
        token = self._by_key.get(("token", clerk.jti)) if clerk.jti else None
        if token is not None:
            raise errors.Unauthenticated("TOKEN_REVOKED", "the token has been revoked")
        before = self._by_key.get(("tokens_before", clerk.sub))
        if before is not None and before.before is not None and clerk.issued_at < before.before:
            raise errors.Unauthenticated(
                "TOKEN_REVOKED", "the clerk's tokens issued before this time have been revoked"
            )
        disabled = self._by_key.get(("clerk", clerk.sub))
        if disabled is not None and disabled.in_force(self._clock()):
            raise errors.PermissionDenied("CLERK_DISABLED", "the clerk has been disabled")
        if ("office", clerk.office) in self._by_key:
            raise errors.PermissionDenied("OFFICE_DISABLED", "the clerk's office has been disabled")

    def check_subject(self, clerk: Clerk, subject_id: str) -> None:
        """Refuse a lookup of a frozen citizen's records, unless ``clerk`` holds an exempt
        role."""
        frozen = self._by_key.get(("subject", subject_id)) if self._by_key else None
        if frozen is not None and not set(frozen.except_roles) & set(clerk.roles):
            raise errors.PermissionDenied(
                "SUBJECT_FROZEN", "the citizen's records are frozen", subject_id=subject_id
            )
