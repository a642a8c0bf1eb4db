"""The security officers' controls in PostgreSQL: one
:class:`~certbroker.auth.controls.ControlStore` for every broker of a cluster.

Each change is one transaction that also bumps the ``controls`` version and notifies the other
brokers (:mod:`certbroker.cluster.pg`); after the commit it waits until every live broker
holds it (:meth:`~certbroker.cluster.pg.ClusterDb.settle`), so when the officer's call returns
the next call at any broker is refused.
"""

from __future__ import annotations

from typing import Any

from certbroker.auth.controls import Control
from certbroker.cluster.pg import ClusterDb, Session

_COLUMNS = "kind, target, reason, ticket, officer, created, until, before, except_roles"


class PostgresControlStore:
    """The controls in table ``cluster_controls`` of the cluster's schema."""

    def __init__(self, db: ClusterDb) -> None:
        self._db = db
        self._session = Session(db, "controls")

    def load(self) -> list[Control]:
        """Every stored control."""

        def work(conn: Any) -> list[Control]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM cluster_controls ORDER BY created, kind, target"  # noqa: S608
            ).fetchall()
            return [Control.from_row(row) for row in rows]

        return self._session.run(work)

    def put(self, control: Control) -> int:
        """Store ``control`` (replacing one of the same kind and target); the new version,
        once every live broker holds it."""

        def work(conn: Any) -> int:
            with conn.transaction():
                conn.execute(
                    f"INSERT INTO cluster_controls ({_COLUMNS})"  # noqa: S608
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (kind, target) DO UPDATE SET reason = excluded.reason,"
                    " ticket = excluded.ticket, officer = excluded.officer,"
                    " created = excluded.created, until = excluded.until,"
                    " before = excluded.before, except_roles = excluded.except_roles",
                    control.row(),
                )
                version = self._db.bump(conn, "controls")
            self._db.settle(conn, "controls", version)
            return version

        return self._session.run(work)

    def remove(self, kind: str, target: str) -> tuple[Control | None, int]:
        """Delete the control of ``kind`` on ``target``: the removed one (or ``None``) and
        the version (bumped only if one was removed)."""

        def work(conn: Any) -> tuple[Control | None, int]:
            with conn.transaction():
                row = conn.execute(
                    f"DELETE FROM cluster_controls WHERE kind = %s AND target = %s"  # noqa: S608
                    f" RETURNING {_COLUMNS}",
                    (kind, target),
                ).fetchone()
                if row is None:
                    return None, self._db.version(conn, "controls")
                version = self._db.bump(conn, "controls")
            self._db.settle(conn, "controls", version)
            return Control.from_row(row), version

        return self._session.run(work)

    def version(self) -> int:
        """The ``controls`` version now."""
        return self._session.run(lambda conn: self._db.version(conn, "controls"))

    def close(self) -> None:
        self._session.close()
