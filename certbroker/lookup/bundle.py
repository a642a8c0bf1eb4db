"""Matter bundles (``LookupMatter``): every record a matter needs, for every subject, at once.

A window clerk handling a property transfer needs the seller's and the spouse's household,
marriage and property records together. One call names the matter, the case and up to
:data:`MAX_SUBJECTS` subjects, each with a relation to the case from :data:`RELATIONS`.

In order: authenticate once; validate the whole request (any problem fails the whole call with
INVALID_ARGUMENT); derive the record types from the matter catalogue; decide every
(subject, record type) item exactly as ``Lookup`` decides
(:class:`certbroker.lookup.pipeline.ItemPipeline`); fetch every allowed item in parallel within
one deadline; write one audit entry per item (with the bundle id) and, after them in the same
transaction, one ``"bundle"`` entry linking them; only then answer, one :class:`BundleItem` per
item. One item failing never fails the others: its place in the answer holds an
:class:`ItemError` instead of a record.

The deadline is the caller's remaining time less a reserve for the audit writes and the answer
(:func:`certbroker.lookup.pipeline.fetch_budget`), capped by the configured adapter timeout.
Items not back by then are cancelled and reported as DEADLINE_EXCEEDED (``ADAPTER_TIMEOUT``,
naming the department), so the answer still leaves before the caller gives up.

No audit, no answer (:class:`certbroker.audit.guard.AuditedCall`): if the entries cannot be
written (they are written together, all or none), the call fails UNAVAILABLE and no record
leaves. A refused call (invalid, or denied) is audited by a bundle entry without items; one
refused before its caller is known (no or bad token) is counted in its peer's summary
(:mod:`certbroker.audit.refusals`).

Packages (一件事, ``package_code`` instead of ``matter_code``): several matters handled as one,
e.g. 二手房交易一件事 (the transfer registration, the utilities, the 户口). The items are every
(member matter, subject, record type), each decided under its own matter exactly as above;
a member matter the clerk may not handle has its items denied (audited) while the others
proceed, as any denied item of a bundle. A record that several allowed members need -- one
(record type, subject) -- is fetched once, for the union of their released fields
(:meth:`certbroker.lookup.pipeline.ItemPipeline.fetch_shared`), and each member's item gets it
cut to its own decision. Every item keeps its own entry (matter × subject × record type); the
closing entry is of kind ``"package"`` (matter code = the package code) and links them all, in
the same transaction. The answer groups the items by member matter (``matters``).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from certbroker import errors, validation
from certbroker.audit.events import AuditEvent, AuditLog, Receipt
from certbroker.audit.guard import AuditedCall, Batch, Result, invocation_metadata, outcome
from certbroker.audit.refusals import RefusalLedger
from certbroker.auth.authenticator import Authenticator, Clerk
from certbroker.evidence.document import Call, Issuer
from certbroker.ids import new_id
from certbroker.lookup.pipeline import (
    ItemPipeline,
    Trace,
    consent_name,
    event,
    evidence_item,
    fetch_budget,
    fill_receipt,
    label,
    release,
    safe_consent,
)
from certbroker.metrics import Metrics
from certbroker.policy import Decision, Matter, PolicySet
from certbroker.routing.router import adapter_timeout
from certbroker.v1 import broker_pb2

#: Relations a subject may have to the case. Recorded in each item's audit entry.
RELATIONS: tuple[str, ...] = (
    "applicant",
    "spouse",
    "co_owner",
    "seller",
    "buyer",
    "guardian",
    "child",
    "agent",
)
#: Most subjects one bundle may name: a family, not a population.
MAX_SUBJECTS = 8
#: The bundle's wait outlasts the sources' own timeouts by this much, so a well-behaved source
#: reports its timeout itself and the bundle only cancels the ones that do not.
_SLACK_S = 0.01
#: How long cancelled fetches get to unwind before the answer is written regardless.
_CANCEL_GRACE_S = 0.05


@dataclass
class _Item:
    """One (subject, record type) of the bundle, as it proceeds."""

    request: broker_pb2.LookupRequest  # the item, as a single Lookup would ask for it
    trace: Trace
    decision: Decision | None = None
    response: broker_pb2.LookupResponse | None = None
    failure: errors.BrokerError | None = None
    latency_ms: float = 0.0


@dataclass
class _Call:
    """What the bundle entry says about the call; caller input only once it is validated."""

    bundle_id: str
    started: float
    clerk: Clerk | None = None
    matter_code: str = ""  # the matter, or the package's code
    case_number: str = ""
    consent: str = ""
    items: list[_Item] = field(default_factory=list)
    package: bool = False  # a package of matters was asked for (package_code)
    matters: list[Matter] = field(default_factory=list)  # the matter, or the package's members


class BundleRunner:
    """Runs ``LookupMatter`` calls for the servicer (see the module docstring)."""

    def __init__(
        self,
        auth: Authenticator,
        items: ItemPipeline,
        audit: AuditLog,
        metrics: Metrics,
        *,
        cap_s: float,
        now: Callable[[], dt.datetime],
        refusals: RefusalLedger | None = None,
        evidence: Issuer | None = None,
    ) -> None:
        self._auth = auth
        self._refusals = refusals
        self._evidence = evidence
        self._items = items
        self._audit = audit
        self._metrics = metrics
        self._cap_s = cap_s
        self._now = now

    async def run(
        self,
        request: broker_pb2.LookupMatterRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        policy: PolicySet,
    ) -> broker_pb2.LookupMatterResponse:
        """Answer one bundle. Raises ``BrokerError`` for a refused call (already audited, with
        ``audit_entry_id`` in its metadata) and ``Unavailable`` when the audit cannot be written.
        """
        call = _Call(new_id(), time.perf_counter())
        async with AuditedCall(
            self._audit,
            lambda result: self._entries(request, policy, call, result),
            refusals=self._refusals,
            context=context,
            on_append=self._metrics.audit_append.observe,
            on_finish=lambda status, _seconds: self._finished(call, policy, status),
        ) as audited:
            self._plan(request, context, policy, call)
            deadline = asyncio.get_running_loop().time() + fetch_budget(context, self._cap_s)
            now = self._now()  # one instant for every decision: opening hours cannot split a bundle
            for item in call.items:
                try:
                    # A frozen citizen's items are refused one by one, like a policy denial.
                    assert item.trace.clerk is not None
                    self._auth.enforce_subject(item.trace.clerk, item.trace.subject_id)
                    item.decision = self._items.authorize(
                        policy, item.request, call.consent, (), now, item.trace
                    )
                except Exception as exc:  # noqa: BLE001 - reported in the item, never the whole call
                    item.failure = errors.as_broker_error(exc)
            await self._fetch_all(call, policy, deadline)
            if request.evidence:  # the released items' digests go into their entries
                for item in _released(call):
                    assert item.response is not None
                    release(item.trace, item.response)
        *receipts, bundle_receipt = audited.receipts
        reply = _answer(call, receipts, bundle_receipt)
        if request.evidence:
            reply.evidence = self._issue(request, policy, call, receipts, bundle_receipt)
        return reply

    def _issue(
        self,
        request: broker_pb2.LookupMatterRequest,
        policy: PolicySet,
        call: _Call,
        receipts: Sequence[Receipt],
        bundle_receipt: Receipt,
    ) -> str:
        """One evidence document for every released item of the call, after the entries."""
        assert self._evidence is not None
        assert call.clerk is not None
        if call.package:
            package = policy.packages.get(call.matter_code)
            name = package.name if package else ""
        else:
            name = call.matters[0].name if call.matters else ""
        document_call = Call(
            kind="package" if call.package else "bundle",
            clerk_sub=call.clerk.sub,
            clerk_name=call.clerk.name,
            office=call.clerk.office,
            matter_code=call.matter_code,
            matter_name=name,
            case_number=call.case_number,
            consent_method=call.consent,
            consent_reference=request.consent.reference,
            policy_version=policy.version,
            bundle_id=call.bundle_id,
            entry=bundle_receipt,
        )
        items = [
            evidence_item(item.request, item.trace, item.response, receipt)
            for item, receipt in zip(call.items, receipts, strict=True)
            if item.failure is None and item.response is not None
        ]
        return self._evidence.issue(document_call, items, self._now())

    def _entries(
        self,
        request: broker_pb2.LookupMatterRequest,
        policy: PolicySet,
        call: _Call,
        result: Result,
    ) -> AuditEvent | Batch:
        """The call's entries: one per item and, after them in the same transaction, the bundle
        entry naming them -- a bundle is in the log whole or not at all, and costs one fsync. A
        refused call (unauthenticated, invalid) has only its bundle entry, without items."""
        if result.failure is not None:
            call.items = []  # none of them is answered (or counted)
            return self._bundle_event(request, policy, call, outcome(result.failure), [])
        return Batch(
            [
                event(i.request, policy, i.trace, outcome(i.failure), i.latency_ms)
                for i in call.items
            ],
            link=lambda ids: self._bundle_event(request, policy, call, ("OK", "OK"), ids),
        )

    def _finished(self, call: _Call, policy: PolicySet, status: str) -> None:
        """Metrics of a finished call; ``status`` is the caller's ("UNAVAILABLE": unaudited)."""
        # An answered bundle counts each item with its own status; an unaudited one counts
        # every item UNAVAILABLE, as none of them reached the caller.
        self._count(call, policy, "" if status == "OK" else status)
        if status == "OK":
            self._metrics.bundle_items.observe(len(call.items))
        self._observe(call, policy, status)

    def _plan(
        self,
        request: broker_pb2.LookupMatterRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        policy: PolicySet,
        call: _Call,
    ) -> None:
        """Authenticate and validate; fill ``call.items`` (matter-major in package order, then
        subject-major, catalogue order)."""
        call.package = bool(request.package_code)
        call.clerk = self._auth.authenticate(invocation_metadata(context))
        self._auth.enforce(call.clerk)  # a security officer's controls refuse the whole call
        if request.evidence and self._evidence is None:
            raise no_evidence()
        code, matters = _matters(request, policy)
        validation.text("case_number", request.case_number, required=False)
        validation.text("consent.reference", request.consent.reference, required=False)
        consent = consent_name(request.consent.method)
        subjects = validate_subjects(request.subjects)
        call.matter_code, call.case_number, call.consent = code, request.case_number, consent
        call.matters = matters
        for matter in matters:
            for subject_id, relation in subjects:
                for record_type in matter.needs:
                    item = broker_pb2.LookupRequest(
                        record_type=record_type,
                        subject_id=subject_id,
                        matter_code=matter.code,
                        case_number=request.case_number,
                        consent=request.consent,
                    )
                    trace = Trace(
                        clerk=call.clerk,
                        subject_id=subject_id,
                        bundle_id=call.bundle_id,
                        relation=relation,
                    )
                    call.items.append(_Item(item, trace))

    async def _fetch_all(self, call: _Call, policy: PolicySet, deadline: float) -> None:
        """Fetch every allowed record in parallel, once per (record type, subject) however many
        matters of a package need it; whatever is not back by ``deadline`` is cancelled and
        becomes DEADLINE_EXCEEDED."""
        loop = asyncio.get_running_loop()
        allowed = [i for i in call.items if i.decision is not None and i.failure is None]
        records: dict[tuple[str, str], list[_Item]] = {}
        for item in allowed:  # in item order: a record's first item leads its fetch
            records.setdefault((item.request.record_type, item.trace.subject_id), []).append(item)
        tasks = [
            asyncio.create_task(self._fetch(group, policy, deadline, call.started))
            for group in records.values()
        ]
        try:
            if tasks:
                _, pending = await asyncio.wait(
                    tasks, timeout=max(0.0, deadline - loop.time()) + _SLACK_S
                )
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=_CANCEL_GRACE_S)
        finally:
            for task in tasks:  # also when this call itself is cancelled: leave nothing behind
                task.cancel()
        for item in allowed:
            if item.response is None and item.failure is None:
                item.failure = adapter_timeout(item.trace.department)
                item.latency_ms = _elapsed_ms(call.started)

    async def _fetch(
        self, group: list[_Item], policy: PolicySet, deadline: float, started: float
    ) -> None:
        """One record for the items that need it (one item, or one per package member)."""
        decided = [(item.decision, item.trace) for item in group if item.decision is not None]
        assert len(decided) == len(group)
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            responses = await self._items.fetch_shared(policy, decided, remaining)
        except Exception as exc:  # noqa: BLE001 - one record failing never fails the others
            failure = errors.as_broker_error(exc)
            for item in group:
                item.failure = failure
        else:
            for item, response in zip(group, responses, strict=True):
                item.response = response
        finally:
            for item in group:
                item.latency_ms = _elapsed_ms(started)

    def _count(self, call: _Call, policy: PolicySet, status: str) -> None:
        """Count every item in ``certbroker_lookups``: with ``status``, or its own when ""."""
        for item in call.items:
            self._items.count(
                item.request.record_type,
                policy,
                item.trace,
                status or outcome(item.failure)[1],
            )

    def _bundle_event(
        self,
        request: broker_pb2.LookupMatterRequest,
        policy: PolicySet,
        call: _Call,
        result: tuple[str, str],
        item_entry_ids: Sequence[str],
    ) -> AuditEvent:
        clerk = call.clerk
        counts = collections.Counter(outcome(i.failure)[0] for i in call.items)
        return AuditEvent(
            kind="package" if call.package else "bundle",
            clerk=clerk.sub if clerk else "",
            office=clerk.office if clerk else "",
            roles=clerk.roles if clerk else (),
            subject_id="",  # the subjects are on the item entries
            matter_code=call.matter_code,
            case_number=call.case_number,
            consent_method=safe_consent(request.consent.method),
            record_type="",
            decision="",
            rule_id="",
            withheld_fields=(),
            outcome=result[0],
            status=result[1],
            policy_version=policy.version,
            department="",
            latency_ms=round(_elapsed_ms(call.started), 3),
            decision_id="",
            bundle_id=call.bundle_id,
            item_entry_ids=tuple(item_entry_ids),
            outcome_counts=dict(sorted(counts.items())),
        )

    def _observe(self, call: _Call, policy: PolicySet, status: str) -> None:
        """The call's latency: by matter, and with Lookup's by method and status."""
        elapsed = time.perf_counter() - call.started
        known = policy.packages if call.package else policy.matters
        self._metrics.bundle_latency.labels(label(call.matter_code, known)).observe(elapsed)
        self._metrics.observe_lookup("LookupMatter", status, elapsed)


