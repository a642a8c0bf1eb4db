"""Registered adapter instances: in memory for routing, in a durable store so a restart keeps them.

The Registry servicer (:mod:`certbroker.routing.registry.servicer`) writes through this store;
routing reads
:meth:`RegistryStore.live_endpoints` on every remote fetch, from memory only, so a lookup never
waits on the disk. Writes go to the durable store first and to memory after the commit, under
one write lock, so memory never shows a state the store does not hold.

Where the instances are kept is a :class:`RegistryBackend`: an SQLite file in the state dir
(:class:`SqliteRegistryBackend`, the default) or, in a cluster of brokers, PostgreSQL
(:mod:`certbroker.cluster.registry`), which every broker reads.

Leases are wall-clock times (epoch seconds from the injected ``clock``), because they must mean
the same after a restart. An instance is *live* while ``now < lease_expires_at``; a lapsed
instance stays registered (``live = false``) and is back in routing with its next heartbeat.
Instances lapsed for longer than :data:`FORGET_AFTER_S` are forgotten.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

#: A lapsed instance is deleted this long after its lease ended (its adapter is long gone).
FORGET_AFTER_S = 24 * 3600

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    instance_id      TEXT PRIMARY KEY,
    department       TEXT NOT NULL,
    record_types     TEXT NOT NULL,   -- JSON array
    endpoint         TEXT NOT NULL,
    schema_version   TEXT NOT NULL,
    registered_at    REAL NOT NULL,   -- epoch seconds
    lease_expires_at REAL NOT NULL,
    UNIQUE (department, endpoint)
)
"""


@dataclass(frozen=True)
class Instance:
    """One registered adapter instance of a department."""

    instance_id: str
    department: str
    record_types: tuple[str, ...]
    endpoint: str
    schema_version: str
    registered_at: float
    lease_expires_at: float

    def live(self, now: float) -> bool:
        """In routing: the lease has not lapsed."""
        return now < self.lease_expires_at

    def row(self) -> tuple[object, ...]:
        """The stored row (every backend's column order; record types as a JSON array)."""
        return (
            self.instance_id,
            self.department,
            json.dumps(list(self.record_types)),
            self.endpoint,
            self.schema_version,
            self.registered_at,
            self.lease_expires_at,
        )

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Instance:
        """The instance of a stored row (:meth:`row`)."""
        return cls(row[0], row[1], tuple(json.loads(row[2])), *row[3:])


class RegistryBackend(Protocol):
    """Where the registered instances are kept durably (SQLite file or PostgreSQL).

    Blocking methods, called from a worker thread under :class:`RegistryStore`'s write lock.
    """

    def read_all(self) -> dict[str, Instance]:
        """Every stored instance, by id; what :meth:`changed` compares against from now on."""
        ...

    def changed(self) -> bool:
        """Whether someone else (another worker or broker) wrote since the last
        :meth:`read_all`; this store's own writes do not count."""
        ...

    def save(self, instance: Instance) -> None:
        """Insert or replace ``instance`` (replacing any other instance of the same department
        and endpoint)."""
        ...

    def forget(self, before: float) -> None:
        """Delete the instances whose lease ended before ``before``."""
        ...

    def renew(self, instance_id: str, lease_expires_at: float) -> None:
        """Set one instance's lease end."""
        ...

    def delete(self, instance_id: str) -> None:
        """Delete one instance (nothing if unknown)."""
        ...

    def settle(self) -> None:
        """After a write, outside the write lock: wait (boundedly) until every other broker
        holds it in memory; nothing to wait for when no other broker reads this store."""
        ...

    def close(self) -> None: ...


