"""The standard ``grpc.health.v1.Health`` service, with Watch streams that end at shutdown.

grpc's own aio servicer (``grpc_health.v1.health.aio.HealthServicer``) keeps every ``Watch``
stream open until the server cancels it. A graceful ``server.stop(grace)`` waits for every call,
so one open Watch -- a load balancer's -- would hold each stop for the whole grace period, even
with no lookup in flight. Cutting the watches with a second ``server.stop(0)`` while the first
is still running crashes grpcio (a segmentation fault in its shutdown); so here a Watch stream
ends by itself once :meth:`Health.enter_graceful_shutdown` was called, right after it sent the
watcher NOT_SERVING. Otherwise it behaves as grpc's: ``Check`` answers the status of a known
service (NOT_FOUND for another), ``Watch`` sends the current status, then every change
(SERVICE_UNKNOWN for a service never set).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Serving statuses by service name ("" = the server as a whole); use on one event loop."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._changed = asyncio.Event()  # set, and replaced, on every change
        self._shutting_down = False

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def set(self, service: str, status: int) -> None:
        """Set a service's status; ignored once shutting down (it stays NOT_SERVING)."""
        if self._shutting_down:
            return
        self._status[service] = status
        self._notify()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good; Watch streams end after sending it."""
        if self._shutting_down:
            return
        self._shutting_down = True
        for service in self._status:
            self._status[service] = health_pb2.HealthCheckResponse.NOT_SERVING
        self._notify()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        last: int | None = None
        while True:
            changed = self._changed  # taken before reading: a later change sets it
            status = self._status.get(
                request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            )
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
                continue  # the status may have changed while writing: read it again
            if self._shutting_down:
                return  # the watcher has the final status (NOT_SERVING): the stream ends
            await changed.wait()
