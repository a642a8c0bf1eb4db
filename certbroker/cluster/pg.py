"""The cluster's tables in PostgreSQL and the one connection each store keeps to them.

The tables live in the audit log's schema (``[audit] schema``), beside the audit tables:

``cluster_versions``
    One counter per kind of shared state (``controls``, ``registry``), bumped in the same
    transaction as every change, which also sends ``NOTIFY`` on the schema's channel
    (:attr:`ClusterDb.channel`, payload the kind). A broker compares the counter with the
    one it last read to know whether to re-read (the fallback when a notice is lost).
``cluster_controls`` / ``cluster_instances``
    The controls and the registered adapter instances (the SQLite tables' twins).
``cluster_brokers``
    One row per broker process: the versions it holds in memory and when it last said so
    (every second). A change waits, at most :data:`SETTLE_S`, until every broker seen in the
    last :data:`LIVE_S` holds it (:meth:`ClusterDb.settle`): so a control set through one
    broker is in force at every live broker when the officer's call returns, and the next
    call anywhere is refused.

The schema is created idempotently under a transaction-scoped advisory lock (as the audit
store does), so brokers starting together do not race. psycopg is imported inside the methods:
an SQLite-only install does not need it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final, LiteralString, TypeVar

from certbroker import errors
from certbroker.config import PostgresLocation

log = logging.getLogger(__name__)

#: A broker is live (waited for by :meth:`ClusterDb.settle`) while it reported this recently.
LIVE_S: Final = 3.0
#: A change waits at most this long for the live brokers to hold it.
SETTLE_S: Final = 2.0
#: How often :meth:`ClusterDb.settle` looks at the brokers' reports while it waits.
SETTLE_POLL_S: Final = 0.002
#: The reason of the UNAVAILABLE answer when the shared store cannot be reached.
UNAVAILABLE: Final = "SHARED_STATE_UNAVAILABLE"
#: The kinds of shared state with a version counter.
KINDS: Final = ("controls", "registry")

_DDL: tuple[LiteralString, ...] = (
    "CREATE SCHEMA IF NOT EXISTS {s}",
    """CREATE TABLE IF NOT EXISTS {s}.cluster_versions (
        name       TEXT PRIMARY KEY,
        version    BIGINT NOT NULL,
        changed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
    )""",
    "INSERT INTO {s}.cluster_versions (name, version) VALUES ('controls', 0), ('registry', 0)"
    " ON CONFLICT DO NOTHING",
    """CREATE TABLE IF NOT EXISTS {s}.cluster_controls (
        kind         TEXT NOT NULL,
        target       TEXT NOT NULL,
        reason       TEXT NOT NULL,
        ticket       TEXT NOT NULL,
        officer      TEXT NOT NULL,
        created      DOUBLE PRECISION NOT NULL,
        until        DOUBLE PRECISION,
        before       DOUBLE PRECISION,
        except_roles TEXT NOT NULL DEFAULT '[]',
        PRIMARY KEY (kind, target)
    )""",
    """CREATE TABLE IF NOT EXISTS {s}.cluster_instances (
        instance_id      TEXT PRIMARY KEY,
        department       TEXT NOT NULL,
        record_types     TEXT NOT NULL,
        endpoint         TEXT NOT NULL,
        schema_version   TEXT NOT NULL,
        registered_at    DOUBLE PRECISION NOT NULL,
        lease_expires_at DOUBLE PRECISION NOT NULL,
        UNIQUE (department, endpoint)
    )""",
    """CREATE TABLE IF NOT EXISTS {s}.cluster_brokers (
        broker_id        TEXT PRIMARY KEY,
        controls_version BIGINT NOT NULL,
        registry_version BIGINT NOT NULL,
        applied_at       TIMESTAMPTZ NOT NULL,
        seen_at          TIMESTAMPTZ NOT NULL
    )""",
)

_T = TypeVar("_T")


def _key(purpose: str, schema: str) -> int:
    digest = hashlib.sha256(f"certbroker-{purpose}:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class ClusterDb:
    """The cluster's schema at ``location``, as broker ``broker_id`` sees it.

    ``broker_id`` names this broker process in ``cluster_brokers`` and in the
    ``application_name`` of its sessions (``pg_stat_activity`` shows who is connected).
    """

    def __init__(self, location: PostgresLocation, broker_id: str) -> None:
        self.location = location
        self.broker_id = broker_id
        self.schema = location.schema
        # LISTEN takes an identifier (at most 63 bytes): derived from the schema, not the name.
        self.channel = f"certbroker_{hashlib.sha256(self.schema.encode()).hexdigest()[:16]}"
        self.signer_key = _key("signer", self.schema)
        self._schema_key = _key("cluster-schema", self.schema)
        self._ready = False

    def connect_kwargs(self, role: str) -> dict[str, Any]:
        """psycopg connection options: autocommit, a short connect timeout, and TCP keepalives
        so that a session whose peer vanished without closing ends within ~10 s (PostgreSQL
        then releases its locks, :mod:`certbroker.cluster.lease`)."""
        return {
            "autocommit": True,
            "connect_timeout": 5,
            "application_name": f"certbroker {role} {self.broker_id}"[:63],
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
        }

    def connect(self, role: str) -> Any:
        """A new autocommit session on the schema (created first if needed); UNAVAILABLE
        ``SHARED_STATE_UNAVAILABLE`` if the server cannot be reached."""
        import psycopg
        from psycopg import sql

        try:
            conn = psycopg.connect(self.location.dsn, **self.connect_kwargs(role))
        except psycopg.Error as exc:
            raise errors.Unavailable(
                UNAVAILABLE, f"cannot reach the cluster's PostgreSQL ({self.location.display})"
            ) from exc
        try:
            if not self._ready:
                self._create_schema(conn)
            conn.execute(
                "SELECT set_config('search_path', %s, false)",
                (sql.Identifier(self.schema).as_string(conn),),
            )
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_schema(self, conn: Any) -> None:
        from psycopg import sql

        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._schema_key,))
            for statement in _DDL:
                conn.execute(sql.SQL(statement).format(s=sql.Identifier(self.schema)))
        self._ready = True

    # --- helpers for a session in a transaction ---------------------------------------------

    def bump(self, conn: Any, kind: str) -> int:
        """Count a change of ``kind`` and tell every listening broker (delivered at COMMIT);
        the new version. Call inside the change's transaction."""
        (version,) = conn.execute(
            "UPDATE cluster_versions SET version = version + 1, changed_at = clock_timestamp()"
            " WHERE name = %s RETURNING version",
            (kind,),
        ).fetchone()
        conn.execute("SELECT pg_notify(%s, %s)", (self.channel, kind))
        return int(version)

    @staticmethod
    def version(conn: Any, kind: str) -> int:
        """The version of ``kind`` now."""
        (version,) = conn.execute(
            "SELECT version FROM cluster_versions WHERE name = %s", (kind,)
        ).fetchone()
        return int(version)

    def report(self, conn: Any, controls_version: int, registry_version: int) -> None:
        """Say which versions this broker holds in memory (and that it is alive)."""
        conn.execute(
            "INSERT INTO cluster_brokers AS b (broker_id, controls_version, registry_version,"
            " applied_at, seen_at) VALUES (%s, %s, %s, clock_timestamp(), clock_timestamp())"
            " ON CONFLICT (broker_id) DO UPDATE SET"
            " controls_version = excluded.controls_version,"
            " registry_version = excluded.registry_version,"
            " applied_at = CASE WHEN (b.controls_version, b.registry_version)"
            "   = (excluded.controls_version, excluded.registry_version)"
            "   THEN b.applied_at ELSE excluded.applied_at END,"
            " seen_at = excluded.seen_at",
            (self.broker_id, controls_version, registry_version),
        )

    def settle(self, conn: Any, kind: str, version: int) -> bool:
        """Wait until every other live broker holds ``version`` of ``kind`` (at most
        :data:`SETTLE_S`); False (logged) if one did not: it will on its next re-read."""
        column = {"controls": "controls_version", "registry": "registry_version"}[kind]
        deadline = time.monotonic() + SETTLE_S
        while True:
            (behind,) = conn.execute(
                f"SELECT count(*) FROM cluster_brokers WHERE broker_id <> %s"  # noqa: S608
                f" AND seen_at > clock_timestamp() - make_interval(secs => %s)"
                f" AND {column} < %s",
                (self.broker_id, LIVE_S, version),
            ).fetchone()
            if behind == 0:
                return True
            if time.monotonic() >= deadline:
                log.warning(
                    "%d broker(s) did not pick up %s version %d within %.1f s",
                    behind,
                    kind,
                    version,
                    SETTLE_S,
                )
                return False
            time.sleep(SETTLE_POLL_S)


class Session:
    """One lazily opened connection of a store, used under a lock (stores are called from
    worker threads). A failed statement drops the connection: the next call reconnects, and
    the caller gets UNAVAILABLE ``SHARED_STATE_UNAVAILABLE``."""

    def __init__(self, db: ClusterDb, role: str) -> None:
        self.db = db
        self._role = role
        self._conn: Any = None
        self._lock = threading.Lock()

    def run(self, work: Callable[[Any], _T]) -> _T:
        """``work(connection)`` under the lock."""
        import psycopg

        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = self.db.connect(self._role)
            try:
                return work(self._conn)
            except psycopg.OperationalError as exc:
                self._conn.close()
                self._conn = None
                raise errors.Unavailable(
                    UNAVAILABLE,
                    f"lost the cluster's PostgreSQL ({self.db.location.display})",
                ) from exc

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
