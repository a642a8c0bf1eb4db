"""No audit, no answer: the one way a servicer call is audited.

Every audited RPC method runs its work inside an :class:`AuditedCall`::

    trace = Trace()
    async with AuditedCall(log, lambda result: event(request, trace, result)) as call:
        trace.clerk = auth.authenticate(invocation_metadata(context))
        ...                                  # fill ``trace`` as the call proceeds
        response = ...
    fill_receipt(response.receipt, call.receipt)
    return response

The method collects the call's facts (who called, what was asked, what was decided) as it goes,
in an object of its own; when the block ends -- normally, with a ``BrokerError``, or with any
other exception -- the guard asks ``describe`` for the call's entry, given a :class:`Result`
(the error the caller will get, if any, and the call's latency), and writes it. Only then does
anything leave:

* the block succeeded and the entry is written: the code after the block runs (and answers),
  with the entry's receipt in :attr:`AuditedCall.receipt`;
* the block raised a ``BrokerError``: the entry records its reason and code, the error gets
  ``audit_entry_id`` in its metadata and propagates;
* the block raised anything else: it is logged with its traceback (never sent) and becomes
  ``Internal("INTERNAL", "internal error")``, recorded and raised like any ``BrokerError``;
* the entry cannot be written: the caller gets ``Unavailable("AUDIT_UNAVAILABLE")`` instead
  of the answer or the error (not even a denial's reason leaves unaudited), and the
  ``undo_unless_audited`` callbacks run, so a change whose entry is missing does not stay.

A call refused before any caller is known -- the block raised
:class:`certbroker.errors.UnknownCaller` (no token, a malformed, forged or otherwise refused
one) -- gets no entry of its own when the guard is given a ``refusals`` ledger
(:class:`certbroker.audit.refusals.RefusalLedger`, as every servicer of a running broker is):
``describe`` is not asked, the ledger counts the call for the caller's peer and writes one
summary entry per peer per interval, and the caller gets its refusal as it is, or
RESOURCE_EXHAUSTED ``UNAUTHENTICATED_RATE_LIMITED`` past the peer's rate. Otherwise anyone
could grow the log, one entry per call, without being anyone. Every call of a known caller,
allowed or refused, still has its own entry before its answer. (Without a ledger, such a call
is described like any other.)

``describe`` may return ``None`` for outcomes a servicer deliberately leaves out of the log
(the Registry's heartbeats and its refusals of unauthenticated or malformed calls); nothing is
written then and the answer or error leaves as it is. It may also return a :class:`Batch`: several
entries written as one unit, all or none (a ``LookupMatter`` call's items and its bundle entry).

A call cancelled while its block runs (``asyncio.CancelledError``: the caller went away) gets no
answer and writes no entry (its ``undo_unless_audited`` callbacks run); cancelling a call while
its entry is written does not withdraw the entry
(:meth:`certbroker.audit.log.BatchingAuditLog.append`).

Mapping a ``BrokerError`` to a gRPC status is the server's job
(:func:`certbroker.server.app.guarded`, :func:`certbroker.errors.to_status`), after the guard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import grpc

from certbroker import errors
from certbroker.audit.events import AUDIT_UNAVAILABLE, AuditEvent, AuditLog, Receipt
from certbroker.audit.refusals import RefusalLedger

__all__ = [
    "AuditedCall",
    "Batch",
    "Describe",
    "Result",
    "invocation_metadata",
    "outcome",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    """How an audited call ended, for its entry.

    ``failure`` is the error the caller will get (``None`` on success; unknown exceptions are
    already the generic INTERNAL), ``latency_ms`` the time from entering the guard to the end
    of the block, before the entry is written.
    """

    failure: errors.BrokerError | None
    latency_ms: float

    @property
    def outcome(self) -> str:
        """The entry's ``outcome``: "OK" or the error's reason."""
        return outcome(self.failure)[0]

    @property
    def status(self) -> str:
        """The entry's ``status``: "OK" or the gRPC code name the caller gets."""
        return outcome(self.failure)[1]

    @property
    def decision(self) -> str:
        """The entry's ``decision`` for a call the broker authorizes: "allow" when it
        succeeded, "deny" when it was refused (PERMISSION_DENIED), "" when it failed
        otherwise (no decision was reached: bad input, no verified caller, ...)."""
        if self.failure is None:
            return "allow"
        return "deny" if isinstance(self.failure, errors.PermissionDenied) else ""


@dataclass(frozen=True)
class Batch:
    """Entries written as one unit (one transaction, all or none): ``events`` in order and then,
    if given, ``link(their entry ids)``. :attr:`AuditedCall.receipts` follow the same order."""

    events: Sequence[AuditEvent]
    link: Callable[[list[str]], AuditEvent] | None = None


#: What a servicer passes the guard: the call's entry (or entries, or none) for its result.
Describe = Callable[[Result], AuditEvent | Batch | None]


