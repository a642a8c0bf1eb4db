"""The ``certbroker.v1.Audit`` servicer: Query, CitizenReport and Anomalies for auditors.

Only callers whose JWT ``roles`` contain "auditor" are served; anyone else gets
PERMISSION_DENIED ``ROLE_NOT_ALLOWED``. EVERY call of a known caller -- allowed, refused or
invalid -- is first written to the audit log (no audit, no answer), and then sees the log as
it was just before its own entry; a call refused before its caller is known (no or bad token)
is counted in its peer's summary (:mod:`certbroker.audit.refusals`). Audit entries of these
calls reuse the lookup fields::

    kind             "audit_query"
    rule_id          "audit.<rpc>": audit.query | audit.citizen_report | audit.anomalies | ...
    clerk, office, roles   the caller (from the verified token)
    subject_id, matter_code, case_number, record_type   the filter's values (validated only)
    decision_id      the rest of the filter, "key=value" pairs joined by ";" (clerk, office,
                     decision, since, until, page_token, page_size), validated values only
    decision         "allow" | "deny" (role refused) | "" (invalid)
    outcome, status  "OK" or the error reason and gRPC code name

Fields released (``CitizenAccess.fields``) are not stored in the entry; they are derived from
the policy catalogue in force: the matter's fields for the record type minus the entry's
withheld fields. That is exact for a lookup of everything the matter needs (the usual case);
when the clerk asked for a subset, it may list more fields than were released -- it errs
towards telling the citizen more, never less. Denied or failed lookups released nothing.

``GetCheckpoint``, ``GetInclusionProof``, ``GetConsistencyProof`` and ``Export`` check their
request against the log before the entry is written (:mod:`certbroker.audit.service.proofs`), so
the entry's outcome is the caller's (``NO_CHECKPOINT``, ``BAD_SEQUENCE``, ...); ``decision_id``
then also names what was served (``size=`` of a checkpoint, ``sequence=`` of a proven entry,
``from=``/``to=`` of an export). A fresh checkpoint is signed before the entry, so it does not
cover the call's own entry. Exports stream the log in fixed-size chunks from a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc

from certbroker import errors, validation
from certbroker.audit import anomalies, archived
from certbroker.audit.anomaly_scan import find_in_store
from certbroker.audit.events import AuditEntry, AuditEvent, AuditLog, Receipt
from certbroker.audit.guard import AuditedCall, Result, invocation_metadata
from certbroker.audit.integrity.proofs import CheckpointSigner
from certbroker.audit.lookups import count_by_hour
from certbroker.audit.refusals import RefusalLedger
from certbroker.audit.scan import Criteria, scan
from certbroker.audit.service import overview, proofs
from certbroker.audit.service.messages import (
    entry_message,
    released_fields,
    time_range,
    timestamp,
    unsearched_message,
)
from certbroker.auth.authenticator import Authenticator, Clerk
from certbroker.metrics import BrokerState
from certbroker.policy import PolicySource
from certbroker.v1 import audit_pb2, audit_pb2_grpc

AUDITOR_ROLE = "auditor"
#: Sees the Overview of their own office (the web console's hall supervisor), nothing else.
HALL_SUPERVISOR_ROLE = "hall_supervisor"
#: How far back an Overview looks when the request gives no time range.
OVERVIEW_SPAN = timedelta(hours=24)
_FINDING_ID = re.compile(r"[0-9a-f]{16}")
_RULES = (
    anomalies.NO_CASE_NUMBER,
    anomalies.OUTSIDE_HOURS,
    anomalies.MANY_SUBJECTS,
    anomalies.REPEATED_SUBJECT,
    anomalies.DENIAL_BURST,
)
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_PAGE_TOKEN = re.compile(r"[1-9][0-9]{0,17}")
_Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")
U = TypeVar("U")


@dataclass
class _Call:
    """What the audit entry says about one Audit call, filled in as it is validated."""

    rpc: str
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


class AuditService(audit_pb2_grpc.AuditServicer):
    """Serves auditors from the audit log at ``db``, which ``log`` appends to; ``signer`` signs
    checkpoints on demand. ``db`` is passed unchanged to the reading modules. ``refusals``
    counts calls refused before the caller is known (:mod:`certbroker.audit.guard`).
    ``archive_dir``: where the log's archive files are (inclusion proofs of archived entries).

    Every RPC runs inside :class:`~certbroker.audit.guard.AuditedCall`; errors are raised as
    ``BrokerError`` and mapped to a status by the server (:func:`certbroker.server.calls.guarded`).
    """

    def __init__(
        self,
        auth: Authenticator,
        policies: PolicySource,
        log: AuditLog,
        db: proofs.AuditDB,
        *,
        signer: CheckpointSigner,
        thresholds: anomalies.Thresholds | None = None,
        refusals: RefusalLedger | None = None,
        state: BrokerState | None = None,
        evidence_keys: Callable[[], tuple[str, str]] | None = None,
        archive_dir: Path | None = None,
    ) -> None:
        self._auth = auth
        self._archive_dir = archive_dir
        self._state = state
        self._evidence_keys = evidence_keys
        self._refusals = refusals
        self._policies = policies
        self._log = log
        self._db = db
        self._signer = signer
        self._thresholds = thresholds or anomalies.Thresholds()

    async def _admit(
        self, call: _Call, context: _Context, parse: Callable[[], T]
    ) -> tuple[T, Receipt]:
        """Authenticate, require the auditor role, validate (``parse``) and audit the call.

        Raises the call's error after its entry is written; ``Unavailable`` if it cannot be.
        """

        async def work() -> T:
            return parse()

        return await self._gated(call, context, parse, work)

    async def _admit_as(
        self,
        call: _Call,
        context: _Context,
        roles: tuple[str, ...],
        parse: Callable[[Clerk], T],
    ) -> tuple[T, Receipt]:
        """:meth:`_admit` for callers holding any of ``roles``; ``parse`` sees the caller."""

        def known() -> T:
            assert call.clerk is not None  # _gated authenticates before it parses
            return parse(call.clerk)

        async def work() -> T:
            return known()

        return await self._gated(call, context, known, work, roles=roles)

    async def _resolve(
        self,
        call: _Call,
        context: _Context,
        parse: Callable[[], T],
        resolve: Callable[[T], Awaitable[U]],
    ) -> U:
        """Like :meth:`_admit`, then ``resolve`` what ``parse`` returned against the log, all
        before the entry is written, so the entry records the outcome the caller gets."""

        async def work() -> U:
            return await resolve(parse())

        return (await self._gated(call, context, parse, work))[0]

    async def _gated(
        self,
        call: _Call,
        context: _Context,
        parse: Callable[[], object],
        work: Callable[[], Awaitable[U]],
        *,
        roles: tuple[str, ...] = (AUDITOR_ROLE,),
    ) -> tuple[U, Receipt]:
        """Run ``work`` for an authenticated auditor (or only ``parse``, to record what a
        refused caller asked for) inside the call's :class:`AuditedCall`."""
        async with AuditedCall(
            self._log,
            lambda result: self._event(call, result),
            refusals=self._refusals,
            context=context,
        ) as audited:
            call.clerk = self._auth.authenticate(invocation_metadata(context))
            self._auth.enforce(call.clerk)  # a disabled or revoked auditor is refused too
            if not set(roles) & set(call.clerk.roles):
                with contextlib.suppress(errors.BrokerError):
                    parse()  # record what was asked for, as far as it validates
                raise errors.PermissionDenied(
                    "ROLE_NOT_ALLOWED",
                    f"only {' or '.join(roles)} may call this method",
                    role=roles[0],
                )
            answer = await work()
        return answer, audited.receipt

    def _event(self, call: _Call, result: Result) -> AuditEvent:
        clerk = call.clerk
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
            decision=result.decision,
            rule_id=f"audit.{call.rpc}",
            withheld_fields=(),
            outcome=result.outcome,
            status=result.status,
            policy_version=self._policies.current.version,
            department="",
            latency_ms=result.latency_ms,
            decision_id=";".join(call.summary),
        )

    @staticmethod
    def _query_params(call: _Call, request: audit_pb2.QueryRequest) -> tuple[Criteria, int]:
        decision = call.text("decision", request.decision)
        if decision is not None and decision not in ("allow", "deny"):
            raise errors.InvalidArgument(
                "BAD_DECISION", "decision must be allow or deny", argument="decision"
            )
        since, until = time_range(call.summary, request.HasField("time"), request.time)
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
        entries = await asyncio.to_thread(scan, self._db, criteria, limit=size + 1)
        page = entries[:size]
        for i, entry in enumerate(page):
            message = entry_message(entry)
            if i == len(page) - 1 and len(entries) > size:
                message.next_page_token = str(entry.sequence)
            yield message

    async def CitizenReport(
        self, request: audit_pb2.CitizenReportRequest, context: _Context
    ) -> audit_pb2.CitizenReportResponse:
        """Every lookup of the citizen's records (allowed, denied or failed), oldest first:
        the archived ones (read from the archive files), then the live ones. Archived ranges
        that could not be read (encrypted, file missing or changed) are named in
        ``unsearched``; the rest of the report is still given."""
        call = _Call("citizen_report")

        def parse() -> Criteria:
            subject = validation.subject_id(request.subject_id)
            call.subject_id = subject
            since, until = time_range(call.summary, request.HasField("time"), request.time)
            return Criteria(subject_id=subject, kinds=("lookup",), since=since, until=until)

        criteria, receipt = await self._admit(call, context, parse)
        criteria = replace(criteria, before=receipt.sequence)
        found = await asyncio.to_thread(
            archived.scan_with_archives, self._db, self._archive_dir, criteria
        )
        policy = self._policies.current
        reply = audit_pb2.CitizenReportResponse(subject_id=call.subject_id)
        for gap in found.unsearched:
            unsearched_message(gap, reply.unsearched.add())
        for entry in found.entries:
            e = entry.event
            matter = policy.matters.get(e.matter_code)
            reply.accesses.add(
                time=timestamp(entry),
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
        """Findings of :mod:`certbroker.audit.anomalies` over the lookups in the time range."""
        call = _Call("anomalies")

        def parse() -> Criteria:
            since, until = time_range(call.summary, request.HasField("time"), request.time)
            # "citizen" entries: the disputes (CITIZEN_DISPUTE); the other rules read lookups.
            return Criteria(kinds=("lookup", "citizen"), since=since, until=until)

        criteria, receipt = await self._admit(call, context, parse)
        criteria = replace(criteria, before=receipt.sequence)
        findings, reviewed = await asyncio.to_thread(self._findings, criteria, None)
        reply = audit_pb2.AnomaliesResponse()
        for finding in findings:
            overview.finding_message(finding, reviewed, reply.findings.add())
        return reply

    def _findings(
        self, criteria: Criteria, entries: list[AuditEntry] | None
    ) -> tuple[list[anomalies.Finding], dict[str, overview.Review]]:
        """Blocking: the findings over the lookups ``criteria`` selects (``entries``, when
        already read), and the reviews written since the range began (a review comes after
        what it reviews)."""
        if entries is None:
            # Counted by the database where it can (anomaly_scan), not every entry rebuilt
            # whole: a day at city density is tens of thousands of them.
            findings = find_in_store(
                self._db,
                self._policies.current,
                self._thresholds,
                since=criteria.since,
                until=criteria.until,
                before=criteria.before,
            )
        else:
            findings = anomalies.find(entries, self._policies.current, self._thresholds)
        later = Criteria(kinds=("audit_query",), since=criteria.since, before=criteria.before)
        return findings, overview.reviews(scan(self._db, later))

    async def ReviewFinding(
        self, request: audit_pb2.ReviewFindingRequest, context: _Context
    ) -> audit_pb2.ReviewFindingResponse:
        """Record that an auditor reviewed a finding, with a note: the call's entry is the
        review (:mod:`certbroker.audit.service.overview`)."""
        call = _Call("review_finding")

        def parse() -> None:
            validation.text("finding_id", request.finding_id, required=True)
            if not _FINDING_ID.fullmatch(request.finding_id):
                raise errors.InvalidArgument(
                    "BAD_FINDING_ID", "finding_id is not one Anomalies gave", argument="finding_id"
                )
            if request.rule not in _RULES:
                raise errors.InvalidArgument(
                    "UNKNOWN_RULE", "rule is not an anomaly rule", argument="rule"
                )
            validation.text("note", request.note, required=True, limit=500)
            call.summary += overview.review_summary(request.finding_id, request.rule, request.note)

        _, receipt = await self._admit(call, context, parse)
        reply = audit_pb2.ReviewFindingResponse()
        reply.receipt.entry_id, reply.receipt.entry_hash = receipt.entry_id, receipt.entry_hash
        reply.receipt.sequence = receipt.sequence
        return reply

    async def Overview(
        self, request: audit_pb2.OverviewRequest, context: _Context
    ) -> audit_pb2.OverviewResponse:
        """A hall at a glance (auditors: any office; hall supervisors: their own)."""
        call = _Call("overview")

        def parse(clerk: Clerk) -> Criteria:
            office = call.text("office", request.office)
            if AUDITOR_ROLE not in clerk.roles:  # a hall supervisor: their own office only
                if office is not None and office != clerk.office:
                    raise errors.PermissionDenied(
                        "OFFICE_NOT_ALLOWED",
                        "a hall supervisor sees the overview of their own office only",
                        office=office,
                    )
                if office is None:
                    office = clerk.office
                    call.summary.append(f"office={office}")
            since, until = time_range(call.summary, request.HasField("time"), request.time)
            until = until or datetime.now(UTC)
            since = since or until - OVERVIEW_SPAN
            return Criteria(kinds=("lookup",), office=office, since=since, until=until)

        criteria, receipt = await self._admit_as(
            call, context, (AUDITOR_ROLE, HALL_SUPERVISOR_ROLE), parse
        )
        criteria = replace(criteria, before=receipt.sequence)
        return await asyncio.to_thread(self._overview, criteria)

    def _overview(self, criteria: Criteria) -> audit_pb2.OverviewResponse:
        """Blocking: the Overview's answer for ``criteria`` (a time range, maybe an office)."""
        reply = audit_pb2.OverviewResponse(
            policy_version=self._policies.current.version, office=criteria.office or ""
        )
        assert criteria.since is not None
        assert criteria.until is not None
        reply.time.since.FromDatetime(criteria.since)
        reply.time.until.FromDatetime(criteria.until)
        counted = count_by_hour(self._db, criteria)
        overview.add_hours(overview.hour_counts(counted), reply)
        if criteria.office is None:
            # A whole hall's day at city density: counted by the database (anomaly_scan);
            # the Overview counts the lookups' findings, not the citizens' disputes.
            found, reviewed = self._findings(criteria, None)
            findings = [f for f in found if f.rule != anomalies.CITIZEN_DISPUTE]
        else:  # one office's lookups: few
            findings, reviewed = self._findings(criteria, scan(self._db, criteria))
        reply.open_anomalies = sum(overview.finding_id(f) not in reviewed for f in findings)
        with contextlib.suppress(errors.NotFound):  # none signed yet
            reply.last_checkpoint.CopyFrom(proofs.get_checkpoint(self._db, self._signer, False))
        if self._state is not None:
            live = self._state.live_instances()
            for name, breaker in sorted(self._state.breaker_states().items()):
                reply.departments.add(
                    department=name, breaker_state=breaker, live_instances=live.get(name, 0)
                )
        return reply

    async def GetCheckpoint(
        self, request: audit_pb2.GetCheckpointRequest, context: _Context
    ) -> audit_pb2.Checkpoint:
        """The latest signed checkpoint, or (``fresh``) one signed now; NOT_FOUND if none."""
        call = _Call("get_checkpoint")

        def parse() -> bool:
            if request.fresh:
                call.summary.append("fresh=true")
            return request.fresh

        async def resolve(fresh: bool) -> audit_pb2.Checkpoint:
            head = await asyncio.to_thread(proofs.get_checkpoint, self._db, self._signer, fresh)
            call.summary.append(f"size={head.size}")
            return head

        return await self._resolve(call, context, parse, resolve)

    async def GetInclusionProof(
        self, request: audit_pb2.InclusionProofRequest, context: _Context
    ) -> audit_pb2.InclusionProof:
        """RFC 9162 inclusion proof of one entry (by id or sequence) in a tree size."""
        call = _Call("get_inclusion_proof")

        def parse() -> proofs.InclusionQuery:
            query = proofs.inclusion_request(request)
            if query.entry_id:
                call.summary.append(f"entry_id={query.entry_id}")
            else:
                call.summary.append(f"sequence={query.sequence}")
            if query.tree_size:
                call.summary.append(f"tree_size={query.tree_size}")
            return query

        async def resolve(query: proofs.InclusionQuery) -> audit_pb2.InclusionProof:
            proof = await asyncio.to_thread(
                proofs.resolve_inclusion, self._db, query, self._archive_dir
            )
            if query.entry_id:  # what the id resolved to
                call.summary.append(f"sequence={proof.leaf_index + 1}")
            if not query.tree_size:  # what the default resolved to
                call.summary.append(f"tree_size={proof.tree_size}")
            return proof

        return await self._resolve(call, context, parse, resolve)

    async def GetConsistencyProof(
        self, request: audit_pb2.ConsistencyProofRequest, context: _Context
    ) -> audit_pb2.ConsistencyProof:
        """RFC 9162 proof that the tree of ``old_size`` is a prefix of ``new_size``'s."""
        call = _Call("get_consistency_proof")

        def parse() -> tuple[int, int]:
            old, new = proofs.consistency_request(request)
            call.summary += [f"old_size={old}", f"new_size={new}"] if new else [f"old_size={old}"]
            return old, new

        async def resolve(sizes: tuple[int, int]) -> audit_pb2.ConsistencyProof:
            proof = await asyncio.to_thread(
                proofs.resolve_consistency, self._db, *sizes, self._archive_dir
            )
            if not sizes[1]:  # what the default resolved to
                call.summary.append(f"new_size={proof.new_size}")
            return proof

        return await self._resolve(call, context, parse, resolve)

    async def Export(
        self, request: audit_pb2.ExportRequest, context: _Context
    ) -> AsyncIterator[audit_pb2.ExportChunk]:
        """Entries ``from..to`` as the export file (:mod:`certbroker.audit.export`), streamed."""
        call = _Call("export")

        def parse() -> tuple[int, int]:
            first, last = proofs.export_request(request)
            call.summary += [f"from={first}"] if first else []
            call.summary += [f"to={last}"] if last else []
            return first, last

        async def resolve(bounds: tuple[int, int]) -> tuple[int, int]:
            first, last = await asyncio.to_thread(proofs.resolve_export, self._db, *bounds)
            # What the defaults resolved to (the first live entry, the latest checkpoint).
            call.summary += [] if bounds[0] else [f"from={first}"]
            call.summary += [] if bounds[1] else [f"to={last}"]
            return first, last

        first, last = await self._resolve(call, context, parse, resolve)
        async for chunk in proofs.export_chunks(self._db, first, last):
            yield audit_pb2.ExportChunk(data=chunk)

    async def GetEvidenceKeys(
        self, request: audit_pb2.GetEvidenceKeysRequest, context: _Context
    ) -> audit_pb2.EvidenceKeys:
        """Every evidence public key ever used (JWKS) and the current kid; NOT_FOUND when
        this service was built without the broker's evidence key ring."""
        call = _Call("get_evidence_keys")

        def parse() -> None:
            return None

        async def resolve(_: None) -> audit_pb2.EvidenceKeys:
            if self._evidence_keys is None:
                raise errors.NotFound("NO_EVIDENCE_KEYS", "this broker issues no evidence")
            jwks, kid = await asyncio.to_thread(self._evidence_keys)
            return audit_pb2.EvidenceKeys(jwks=jwks, current_kid=kid)

        return await self._resolve(call, context, parse, resolve)
