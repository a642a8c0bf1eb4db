"""The one place a broker's configuration picks where its shared state lives.

:func:`shared_state_for` gives the stores of the security officers' controls and of the adapter
registry, and -- in a cluster -- what follows the other brokers and who signs checkpoints:

* no ``[audit] dsn`` (the embedded default): SQLite files in the state dir
  (``controls.sqlite``, ``registry.sqlite``), shared only by the worker processes of one
  broker; every broker signs its own log's checkpoints;
* ``[audit] dsn``: PostgreSQL, in the audit log's schema, shared by every broker using it
  (:mod:`certbroker.cluster`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from certbroker.auth.controls import Controls, ControlStore, SqliteControlStore
from certbroker.cluster.controls import PostgresControlStore
from certbroker.cluster.follow import follow
from certbroker.cluster.lease import SignerLease
from certbroker.cluster.pg import ClusterDb
from certbroker.cluster.registry import PostgresRegistryBackend
from certbroker.config import Config, PostgresLocation
from certbroker.routing.registry.store import (
    RegistryBackend,
    RegistryStore,
    SqliteRegistryBackend,
)


def default_broker_id() -> str:
    """This broker process's name in the cluster: host and pid (unique while it runs)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class SharedState:
    """Where one broker keeps what it may share with others. ``db`` is None for a broker on
    its own (SQLite in the state dir)."""

    controls: ControlStore
    registry: RegistryBackend
    db: ClusterDb | None = None
    lease: SignerLease | None = None
    _pg_registry: PostgresRegistryBackend | None = None

    def follower(
        self, controls: Controls, registry: RegistryStore
    ) -> Coroutine[Any, Any, None] | None:
        """The task that follows the other brokers' changes (None: no other brokers)."""
        if self.db is None or self._pg_registry is None:
            return None
        backend = self._pg_registry
        return follow(self.db, controls, registry, lambda: backend.seen)

    def may_sign(self) -> bool:
        """Whether this broker signs checkpoints now (always, on its own). Blocking."""
        return self.lease is None or self.lease.held()

    def close(self) -> None:
        """Close the stores and the signer's session (the lock goes with it)."""
        if self.lease is not None:
            self.lease.close()
        self.controls.close()
        self.registry.close()


def shared_state_for(config: Config, *, broker_id: str | None = None) -> SharedState:
    """The shared state of a broker on ``config`` (module docstring); ``broker_id`` defaults
    to :func:`default_broker_id`."""
    location = config.audit_location
    if isinstance(location, PostgresLocation):
        db = ClusterDb(location, broker_id or default_broker_id())
        registry = PostgresRegistryBackend(db)
        return SharedState(
            PostgresControlStore(db), registry, db, SignerLease(db), _pg_registry=registry
        )
    return SharedState(
        SqliteControlStore(config.state_dir / "controls.sqlite"),
        SqliteRegistryBackend(config.state_dir / "registry.sqlite"),
    )
