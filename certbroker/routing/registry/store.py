"""Registered adapter instances: in memory for routing, in SQLite so a restart keeps them.

The Registry servicer (:mod:`certbroker.routing.registry.servicer`) writes through this store;
routing reads
:meth:`RegistryStore.live_endpoints` on every remote fetch, from memory only, so a lookup never
waits on the disk. Writes go to SQLite first and to memory after the commit, under one write
lock, so memory never shows a state the file does not hold.

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


class RegistryStore:
    """The registry's state. Thread-safe; blocking methods are meant for a worker thread.

    ``lease_s`` is how long a registration or heartbeat keeps an instance live.
    """

    def __init__(
        self, path: Path, *, lease_s: int = 15, clock: Callable[[], float] = time.time
    ) -> None:
        if lease_s < 1:
            raise ValueError("lease_s must be at least 1")
        self.path = Path(path)
        self.lease_s = lease_s
        self._clock = clock
        self._write_lock = threading.Lock()  # serializes writers: file, then memory
        self._read_lock = threading.Lock()  # guards the dict swap only; readers never wait on I/O
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(_SCHEMA)
        self._db.execute(
            "DELETE FROM instances WHERE lease_expires_at < ?", (clock() - FORGET_AFTER_S,)
        )
        self._data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
        self._instances = self._read_all()

    def _read_all(self) -> dict[str, Instance]:
        rows = self._db.execute(
            "SELECT instance_id, department, record_types, endpoint, schema_version,"
            " registered_at, lease_expires_at FROM instances"
        ).fetchall()
        return {
            row[0]: Instance(row[0], row[1], tuple(json.loads(row[2])), *row[3:]) for row in rows
        }

    def refresh(self) -> bool:
        """Re-read the file if another process changed it; True if memory was replaced.

        Worker processes of ``certbroker serve --workers N`` share the file but each keeps its
        own memory; they call this every second so an adapter registered (or renewed) through
        one worker routes from all. Blocking: call it from a worker thread.
        """
        with self._write_lock:
            # data_version changes only when ANOTHER connection committed: cheap to poll.
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                return False
            self._data_version = version
            fresh = self._read_all()
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

    # --- writes (blocking: SQLite) --------------------------------------------------------

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
            self._write(instance)
            self._db.execute(
                "DELETE FROM instances WHERE lease_expires_at < ?", (now - FORGET_AFTER_S,)
            )
            with self._read_lock:
                self._instances = {
                    k: v
                    for k, v in self._instances.items()
                    if v.lease_expires_at >= now - FORGET_AFTER_S
                } | {instance.instance_id: instance}
        return instance, previous

    def heartbeat(self, instance_id: str) -> Instance | None:
        """Renew the lease (also of a lapsed instance); None if the instance is unknown."""
        with self._write_lock:
            current = self.get(instance_id)
            if current is None:
                return None
            renewed = replace(current, lease_expires_at=self._clock() + self.lease_s)
            self._db.execute(
                "UPDATE instances SET lease_expires_at = ? WHERE instance_id = ?",
                (renewed.lease_expires_at, instance_id),
            )
            self._swap(instance_id, renewed)
        return renewed

    def remove(self, instance_id: str) -> Instance | None:
        """Deregister; returns the removed instance (None if unknown)."""
        with self._write_lock:
            current = self.get(instance_id)
            if current is not None:
                self._db.execute("DELETE FROM instances WHERE instance_id = ?", (instance_id,))
                self._swap(instance_id, None)
        return current

    def undo(self, instance: Instance, previous: Instance | None) -> None:
        """Put back ``previous`` in place of ``instance`` (a change whose audit entry failed)."""
        with self._write_lock:
            self._db.execute("DELETE FROM instances WHERE instance_id = ?", (instance.instance_id,))
            self._swap(instance.instance_id, None)
            if previous is not None:
                self._write(previous)
                self._swap(previous.instance_id, previous)

    def close(self) -> None:
        with self._write_lock:
            self._db.close()

    def _write(self, instance: Instance) -> None:
        # Autocommit: one statement, one transaction.
        self._db.execute(
            "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                instance.instance_id,
                instance.department,
                json.dumps(list(instance.record_types)),
                instance.endpoint,
                instance.schema_version,
                instance.registered_at,
                instance.lease_expires_at,
            ),
        )

    def _swap(self, instance_id: str, instance: Instance | None) -> None:
        # Copy-on-write: readers holding the old dict are never disturbed.
        with self._read_lock:
            fresh = dict(self._instances)
            if instance is None:
                fresh.pop(instance_id, None)
            else:
                fresh[instance_id] = instance
            self._instances = fresh
