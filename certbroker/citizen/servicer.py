"""The ``certbroker.v1.Citizen`` servicer: a citizen's own accesses, and their disputes.

Callers are citizens (:class:`certbroker.auth.citizens.CitizenAuthenticator`): the resident ID
comes from their verified token, never from the request, so nobody can ask about anyone else.
Every call of a known citizen is an audit entry before its answer (no audit, no answer)::

    kind             "citizen"
    rule_id          "citizen.my_accesses" | "citizen.dispute"
    clerk            the citizen's token sub (the app account); roles ("citizen",)
    subject_id       the citizen's resident ID
    decision_id      canonical JSON: {"action", and for a dispute "entry_id", "seq", "clerk"
                     (the disputed access's clerk), "text", "frozen"}
    decision         "allow" | "" (invalid, not found)
    outcome, status  "OK" or the error reason and gRPC code name

An access (:func:`certbroker.audit.outbox.is_access`: a lookup of the citizen that policy
allowed or denied) is shown with the office, the clerk's number only when the policy's
``citizen.show_clerk`` is "number", the matter, case number, record type and the names of the
fields released. Entries never hold another person's identity on a citizen's entry (a bundle's
items are one entry per subject), so a co-owner sees that their records were read for a case,
not the seller's. An access under a covert matter is hidden until its disclosure delay has
passed (auditors always see it). A dispute of an entry that is not a visible access to the
caller's records is NOT_FOUND ``ENTRY_NOT_FOUND``, whether or not it exists.

Accesses (and disputes) that were archived (:mod:`certbroker.audit.archive`) are read from the
archive files (:mod:`certbroker.audit.archived`), before the live ones, and can be disputed
like live ones. Archived ranges that cannot be read -- encrypted to the auditor's key, or the
file missing or changed (never used then) -- are named in the answer's ``unsearched``; the
page holds the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from certbroker import errors, validation
from certbroker.audit import archived
from certbroker.audit.events import AuditEntry, AuditEvent, AuditLog, iso_time, parse_entry
from certbroker.audit.guard import AuditedCall, Result, invocation_metadata
from certbroker.audit.outbox import is_access
from certbroker.audit.refusals import RefusalLedger
from certbroker.audit.scan import Criteria
from certbroker.audit.service.messages import released_fields, timestamp, unsearched_message
from certbroker.audit.store.db import backend_for
from certbroker.audit.store.rows import select_rows
from certbroker.auth.citizens import CITIZEN_ROLE, Citizen, CitizenAuthenticator
from certbroker.auth.controls import Control, Controls
from certbroker.citizen.notices import record_label, visible_at
from certbroker.config import AuditLocation
from certbroker.lookup.pipeline import fill_receipt
from certbroker.policy import PolicySource
from certbroker.policy.model import PolicySet
from certbroker.v1 import citizen_pb2, citizen_pb2_grpc

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_DISPUTE_CHARS", "MAX_PAGE_SIZE", "CitizenService"]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_DISPUTE_CHARS = 500
_ENTRY_ID = re.compile(r"[0-9a-f]{32}")
_Context = grpc.aio.ServicerContext[Any, Any]


@dataclass
class _Call:
    """What the audit entry says about one Citizen call, filled in as it proceeds."""

    rpc: str
    citizen: Citizen | None = None
    details: dict[str, object] = field(default_factory=dict)


class CitizenService(citizen_pb2_grpc.CitizenServicer):
    """Serves citizens their own accesses (module docstring)."""

    def __init__(
        self,
        auth: CitizenAuthenticator | None,
        policies: PolicySource,
        log: AuditLog,
        db: AuditLocation,
        controls: Controls,
        *,
        refusals: RefusalLedger | None = None,
        clock: Callable[[], float] = time.time,
        archive_dir: Path | None = None,
    ) -> None:
        self._auth = auth
        self._policies = policies
        self._log = log
        self._db = db
        self._controls = controls
        self._refusals = refusals
        self._clock = clock
        self._archive_dir = archive_dir

    async def MyAccesses(
        self, request: citizen_pb2.MyAccessesRequest, context: _Context
    ) -> citizen_pb2.MyAccessesResponse:
        call = _Call("my_accesses")
        async with self._audited(call, context) as audited:
            assert call.citizen is not None
            since = _time(request.since) if request.HasField("since") else None
            until = _time(request.until) if request.HasField("until") else None
            if since is not None and until is not None and until <= since:
                raise errors.InvalidArgument(
                    "BAD_TIME_RANGE", "until must be after since", argument="until"
                )
            size = request.page_size or DEFAULT_PAGE_SIZE
            if not 1 <= size <= MAX_PAGE_SIZE:
                raise errors.InvalidArgument(
                    "BAD_PAGE_SIZE", f"page_size must be 1..{MAX_PAGE_SIZE}", argument="page_size"
                )
            after = _page_token(request.page_token)
            criteria = Criteria(
                subject_id=call.citizen.resident_id,
                kinds=("lookup",),
                since=since,
                until=until,
                after=after,
            )
            page, more, gaps = await asyncio.to_thread(self._accesses, criteria, size)
            disputed = await asyncio.to_thread(self._disputed, call.citizen.resident_id)
            call.details["returned"] = len(page)
        policy = self._policies.current
        reply = citizen_pb2.MyAccessesResponse()
        for entry in page:
            _fill(reply.accesses.add(), policy, entry, entry.entry_id in disputed)
        if more and page:
            reply.next_page_token = str(page[-1].sequence)
        for gap in gaps:
            unsearched_message(gap, reply.unsearched.add())
        fill_receipt(reply.receipt, audited.receipt)
        return reply

    async def Dispute(
        self, request: citizen_pb2.DisputeRequest, context: _Context
    ) -> citizen_pb2.DisputeResponse:
        call = _Call("dispute")
        async with self._audited(call, context) as audited:
            citizen = call.citizen
            assert citizen is not None
            entry_id = validation.text("entry_id", request.entry_id, required=True, limit=32)
            call.details["entry_id"] = entry_id
            text = validation.text("text", request.text, required=False, limit=MAX_DISPUTE_CHARS)
            call.details["text"] = text
            entry = None
            if _ENTRY_ID.fullmatch(entry_id):
                entry = await asyncio.to_thread(self._entry, entry_id, citizen.resident_id)
            if entry is None:
                # Not "not yours": whether it exists is not the caller's business.
                raise errors.NotFound("ENTRY_NOT_FOUND", "no access to your records has this id")
            call.details |= {"seq": entry.sequence, "clerk": entry.event.clerk}
            frozen = False
            if self._policies.current.citizen.freeze_on_dispute:
                frozen = await self._freeze(audited, citizen, entry)
            call.details["frozen"] = frozen
        reply = citizen_pb2.DisputeResponse(frozen=frozen)
        fill_receipt(reply.receipt, audited.receipt)
        return reply

    # -- the machinery ----------------------------------------------------------------------

    def _visible(self, policy: PolicySet, entry: AuditEntry, now: str) -> bool:
        return (
            is_access(vars(entry.event))
            and visible_at(policy, entry.event.matter_code, entry.time) <= now
        )

    def _accesses(
        self, criteria: Criteria, size: int
    ) -> tuple[list[AuditEntry], bool, list[archived.Unsearched]]:
        """One page of visible accesses, whether more follow (covert ones are skipped, so the
        scan goes on until the page is full) and the archived ranges it could not search."""
        policy = self._policies.current
        now = iso_time(datetime.fromtimestamp(self._clock(), UTC))
        page: list[AuditEntry] = []
        gaps: dict[int, archived.Unsearched] = {}
        while True:
            found = self._scan(criteria, size + 1)
            gaps |= {gap.first_seq: gap for gap in found.unsearched}
            chunk = found.entries
            for entry in chunk:
                if self._visible(policy, entry, now):
                    if len(page) == size:
                        return page, True, list(gaps.values())
                    page.append(entry)
            if len(chunk) <= size:
                return page, False, list(gaps.values())
            criteria = replace(criteria, after=chunk[-1].sequence)

    def _scan(self, criteria: Criteria, limit: int | None) -> archived.Found:
        """The archived then live entries ``criteria`` selects, at most ``limit``."""
        try:
            return archived.scan_with_archives(self._db, self._archive_dir, criteria, limit=limit)
        except FileNotFoundError:  # no log yet: no accesses
            return archived.Found()

    def _disputed(self, subject_id: str) -> set[str]:
        criteria = Criteria(subject_id=subject_id, kinds=("citizen",))
        found = set()
        for entry in self._scan(criteria, None).entries:
            if entry.event.rule_id == "citizen.dispute" and entry.event.outcome == "OK":
                found.add(str(json.loads(entry.event.decision_id).get("entry_id", "")))
        return found

    def _entry(self, entry_id: str, subject_id: str) -> AuditEntry | None:
        """The visible access ``entry_id`` to ``subject_id``'s records, else None."""
        backend = backend_for(self._db)
        if not backend.exists():
            return None
        with closing(backend.connect_read()) as conn:
            rows = select_rows(
                conn,
                equals={"entry_id": entry_id, "subject_id": subject_id},
                since=None,
                until=None,
                limit=1,
            )
        entry: AuditEntry | None
        if rows:
            row = rows[0]
            entry = parse_entry(row.seq, row.body, row.prev_hash, row.entry_hash)
        elif self._archive_dir is not None:  # an archived access (MyAccesses lists them too)
            criteria = Criteria(subject_id=subject_id, kinds=("lookup",))
            found = archived.search(self._db, self._archive_dir, criteria)
            entry = next((e for e in found.entries if e.entry_id == entry_id), None)
            if entry is None:
                return None
        else:
            return None
        now = iso_time(datetime.fromtimestamp(self._clock(), UTC))
        return entry if self._visible(self._policies.current, entry, now) else None

    async def _freeze(self, audited: AuditedCall, citizen: Citizen, entry: AuditEntry) -> bool:
        """Freeze the citizen's records (the Admin service's subject freeze) until an officer
        unfreezes them; a freeze already in force stays as it is."""
        subject = citizen.resident_id
        if self._controls.find("subject", subject) is not None:
            return True
        control = Control(
            kind="subject",
            target=subject,
            reason=f"citizen disputes audit entry {entry.entry_id}",
            ticket=f"DISPUTE-{entry.entry_id}",
            officer=f"citizen:{citizen.sub}",
            created=self._clock(),
        )
        await asyncio.to_thread(self._controls.put, control)

        async def undo() -> None:  # the dispute is not in the log: the freeze must not stay
            await asyncio.to_thread(self._controls.remove, "subject", subject)

        audited.undo_unless_audited(undo)
        return True

    @contextlib.asynccontextmanager
    async def _audited(self, call: _Call, context: _Context) -> Any:
        async with AuditedCall(
            self._log,
            lambda result: self._event(call, result),
            refusals=self._refusals,
            context=context,
        ) as audited:
            if self._auth is None:
                raise errors.UnknownCaller(
                    "TOKEN_UNKNOWN_ISSUER", "no citizen issuer is configured on this broker"
                )
            call.citizen = self._auth.authenticate(invocation_metadata(context))
            yield audited

    def _event(self, call: _Call, result: Result) -> AuditEvent:
        citizen = call.citizen
        return AuditEvent(
            kind="citizen",
            clerk=citizen.sub if citizen else "",
            office="",
            roles=(CITIZEN_ROLE,),
            subject_id=citizen.resident_id if citizen else "",
            matter_code="",
            case_number="",
            consent_method="",
            record_type="",
            decision="allow" if result.failure is None else "",
            rule_id=f"citizen.{call.rpc}",
            withheld_fields=(),
            outcome=result.outcome,
            status=result.status,
            policy_version=self._policies.current.version,
            department="",
            latency_ms=result.latency_ms,
            decision_id=json.dumps(
                {"action": call.rpc, **call.details}, sort_keys=True, ensure_ascii=False
            ),
        )