class SqliteRegistryBackend:
    """The instances in one SQLite file (WAL; shared by the worker processes of one broker)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(_SCHEMA)
        self._data_version = -1

    def read_all(self) -> dict[str, Instance]:
        # data_version changes only when ANOTHER connection committed: cheap to poll.
        self._data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
        rows = self._db.execute(
            "SELECT instance_id, department, record_types, endpoint, schema_version,"
            " registered_at, lease_expires_at FROM instances"
        ).fetchall()
        return {row[0]: Instance.from_row(row) for row in rows}

    def changed(self) -> bool:
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        return bool(version != self._data_version)

    def save(self, instance: Instance) -> None:
        # Autocommit: one statement, one transaction (UNIQUE (department, endpoint) makes
        # INSERT OR REPLACE drop a twin of another id).
        self._db.execute(
            "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)", instance.row()
        )

    def forget(self, before: float) -> None:
        """Delete the instances whose lease ended before ``before``."""
        self._db.execute("DELETE FROM instances WHERE lease_expires_at < ?", (before,))

    def renew(self, instance_id: str, lease_expires_at: float) -> None:
        self._db.execute(
            "UPDATE instances SET lease_expires_at = ? WHERE instance_id = ?",
            (lease_expires_at, instance_id),
        )

    def delete(self, instance_id: str) -> None:
        self._db.execute("DELETE FROM instances WHERE instance_id = ?", (instance_id,))

    def settle(self) -> None:
        """Nothing: the workers sharing the file re-read it every second."""

    def close(self) -> None:
        self._db.close()


class RegistryStore:
    """The registry's state. Thread-safe; blocking methods are meant for a worker thread.

    ``backend`` is where the instances are kept: a :class:`RegistryBackend`, or the path of an
    SQLite file. ``lease_s`` is how long a registration or heartbeat keeps an instance live.
    """

    def __init__(
        self,
        backend: Path | RegistryBackend,
        *,
        lease_s: int = 15,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lease_s < 1:
            raise ValueError("lease_s must be at least 1")
        if isinstance(backend, Path):
            backend = SqliteRegistryBackend(backend)
        backend.forget(clock() - FORGET_AFTER_S)
        self._backend: RegistryBackend = backend
        self.lease_s = lease_s
        self._clock = clock
        self._write_lock = threading.Lock()  # serializes writers: store, then memory
        self._read_lock = threading.Lock()  # guards the dict swap only; readers never wait on I/O
        self._instances = backend.read_all()

    def refresh(self) -> bool:
        """Re-read the store if another process changed it; True if memory was replaced.

        Worker processes of ``certbroker serve --workers N`` (and the brokers of a cluster)
        share the store but each keeps its own memory; they call this every second (and a
        cluster on each change notice) so an adapter registered (or renewed) through one
        routes from all. Blocking: call it from a worker thread.
        """
        with self._write_lock:
            return self._reload_if_changed()

    def _reload_if_changed(self) -> bool:
        if not self._backend.changed():
            return False
        fresh = self._backend.read_all()
        with self._read_lock:
            self._instances = fresh
        return True

    def now(self) -> float:
        """The registry's clock (epoch seconds)."""
        return self._clock()

    # --- reads (memory only) -------------------------------------------------------------

    def get(self, instance_id: str) -> Instance | None:
        with self._read_lock:
            return self._instances.get(instance_id)

    def instances(self, department: str = "") -> list[Instance]:
        """Registered instances (live or not), optionally of one department, oldest first."""
        with self._read_lock:
            found = [
                i for i in self._instances.values() if not department or i.department == department
            ]
        return sorted(found, key=lambda i: (i.registered_at, i.instance_id))

    def live_endpoints(self, department: str, record_type: str) -> list[str]:
        """Endpoints of the department's live instances serving ``record_type``, in a stable
        order (round-robin rotates over it)."""
        now = self._clock()
        return [
            i.endpoint
            for i in self.instances(department)
            if record_type in i.record_types and i.live(now)
        ]

    def endpoints(self) -> set[str]:
        """Every registered endpoint (live or not): channels to others can be closed."""
        with self._read_lock:
            return {i.endpoint for i in self._instances.values()}

    # --- writes (blocking: the backend) ----------------------------------------------------

    def register(
        self,
        department: str,
        record_types: Sequence[str],
        endpoint: str,
        schema_version: str,
    ) -> tuple[Instance, Instance | None]:
        """Register (or re-register) an instance with a fresh lease; returns (it, previous).

        The same department registering the same endpoint again updates that instance and keeps
        its id: an adapter restarting on its port does not leave a dead twin in routing.
        ``previous`` is what was stored before, for :meth:`undo`.
        """
        now = self._clock()
        with self._write_lock:
            previous = next(
                (i for i in self.instances(department) if i.endpoint == endpoint),
                None,
            )
            instance = Instance(
                previous.instance_id if previous else uuid.uuid4().hex,
                department,
                tuple(record_types),
                endpoint,
                schema_version,
                registered_at=now,
                lease_expires_at=now + self.lease_s,
            )
            self._backend.save(instance)
            self._backend.forget(now - FORGET_AFTER_S)
            with self._read_lock:
                self._instances = {
                    k: v
                    for k, v in self._instances.items()
                    if v.lease_expires_at >= now - FORGET_AFTER_S
                } | {instance.instance_id: instance}
        self._backend.settle()
        return instance, previous

    def heartbeat(self, instance_id: str) -> Instance | None:
        """Renew the lease (also of a lapsed instance); None if the instance is unknown."""
        with self._write_lock:
            current = self._known(instance_id)
            if current is None:
                return None
            renewed = replace(current, lease_expires_at=self._clock() + self.lease_s)
            self._backend.renew(instance_id, renewed.lease_expires_at)
            self._swap(instance_id, renewed)
        self._backend.settle()
        return renewed

    def remove(self, instance_id: str) -> Instance | None:
        """Deregister; returns the removed instance (None if unknown)."""
        with self._write_lock:
            current = self._known(instance_id)
            if current is not None:
                self._backend.delete(instance_id)
                self._swap(instance_id, None)
        if current is not None:
            self._backend.settle()
        return current

    def undo(self, instance: Instance, previous: Instance | None) -> None:
        """Put back ``previous`` in place of ``instance`` (a change whose audit entry failed)."""
        with self._write_lock:
            self._backend.delete(instance.instance_id)
            self._swap(instance.instance_id, None)
            if previous is not None:
                self._backend.save(previous)
                self._swap(previous.instance_id, previous)
        self._backend.settle()

    def close(self) -> None:
        with self._write_lock:
            self._backend.close()

    def _known(self, instance_id: str) -> Instance | None:
        """The instance from memory, or -- unknown there -- from the store if someone else
        changed it: an adapter registered through another broker a moment ago may send its
        heartbeat here before this broker's memory caught up. Under the write lock."""
        current = self.get(instance_id)
        if current is None and self._reload_if_changed():
            current = self.get(instance_id)
        return current

    def _swap(self, instance_id: str, instance: Instance | None) -> None:
        # Copy-on-write: readers holding the old dict are never disturbed.
        with self._read_lock:
            fresh = dict(self._instances)
            if instance is None:
                fresh.pop(instance_id, None)
            else:
                fresh[instance_id] = instance
            self._instances = fresh
