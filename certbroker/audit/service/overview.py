"""What the Audit service's ``Overview`` and ``ReviewFinding`` compute (pure functions).

``Overview`` counts lookup entries per hour, office and department (the database counts,
:func:`certbroker.audit.lookups.count_by_hour`); ``ReviewFinding`` leaves a
review as its own audit entry (kind ``audit_query``, rule ``audit.review_finding``), whose
``decision_id`` is ``finding_id=<id>;rule=<rule>;note=<note>`` -- the note last, since it is
free text and may hold ``;``. ``Anomalies`` and ``Overview`` read those entries back to mark
findings reviewed: the log itself is the review store, so a review is as tamper-evident as the
entries it is about.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from certbroker.audit.anomalies import EPOCH, Finding
from certbroker.audit.events import AuditEntry
from certbroker.audit.lookups import HourKey
from certbroker.audit.scan import entry_time
from certbroker.v1 import audit_pb2

#: The ``rule_id`` of a review's entry.
REVIEW_RULE_ID = "audit.review_finding"
_NOTE = ";note="

#: (hour, office, department) -> [allowed, denied, failed]
OverviewCounts = dict[tuple[datetime, str, str], list[int]]


def finding_id(finding: Finding) -> str:
    """16 hex digits naming a finding by what it is about: stable across calls and ranges
    that see the same entries behind it."""
    text = f"{finding.rule}\n{finding.clerk}\n{','.join(map(str, finding.sequences))}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def review_summary(finding: str, rule: str, note: str) -> list[str]:
    """The review entry's ``decision_id`` parts (joined with ``;``); the note last."""
    return [f"finding_id={finding}", f"rule={rule}", f"note={note}"]


@dataclass(frozen=True)
class Review:
    """A review read back from its audit entry."""

    finding_id: str
    reviewer: str
    time: datetime
    note: str
    entry_id: str


def reviews(entries: Iterable[AuditEntry]) -> dict[str, Review]:
    """The latest successful review of each finding among ``entries`` (in sequence order)."""
    found: dict[str, Review] = {}
    for entry in entries:
        e = entry.event
        if e.rule_id != REVIEW_RULE_ID or e.outcome != "OK":
            continue
        head, sep, note = e.decision_id.partition(_NOTE)
        if not sep or not head.startswith("finding_id="):
            continue
        finding = head.split(";", 1)[0].removeprefix("finding_id=")
        found[finding] = Review(finding, e.clerk, entry_time(entry), note, entry.entry_id)
    return found


def finding_message(
    finding: Finding, reviewed: Mapping[str, Review], into: audit_pb2.Finding
) -> audit_pb2.Finding:
    """Fill ``into`` with ``finding``, its id and its review if there is one."""
    into.rule = finding.rule
    into.clerk = finding.clerk
    into.description = finding.description
    into.sequences.extend(finding.sequences)
    into.finding_id = finding_id(finding)
    review = reviewed.get(into.finding_id)
    if review is not None:
        into.review.reviewer = review.reviewer
        into.review.time.FromDatetime(review.time)
        into.review.note = review.note
        into.review.entry_id = review.entry_id
    return into


def hour_counts(counted: Mapping[HourKey, int]) -> OverviewCounts:
    """Lookups per (hour, office, department) as [allowed, denied, failed], from their counts
    per :data:`~certbroker.audit.lookups.HourKey`
    (:func:`~certbroker.audit.lookups.count_by_hour`)."""
    into: OverviewCounts = {}
    for (start, office, department, decision, outcome), count in counted.items():
        hour = EPOCH + timedelta(milliseconds=start)
        counts = into.setdefault((hour, office, department), [0, 0, 0])
        if decision == "deny":
            counts[1] += count
        elif decision == "allow" and outcome == "OK":
            counts[0] += count
        else:  # allowed but unanswered (a department down), or refused as invalid
            counts[2] += count
    return into


def add_hours(counts: OverviewCounts, reply: audit_pb2.OverviewResponse) -> None:
    """The counts as ``HourCount`` messages, by hour, office and department."""
    for (hour, office, department), (allowed, denied, failed) in sorted(counts.items()):
        item = reply.hours.add(
            office=office, department=department, allowed=allowed, denied=denied, failed=failed
        )
        item.hour.FromDatetime(hour)
