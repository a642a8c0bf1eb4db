"""How a broker of a cluster keeps its memory in step with the others' changes.

Controls and registry are enforced and routed from memory; another broker's change must reach
it. A dedicated session ``LISTEN``s on the schema's channel: a notice (sent at the commit of
each change) wakes the follower at once. Whether or not one came, the follower looks every
:data:`FOLLOW_S` seconds -- the fallback when a notice is lost (the listening session dropped,
PostgreSQL failed over to its standby): :meth:`Controls.refresh` and :meth:`RegistryStore.refresh`
re-read only when the version counter moved. After each look the broker reports the versions
it holds (:meth:`~certbroker.cluster.pg.ClusterDb.report`), which is what a change waits for
(:meth:`~certbroker.cluster.pg.ClusterDb.settle`) and what tells the others it is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Final

from certbroker.auth.controls import Controls
from certbroker.cluster.pg import ClusterDb, Session
from certbroker.routing.registry.store import RegistryStore

log = logging.getLogger(__name__)

#: The fallback re-read (and the broker's liveness report) happens this often.
FOLLOW_S: Final = 1.0
#: A listening session that failed is opened again after this long.
RELISTEN_S: Final = 1.0


async def follow(
    db: ClusterDb,
    controls: Controls,
    registry: RegistryStore,
    registry_version: Callable[[], int],
    *,
    every_s: float = FOLLOW_S,
) -> None:
    """Follow the other brokers' changes until cancelled (module docstring).
    ``registry_version`` is the registry version this broker's memory holds."""
    wake = asyncio.Event()
    listener = asyncio.create_task(_listen(db, wake), name="cluster-listener")
    reporter = Session(db, "follower")

    def catch_up() -> None:
        controls.refresh()
        registry.refresh()
        reporter.run(lambda conn: db.report(conn, controls.version, registry_version()))

    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), every_s)
            wake.clear()
            try:
                await asyncio.to_thread(catch_up)
            except Exception:  # PostgreSQL away: memory stays as it is; retried next second
                log.exception("following the cluster's shared state failed")
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await asyncio.to_thread(reporter.close)


async def _listen(db: ClusterDb, wake: asyncio.Event) -> None:
    """Set ``wake`` on every notice on the schema's channel; reconnect when the session fails."""
    import psycopg
    from psycopg import sql

    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(
                db.location.dsn, **db.connect_kwargs("listener")
            )
            async with conn:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(db.channel)))
                wake.set()  # catch up on what changed while nobody listened
                async for _notice in conn.notifies():
                    wake.set()
        except psycopg.Error as exc:
            log.warning(
                "listening for the cluster's changes failed (%s); again in %.0f s", exc, RELISTEN_S
            )
        await asyncio.sleep(RELISTEN_S)
