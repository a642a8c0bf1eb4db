"""The adapter registry in PostgreSQL: one
:class:`~certbroker.routing.registry.store.RegistryBackend` for every broker of a cluster.

An adapter registers (and sends heartbeats) through whichever broker the load balancer picks;
each write bumps the ``registry`` version and notifies the other brokers, which re-read the
table into their memory (routing never reads PostgreSQL on a lookup). A write returns once
every live broker holds it (:meth:`~certbroker.cluster.pg.ClusterDb.settle`), so a lookup
through any broker right after a registration finds the instance.

Leases are the registering broker's wall-clock times, as on one broker: the brokers' clocks
must agree to well within a lease (NTP; docs/cluster.md).
"""

from __future__ import annotations

from typing import Any

from certbroker.cluster.pg import ClusterDb, Session
from certbroker.routing.registry.store import Instance

_COLUMNS = (
    "instance_id, department, record_types, endpoint, schema_version, registered_at,"
    " lease_expires_at"
)


class PostgresRegistryBackend:
    """The instances in table ``cluster_instances`` of the cluster's schema."""

    def __init__(self, db: ClusterDb) -> None:
        self._db = db
        self._session = Session(db, "registry")
        #: The version this broker's memory holds (what it reports to the others).
        self.seen = -1
        self._written = -1  # the version of this broker's last write, for settle()

    def read_all(self) -> dict[str, Instance]:
        """Every instance; the version is read first, so the rows are at least that new."""

        def work(conn: Any) -> dict[str, Instance]:
            version = self._db.version(conn, "registry")
            rows = conn.execute(f"SELECT {_COLUMNS} FROM cluster_instances").fetchall()  # noqa: S608
            self.seen = version
            return {row[0]: Instance.from_row(row) for row in rows}

        return self._session.run(work)

    def changed(self) -> bool:
        """Whether the version moved past what memory holds."""
        return self._session.run(lambda conn: self._db.version(conn, "registry")) != self.seen

    def save(self, instance: Instance) -> None:
        """Insert or replace ``instance``; an instance of another id on the same department
        and endpoint (registered through a broker whose change this one had not seen) goes."""
        self._change(
            "DELETE FROM cluster_instances WHERE department = %s AND endpoint = %s"
            " AND instance_id <> %s",
            (instance.department, instance.endpoint, instance.instance_id),
            f"INSERT INTO cluster_instances ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)"  # noqa: S608
            " ON CONFLICT (instance_id) DO UPDATE SET department = excluded.department,"
            " record_types = excluded.record_types, endpoint = excluded.endpoint,"
            " schema_version = excluded.schema_version,"
            " registered_at = excluded.registered_at,"
            " lease_expires_at = excluded.lease_expires_at",
            instance.row(),
        )

    def forget(self, before: float) -> None:
        """Delete the instances whose lease ended before ``before``."""
        self._change("DELETE FROM cluster_instances WHERE lease_expires_at < %s", (before,))

    def renew(self, instance_id: str, lease_expires_at: float) -> None:
        """Set one instance's lease end."""
        self._change(
            "UPDATE cluster_instances SET lease_expires_at = %s WHERE instance_id = %s",
            (lease_expires_at, instance_id),
        )

    def delete(self, instance_id: str) -> None:
        """Delete one instance."""
        self._change("DELETE FROM cluster_instances WHERE instance_id = %s", (instance_id,))

    def settle(self) -> None:
        """Wait until every live broker holds this broker's last write."""
        written = self._written
        if written >= 0:
            self._session.run(lambda conn: self._db.settle(conn, "registry", written))

    def close(self) -> None:
        self._session.close()

    def _change(self, *statements: Any) -> None:
        """Run ``(sql, params)`` pairs (given flat) in one transaction; bump the version if
        they changed a row. Memory is updated by the caller (RegistryStore), so our own write
        needs no re-read unless someone else wrote in between."""
        pairs = list(zip(statements[::2], statements[1::2], strict=True))

        def work(conn: Any) -> None:
            with conn.transaction():
                changed = sum(conn.execute(sql, params).rowcount for sql, params in pairs)
                if not changed:
                    return
                version = self._db.bump(conn, "registry")
            if version == self.seen + 1:
                self.seen = version
            self._written = version

        self._session.run(work)
