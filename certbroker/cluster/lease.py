"""Which broker of a cluster signs checkpoints and archives: the holder of one advisory lock.

Exactly one broker should sign (two would only duplicate work: checkpoints are append-only and
each is a valid signature of the tree, and archival takes the log's own lock; but the signing
key should be used by one process at a time and one writer of archive files is simpler to
reason about). :class:`SignerLease` asks, before each periodic round
(:func:`certbroker.audit.maintenance.checkpoint_task`), whether this broker holds a
session-level advisory lock (``pg_try_advisory_lock``) on a connection of its own.

Why an advisory lock on a dedicated session rather than a row with holder and expiry: the lock
lives exactly as long as the holder's session. When the holder dies (``kill -9``, a crash), the
kernel closes its socket, PostgreSQL ends the session at once and the lock is free; the next
broker to ask -- each asks once per checkpoint interval -- takes it, so the takeover needs at
most one interval and no expiry to tune, no renewal writes, and no clocks compared across
machines. A holder whose machine vanishes without closing its socket is cut off by TCP
keepalives (:meth:`~certbroker.cluster.pg.ClusterDb.connect_kwargs`, about 10 s). A holder
that loses its session (PostgreSQL restarted or failed over) finds out on its next round (the
check query fails) and competes again like everyone else. The holder is visible to operators:
``pg_locks`` joined with ``pg_stat_activity`` names its ``application_name``
(:func:`signer_of`).
"""

from __future__ import annotations

import logging
from typing import Any

from certbroker import errors
from certbroker.cluster.pg import ClusterDb

log = logging.getLogger(__name__)


class SignerLease:
    """The checkpoint signer's lock, as one broker sees it. Blocking (a worker thread)."""

    def __init__(self, db: ClusterDb) -> None:
        self._db = db
        self._conn: Any = None
        self._held = False

    def held(self) -> bool:
        """Whether this broker signs now: keeps the lock if it had it, else tries to take it.
        False (never raises) while PostgreSQL cannot be reached."""
        import psycopg

        try:
            if self._conn is None or self._conn.closed:
                self._held = False
                self._conn = self._db.connect("signer")
            if self._held:
                self._conn.execute("SELECT 1")  # the session (and so the lock) is still there
                return True
            (got,) = self._conn.execute(
                "SELECT pg_try_advisory_lock(%s)", (self._db.signer_key,)
            ).fetchone()
        except (psycopg.Error, errors.Unavailable) as exc:
            if self._held:
                log.warning("lost the checkpoint signer's lock: %s", exc)
            self.close()
            return False
        if got:
            log.info("this broker (%s) signs checkpoints from now on", self._db.broker_id)
        self._held = bool(got)
        return self._held

    def close(self) -> None:
        """Give the lock up (closing the session frees it at once)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._held = False


def signer_of(conn: Any, db: ClusterDb) -> str | None:
    """The ``application_name`` of the session holding the signer's lock, if any."""
    key = db.signer_key & 0xFFFFFFFFFFFFFFFF
    row = conn.execute(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
        " AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid",
        (key >> 32, key & 0xFFFFFFFF),
    ).fetchone()
    return None if row is None else str(row[0])
