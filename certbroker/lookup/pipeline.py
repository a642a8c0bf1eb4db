"""One lookup item — one record type about one citizen — shared by ``Lookup`` and ``LookupMatter``.

Both RPCs run every item through the same :class:`ItemPipeline`: decide by policy
(:meth:`~ItemPipeline.authorize`), fetch from the record cache or the department and minimize
and mask (:meth:`~ItemPipeline.fetch`; :meth:`~ItemPipeline.fetch_shared` for one record that
several matters of a package need), then describe it for the audit log (:func:`event`).
Keeping one copy is what guarantees that a record released inside a bundle is released exactly
as a single lookup would release it (and shares its cache).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import math
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from certbroker import errors
from certbroker.audit.events import AuditEvent, Receipt, iso_time
from certbroker.auth.authenticator import Clerk
from certbroker.cache import RecordCache, record_key
from certbroker.contract import fields as record_fields
from certbroker.evidence import document
from certbroker.ids import new_id
from certbroker.lookup.admission import AdmissionQueue
from certbroker.metrics import Metrics
from certbroker.policy import Decision, PolicySet, RecordType, Request
from certbroker.policy.counters import MemoryQuotaCounter, QuotaCounter, refusal
from certbroker.policy.quota import QUOTA_EXCEEDED
from certbroker.routing.router import Fetched, Router, adapter_timeout
from certbroker.v1 import broker_pb2, records_pb2

_CONSENT_PREFIX = "CONSENT_METHOD_"

#: Part of the caller's remaining time kept back from the departments for writing the audit
#: entries and sending the answer, so the answer leaves before the caller's deadline.
RESERVE_SHARE = 0.2
#: Upper bound of that reserve: an fsync or two, with room for a busy event loop.
RESERVE_MAX_S = 0.25


#: Proto consent enum value → the policy/audit name; UNSPECIFIED → "" (looked up per item).
_CONSENT_NAMES: dict[int, str] = {
    value.number: (
        ""
        if value.number == broker_pb2.CONSENT_METHOD_UNSPECIFIED
        else value.name.removeprefix(_CONSENT_PREFIX).lower()
    )
    for value in broker_pb2.ConsentMethod.DESCRIPTOR.values
}


def consent_name(method: broker_pb2.ConsentMethod.ValueType) -> str:
    """Proto consent enum → the policy/audit name ("id_card_read"); "" when unspecified."""
    name = _CONSENT_NAMES.get(method)
    if name is None:
        raise errors.InvalidArgument(
            "UNKNOWN_CONSENT_METHOD",
            "consent.method is not a known consent method",
            argument="consent.method",
        )
    return name


def consent_value(name: str) -> broker_pb2.ConsentMethod.ValueType:
    """Policy/audit consent name → the proto enum value."""
    return broker_pb2.ConsentMethod.Value(_CONSENT_PREFIX + name.upper())


def safe_consent(method: broker_pb2.ConsentMethod.ValueType) -> str:
    """:func:`consent_name`, or "" for an unknown value (for audit entries of bad requests)."""
    try:
        return consent_name(method)
    except errors.BrokerError:
        return ""


def fetch_budget(context: grpc.aio.ServicerContext[Any, Any], cap_s: float) -> float:
    """Seconds the departments may take for this call: the caller's remaining time less a
    reserve for the audit write and the answer, capped by the configured adapter timeout."""
    remaining: float | None = context.time_remaining()
    if remaining is None or not math.isfinite(remaining):  # the caller set no deadline
        return cap_s
    reserve = min(RESERVE_MAX_S, remaining * RESERVE_SHARE)
    return max(0.0, min(cap_s, remaining - reserve))


@dataclass
class Trace:
    """What the audit entry says about one item, filled in as the item proceeds."""

    clerk: Clerk | None = None
    subject_id: str = ""
    decision: Decision | None = None
    department: str = ""
    decision_id: str = ""
    bundle_id: str = ""
    relation: str = ""
    from_cache: bool = False  # served without calling the department (cache or single-flight)
    #: The released content, salted and digested, when the call asked for evidence: the entry
    #: records its digest and field names (certbroker.evidence.document).
    released: document.Released | None = None


class ItemPipeline:
    """Authorize → fetch (through the record cache) → minimize for one (subject, record type),
    with its metrics.

    The cache is read only after :meth:`authorize` has decided the current request, and its
    key is the exact set of fields that decision released (:func:`certbroker.cache.record_key`):
    two requests share an entry only when they were released the same fields, so a narrower
    role never sees a wider role's fields. What is cached is the department's answer cut to
    those fields, unmasked; every request gets its own masked copy (:func:`release_into`), never
    the cached message. The TTL is the record type's ``cache_ttl_s`` in the policy in force
    (0: never cached, never coalesced).
    """

    def __init__(
        self,
        router: Router,
        metrics: Metrics,
        cache: RecordCache[Fetched] | None = None,
        quotas: QuotaCounter | None = None,
    ) -> None:
        self._router = router
        self._metrics = metrics
        self._cache = cache if cache is not None else RecordCache(sizeof=fetched_size)
        # Inline (in memory) or batched per commit off the event loop (lookup.admission).
        self._quotas = AdmissionQueue(quotas) if quotas is not None else None

    async def admit(
        self, policy: PolicySet, traces: Sequence[Trace], now: dt.datetime
    ) -> list[errors.BrokerError | None]:
        """Charge allowed items (all of one clerk) to the quotas of the clerk's roles, in order;
        for each, None when admitted or its ``QUOTA_EXCEEDED`` refusal, the trace's decision then
        turned into the quota's denial (:func:`certbroker.policy.counters.refusal`), so its
        audit entry is a denial naming the quota. No quota for the roles: no I/O at all.

        Raises ``Unavailable`` (``QUOTA_UNAVAILABLE``) when the counters cannot be reached: a
        quota that cannot be counted is not waved through.
        """
        if not traces:
            return []
        clerk = traces[0].clerk
        assert clerk is not None, "authenticate before admitting"
        assert all(t.clerk is clerk for t in traces), "one clerk's items"
        quotas = policy.quotas_for(clerk.roles)
        if not quotas:
            return [None] * len(traces)
        if self._quotas is None:  # a servicer built without a counter (tests): this process's
            self._quotas = AdmissionQueue(MemoryQuotaCounter())
        subjects = [t.subject_id for t in traces]
        verdicts = await self._quotas.admit(clerk.sub, subjects, quotas, now.timestamp())
        refusals: list[errors.BrokerError | None] = []
        for trace, quota in zip(traces, verdicts, strict=True):
            if quota is None or trace.decision is None:
                refusals.append(None)
                continue
            trace.decision = refusal(policy, trace.decision, quota)
            trace.decision_id = ""  # nothing is fetched under it
            refusals.append(
                errors.PermissionDenied(
                    QUOTA_EXCEEDED,
                    trace.decision.reason,
                    rule=quota.id,
                    condition=QUOTA_EXCEEDED,
                )
            )
        return refusals

    def authorize(
        self,
        policy: PolicySet,
        request: broker_pb2.LookupRequest,
        consent: str,
        fields: tuple[str, ...],
        now: dt.datetime,
        trace: Trace,
    ) -> Decision:
        """Decide ``request`` for ``trace.clerk`` (authenticated, request validated).

        Raises ``InvalidArgument`` for names the policy does not know and ``PermissionDenied``
        (``POLICY_DENIED``, with the rule and condition) when the policy denies. On allow, the
        trace gets a fresh decision id.
        """
        assert trace.clerk is not None, "authenticate before authorizing"
        started = time.perf_counter()
        try:
            decision = policy.decide(  # which checks the names first (InvalidArgument)
                Request(
                    clerk=trace.clerk,
                    record_type=request.record_type,
                    matter_code=request.matter_code,
                    case_number=request.case_number,
                    consent_method=consent,
                    fields=fields,
                    now=now,
                )
            )
        finally:
            self._metrics.policy_evaluation.observe(time.perf_counter() - started)
        trace.decision = decision
        trace.department = decision.department
        if not decision.allowed:
            raise errors.PermissionDenied(
                "POLICY_DENIED",
                decision.reason,
                rule=decision.rule_id,
                condition=decision.condition,
            )
        trace.decision_id = new_id()
        return decision

    async def fetch(
        self, policy: PolicySet, decision: Decision, trace: Trace, timeout_s: float
    ) -> broker_pb2.LookupResponse:
        """The allowed record within ``timeout_s``, from the cache or the department, released
        only as ``decision`` allows, masked. Source errors arrive as ``BrokerError``s naming
        the department; ``trace.from_cache`` says whether the department was called for it."""
        (response,) = await self.fetch_shared(policy, [(decision, trace)], timeout_s)
        return response

    async def fetch_shared(
        self,
        policy: PolicySet,
        items: Sequence[tuple[Decision, Trace]],
        timeout_s: float,
    ) -> list[broker_pb2.LookupResponse]:
        """One record -- one (record type, subject) -- that several allowed decisions need (the
        member matters of a package), fetched once; one response per item, in order, each
        released only as its own decision allows (:func:`release_into`).

        The department is asked once, for the union of the decisions' fields (in catalogue
        order), under the first item's decision id: the decision token names that id and the
        union, and that item's trace says whether the department was called. The others say
        ``from_cache`` (they did not call the department themselves). The cache key is the
        union, so a later single lookup shares the entry only if released exactly those
        fields. A failure fails every item. With one item this is :meth:`fetch`.
        """
        lead, lead_trace = items[0]
        record_type = lead.record_type
        assert all(
            d.record_type == record_type and t.subject_id == lead_trace.subject_id for d, t in items
        ), "one record: one record type, one subject"
        known = policy.record_types[record_type]
        wanted = {f for d, _ in items for f in d.fields}
        fields = tuple(f for f in known.fields if f in wanted)
        # The fetch runs under the lead item's decision, widened to the union: what the
        # department is asked for (and the token allows) is exactly what some item may see.
        asked = lead if fields == lead.fields else dataclasses.replace(lead, fields=fields)
        key = record_key(record_type, lead_trace.subject_id, fields)
        try:
            fetched, served = await self._cache.get_or_fetch(
                key,
                known.cache_ttl_s,
                lambda: self._fetch_source(asked, lead_trace, timeout_s, known),
                wait_s=timeout_s,
            )
        except TimeoutError:  # joined another request's fetch, which outlasted our budget
            raise adapter_timeout(lead.department) from None
        self._metrics.observe_record_cache(record_type, served)
        responses = []
        for index, (decision, trace) in enumerate(items):
            trace.from_cache = served.shared or index > 0
            responses.append(self._respond(decision, trace, fetched))
        return responses

    def _respond(
        self, decision: Decision, trace: Trace, fetched: Fetched
    ) -> broker_pb2.LookupResponse:
        """The response of one item: ``fetched`` released as ``decision`` allows, masked."""
        record_type = decision.record_type
        response = broker_pb2.LookupResponse(
            withheld_fields=decision.withheld,
            masked_fields=sorted(decision.masks),
            department=decision.department,
            from_cache=trace.from_cache,
            decision_id=trace.decision_id,
            rule_id=decision.rule_id,
        )
        # Minimized in place in the response: one copy of the record, not two.
        release_into(response.record, fetched.record, record_type, decision)
        response.as_of.seconds, response.as_of.nanos = fetched.as_of_timestamp
        return response

    async def _fetch_source(
        self, decision: Decision, trace: Trace, timeout_s: float, known: RecordType
    ) -> Fetched:
        """One call to the department, with its metrics; the answer cut to the released
        fields (fields unknown to the contract dropped), so a cache entry never holds more
        than its key names. The source refuses a record over the record type's limits, or
        (a catalogue-declared type) one that does not match its schema."""
        record_type = decision.record_type
        source = self._router.source(record_type, decision.department)
        started = time.perf_counter()
        status = "OK"
        try:
            fetched = await source.fetch(
                record_type,
                trace.subject_id,
                decision.fields,
                trace.decision_id,
                timeout_s,
                known.limits,
                # Only for a declared type: sources written before declared types keep working.
                **({"schema": known.schema} if known.schema is not None else {}),
            )
        except errors.BrokerError as exc:
            status = exc.code.name
            self._metrics.adapter_errors.labels(decision.department, status).inc()
            raise
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            self._metrics.observe_adapter_call(record_type, status, time.perf_counter() - started)
        kept = records_pb2.Record()
        kept.CopyFrom(fetched.record)
        kept.DiscardUnknownFields()  # the source dropped them already; a cache entry never has any
        record_fields.keep_record(kept, decision.fields)
        return Fetched(kept, fetched.as_of)

    def count(self, record_type: str, policy: PolicySet, trace: Trace, status: str) -> None:
        """Count one finished item in ``certbroker_lookups``."""
        decision = trace.decision
        self._metrics.lookups.labels(
            label(record_type, policy.record_types),
            "" if decision is None else ("allow" if decision.allowed else "deny"),
            trace.department,
            status,
        ).inc()


def fetched_size(fetched: Fetched) -> int:
    """Estimated bytes a cached record takes in memory: its wire size, doubled for the
    in-memory message, plus a fixed overhead for the entry, key and timestamp."""
    return 2 * fetched.record.ByteSize() + 512


def label(name: str, known: Container[str]) -> str:
    """A metric label value: only catalogue names, so a caller cannot mint new time series."""
    return name if name in known else "invalid"


def release_into(
    out: records_pb2.Record, record: records_pb2.Record, record_type: str, decision: Decision
) -> None:
    """Defence in depth: whatever the department (or the cache) holds, release into ``out``
    (e.g. the response's own record field) only what the decision allows, masked, and no field
    the contract does not know. ``record`` is copied, never changed: it may be a cache entry
    shared by requests."""
    out.CopyFrom(record)
    out.DiscardUnknownFields()
    if record_fields.record_type_of(out) != record_type:  # never: sources check it; cheap
        raise errors.Internal("INTERNAL", "internal error")
    record_fields.keep_record(out, decision.fields)
    record_fields.mask_record(out, decision.masks)


def fill_receipt(target: broker_pb2.AuditReceipt, receipt: Receipt) -> None:
    """Copy an audit receipt into a reply's receipt message."""
    target.entry_id = receipt.entry_id
    target.entry_hash = receipt.entry_hash
    target.sequence = receipt.sequence


def event(
    request: broker_pb2.LookupRequest,
    policy: PolicySet,
    trace: Trace,
    result: tuple[str, str],
    latency_ms: float,
) -> AuditEvent:
    """The audit entry (kind "lookup") of one item; ``result`` is (outcome, status)."""
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
        consent_method=safe_consent(request.consent.method),
        record_type=request.record_type if known else "",
        decision="" if decision is None else ("allow" if decision.allowed else "deny"),
        rule_id=decision.rule_id if decision else "",
        withheld_fields=decision.withheld if decision else (),
        outcome=result[0],
        status=result[1],
        policy_version=policy.version,
        department=trace.department,
        latency_ms=round(latency_ms, 3),
        decision_id=trace.decision_id,
        bundle_id=trace.bundle_id,
        relation=trace.relation,
        from_cache=trace.from_cache,
        released_fields=trace.released.fields if trace.released else (),
        released_digest=trace.released.digest if trace.released else "",
    )


def release(trace: Trace, response: broker_pb2.LookupResponse) -> None:
    """Salt and digest the record ``response`` releases, for the entry and the evidence."""
    assert trace.decision is not None
    trace.released = document.release(response.record, trace.decision.fields)


def evidence_item(
    request: broker_pb2.LookupRequest,
    trace: Trace,
    response: broker_pb2.LookupResponse,
    receipt: Receipt,
) -> document.Item:
    """One released record of an evidence document, with its entry's receipt."""
    assert trace.released is not None, "release() the record before its entry is written"
    return document.Item(
        subject_id=trace.subject_id,
        relation=trace.relation,
        matter_code=request.matter_code,
        record_type=request.record_type,
        department=response.department,
        as_of=iso_time(response.as_of.ToDatetime(dt.UTC)),
        rule_id=response.rule_id,
        decision_id=response.decision_id,
        masked_fields=tuple(response.masked_fields),
        withheld_fields=tuple(response.withheld_fields),
        entry=receipt,
        released=trace.released,
    )
