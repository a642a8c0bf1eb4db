"""Each anomaly rule (certbroker.audit.anomalies) fires on a seeded log and stays quiet on a clean
one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from certbroker import config, policy
from certbroker.audit import anomalies
from certbroker.audit.anomalies import Thresholds
from certbroker.audit.events import AuditEntry, AuditEvent

# Monday 2026-03-02 10:00 at UTC+08:00.
MONDAY_10 = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def rules() -> policy.PolicySet:
    return policy.load(config.DEFAULT_POLICY_DIR)


class Log:
    """Builds entries with consecutive sequences and chosen times."""

    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []

    def add(self, at: datetime = MONDAY_10, **overrides: Any) -> int:
        fields: dict[str, Any] = {
            "kind": "lookup",
            "clerk": "c1",
            "office": "gz-tianhe-hall-01",
            "roles": ("window_clerk",),
            "subject_id": "S1",
            "matter_code": "BDC-ZY-001",
            "case_number": "GZ20260302-000001",
            "consent_method": "id_card_read",
            "record_type": "marriage",
            "decision": "allow",
            "rule_id": "r",
            "withheld_fields": (),
            "outcome": "OK",
            "status": "OK",
            "policy_version": "v",
            "department": "d",
            "latency_ms": 1.0,
            "decision_id": "x",
        }
        fields.update(overrides)
        seq = len(self.entries) + 1
        stamp = at.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        self.entries.append(AuditEntry(seq, f"e{seq}", stamp, AuditEvent(**fields), "", ""))
        return seq


def rules_fired(
    log: Log, rules: policy.PolicySet, **limits: Any
) -> dict[tuple[str, str], list[int]]:
    found = anomalies.find(log.entries, rules, Thresholds(**limits))
    return {(f.rule, f.clerk): list(f.sequences) for f in found}


def test_clean_log_has_no_findings(rules: policy.PolicySet) -> None:
    log = Log()
    for i in range(10):
        log.add(MONDAY_10 + timedelta(minutes=i), subject_id=f"S{i}", case_number=f"C{i}")
    log.add(MONDAY_10 + timedelta(hours=12), office="gz-haizhu-24h-01")  # 24-hour hall
    for i in range(4):  # denials, but fewer than the burst threshold
        log.add(MONDAY_10 + timedelta(minutes=i), decision="deny", clerk="c2")
    assert rules_fired(log, rules) == {}


def test_no_case_number(rules: policy.PolicySet) -> None:
    log = Log()
    log.add()
    seq = log.add(case_number="")
    assert rules_fired(log, rules) == {("NO_CASE_NUMBER", "c1"): [seq]}


def test_outside_hours_follows_the_rules_hours(rules: policy.PolicySet) -> None:
    log = Log()
    log.add(MONDAY_10 + timedelta(hours=7, minutes=29))  # 17:29 local
    late = log.add(MONDAY_10 + timedelta(hours=7, minutes=30))  # 17:30: closed
    sunday = log.add(MONDAY_10 - timedelta(days=1))
    log.add(MONDAY_10 + timedelta(hours=14), office="gz-haizhu-24h-01")
    unknown = log.add(MONDAY_10 + timedelta(hours=14), office="sz-futian-x-01")  # default hours
    assert rules_fired(log, rules) == {("OUTSIDE_HOURS", "c1"): [late, sunday, unknown]}
    assert anomalies.office_hours(rules, "gz-haizhu-24h-01", ()) == ()


def test_many_subjects(rules: policy.PolicySet) -> None:
    log = Log()
    seqs = [log.add(subject_id=f"S{i}") for i in range(3)]
    assert rules_fired(log, rules, many_subjects=4) == {}
    seqs.append(log.add(subject_id="S3"))
    assert rules_fired(log, rules, many_subjects=4) == {("MANY_SUBJECTS", "c1"): seqs}


def test_repeated_subject_across_unrelated_cases(rules: policy.PolicySet) -> None:
    log = Log()
    seqs = [log.add(case_number="A"), log.add(case_number="A"), log.add(case_number="B")]
    log.add(case_number="C", subject_id="S2")
    assert rules_fired(log, rules) == {}
    seqs.append(log.add(case_number="C"))
    assert rules_fired(log, rules) == {("REPEATED_SUBJECT", "c1"): seqs}


def test_denial_burst_within_the_window(rules: policy.PolicySet) -> None:
    log = Log()
    spread = [log.add(MONDAY_10 + timedelta(minutes=3 * i), decision="deny") for i in range(5)]
    assert rules_fired(log, rules) == {}  # 5 denials over 12 minutes
    burst = [log.add(MONDAY_10 + timedelta(hours=1, minutes=i), decision="deny") for i in range(5)]
    assert rules_fired(log, rules) == {("DENIAL_BURST", "c1"): burst}
    assert spread[0] not in burst


def test_the_denied_items_of_one_bundle_are_one_denied_call(rules: policy.PolicySet) -> None:
    log = Log()
    # One package call: a member matter the clerk may not handle, for three subjects and two
    # record types -- six denied items of one act at the counter.
    one_call = [
        log.add(MONDAY_10, decision="deny", bundle_id="b1", subject_id=f"S{i % 3}")
        for i in range(6)
    ]
    assert rules_fired(log, rules) == {}
    # Four more denied calls within the window make five: the finding names every entry.
    more = [log.add(MONDAY_10 + timedelta(minutes=i + 1), decision="deny") for i in range(4)]
    assert rules_fired(log, rules) == {("DENIAL_BURST", "c1"): one_call + more}


def test_quota_refusals_per_clerk(rules: policy.PolicySet) -> None:
    log = Log()
    log.add(decision="deny", rule_id="window-clerk-hall", outcome="POLICY_DENIED")
    refused = [
        log.add(decision="deny", rule_id=quota, outcome="QUOTA_EXCEEDED")
        for quota in ("clerk-lookups-per-minute", "clerk-citizens-per-hour")
    ]
    found = anomalies.find(log.entries, rules)
    assert [(f.rule, f.clerk, list(f.sequences)) for f in found] == [
        ("QUOTA_EXCEEDED", "c1", refused)
    ]
    assert found[0].description == (
        "2 lookup(s) refused past quota clerk-citizens-per-hour, clerk-lookups-per-minute"
    )
