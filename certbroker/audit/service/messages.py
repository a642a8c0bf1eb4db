"""Audit entries and filters as the ``certbroker.v1.Audit`` contract's messages.

Shared by the Audit servicer (:mod:`certbroker.audit.service.servicer`): converting stored entries
to
messages, reading a request's optional time range, deriving the fields a lookup released.
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from certbroker import errors
from certbroker.audit.archived import Unsearched
from certbroker.audit.events import AuditEntry
from certbroker.audit.scan import entry_time
from certbroker.policy import PolicySet
from certbroker.v1 import audit_pb2, broker_pb2


def _time(stamp: timestamp_pb2.Timestamp, name: str) -> datetime:
    try:
        if not 0 <= stamp.nanos < 10**9:
            raise ValueError("nanos out of range")
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise errors.InvalidArgument(
            "BAD_TIME_RANGE", f"time.{name} is not a valid timestamp", argument=f"time.{name}"
        ) from None


def time_range(
    summary: list[str], has: bool, span: audit_pb2.TimeRange
) -> tuple[datetime | None, datetime | None]:
    """(since, until) of an optional TimeRange, appended to ``summary`` as ``key=value``;
    since must come before until."""
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
            summary.append(f"{name}={moment.isoformat()}")
    return since, until


def timestamp(entry: AuditEntry) -> timestamp_pb2.Timestamp:
    """The entry's time as a protobuf Timestamp."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(entry_time(entry))
    return stamp


def unsearched_message(gap: Unsearched, target: broker_pb2.UnsearchedRange) -> None:
    """An archived range that was not searched, into ``target`` (no entry contents)."""
    target.first_sequence = gap.first_seq
    target.last_sequence = gap.last_seq
    target.reason = gap.reason
    target.description = gap.describe()


def entry_message(entry: AuditEntry) -> audit_pb2.AuditEntry:
    """An audit entry as the contract's message."""
    e = entry.event
    return audit_pb2.AuditEntry(
        sequence=entry.sequence,
        entry_id=entry.entry_id,
        time=timestamp(entry),
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
    """Fields a lookup released: those its entry records (an entry of a lookup that issued
    evidence names them exactly), else derived from the policy set in force: the matter's
    fields for the record type minus the entry's withheld fields; none unless the lookup was
    allowed and succeeded. See :mod:`certbroker.audit.service.servicer`."""
    e = entry.event
    if e.released_fields and e.outcome == "OK" and e.decision == "allow":
        return list(e.released_fields)
    matter = policy.matters.get(e.matter_code)
    record_type = policy.record_types.get(e.record_type)
    if e.outcome != "OK" or e.decision != "allow" or matter is None or record_type is None:
        return []
    needed = set(matter.needs.get(e.record_type, ()))
    withheld = set(e.withheld_fields)
    return [f for f in record_type.fields if f in needed and f not in withheld]