class AuditedCall:
    """One audited call (see the module docstring): an async context manager around the work.

    ``log`` is the audit log (``None``: none attached yet, so every call fails closed);
    ``describe`` builds the entry when the block ends. ``refusals`` counts the call instead
    when its caller turns out to be unknown, under the peer of ``context`` (the call's
    servicer context; see the module docstring). Optional observers, for metrics:
    ``on_append(seconds)`` after a successful write, with the time it took, and
    ``on_finish(status, seconds)`` once per call with the status the caller gets
    ("UNAVAILABLE" when the entry could not be written) and the time since the guard was
    entered, the write included.
    """

    def __init__(
        self,
        log: AuditLog | None,
        describe: Describe,
        *,
        refusals: RefusalLedger | None = None,
        context: grpc.aio.ServicerContext[Any, Any] | None = None,
        on_append: Callable[[float], object] | None = None,
        on_finish: Callable[[str, float], object] | None = None,
    ) -> None:
        self._log = log
        self._describe = describe
        self._refusals = refusals
        self._context = context
        self._on_append = on_append
        self._on_finish = on_finish
        self._undo: list[Callable[[], Awaitable[object]]] = []
        self.started = time.perf_counter()
        #: The written entries' receipts, in order; empty until written (or when not audited).
        self.receipts: list[Receipt] = []

    @property
    def receipt(self) -> Receipt:
        """The receipt of the call's entry (of a :class:`Batch`'s last entry), once written."""
        if not self.receipts:
            raise RuntimeError("the call's audit entry has not been written")
        return self.receipts[-1]

    @property
    def written(self) -> bool:
        """Whether the call's entry is in the log."""
        return bool(self.receipts)

    def elapsed_ms(self) -> float:
        """Milliseconds since the guard was entered."""
        return (time.perf_counter() - self.started) * 1000

    def undo_unless_audited(self, undo: Callable[[], Awaitable[object]]) -> None:
        """Run ``undo()`` if the call's entry cannot be written, or the block is cancelled: a
        change made inside the block (a registration) must not stay without its entry.
        Callbacks run last-in, first-out; not when ``describe`` leaves the call out of the log.
        """
        self._undo.append(undo)

    async def __aenter__(self) -> AuditedCall:
        self.started = time.perf_counter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not isinstance(exc, Exception):
            # Cancelled, or the process is leaving: no answer leaves and there is no outcome to
            # record, but a change made so far must not stay without an entry either.
            await self._run_undo()
            return
        failure = None if exc is None else errors.as_broker_error(exc)
        if isinstance(failure, errors.UnknownCaller) and self._refusals is not None:
            await self._refuse_unknown(failure)
            return  # the refusal propagates as it is
        result = Result(failure, self.elapsed_ms())
        started = time.perf_counter()
        try:
            entry = self._describe(result)
            if entry is not None:
                self.receipts = await self._write(entry)
        except Exception as problem:  # noqa: BLE001 - whatever it was, the entry is not written
            unavailable = _unavailable(problem)
            await self._run_undo()
            self._finish(unavailable.code.name)
            raise unavailable from failure
        if self.receipts and self._on_append is not None:
            self._on_append(time.perf_counter() - started)
        self._finish(result.status)
        if failure is None:
            return
        if self.receipts:
            failure.metadata["audit_entry_id"] = self.receipt.entry_id
        if failure is not exc:
            raise failure from exc  # the generic INTERNAL, never the unexpected exception
        # else: the BrokerError propagates as it is, now naming its entry

    async def _refuse_unknown(self, failure: errors.UnknownCaller) -> None:
        """Count a call refused before its caller was known (no entry of its own); raise
        the rate limit's error instead of the refusal when the peer is past its rate."""
        assert self._refusals is not None
        peer = self._context.peer() if self._context is not None else ""
        answer = self._refusals.refuse(peer, failure)
        await self._run_undo()  # nothing of the call is in the log
        self._finish(answer.code.name)
        if answer is not failure:
            raise answer from None

    async def _write(self, entry: AuditEvent | Batch) -> list[Receipt]:
        if self._log is None:
            raise errors.Unavailable(AUDIT_UNAVAILABLE, "no audit log attached")
        if isinstance(entry, Batch):
            return await self._log.append_many(entry.events, link=entry.link)
        return [await self._log.append(entry)]

    async def _run_undo(self) -> None:
        for undo in reversed(self._undo):
            try:
                await undo()
            except Exception:  # the caller gets UNAVAILABLE regardless
                log.exception("could not undo a change whose audit entry was not written")

    def _finish(self, status: str) -> None:
        if self._on_finish is not None:
            self._on_finish(status, time.perf_counter() - self.started)


def _unavailable(problem: Exception) -> errors.Unavailable:
    """The error a caller gets when its entry cannot be written (fail closed)."""
    if isinstance(problem, errors.Unavailable):  # the log's own AUDIT_UNAVAILABLE
        return problem
    # A malformed entry, a broken log implementation: a bug, but still no answer unaudited.
    log.error("audit entry not written", exc_info=problem)
    return errors.Unavailable(AUDIT_UNAVAILABLE, "the audit log cannot be written")


def invocation_metadata(
    context: grpc.aio.ServicerContext[Any, Any],
) -> Sequence[tuple[str, str | bytes]]:
    """The call's metadata as pairs (what :meth:`Authenticator.authenticate` takes)."""
    # grpc-stubs type aio metadata as a Mapping; at run time it is a sequence of pairs.
    return cast(Sequence[tuple[str, str | bytes]], context.invocation_metadata() or ())


def outcome(failure: BaseException | None) -> tuple[str, str]:
    """(outcome, status) for the audit entry; unknown exceptions are INTERNAL, as callers see."""
    if failure is None:
        return "OK", "OK"
    if isinstance(failure, errors.BrokerError):
        return failure.reason, failure.code.name
    return "INTERNAL", "INTERNAL"
