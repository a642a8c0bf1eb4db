"""The ``certbroker.v1.CertificateBroker`` servicer: the lookup path.

Lookup, in order: authenticate the clerk, validate the request, decide by policy, fetch from
the department, minimize and mask, then append the audit entry, and only then answer. Every
lookup that reaches the servicer — allowed, denied or failed — produces exactly one audit entry;
if that entry cannot be written durably, the caller gets UNAVAILABLE and no record.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import grpc

from broker import errors, validation
from broker.audit import AuditEvent, AuditLog
from broker.auth import Authenticator, Clerk
from broker.metrics import Metrics
from broker.policy import Decision, PolicySet, Request
from broker.routing import Router
from certbroker import fields as record_fields
from certbroker.v1 import broker_pb2, broker_pb2_grpc, records_pb2

_CONSENT_PREFIX = "CONSENT_METHOD_"


def consent_name(method: broker_pb2.ConsentMethod.ValueType) -> str:
    """Proto consent enum → the policy/audit name ("id_card_read"); "" when unspecified."""
    if method == broker_pb2.CONSENT_METHOD_UNSPECIFIED:
        return ""
    try:
        return broker_pb2.ConsentMethod.Name(method).removeprefix(_CONSENT_PREFIX).lower()
    except ValueError:
        raise errors.InvalidArgument(
            "UNKNOWN_CONSENT_METHOD",
            "consent.method is not a known consent method",
            argument="consent.method",
        ) from None


def consent_value(name: str) -> broker_pb2.ConsentMethod.ValueType:
    return broker_pb2.ConsentMethod.Value(_CONSENT_PREFIX + name.upper())


class PolicySource(Protocol):
    """Holds the policy set in force; reloads swap it atomically."""

    @property
    def current(self) -> PolicySet: ...


@dataclass
class _Trace:
    """What the audit entry says about one lookup, filled in as the lookup proceeds."""

    clerk: Clerk | None = None
    subject_id: str = ""
    decision: Decision | None = None
    department: str = ""
    extra: dict[str, str] = field(default_factory=dict)


class CertificateBrokerService(broker_pb2_grpc.CertificateBrokerServicer):
    """Serves counter software. Errors are raised as ``BrokerError`` and mapped by the server."""

    def __init__(
        self,
        auth: Authenticator,
        policies: PolicySource,
        router: Router,
        audit: AuditLog,
        metrics: Metrics,
        *,
        adapter_timeout_s: float = 5.0,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._auth = auth
        self._policies = policies
        self._router = router
        self._audit = audit
        self._metrics = metrics
        self._timeout_s = adapter_timeout_s
        self._now = now

    async def Lookup(
        self, request: broker_pb2.LookupRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> broker_pb2.LookupResponse:
        started = time.perf_counter()
        policy = self._policies.current
        trace = _Trace()
        response: broker_pb2.LookupResponse | None = None
        failure: Exception | None = None
        try:
            response = await self._lookup(request, context, policy, trace)
        except Exception as exc:  # noqa: BLE001 - audited here, mapped to a status by the server
            failure = exc
        latency_ms = (time.perf_counter() - started) * 1000
        outcome, status = _outcome(failure)
        event = _event(request, policy, trace, outcome, status, latency_ms)
        audit_started = time.perf_counter()
        try:
            receipt = await self._audit.append(event)
        except errors.BrokerError:
            self._count(request, policy, trace, "UNAVAILABLE")
            raise  # no audit, no answer: not even the denial's reason leaves unaudited
        self._metrics.audit_append.observe(time.perf_counter() - audit_started)
        self._count(request, policy, trace, status)
        self._metrics.lookup_latency.labels(_label(request.record_type, policy)).observe(
            time.perf_counter() - started
        )
        if failure is not None:
            if isinstance(failure, errors.BrokerError):
                failure.metadata["audit_entry_id"] = receipt.entry_id
            raise failure
        assert response is not None
        response.receipt.entry_id = receipt.entry_id
        response.receipt.entry_hash = receipt.entry_hash
        response.receipt.sequence = receipt.sequence
        return response

    async def _lookup(
        self,
        request: broker_pb2.LookupRequest,
        context: grpc.aio.ServicerContext[object, object],
        policy: PolicySet,
        trace: _Trace,
    ) -> broker_pb2.LookupResponse:
        trace.clerk = self._auth.authenticate(_metadata(context))
        validation.text("record_type", request.record_type, required=True)
        validation.text("matter_code", request.matter_code, required=True)
        validation.text("case_number", request.case_number, required=False)
        validation.text("consent.reference", request.consent.reference, required=False)
        consent = consent_name(request.consent.method)
        wanted = validation.field_names(request.fields)
        trace.subject_id = validation.subject_id(request.subject_id)
        policy.check_request(request.record_type, request.matter_code, wanted)
        decision = policy.decide(
            Request(
                clerk=trace.clerk,
                record_type=request.record_type,
                matter_code=request.matter_code,
                case_number=request.case_number,
                consent_method=consent,
                fields=wanted,
                now=self._now(),
            )
        )
        trace.decision = decision
        trace.department = decision.department
        if not decision.allowed:
            raise errors.PermissionDenied(
                "POLICY_DENIED",
                decision.reason,
                rule=decision.rule_id,
                condition=decision.condition,
            )
        decision_id = trace.extra["decision_id"] = uuid.uuid4().hex
        source = self._router.source(request.record_type)
        adapter_started = time.perf_counter()
        try:
            fetched = await source.fetch(
                request.record_type, trace.subject_id, decision.fields, decision_id, self._timeout_s
            )
        except errors.BrokerError as exc:
            self._metrics.adapter_errors.labels(decision.department, exc.code.name).inc()
            raise
        finally:
            self._metrics.adapter_latency.labels(decision.department).observe(
                time.perf_counter() - adapter_started
            )
        record = _minimized(fetched.record, request.record_type, decision)
        response = broker_pb2.LookupResponse(
            record=record,
            withheld_fields=decision.withheld,
            masked_fields=sorted(decision.masks),
            department=decision.department,
            from_cache=False,
            decision_id=decision_id,
            rule_id=decision.rule_id,
        )
        response.as_of.FromDatetime(fetched.as_of)
        return response

    async def ListMatters(
        self,
        request: broker_pb2.ListMattersRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> broker_pb2.ListMattersResponse:
        clerk = self._auth.authenticate(_metadata(context))
        policy = self._policies.current
        reply = broker_pb2.ListMattersResponse(policy_version=policy.version)
        for view in policy.matters_for(clerk):
            matter = reply.matters.add(
                code=view.matter.code,
                name=view.matter.name,
                case_number_required=view.case_number_required,
                consent_methods=[consent_value(m) for m in view.consent_methods],
            )
            for record_type, names in view.fields.items():
                matter.needs.add(
                    record_type=record_type,
                    fields=names,
                    masked_fields=view.masks.get(record_type, ()),
                )
        return reply

    def _count(
        self, request: broker_pb2.LookupRequest, policy: PolicySet, trace: _Trace, status: str
    ) -> None:
        decision = trace.decision
        self._metrics.lookups.labels(
            _label(request.record_type, policy),
            "" if decision is None else ("allow" if decision.allowed else "deny"),
            trace.department,
            status,
        ).inc()


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> Sequence[tuple[str, str | bytes]]:
    # grpc-stubs type aio metadata as a Mapping; at run time it is a sequence of pairs.
    return cast(Sequence[tuple[str, str | bytes]], context.invocation_metadata() or ())


def _label(record_type: str, policy: PolicySet) -> str:
    # Only catalogue names become label values: a caller cannot mint new time series.
    return record_type if record_type in policy.record_types else "invalid"


def _minimized(
    record: records_pb2.Record, record_type: str, decision: Decision
) -> records_pb2.Record:
    """Defence in depth: whatever the department sent, release only what the decision allows."""
    out = records_pb2.Record()
    out.CopyFrom(record)
    inner = getattr(out, record_type)
    record_fields.keep_fields(inner, decision.fields)
    record_fields.apply_masks(inner, decision.masks)
    return out


def _outcome(failure: Exception | None) -> tuple[str, str]:
    """(outcome, status) for the audit entry; unknown exceptions are INTERNAL, as callers see."""
    if failure is None:
        return "OK", "OK"
    if isinstance(failure, errors.BrokerError):
        return failure.reason, failure.code.name
    return "INTERNAL", "INTERNAL"


def _event(
    request: broker_pb2.LookupRequest,
    policy: PolicySet,
    trace: _Trace,
    outcome: str,
    status: str,
    latency_ms: float,
) -> AuditEvent:
    clerk, decision = trace.clerk, trace.decision
    known = request.record_type in policy.record_types
    # Unvalidated caller input is recorded only once validated (or cut short and cleaned), so a
    # malformed request cannot write garbage or control characters into the log.
    return AuditEvent(
        kind="lookup",
        clerk=clerk.sub if clerk else "",
        office=clerk.office if clerk else "",
        roles=clerk.roles if clerk else (),
        subject_id=trace.subject_id,
        matter_code=request.matter_code if decision else "",
        case_number=request.case_number if decision else "",
        consent_method=_safe_consent(request.consent.method),
        record_type=request.record_type if known else "",
        decision="" if decision is None else ("allow" if decision.allowed else "deny"),
        rule_id=decision.rule_id if decision else "",
        withheld_fields=decision.withheld if decision else (),
        outcome=outcome,
        status=status,
        policy_version=policy.version,
        department=trace.department,
        latency_ms=round(latency_ms, 3),
        decision_id=trace.extra.get("decision_id", ""),
    )


def _safe_consent(method: broker_pb2.ConsentMethod.ValueType) -> str:
    try:
        return consent_name(method)
    except errors.BrokerError:
        return ""
