"""The cluster's stores on the real PostgreSQL, one broker against another in one process:
controls and registry changes reach the other broker, a change waits for the live brokers,
the signer's lock moves when its holder goes, and LISTEN/NOTIFY wakes a follower at once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from certbroker import errors
from certbroker.auth.controls import Control, Controls, SqliteControlStore
from certbroker.auth.principals import Clerk
from certbroker.cluster import pg as cluster_pg
from certbroker.cluster.controls import PostgresControlStore
from certbroker.cluster.follow import follow
from certbroker.cluster.lease import SignerLease, signer_of
from certbroker.cluster.pg import ClusterDb
from certbroker.cluster.registry import PostgresRegistryBackend
from certbroker.cluster.shared import shared_state_for
from certbroker.config import PostgresLocation
from certbroker.routing.registry.store import RegistryStore, SqliteRegistryBackend
from tests.audit.pg_support import fresh_schema
from tests.helpers import make_config

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg() -> Iterator[PostgresLocation]:
    with fresh_schema() as location:
        yield location


def disabled(sub: str) -> Control:
    return Control("clerk", sub, "misuse", "SEC-1", "sec-1", created=time.time())


def clerk(sub: str) -> Clerk:
    return Clerk(sub=sub, roles=("window_clerk",), office="gz-haizhu-24h-01", issued_at=0.0)


def test_a_control_set_at_one_broker_is_in_force_at_the_other_after_refresh(
    pg: PostgresLocation,
) -> None:
    one, two = (
        PostgresControlStore(ClusterDb(pg, "one")),
        PostgresControlStore(ClusterDb(pg, "two")),
    )
    try:
        at_one, at_two = Controls(one), Controls(two)
        at_one.put(disabled("clerk-7"))
        assert at_two.refresh() is True
        with pytest.raises(errors.PermissionDenied, match="disabled"):
            at_two.check_clerk(clerk("clerk-7"))
        assert at_two.remove("clerk", "clerk-7") is not None
        assert at_one.refresh() is True
        at_one.check_clerk(clerk("clerk-7"))  # enabled again
        assert at_one.refresh() is False  # nothing new
    finally:
        one.close()
        two.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_change_of_another_broker_in_between_is_not_skipped(
    backend: str, tmp_path: Path, pg: PostgresLocation
) -> None:
    """Our own change bumps the version past another broker's change we have not read yet:
    the next refresh must still load it (it did not when put() took the store's version)."""
    if backend == "sqlite":
        stores = [SqliteControlStore(tmp_path / "c.sqlite") for _ in range(2)]
    else:
        stores = [PostgresControlStore(ClusterDb(pg, name)) for name in ("one", "two")]
    try:
        at_one, at_two = Controls(stores[0]), Controls(stores[1])
        at_two.put(disabled("clerk-2"))
        at_one.put(disabled("clerk-1"))  # at_one has not seen clerk-2 yet
        assert at_one.refresh() is True
        assert {c.target for c in at_one.listing()} == {"clerk-1", "clerk-2"}
    finally:
        for store in stores:
            store.close()


def test_an_instance_registered_at_one_broker_routes_and_renews_at_the_other(
    pg: PostgresLocation,
) -> None:
    one = RegistryStore(PostgresRegistryBackend(ClusterDb(pg, "one")), lease_s=15)
    two = RegistryStore(PostgresRegistryBackend(ClusterDb(pg, "two")), lease_s=15)
    try:
        instance, _ = one.register("civil_affairs", ["marriage"], "127.0.0.1:7004", "v1")
        assert one.refresh() is False  # its own change is already in its memory
        # A heartbeat reaching the other broker before it re-read: found in the store.
        renewed = two.heartbeat(instance.instance_id)
        assert renewed is not None
        assert two.live_endpoints("civil_affairs", "marriage") == ["127.0.0.1:7004"]
        assert one.refresh() is True
        assert one.get(instance.instance_id) == renewed
        # Registered again at the other broker: the same instance, no twin.
        again, previous = two.register("civil_affairs", ["marriage"], "127.0.0.1:7004", "v1")
        assert previous is not None
        assert again.instance_id == instance.instance_id
        assert two.remove(instance.instance_id) is not None
        assert one.refresh() is True
        assert one.instances() == []
    finally:
        one.close()
        two.close()


def test_a_change_waits_for_the_live_brokers_and_not_for_the_dead(
    pg: PostgresLocation, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster_pg, "SETTLE_S", 0.3)
    db = ClusterDb(pg, "one")
    store = PostgresControlStore(db)
    try:
        store.version()  # creates the schema
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(f"SET search_path TO {pg.schema}")
            ClusterDb(pg, "behind").report(conn, 0, 0)
            conn.execute(  # a broker that stopped reporting long ago is not waited for
                "INSERT INTO cluster_brokers VALUES ('dead', 0, 0, now(), now() - interval '1 h')"
            )
            version = store.put(disabled("clerk-1"))
            assert db.settle(conn, "controls", version) is False  # "behind" did not catch up
            ClusterDb(pg, "behind").report(conn, version, 0)
            assert db.settle(conn, "controls", version) is True
    finally:
        store.close()


def takes(lease: SignerLease) -> bool:
    """Whether ``lease`` gets the lock within a few seconds (the server ends a closed session
    asynchronously: a moment after the client closed it)."""
    for _ in range(500):
        if lease.held():
            return True
        time.sleep(0.02)
    return False


def test_the_signer_lock_has_one_holder_and_moves_when_it_goes(pg: PostgresLocation) -> None:
    dbs = [ClusterDb(pg, name) for name in ("one", "two")]
    leases = [SignerLease(db) for db in dbs]
    try:
        assert leases[0].held() is True
        assert leases[1].held() is False
        assert leases[0].held() is True  # kept, not taken twice
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            assert signer_of(conn, dbs[0]) == "certbroker signer one"
            leases[0].close()  # its session ends: the server frees the lock as it notices
            assert takes(leases[1])
            assert signer_of(conn, dbs[0]) == "certbroker signer two"
            # The holder's session killed under it: it finds out on its next round.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'certbroker signer two'"
            )
            assert leases[1].held() is False
            assert takes(leases[0])
    finally:
        for lease in leases:
            lease.close()


