"""The ``certbroker.v1.Admin`` servicer: security officers disable clerks and offices, revoke
tokens and freeze citizens' records (:mod:`certbroker.auth.controls` keeps and enforces them).

Only callers whose JWT ``roles`` contain "security_officer" are served; anyone else gets
PERMISSION_DENIED ``ROLE_NOT_ALLOWED``. Every call of a known caller -- allowed, refused or
invalid -- is written to the audit log before its answer (no audit, no answer), like the Audit
service's calls; a change whose entry cannot be written is undone. Every change needs a reason
and a ticket number (``MISSING_ARGUMENT`` otherwise). The entries::

    kind             "admin"
    rule_id          "admin.<rpc>": admin.disable_clerk | admin.revoke_token | ...
    clerk, office, roles   the officer (from the verified token)
    subject_id       the frozen / unfrozen citizen (FreezeSubject, UnfreezeSubject)
    case_number      the ticket number (so an auditor can Query by ticket)
    decision_id      canonical JSON: {"action", "target", "reason", "ticket"} and, when given,
                     "until", "before" (ISO times), "except_roles", "changed"
    decision         "allow" | "deny" (role refused) | "" (invalid)
    outcome, status  "OK" or the error reason and gRPC code name
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from certbroker import errors, validation
from certbroker.audit.events import AuditEvent, AuditLog, epoch_time
from certbroker.audit.guard import AuditedCall, Result, invocation_metadata
from certbroker.audit.refusals import RefusalLedger
from certbroker.auth.authenticator import Authenticator, Clerk
from certbroker.auth.controls import Control, Controls
from certbroker.policy import PolicySource
from certbroker.v1 import admin_pb2, admin_pb2_grpc, broker_pb2

__all__ = ["SECURITY_OFFICER_ROLE", "AdminService"]

SECURITY_OFFICER_ROLE = "security_officer"
MAX_REASON_CHARS = 500
MAX_TICKET_CHARS = 64
MAX_TARGET_CHARS = 128
_Context = grpc.aio.ServicerContext[Any, Any]


@dataclass
class _Call:
    """What the audit entry says about one Admin call, filled in as it is validated."""

    rpc: str
    officer: Clerk | None = None
    target: str = ""
    subject_id: str = ""
    reason: str = ""
    ticket: str = ""
    extra: dict[str, object] = field(default_factory=dict)


class AdminService(admin_pb2_grpc.AdminServicer):
    """Serves security officers; changes ``controls`` (durable first, then in force)."""

    def __init__(
        self,
        auth: Authenticator,
        policies: PolicySource,
        log: AuditLog,
        controls: Controls,
        *,
        refusals: RefusalLedger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._auth = auth
        self._policies = policies
        self._log = log
        self._controls = controls
        self._refusals = refusals
        self._clock = clock

    # -- the RPCs ---------------------------------------------------------------------------

    async def DisableClerk(
        self, request: admin_pb2.DisableClerkRequest, context: _Context
    ) -> admin_pb2.ControlResponse:
        def parse(call: _Call) -> Control:
            until = _time(request.until) if request.HasField("until") else None
            if until is not None:
                call.extra["until"] = epoch_time(until)
            return self._new(
                call, "clerk", _target(call, "sub", request.sub), request.why, until=until
            )

        return await self._put("disable_clerk", context, parse)

    async def EnableClerk(
        self, request: admin_pb2.EnableClerkRequest, context: _Context
    ) -> admin_pb2.ControlResponse:
        return await self._lift("enable_clerk", context, "clerk", "sub", request.sub, request.why)

    async def RevokeToken(
        self, request: admin_pb2.RevokeTokenRequest, context: _Context
    ) -> admin_pb2.ControlResponse:
        def parse(call: _Call) -> Control:
            return self._new(call, "token", _target(call, "jti", request.jti), request.why)

        return await self._put("revoke_token", context, parse)

    async def RevokeTokensBefore(
        self, request: admin_pb2.RevokeTokensBeforeRequest, context: _Context
    ) -> admin_pb2.ControlResponse:
        def parse(call: _Call) -> Control:
            before = _time(request.before) if request.HasField("before") else self._clock()
            call.extra["before"] = epoch_time(before)
            target = _target(call, "sub", request.sub)
            return self._new(call, "tokens_before", target, request.why, before=before)

        return await self._put("revoke_tokens_before", context, parse)

    async def DisableOffice(
        self, request: admin_pb2.DisableOfficeRequest, context: _Context
    ) -> admin_pb2.ControlResponse:
        def parse(call: _Call) -> Control:
            return self._new(call, "office", _target(call, "office", request.office), request.why)

        return await self._put("disable_office", context, parse)

    async def EnableOffice(
        self, request: admin_pb2.EnableOfficeRequest, context: _Context
    ) -> admin_pb2.ControlResponse:
        return await self._lift(
            "enable_office", context, "office", "office", request.office, request.why
        )

    async def FreezeSubject(
        self, request: admin_pb2.FreezeSubjectRequest, context: _Context
    ) -> admin_pb2.ControlResponse:
        def parse(call: _Call) -> Control:
            call.subject_id = call.target = validation.subject_id(request.subject_id)
            roles = tuple(
                validation.text("except_roles", r, required=True) for r in request.except_roles
            )
            if roles:
                call.extra["except_roles"] = list(roles)
            return self._new(call, "subject", call.target, request.why, except_roles=roles)

        return await self._put("freeze_subject", context, parse)

    async def UnfreezeSubject(
        self, request: admin_pb2.UnfreezeSubjectRequest, context: _Context
    ) -> admin_pb2.ControlResponse:
        return await self._lift(
            "unfreeze_subject", context, "subject", "subject_id", request.subject_id, request.why
        )

    async def ListControls(
        self, request: admin_pb2.ListControlsRequest, context: _Context
    ) -> admin_pb2.ListControlsResponse:
        call = _Call("list_controls")

        def parse() -> None:
            # A listing changes nothing: the justification is recorded when given.
            call.reason = _reason(request.why, required=False)
            call.ticket = _ticket(request.why, required=False)

        async with self._audited(call, context, parse) as audited:
            parse()
            controls = self._controls.listing()
            version = self._controls.version
        reply = admin_pb2.ListControlsResponse(version=version)
        for control in controls:
            _fill(reply.controls.add(), control)
        _receipt(reply.receipt, audited)
        return reply

    # -- the machinery ----------------------------------------------------------------------

    def _new(
        self,
        call: _Call,
        kind: str,
        target: str,
        why: admin_pb2.Justification,
        *,
        until: float | None = None,
        before: float | None = None,
        except_roles: tuple[str, ...] = (),
    ) -> Control:
        call.reason = _reason(why, required=True)
        call.ticket = _ticket(why, required=True)
        assert call.officer is not None
        return Control(
            kind=kind,
            target=target,
            reason=call.reason,
            ticket=call.ticket,
            officer=call.officer.sub,
            created=self._clock(),
            until=until,
            before=before,
            except_roles=except_roles,
        )

    async def _put(
        self, rpc: str, context: _Context, parse: Callable[[_Call], Control]
    ) -> admin_pb2.ControlResponse:
        call = _Call(rpc)
        async with self._audited(call, context, lambda: parse(call)) as audited:
            control = parse(call)
            previous = self._controls.find(control.kind, control.target)
            await asyncio.to_thread(self._controls.put, control)

            async def undo() -> None:  # the entry is missing: the change must not stay
                if previous is None:
                    await asyncio.to_thread(self._controls.remove, control.kind, control.target)
                else:
                    await asyncio.to_thread(self._controls.put, previous)

            audited.undo_unless_audited(undo)
        reply = admin_pb2.ControlResponse(changed=True)
        _fill(reply.control, control)
        _receipt(reply.receipt, audited)
        return reply

    async def _lift(
        self,
        rpc: str,
        context: _Context,
        kind: str,
        name: str,
        value: str,
        why: admin_pb2.Justification,
    ) -> admin_pb2.ControlResponse:
        call = _Call(rpc)

        def parse() -> None:
            if kind == "subject":
                call.subject_id = call.target = validation.subject_id(value)
            else:
                _target(call, name, value)
            call.reason = _reason(why, required=True)
            call.ticket = _ticket(why, required=True)

        async with self._audited(call, context, parse) as audited:
            parse()
            removed = await asyncio.to_thread(self._controls.remove, kind, call.target)
            call.extra["changed"] = removed is not None
            if removed is not None:
                lifted = removed

                async def undo() -> None:
                    await asyncio.to_thread(self._controls.put, lifted)

                audited.undo_unless_audited(undo)
        reply = admin_pb2.ControlResponse(changed=removed is not None)
        if removed is not None:
            _fill(reply.control, removed)
        _receipt(reply.receipt, audited)
        return reply

    @contextlib.asynccontextmanager
    async def _audited(self, call: _Call, context: _Context, parse: Callable[[], object]) -> Any:
        """The call's :class:`AuditedCall`, after authentication and the role check (a refused
        officer's request is still parsed, as far as it validates, to record what was asked)."""
        async with AuditedCall(
            self._log,
            lambda result: self._event(call, result),
            refusals=self._refusals,
            context=context,
        ) as audited:
            call.officer = self._auth.authenticate(invocation_metadata(context))
            self._auth.enforce(call.officer)
            if SECURITY_OFFICER_ROLE not in call.officer.roles:
                with contextlib.suppress(errors.BrokerError):
                    parse()
                raise errors.PermissionDenied(
                    "ROLE_NOT_ALLOWED",
                    "only security officers may call the Admin service",
                    role=SECURITY_OFFICER_ROLE,
                )
            yield audited

    def _event(self, call: _Call, result: Result) -> AuditEvent:
        officer = call.officer
        details: dict[str, object] = {
            "action": call.rpc,
            "target": call.target,
            "reason": call.reason,
            "ticket": call.ticket,
            **call.extra,
        }
        return AuditEvent(
            kind="admin",
            clerk=officer.sub if officer else "",
            office=officer.office if officer else "",
            roles=officer.roles if officer else (),
            subject_id=call.subject_id,
            matter_code="",
            case_number=call.ticket,
            consent_method="",
            record_type="",
            decision=result.decision,
            rule_id=f"admin.{call.rpc}",
            withheld_fields=(),
            outcome=result.outcome,
            status=result.status,
            policy_version=self._policies.current.version,
            department="",
            latency_ms=result.latency_ms,
            decision_id=json.dumps(details, sort_keys=True, ensure_ascii=False),
        )