def _matters(
    request: broker_pb2.LookupMatterRequest, policy: PolicySet
) -> tuple[str, list[Matter]]:
    """The code asked for (a matter's or a package's) and the matters it stands for. Exactly
    one of ``matter_code`` and ``package_code``: both is MATTER_AND_PACKAGE, neither
    MISSING_ARGUMENT (argument ``matter_code``, as before packages), an unknown one
    UNKNOWN_MATTER / UNKNOWN_PACKAGE (all INVALID_ARGUMENT)."""
    validation.text("matter_code", request.matter_code, required=False)
    validation.text("package_code", request.package_code, required=False)
    if request.matter_code and request.package_code:
        raise errors.InvalidArgument(
            "MATTER_AND_PACKAGE",
            "give matter_code or package_code, not both",
            argument="package_code",
        )
    if request.package_code:
        package = policy.packages.get(request.package_code)
        if package is None:
            raise errors.InvalidArgument(
                "UNKNOWN_PACKAGE", "unknown package", argument="package_code"
            )
        return package.code, [policy.matters[code] for code in package.matters]
    if not request.matter_code:
        raise errors.InvalidArgument(
            "MISSING_ARGUMENT", "matter_code or package_code is required", argument="matter_code"
        )
    matter = policy.matters.get(request.matter_code)
    if matter is None:
        raise errors.InvalidArgument("UNKNOWN_MATTER", "unknown matter", argument="matter_code")
    return matter.code, [matter]


