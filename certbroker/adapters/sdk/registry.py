"""Registration with the broker's ``certbroker.v1.Registry``: register, heartbeat, deregister.

An adapter registers its department, record types and advertised endpoint when it starts, then
renews its lease with heartbeats at a fraction of the lease (a third unless told otherwise). If
the broker has forgotten the instance (a heartbeat answers NOT_FOUND: the broker lost its state,
or an operator deregistered it) the adapter registers again. On a graceful stop it deregisters,
so the broker stops routing to it before it goes away.

Every call carries the department credential -- a JWT read from a file on each call, so an
operator can rotate it without restarting the adapter -- as ``authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from certbroker.adapters.sdk.metrics import AdapterMetrics
from certbroker.v1 import registry_pb2, registry_pb2_grpc

log = logging.getLogger("certbroker.adapters.sdk.registry")

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

#: The contract version this SDK implements, sent as ``schema_version``.
SCHEMA_VERSION = "certbroker.v1"
#: Timeout of each Registry call, in seconds.
CALL_TIMEOUT_S = 5.0
#: Heartbeats come at this fraction of the lease unless an interval is configured.
LEASE_FRACTION = 1 / 3
#: Seconds between attempts while there is no lease to go by.
UNREGISTERED_RETRY_S = 5.0

# A broker answering these will answer the same again: stop and tell the operator.
_PERMANENT = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


class RegistrationError(Exception):
    """The broker refused the registration for a reason retrying will not fix."""


@dataclass(frozen=True)
class RegistrationConfig:
    """Where and as what to register.

    ``heartbeat_s`` overrides the interval derived from the lease;
    ``channel_credentials`` make the Registry calls over TLS (plaintext otherwise).
    """

    broker: str
    credential_file: Path
    department: str
    record_types: Sequence[str]
    endpoint: str
    heartbeat_s: float | None = None
    channel_credentials: grpc.ChannelCredentials | None = None


def read_credential(path: Path) -> str:
    """The department credential in ``path`` (surrounding whitespace ignored)."""
    try:
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistrationError(f"{path}: cannot read the department credential ({exc})") from None
    if not token or len(token.split()) != 1:
        raise RegistrationError(f"{path}: expected one JWT, the department credential")
    return token


class Registration:
    """One instance's registration, kept alive by a background task.

    ``await start()`` registers once (raising :class:`RegistrationError` if the broker refuses
    for good; a broker that is down is retried in the background), ``await stop()`` deregisters.
    """

    def __init__(self, config: RegistrationConfig, *, metrics: AdapterMetrics | None = None):
        if config.heartbeat_s is not None and config.heartbeat_s <= 0:
            raise ValueError("heartbeat interval must be positive")
        self.config = config
        self._metrics = metrics
        self.instance_id: str | None = None
        self.lease_s: int | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: registry_pb2_grpc.RegistryAsyncStub | None = None
        self._task: asyncio.Task[None] | None = None
        #: Set after each successful Register or Heartbeat (tests wait on it).
        self.renewed = asyncio.Event()

    @property
    def interval_s(self) -> float:
        """Seconds until the next heartbeat."""
        if self.config.heartbeat_s is not None:
            return self.config.heartbeat_s
        if self.lease_s is None:
            return UNREGISTERED_RETRY_S
        return max(0.1, self.lease_s * LEASE_FRACTION)

    async def start(self) -> None:
        """Register, then keep the lease alive in the background."""
        read_credential(self.config.credential_file)  # fail fast on a missing credential
        if self.config.channel_credentials is None:
            self._channel = grpc.aio.insecure_channel(self.config.broker)
        else:
            self._channel = grpc.aio.secure_channel(
                self.config.broker, self.config.channel_credentials
            )
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)
        try:
            await self._register()
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _PERMANENT:
                await self._close_channel()
                raise RegistrationError(
                    f"broker {self.config.broker} refused the registration: "
                    f"{exc.code().name} {exc.details()}"
                ) from None
            log.warning(
                "broker %s unreachable (%s); retrying in the background",
                self.config.broker,
                exc.code().name,
            )
        self._task = asyncio.create_task(self._keep_alive(), name="adapter-registration")

    async def stop(self, *, deregister: bool = True) -> None:
        """Stop heartbeats and (by default) deregister; never raises for a broker failure."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if deregister and self.instance_id is not None and self._stub is not None:
            try:
                await self._call(
                    "Deregister",
                    self._stub.Deregister,
                    registry_pb2.DeregisterRequest(instance_id=self.instance_id),
                )
                log.info("deregistered instance %s", self.instance_id)
            except (grpc.aio.AioRpcError, RegistrationError) as exc:
                # The lease lapses on its own; the broker stops routing here soon anyway.
                log.warning("deregistration failed (%s); the lease will lapse", _describe(exc))
            self.instance_id = None
        self._set_registered(False)
        await self._close_channel()

    async def _keep_alive(self) -> None:
        failures = 0
        while True:
            # After a failure retry sooner, backing off up to the normal interval.
            delay = self.interval_s if failures == 0 else min(self.interval_s, 0.5 * 2**failures)
            await asyncio.sleep(delay)
            try:
                if self.instance_id is None:
                    await self._register()
                else:
                    await self._heartbeat()
                failures = 0
            except (grpc.aio.AioRpcError, RegistrationError) as exc:
                failures = min(failures + 1, 10)
                level = logging.ERROR if _permanent(exc) else logging.WARNING
                log.log(level, "registry call failed: %s", _describe(exc))
            except Exception:
                # Whatever it is, the loop must outlive it: a dead loop lets the lease lapse
                # silently while the adapter still looks healthy.
                failures = min(failures + 1, 10)
                log.exception("unexpected error keeping the registration alive")

    async def _register(self) -> None:
        assert self._stub is not None
        request = registry_pb2.RegisterRequest(
            department=self.config.department,
            record_types=list(self.config.record_types),
            endpoint=self.config.endpoint,
            schema_version=SCHEMA_VERSION,
        )
        reply = await self._call("Register", self._stub.Register, request)
        self.instance_id, self.lease_s = reply.instance_id, reply.lease_seconds
        log.info(
            "registered %s %s at %s with %s: instance %s, lease %ds",
            self.config.department,
            ",".join(self.config.record_types),
            self.config.endpoint,
            self.config.broker,
            reply.instance_id,
            reply.lease_seconds,
        )
        self._renewed()

    async def _heartbeat(self) -> None:
        assert self._stub is not None
        assert self.instance_id is not None
        request = registry_pb2.HeartbeatRequest(instance_id=self.instance_id)
        try:
            reply = await self._call("Heartbeat", self._stub.Heartbeat, request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            log.warning("broker forgot instance %s; registering again", self.instance_id)
            self.instance_id = None
            self._set_registered(False)
            await self._register()
            return
        if reply.lease_seconds > 0:
            self.lease_s = reply.lease_seconds
        self._renewed()

    async def _call(
        self, method: str, rpc: grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req
    ) -> _Resp:
        """One Registry call with the credential; counts it by method and status."""
        metadata = (("authorization", f"Bearer {read_credential(self.config.credential_file)}"),)
        try:
            reply = await rpc(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            self._count(method, exc.code().name)
            raise
        self._count(method, "OK")
        return reply

    def _count(self, method: str, status: str) -> None:
        if self._metrics is not None:
            self._metrics.registry_calls.labels(method, status).inc()

    def _renewed(self) -> None:
        self._set_registered(True)
        self.renewed.set()

    def _set_registered(self, registered: bool) -> None:
        if self._metrics is not None:
            self._metrics.registered.set(1 if registered else 0)

    async def _close_channel(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = self._stub = None


def _permanent(exc: BaseException) -> bool:
    return isinstance(exc, RegistrationError) or (
        isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _PERMANENT
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name} {exc.details()}"
    return str(exc)
