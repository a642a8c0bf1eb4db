"""How the server runs each call of its own services: errors mapped to a gRPC status, the call
counted while it runs (for the drain on stop), its log context set, and one log line at its end.

Each servicer is registered :func:`guarded`: its RPC methods are wrapped once, at registration
(the generated ``add_*Servicer_to_server`` functions read each method once), so the wrapping
costs a few attribute updates per call and no lookup. (A server interceptor could do the same
job but runs on every call: about 4 % of cache-hit throughput here.) The health and reflection
services are grpc's own and are not wrapped.

The line logged when a call ends (logger ``certbroker.server.calls``) names the RPC, its gRPC
status and reason, its latency and the ids the call produced: the audit entry (from the answer's
receipt, or the ``audit_entry_id`` of the error), the decision id and the bundle id. Successful
calls are logged at DEBUG (the audit log already holds every one of them, and a line per call
at INFO would cost several percent of throughput); calls the caller got wrong (INVALID_ARGUMENT,
UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, CANCELLED) at INFO; the rest, failures of the
broker or a department, at WARNING.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeVar, cast

import grpc
from grpc_status import rpc_status

from certbroker import errors, logs
from certbroker.audit.refusals import RefusalLedger, malformed_request
from certbroker.server.decoding import UNDECODABLE

log = logging.getLogger(__name__)

_S = TypeVar("_S")

#: Statuses that say the caller asked for something it may not have; logged at INFO.
CALLER_STATUSES: Final = frozenset(
    {"INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND", "CANCELLED"}
)


class Calls:
    """The calls of the broker's services being served: counted, so that a stop can wait for
    them (:meth:`wait_idle`) and ``certbroker_rpcs_in_flight`` can show them.

    Used from the event loop only; :attr:`active` may be read from any thread.
    """

    def __init__(self) -> None:
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self, rpc: str) -> _Call:
        """A call of ``rpc`` starts: counted, and its :class:`~certbroker.logs.CallLog` made
        current."""
        self.active += 1
        self._idle.clear()
        return _Call(rpc)

    def end(self, call: _Call) -> None:
        """``call`` is over: logged, uncounted, its log context left."""
        try:
            call.log_end()
        finally:
            call.leave()
            self.active -= 1
            if not self.active:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is being served, at most ``timeout`` seconds; True if none is."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class _Call:
    """One call being served: its log context and what its end line reports."""

    __slots__ = ("_started", "_token", "info", "reason", "status")

    def __init__(self, rpc: str) -> None:
        self.info = logs.CallLog(rpc)
        self._token = logs.enter_call(self.info)
        self._started = time.perf_counter()
        # Until the method returns or raises: a call that ends otherwise was cancelled (the
        # caller went away or its deadline passed, or the server stopped).
        self.status = "CANCELLED"
        self.reason = ""

    def answered(self, response: object) -> None:
        self.status = "OK"
        if not log.isEnabledFor(logging.DEBUG):
            return  # the ids are only for the end line, which is not written
        receipt = getattr(response, "receipt", None)
        entry_id = getattr(receipt, "entry_id", "")
        if entry_id:
            self.info.audit_entry_id = entry_id
        logs.annotate(
            decision_id=getattr(response, "decision_id", ""),
            bundle_id=getattr(response, "bundle_id", ""),
        )

    def failed(self, exc: Exception) -> None:
        if isinstance(exc, errors.BrokerError):
            self.status, self.reason = exc.code.name, exc.reason
            self.info.audit_entry_id = exc.metadata.get("audit_entry_id", "")
        else:  # errors.to_status logs its traceback when the status is sent
            self.status = self.reason = "INTERNAL"

    def log_end(self) -> None:
        if self.status == "OK":
            level = logging.DEBUG
        elif self.status in CALLER_STATUSES:
            level = logging.INFO
        else:
            level = logging.WARNING
        if not log.isEnabledFor(level):
            return
        latency_ms = round((time.perf_counter() - self._started) * 1000, 3)
        reason = f" {self.reason}" if self.reason and self.reason != self.status else ""
        log.log(
            level,
            "%s %s%s in %.1f ms",
            self.info.rpc,
            self.status,
            reason,
            latency_ms,
            extra={"status": self.status, "reason": self.reason, "latency_ms": latency_ms},
        )

    def leave(self) -> None:
        # A streaming call's generator may be finalized from another context (closed by the
        # garbage collector's hook, in a task of its own): its token is not valid there.
        with contextlib.suppress(ValueError):
            logs.leave_call(self._token)


class _Guarded:
    """A servicer whose RPC methods run as described in the module docstring."""

    def __init__(self, servicer: object, calls: Calls, refusals: RefusalLedger | None) -> None:
        self._servicer = servicer
        self._calls = calls
        self._refusals = refusals

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._servicer, name)
        if inspect.isasyncgenfunction(method):
            return _guard_stream(method, self._calls, self._refusals)
        if inspect.iscoroutinefunction(method):
            return _guard_call(method, self._calls, self._refusals)
        return method


def guarded(servicer: _S, calls: Calls, refusals: RefusalLedger | None = None) -> _S:
    """``servicer`` as registered: every RPC method error-mapped, counted in ``calls`` and
    logged (module docstring); a request that did not decode
    (:data:`~certbroker.server.decoding.UNDECODABLE`) is refused ``MALFORMED_REQUEST`` before
    the method runs, counted by ``refusals`` like every refusal of an unknown caller."""
    return cast(_S, _Guarded(servicer, calls, refusals))


async def _abort(context: Any, exc: Exception) -> None:
    _code, _message, status = errors.to_status(exc)
    await context.abort_with_status(rpc_status.to_status(status))


def _malformed(context: Any, refusals: RefusalLedger | None) -> errors.BrokerError:
    """The error for a request that did not decode (RESOURCE_EXHAUSTED past the peer's rate)."""
    error = malformed_request()
    return error if refusals is None else refusals.refuse(context.peer(), error)


def _guard_call(
    method: Callable[[Any, Any], Awaitable[Any]], calls: Calls, refusals: RefusalLedger | None
) -> Callable[..., Awaitable[Any]]:
    """A coroutine RPC: unary, or streaming by writing to the context."""
    rpc = method.__name__

    @functools.wraps(method)
    async def guarded(request: Any, context: Any) -> Any:
        call = calls.begin(rpc)
        try:
            if request is UNDECODABLE:
                raise _malformed(context, refusals)
            response = await method(request, context)
            call.answered(response)
            return response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the one mapping point
            call.failed(exc)
            await _abort(context, exc)  # raises AbortError
        finally:
            calls.end(call)

    return guarded


def _guard_stream(
    method: Callable[[Any, Any], AsyncIterator[Any]], calls: Calls, refusals: RefusalLedger | None
) -> Callable[..., Any]:
    """A server-streaming RPC written as an async generator."""
    rpc = method.__name__

    @functools.wraps(method)
    async def guarded(request: Any, context: Any) -> AsyncIterator[Any]:
        call = calls.begin(rpc)
        try:
            if request is UNDECODABLE:
                raise _malformed(context, refusals)
            async for message in method(request, context):
                yield message
            call.answered(None)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the one mapping point
            call.failed(exc)
            await _abort(context, exc)
        finally:
            calls.end(call)

    return guarded