def _page_token(token: str) -> int:
    if not token:
        return 0
    if not token.isascii() or not token.isdigit() or len(token) > 19:
        raise errors.InvalidArgument(
            "BAD_PAGE_TOKEN", "page_token is not one this service gave", argument="page_token"
        )
    return int(token)


def _time(stamp: Any) -> datetime:
    return datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, UTC)


def _fill(target: citizen_pb2.Access, policy: PolicySet, entry: AuditEntry, disputed: bool) -> None:
    """One access as the citizen may see it: the other people of a case never appear (an
    entry names one subject), the clerk only when the policy shows clerk numbers."""
    e = entry.event
    matter = policy.matters.get(e.matter_code)
    target.entry_id = entry.entry_id
    target.time.CopyFrom(timestamp(entry))
    target.office = e.office
    target.clerk = e.clerk if policy.citizen.show_clerk == "number" else ""
    target.matter_code = e.matter_code
    target.matter_name = matter.name if matter else ""
    target.case_number = e.case_number
    target.record_type = e.record_type
    target.record_label = record_label(policy, e.record_type)
    target.fields.extend(released_field_names(policy, entry))
    target.decision = e.decision
    target.disputed = disputed


def released_field_names(policy: PolicySet, entry: AuditEntry) -> list[str]:
    """The names of the fields a lookup released, exactly as the auditors' citizen report
    gives them (:func:`certbroker.audit.service.messages.released_fields`): recorded in the
    entry when the lookup issued evidence, else derived from the policy in force."""
    return released_fields(policy, entry)