def test_a_notice_wakes_the_follower_without_waiting_for_the_fallback(
    pg: PostgresLocation,
) -> None:
    """The follower's fallback re-read is an hour away here: only LISTEN/NOTIFY can bring
    the other broker's change."""

    async def scenario() -> None:
        one_store = PostgresControlStore(ClusterDb(pg, "one"))
        db_two = ClusterDb(pg, "two")
        two_store = PostgresControlStore(db_two)
        one, two = Controls(one_store), Controls(two_store)
        backend = PostgresRegistryBackend(db_two)
        registry = RegistryStore(backend)
        task = asyncio.create_task(
            follow(db_two, two, registry, lambda: backend.seen, every_s=3600)
        )
        try:
            # The follower's first report comes once it listens.
            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                conn.execute(f"SET search_path TO {pg.schema}")
                while not conn.execute("SELECT 1 FROM cluster_brokers").fetchall():
                    await asyncio.sleep(0.02)
            await asyncio.to_thread(one.put, disabled("clerk-9"))
            while two.find("clerk", "clerk-9") is None:  # the fallback would take an hour
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            registry.close()
            one_store.close()
            two_store.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))  # fails here if no notice came


def test_without_a_dsn_the_stores_are_the_state_dirs_sqlite_files(
    tmp_path: Path, dataset_dir: Path
) -> None:
    shared = shared_state_for(make_config(tmp_path, dataset_dir))
    try:
        assert isinstance(shared.controls, SqliteControlStore)
        assert isinstance(shared.registry, SqliteRegistryBackend)
        assert shared.db is None
        assert shared.may_sign() is True
        assert (tmp_path / "state" / "controls.sqlite").exists()
        assert (tmp_path / "state" / "registry.sqlite").exists()
    finally:
        shared.close()