def validate_subjects(
    subjects: Sequence[broker_pb2.BundleSubject],
) -> list[tuple[str, str]]:
    """(subject_id, relation) pairs, checked: 1..MAX_SUBJECTS subjects, valid resident IDs,
    no subject twice, relations from :data:`RELATIONS`. Raises ``InvalidArgument`` naming the
    offending ``subjects[i]`` (never its value)."""
    if not subjects:
        raise errors.InvalidArgument(
            "NO_SUBJECTS", "a bundle needs at least one subject", argument="subjects"
        )
    if len(subjects) > MAX_SUBJECTS:
        raise errors.InvalidArgument(
            "TOO_MANY_SUBJECTS",
            f"{len(subjects)} subjects; a bundle has at most {MAX_SUBJECTS}",
            argument="subjects",
        )
    seen: dict[str, int] = {}
    checked: list[tuple[str, str]] = []
    for index, subject in enumerate(subjects):
        where = f"subjects[{index}]"
        try:
            subject_id = validation.subject_id(subject.subject_id)
            relation = validation.text("relation", subject.relation, required=True)
        except errors.InvalidArgument as exc:
            name = exc.metadata.get("argument", "")
            raise errors.InvalidArgument(
                exc.reason, f"{where}: {exc.message}", argument=f"{where}.{name}"
            ) from None
        if relation not in RELATIONS:
            raise errors.InvalidArgument(
                "UNKNOWN_RELATION",
                f"{where}.relation is not one of: {', '.join(RELATIONS)}",
                argument=f"{where}.relation",
            )
        if subject_id in seen:
            raise errors.InvalidArgument(
                "DUPLICATE_SUBJECT",
                f"{where} names the same citizen as subjects[{seen[subject_id]}]",
                argument=f"{where}.subject_id",
            )
        seen[subject_id] = index
        checked.append((subject_id, relation))
    return checked


