"""The ``certbroker.v1.Audit`` servicer: Query, CitizenReport and Anomalies for auditors.

Only callers whose JWT ``roles`` contain "auditor" are served; anyone else gets
PERMISSION_DENIED ``ROLE_NOT_ALLOWED``. EVERY call -- allowed, refused, invalid or
unauthenticated -- is first written to the audit log (no audit, no answer), and then sees the
log as it was just before its own entry. Audit entries of these calls reuse the lookup fields::

    kind             "audit_query"
    rule_id          "audit.<rpc>": audit.query | audit.citizen_report | audit.anomalies | ...
    clerk, office, roles   the caller (from the verified token), "" if unauthenticated
    subject_id, matter_code, case_number, record_type   the filter's values (validated only)
    decision_id      the rest of the filter, "key=value" pairs joined by ";" (clerk, office,
                     decision, since, until, page_token, page_size), validated values only
    decision         "allow" | "deny" (role refused) | "" (unauthenticated or invalid)
    outcome, status  "OK" or the error reason and gRPC code name

Fields released (``CitizenAccess.fields``) are not stored in the entry; they are derived from
the policy catalogue in force: the matter's fields for the record type minus the entry's
withheld fields. That is exact for a lookup of everything the matter needs (the usual case);
when the clerk asked for a subset, it may list more fields than were released -- it errs
towards telling the citizen more, never less. Denied or failed lookups released nothing.

``GetCheckpoint``, ``GetInclusionProof``, ``GetConsistencyProof`` and ``Export`` are gated and
audited here but answer UNIMPLEMENTED until the Merkle checkpoint work wires them in.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import timestamp_pb2

from broker import anomalies, errors, validation
from broker.audit import AuditEntry, AuditEvent, AuditLog, Receipt
from broker.audit_scan import Criteria, entry_time, scan
from broker.auth import Authenticator, Clerk
from broker.lookup import invocation_metadata, outcome
from broker.policy import PolicySet
from certbroker.v1 import audit_pb2, audit_pb2_grpc

AUDITOR_ROLE = "auditor"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_PAGE_TOKEN = re.compile(r"[1-9][0-9]{0,17}")
_Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")


class Unimplemented(errors.BrokerError):
    """An RPC of the contract this broker does not serve yet."""

    code = grpc.StatusCode.UNIMPLEMENTED


class PolicySource(Protocol):
    """Holds the policy set in force (``server.PolicyHolder``)."""

    @property
    def current(self) -> PolicySet: ...


@dataclass
class _Call:
    """What the audit entry says about one Audit call, filled in as it is validated."""

    rpc: str
    started: float = field(default_factory=time.perf_counter)
    clerk: Clerk | None = None
    subject_id: str = ""
    matter_code: str = ""
    case_number: str = ""
    record_type: str = ""
    summary: list[str] = field(default_factory=list)

    def text(self, name: str, value: str) -> str | None:
        """Validate one optional filter string; record it; ``None`` when empty."""
        validation.text(name, value, required=False)
        if value and name in ("subject_id", "matter_code", "case_number", "record_type"):
            setattr(self, name, value)
        elif value:
            self.summary.append(f"{name}={value}")
        return value or None


def _time(stamp: timestamp_pb2.Timestamp, name: str) -> datetime:
    try:
        if not 0 <= stamp.nanos < 10**9:
            raise ValueError("nanos out of range")
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise errors.InvalidArgument(
            "BAD_TIME_RANGE", f"time.{name} is not a valid timestamp", argument=f"time.{name}"
        ) from None


def _range(
    call: _Call, has: bool, span: audit_pb2.TimeRange
) -> tuple[datetime | None, datetime | None]:
    """(since, until) of an optional TimeRange; since must come before until."""
    if not has:
        return None, None
    since = _time(span.since, "since") if span.HasField("since") else None
    until = _time(span.until, "until") if span.HasField("until") else None
    if since is not None and until is not None and since >= until:
        raise errors.InvalidArgument(
            "BAD_TIME_RANGE", "time.since must be before time.until", argument="time"
        )
    for name, moment in (("since", since), ("until", until)):
        if moment is not None:
            call.summary.append(f"{name}={moment.isoformat()}")
    return since, until


def _stamp(entry: AuditEntry) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(entry_time(entry))
    return stamp


def entry_message(entry: AuditEntry) -> audit_pb2.AuditEntry:
    """An audit entry as the contract's message."""
    e = entry.event
    return audit_pb2.AuditEntry(
        sequence=entry.sequence,
        entry_id=entry.entry_id,
        time=_stamp(entry),
        kind=e.kind,
        clerk=e.clerk,
        office=e.office,
        roles=e.roles,
        subject_id=e.subject_id,
        matter_code=e.matter_code,
        case_number=e.case_number,
        consent_method=e.consent_method,
        record_type=e.record_type,
        decision=e.decision,
        rule_id=e.rule_id,
        withheld_fields=e.withheld_fields,
        outcome=e.outcome,
        status=e.status,
        policy_version=e.policy_version,
        department=e.department,
        latency_ms=e.latency_ms,
        decision_id=e.decision_id,
        bundle_id=e.bundle_id,
        entry_hash=entry.entry_hash,
    )


