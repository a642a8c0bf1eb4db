"""The ``certbroker.v1.CertificateBroker`` servicer: Lookup, ListMatters (matters and packages of
matters) and LookupMatter (one matter, or a package).

Lookup, in order: authenticate the clerk, validate the request, decide by policy, fetch from
the record cache or the department, minimize and mask, then append the audit entry (saying
whether the record came from the cache), and only then answer. Every lookup that reaches the
servicer from a known clerk -- allowed, denied or failed -- produces exactly one audit entry;
if that entry cannot be written durably, the caller gets UNAVAILABLE and no record. The entry
is written by :class:`certbroker.audit.guard.AuditedCall`, as for every audited call of the
broker; a call refused before its caller is known (no or bad token) is counted in its peer's
summary instead (``refusals``, :mod:`certbroker.audit.refusals`). ListMatters and
DescribeRecordType are not audited: they answer from the policy catalogue alone, about no
citizen (their refusals are counted too).

The decide/fetch/minimize steps live in :mod:`certbroker.lookup.pipeline`, shared with matter
bundles (:mod:`certbroker.lookup.bundle`), which run the same steps for every item of a
``LookupMatter``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import grpc

from certbroker import validation
from certbroker.audit.events import AuditEvent, AuditLog, Receipt
from certbroker.audit.guard import AuditedCall, Result, invocation_metadata, outcome
from certbroker.audit.refusals import RefusalLedger
from certbroker.auth.authenticator import Authenticator
from certbroker.cache import RecordCache
from certbroker.evidence.document import Call, Issuer
from certbroker.lookup.bundle import BundleRunner, no_evidence
from certbroker.lookup.describe import describe
from certbroker.lookup.pipeline import (
    ItemPipeline,
    Trace,
    consent_name,
    consent_value,
    event,
    evidence_item,
    fetch_budget,
    fill_receipt,
    release,
)
from certbroker.metrics import Metrics
from certbroker.policy import PolicySet, PolicySource, matters_for, packages_for
from certbroker.routing.router import Fetched, Router
from certbroker.v1 import broker_pb2, broker_pb2_grpc

__all__ = ["CertificateBrokerService", "PolicySource", "consent_name", "consent_value"]


class CertificateBrokerService(broker_pb2_grpc.CertificateBrokerServicer):
    """Serves counter software. Errors are raised as ``BrokerError`` and mapped by the server.

    ``adapter_timeout_s`` caps how long departments get per call (single lookup or whole
    bundle); a caller's earlier deadline shortens it. ``record_cache`` is shared by Lookup and
    LookupMatter (default: :class:`certbroker.cache.RecordCache` with its default bounds).
    ``refusals`` counts calls refused before the clerk is known (:mod:`certbroker.audit.guard`).
    ``evidence`` signs the evidence documents callers ask for (``evidence`` in a request;
    without an issuer such a request is refused UNAVAILABLE ``EVIDENCE_UNAVAILABLE``).
    """

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
        record_cache: RecordCache[Fetched] | None = None,
        refusals: RefusalLedger | None = None,
        evidence: Issuer | None = None,
    ) -> None:
        self._auth = auth
        self._evidence = evidence
        self._refusals = refusals
        self._policies = policies
        self._audit = audit
        self._metrics = metrics
        self._timeout_s = adapter_timeout_s
        self._now = now
        self._items = ItemPipeline(router, metrics, record_cache)
        self._bundles = BundleRunner(
            auth,
            self._items,
            audit,
            metrics,
            cap_s=adapter_timeout_s,
            now=now,
            refusals=refusals,
            evidence=evidence,
        )

    async def Lookup(
        self, request: broker_pb2.LookupRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> broker_pb2.LookupResponse:
        policy = self._policies.current
        trace = Trace()

        def entry(result: Result) -> AuditEvent:
            return event(request, policy, trace, outcome(result.failure), result.latency_ms)

        def finished(status: str, seconds: float) -> None:
            self._items.count(request.record_type, policy, trace, status)
            self._metrics.observe_lookup("Lookup", status, seconds)

        async with AuditedCall(
            self._audit,
            entry,
            refusals=self._refusals,
            context=context,
            on_append=self._metrics.audit_append.observe,
            on_finish=finished,
        ) as call:
            response = await self._lookup(request, context, policy, trace)
            if request.evidence:
                release(trace, response)  # its digest goes into the entry
        fill_receipt(response.receipt, call.receipt)
        if request.evidence:
            response.evidence = self._issue(request, policy, trace, response, call.receipt)
        return response

    def _issue(
        self,
        request: broker_pb2.LookupRequest,
        policy: PolicySet,
        trace: Trace,
        response: broker_pb2.LookupResponse,
        receipt: Receipt,
    ) -> str:
        """The evidence document of one released record (after its entry is written)."""
        assert self._evidence is not None
        assert trace.clerk is not None
        matter = policy.matters.get(request.matter_code)
        call = Call(
            kind="lookup",
            clerk_sub=trace.clerk.sub,
            clerk_name=trace.clerk.name,
            office=trace.clerk.office,
            matter_code=request.matter_code,
            matter_name=matter.name if matter else "",
            case_number=request.case_number,
            consent_method=consent_name(request.consent.method),
            consent_reference=request.consent.reference,
            policy_version=policy.version,
            bundle_id="",
            entry=receipt,
        )
        item = evidence_item(request, trace, response, receipt)
        return self._evidence.issue(call, [item], self._now())

    async def _lookup(
        self,
        request: broker_pb2.LookupRequest,
        context: grpc.aio.ServicerContext[object, object],
        policy: PolicySet,
        trace: Trace,
    ) -> broker_pb2.LookupResponse:
        trace.clerk = self._auth.authenticate(invocation_metadata(context))
        self._auth.enforce(trace.clerk)  # a security officer's controls, audited under the clerk
        if request.evidence and self._evidence is None:
            raise no_evidence()
        validation.text("record_type", request.record_type, required=True)
        validation.text("matter_code", request.matter_code, required=True)
        validation.text("case_number", request.case_number, required=False)
        validation.text("consent.reference", request.consent.reference, required=False)
        consent = consent_name(request.consent.method)
        wanted = validation.field_names(request.fields)
        trace.subject_id = validation.subject_id(request.subject_id)
        self._auth.enforce_subject(trace.clerk, trace.subject_id)  # frozen: SUBJECT_FROZEN
        decision = self._items.authorize(policy, request, consent, wanted, self._now(), trace)
        budget = fetch_budget(context, self._timeout_s)
        return await self._items.fetch(policy, decision, trace, budget)

    async def LookupMatter(
        self,
        request: broker_pb2.LookupMatterRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> broker_pb2.LookupMatterResponse:
        """Every record a matter needs for every subject, in parallel (see
        certbroker.lookup.bundle)."""
        return await self._bundles.run(request, context, self._policies.current)

    async def ListMatters(
        self,
        request: broker_pb2.ListMattersRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> broker_pb2.ListMattersResponse:
        # Not audited (nothing to describe), but guarded: a refused caller is still counted.
        async with AuditedCall(self._audit, _not_audited, refusals=self._refusals, context=context):
            clerk = self._auth.authenticate(invocation_metadata(context))
        policy = self._policies.current
        reply = broker_pb2.ListMattersResponse(policy_version=policy.version)
        for view in matters_for(policy, clerk):
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
        for package in packages_for(policy, clerk):
            reply.packages.add(
                code=package.package.code,
                name=package.package.name,
                matter_codes=package.package.matters,
                unavailable_matter_codes=package.unavailable,
            )
        return reply

    async def DescribeRecordType(
        self,
        request: broker_pb2.DescribeRecordTypeRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> broker_pb2.DescribeRecordTypeResponse:
        """The schema of one record type, or of all (see certbroker.lookup.describe)."""
        # Like ListMatters: not audited (the catalogue alone, about no citizen), but guarded.
        async with AuditedCall(self._audit, _not_audited, refusals=self._refusals, context=context):
            self._auth.authenticate(invocation_metadata(context))
            validation.text("record_type", request.record_type, required=False)
        return describe(self._policies.current, request.record_type)


def _not_audited(_result: Result) -> None:
    """ListMatters' entry: none (see the module docstring)."""