def _target(call: _Call, name: str, value: str) -> str:
    call.target = validation.text(name, value, required=True, limit=MAX_TARGET_CHARS)
    return call.target


def _reason(why: admin_pb2.Justification, *, required: bool) -> str:
    return validation.text("reason", why.reason, required=required, limit=MAX_REASON_CHARS)


def _ticket(why: admin_pb2.Justification, *, required: bool) -> str:
    return validation.text("ticket", why.ticket, required=required, limit=MAX_TICKET_CHARS)


def _time(stamp: Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def _stamp(target: Timestamp, seconds: float) -> None:
    target.FromNanoseconds(int(seconds * 1e9))


def _fill(target: admin_pb2.Control, control: Control) -> None:
    target.kind = control.kind
    target.target = control.target
    target.reason = control.reason
    target.ticket = control.ticket
    target.officer = control.officer
    target.except_roles.extend(control.except_roles)
    _stamp(target.created, control.created)
    if control.until is not None:
        _stamp(target.until, control.until)
    if control.before is not None:
        _stamp(target.before, control.before)


def _receipt(target: broker_pb2.AuditReceipt, audited: AuditedCall) -> None:
    receipt = audited.receipt
    target.entry_id = receipt.entry_id
    target.entry_hash = receipt.entry_hash
    target.sequence = receipt.sequence