def released_fields(policy: PolicySet, entry: AuditEntry) -> list[str]:
    """Fields a lookup released, derived as the module docstring explains."""
    e = entry.event
    matter = policy.matters.get(e.matter_code)
    record_type = policy.record_types.get(e.record_type)
    if e.outcome != "OK" or e.decision != "allow" or matter is None or record_type is None:
        return []
    needed = set(matter.needs.get(e.record_type, ()))
    withheld = set(e.withheld_fields)
    return [f for f in record_type.fields if f in needed and f not in withheld]


class AuditService(audit_pb2_grpc.AuditServicer):
    """Serves auditors from the audit file at ``path``, which ``log`` appends to.

    Errors are raised as ``BrokerError`` and mapped to a status by the server's interceptor.
    """

    def __init__(
        self,
        auth: Authenticator,
        policies: PolicySource,
        log: AuditLog,
        path: Path,
        *,
        thresholds: anomalies.Thresholds | None = None,
    ) -> None:
        self._auth = auth
        self._policies = policies
        self._log = log
        self._path = Path(path)
        self._thresholds = thresholds or anomalies.Thresholds()

    async def _admit(
        self, call: _Call, context: _Context, parse: Callable[[], T]
    ) -> tuple[T, Receipt]:
        """Authenticate, require the auditor role, validate (``parse``) and audit the call.

        Raises the call's error after its entry is written; ``Unavailable`` if it cannot be.
        """
        failure: Exception | None = None
        parsed: T | None = None
        try:
            call.clerk = self._auth.authenticate(invocation_metadata(context))
            if AUDITOR_ROLE not in call.clerk.roles:
                failure = errors.PermissionDenied(
                    "ROLE_NOT_ALLOWED", "only auditors may call the Audit service", role="auditor"
                )
                with contextlib.suppress(errors.BrokerError):
                    parse()  # record what was asked for, as far as it validates
            else:
                parsed = parse()
        except Exception as exc:  # noqa: BLE001 - audited here, mapped by the server
            failure = exc
        receipt = await self._log.append(self._event(call, failure))
        if failure is not None:
            if isinstance(failure, errors.BrokerError):
                failure.metadata["audit_entry_id"] = receipt.entry_id
            raise failure
        return parsed, receipt  # type: ignore[return-value]  # parse() returned a T

    def _event(self, call: _Call, failure: Exception | None) -> AuditEvent:
        clerk = call.clerk
        result, status = outcome(failure)
        if failure is None:
            decision = "allow"
        elif isinstance(failure, errors.PermissionDenied):
            decision = "deny"
        else:
            decision = ""
        return AuditEvent(
            kind="audit_query",
            clerk=clerk.sub if clerk else "",
            office=clerk.office if clerk else "",
            roles=clerk.roles if clerk else (),
            subject_id=call.subject_id,
            matter_code=call.matter_code,
            case_number=call.case_number,
            consent_method="",
            record_type=call.record_type,
            decision=decision,
            rule_id=f"audit.{call.rpc}",
            withheld_fields=(),
            outcome=result,
            status=status,
            policy_version=self._policies.current.version,
            department="",
            latency_ms=(time.perf_counter() - call.started) * 1000,
            decision_id=";".join(call.summary),
        )

    @staticmethod
    def _query_params(call: _Call, request: audit_pb2.QueryRequest) -> tuple[Criteria, int]:
        decision = call.text("decision", request.decision)
        if decision is not None and decision not in ("allow", "deny"):
            raise errors.InvalidArgument(
                "BAD_DECISION", "decision must be allow or deny", argument="decision"
            )
        since, until = _range(call, request.HasField("time"), request.time)
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 0 < size <= MAX_PAGE_SIZE:
            raise errors.InvalidArgument(
                "BAD_PAGE_SIZE", f"page_size must be 1..{MAX_PAGE_SIZE}", argument="page_size"
            )
        call.summary.append(f"page_size={size}")
        after = 0
        if request.page_token:
            if not _PAGE_TOKEN.fullmatch(request.page_token):
                raise errors.InvalidArgument(
                    "BAD_PAGE_TOKEN",
                    "page_token is not one this service issued",
                    argument="page_token",
                )
            after = int(request.page_token)
            call.summary.append(f"page_token={after}")
        criteria = Criteria(
            clerk=call.text("clerk", request.clerk),
            office=call.text("office", request.office),
            subject_id=call.text("subject_id", request.subject_id),
            matter_code=call.text("matter_code", request.matter_code),
            case_number=call.text("case_number", request.case_number),
            record_type=call.text("record_type", request.record_type),
            decision=decision,
            since=since,
            until=until,
            after=after,
        )
        return criteria, size

    async def Query(
        self, request: audit_pb2.QueryRequest, context: _Context
    ) -> AsyncIterator[audit_pb2.AuditEntry]:
        """Matching entries oldest first, one page; the last of a full page carries the token."""
        call = _Call("query")
        (criteria, size), receipt = await self._admit(
            call, context, lambda: self._query_params(call, request)
        )
        criteria = replace(criteria, before=receipt.sequence)
        entries = await asyncio.to_thread(scan, self._path, criteria, limit=size + 1)
        page = entries[:size]
        for i, entry in enumerate(page):
            message = entry_message(entry)
            if i == len(page) - 1 and len(entries) > size:
                message.next_page_token = str(entry.sequence)
            yield message

    async def CitizenReport(
        self, request: audit_pb2.CitizenReportRequest, context: _Context
    ) -> audit_pb2.CitizenReportResponse:
        """Every lookup of the citizen's records (allowed, denied or failed), oldest first."""
        call = _Call("citizen_report")

        def parse() -> Criteria:
            subject = validation.subject_id(request.subject_id)
            call.subject_id = subject
            since, until = _range(call, request.HasField("time"), request.time)
            return Criteria(subject_id=subject, kinds=("lookup",), since=since, until=until)

        criteria, receipt = await self._admit(call, context, parse)
        criteria = replace(criteria, before=receipt.sequence)
        entries = await asyncio.to_thread(scan, self._path, criteria)
        policy = self._policies.current
        reply = audit_pb2.CitizenReportResponse(subject_id=call.subject_id)
        for entry in entries:
            e = entry.event
            matter = policy.matters.get(e.matter_code)
            reply.accesses.add(
                time=_stamp(entry),
                clerk=e.clerk,
                office=e.office,
                matter_code=e.matter_code,
                matter_name=matter.name if matter else "",
                case_number=e.case_number,
                record_type=e.record_type,
                department=e.department,
                fields=released_fields(policy, entry),
                decision=e.decision,
                outcome=e.outcome,
                entry_id=entry.entry_id,
            )
        return reply

    async def Anomalies(
        self, request: audit_pb2.AnomaliesRequest, context: _Context
    ) -> audit_pb2.AnomaliesResponse:
        """Findings of :mod:`broker.anomalies` over the lookups in the time range."""
        call = _Call("anomalies")

        def parse() -> Criteria:
            since, until = _range(call, request.HasField("time"), request.time)
            return Criteria(kinds=("lookup",), since=since, until=until)

        criteria, receipt = await self._admit(call, context, parse)
        criteria = replace(criteria, before=receipt.sequence)
        entries = await asyncio.to_thread(scan, self._path, criteria)
        findings = anomalies.find(entries, self._policies.current, self._thresholds)
        reply = audit_pb2.AnomaliesResponse()
        for finding in findings:
            reply.findings.add(
                rule=finding.rule,
                clerk=finding.clerk,
                description=finding.description,
                sequences=finding.sequences,
            )
        return reply

    async def _not_yet(self, rpc: str, context: _Context) -> None:
        await self._admit(_Call(rpc), context, lambda: None)
        raise Unimplemented("NOT_IMPLEMENTED", f"{rpc} is not served by this broker yet")

    async def GetCheckpoint(
        self, request: audit_pb2.GetCheckpointRequest, context: _Context
    ) -> audit_pb2.Checkpoint:
        await self._not_yet("get_checkpoint", context)
        raise AssertionError("unreachable")

    async def GetInclusionProof(
        self, request: audit_pb2.InclusionProofRequest, context: _Context
    ) -> audit_pb2.InclusionProof:
        await self._not_yet("get_inclusion_proof", context)
        raise AssertionError("unreachable")

    async def GetConsistencyProof(
        self, request: audit_pb2.ConsistencyProofRequest, context: _Context
    ) -> audit_pb2.ConsistencyProof:
        await self._not_yet("get_consistency_proof", context)
        raise AssertionError("unreachable")

    async def Export(
        self, request: audit_pb2.ExportRequest, context: _Context
    ) -> AsyncIterator[audit_pb2.ExportChunk]:
        await self._not_yet("export", context)
        yield audit_pb2.ExportChunk()  # unreachable: makes this an async generator