def _released(call: _Call) -> list[_Item]:
    """The items whose record is answered (what an evidence document covers)."""
    return [i for i in call.items if i.failure is None and i.response is not None]


def no_evidence() -> errors.Unavailable:
    """The refusal of an evidence request by a broker that has no evidence key."""
    return errors.Unavailable("EVIDENCE_UNAVAILABLE", "this broker issues no evidence documents")


def _answer(
    call: _Call, receipts: Sequence[Receipt], bundle_receipt: Receipt
) -> broker_pb2.LookupMatterResponse:
    """The reply: the items in order, or for a package grouped by member matter."""
    reply = broker_pb2.LookupMatterResponse(bundle_id=call.bundle_id)
    groups: dict[str, RepeatedCompositeFieldContainer[broker_pb2.BundleItem]] = {}
    if call.package:
        reply.package_code = call.matter_code
        for matter in call.matters:
            groups[matter.code] = reply.matters.add(matter_code=matter.code, name=matter.name).items
    for item, receipt in zip(call.items, receipts, strict=True):
        target = groups.get(item.request.matter_code, reply.items)
        out = target.add(
            subject_id=item.request.subject_id,
            relation=item.trace.relation,
            record_type=item.request.record_type,
            matter_code=item.request.matter_code,
        )
        if item.failure is None and item.response is not None:
            out.response.CopyFrom(item.response)
            fill_receipt(out.response.receipt, receipt)
        else:
            failure = item.failure or errors.Internal("INTERNAL", "internal error")
            out.error.code = failure.code.name
            out.error.reason = failure.reason
            out.error.message = failure.message
            out.error.metadata.update(failure.metadata)
            out.error.metadata["audit_entry_id"] = receipt.entry_id
    fill_receipt(reply.receipt, bundle_receipt)
    return reply


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
