"""The outbox relay: publishes the notices of :mod:`certbroker.audit.outbox` to a message
broker, at least once, the audit entry id being the idempotency key.

Every ``interval_s`` the relay reads the unsent notices that are due (oldest entry first, at
most ``batch``), publishes them, and marks as sent those the broker acknowledged. A notice is
marked only after its acknowledgement, so a relay killed in between (or a broker that went
away) publishes it again later: duplicates are possible, losses are not. The publisher sends
the entry id as the message's idempotency key -- NATS JetStream's ``Nats-Msg-Id`` header, which
the stream deduplicates within its duplicate window -- and consumers dedup by it too
(``certbroker notify tail`` does).

:class:`NatsPublisher` is the one :class:`Publisher`: NATS JetStream (``[notify] nats_url``),
subject ``<subject>.<record_type>``, in a file-backed stream it creates if missing (why NATS:
docs/design.md, "Access notices"). nats-py (the ``notify`` extra) is imported only when a
relay is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from certbroker.audit.outbox import Pending, mark_sent, pending
from certbroker.audit.store.base import Backend
from certbroker.citizen.notices import now_iso

__all__ = ["DUPLICATE_WINDOW_S", "NatsPublisher", "OutboxRelay", "Publisher"]

log = logging.getLogger(__name__)

#: How long JetStream remembers a message id: longer than any relay restart takes.
DUPLICATE_WINDOW_S = 3600.0


class Publisher(Protocol):
    """Where notices go. ``publish`` returns once the broker has the message durably (raises
    otherwise); the same ``key`` twice must be one message to consumers that dedup by it."""

    async def publish(self, key: str, topic: str, payload: bytes) -> None: ...

    async def aclose(self) -> None: ...


class NatsPublisher:
    """NATS JetStream: one connection (re-made after a failure), a file-backed stream over
    ``<subject>.>`` created if missing, ``Nats-Msg-Id`` = the entry id."""

    def __init__(self, url: str, stream: str, subject: str, *, timeout_s: float = 5.0) -> None:
        self.url, self.stream, self.subject = url, stream, subject
        self._timeout = timeout_s
        self._nc: Any = None
        self._js: Any = None
        # A round publishes its notices concurrently: one of them connects, the others wait.
        self._connecting = asyncio.Lock()

    async def _jetstream(self) -> Any:
        async with self._connecting:
            if self._nc is not None and self._nc.is_connected:
                return self._js
            await self.aclose()
            return await self._connect()

    async def _connect(self) -> Any:
        import nats
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        # No reconnect inside the client: a failed round closes it and the next one connects
        # anew, so a publish never waits on a reconnect loop.
        self._nc = await nats.connect(
            self.url, allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=0
        )
        self._js = self._nc.jetstream(timeout=self._timeout)
        try:
            await self._js.stream_info(self.stream)
        except NotFoundError:
            await self._js.add_stream(
                StreamConfig(
                    name=self.stream,
                    subjects=[f"{self.subject}.>"],
                    storage=StorageType.FILE,
                    duplicate_window=DUPLICATE_WINDOW_S,
                )
            )
        return self._js

    async def publish(self, key: str, topic: str, payload: bytes) -> None:
        js = await self._jetstream()
        await js.publish(
            f"{self.subject}.{topic}", payload, timeout=self._timeout, headers={"Nats-Msg-Id": key}
        )

    async def aclose(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
            # close() cancels the client's reader and flusher tasks; let them finish here,
            # not after the loop is closed.
            for _ in range(3):
                await asyncio.sleep(0)


class OutboxRelay:
    """Publishes the outbox of the audit log ``backend`` through ``publisher`` (module
    docstring). :meth:`run` until cancelled; :meth:`relay_once` for one round."""

    def __init__(
        self, backend: Backend, publisher: Publisher, *, interval_s: float, batch: int = 256
    ) -> None:
        self._backend = backend
        self._publisher = publisher
        self._interval = interval_s
        self._batch = batch
        #: Notices acknowledged by the broker so far (for metrics and tests).
        self.published = 0

    async def run(self) -> None:
        """Relay every ``interval_s`` (at once again while a round finds a full batch)."""
        try:
            while True:
                try:
                    sent = await self.relay_once()
                except Exception as exc:  # noqa: BLE001 - broker down: notices wait in the outbox
                    log.warning("notice relay: %s; retrying in %.1f s", exc, self._interval)
                    await self._publisher.aclose()
                    sent = 0
                if sent < self._batch:
                    await asyncio.sleep(self._interval)
        finally:
            await self._publisher.aclose()

    async def relay_once(self) -> int:
        """Publish the due unsent notices (one batch); the number the broker acknowledged.
        Raises when none could be published while some were due."""
        due = await asyncio.to_thread(pending, self._backend, now_iso(), self._batch)
        if not due:
            return 0
        results = await asyncio.gather(*(self._send(p) for p in due), return_exceptions=True)
        acked = [p.entry_id for p, r in zip(due, results, strict=True) if r is None]
        await asyncio.to_thread(mark_sent, self._backend, acked, now_iso())
        self.published += len(acked)
        failures: Sequence[BaseException] = [r for r in results if isinstance(r, BaseException)]
        if failures and not acked:
            raise failures[0]
        return len(acked)

    async def _send(self, notice: Pending) -> None:
        topic = str(json.loads(notice.notice).get("record_type") or "unknown")
        await self._publisher.publish(notice.entry_id, topic, notice.notice.encode("utf-8"))
