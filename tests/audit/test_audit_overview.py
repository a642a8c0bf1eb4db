"""The Audit service's Overview (auditors, hall supervisors) and ReviewFinding on a real broker."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from certbroker.v1 import audit_pb2
from tests.audit.test_audit_service import (
    MONDAY_10,
    aenv,  # noqa: F401 - the fixture
    append,
    auditor,
    entries,
    event,
    reason,
    stamp,
    stub,
)
from tests.helpers import Env, FakeClock

HALL = "gz-tianhe-hall-01"
OTHER = "gz-yuexiu-hall-02"


def span() -> audit_pb2.TimeRange:
    return audit_pb2.TimeRange(
        since=stamp(MONDAY_10 - timedelta(hours=2)), until=stamp(MONDAY_10 + timedelta(hours=3))
    )


def seed(env: Env, clock: FakeClock) -> None:
    """Hour 1 at HALL: 2 answered, 1 denied, 1 failed (civil affairs); hour 2: 1 at OTHER."""
    append(env, event(office=HALL))
    append(env, event(office=HALL))
    append(env, event(office=HALL, decision="deny", outcome="POLICY_DENIED"))
    append(env, event(office=HALL, outcome="ADAPTER_UNAVAILABLE", status="UNAVAILABLE"))
    clock.advance(3600)
    append(env, event(office=OTHER, department="public_security", record_type="household"))


def test_overview_counts_lookups_per_hour_office_and_department(
    aenv: tuple[Env, FakeClock],  # noqa: F811
) -> None:
    env, clock = aenv
    seed(env, clock)
    reply = stub(env).Overview(audit_pb2.OverviewRequest(time=span()), metadata=auditor(env))
    rows = [
        (h.hour.ToDatetime().hour, h.office, h.department, h.allowed, h.denied, h.failed)
        for h in reply.hours
    ]
    assert rows == [
        (2, HALL, "civil_affairs", 2, 1, 1),
        (3, OTHER, "public_security", 1, 0, 0),
    ]
    assert reply.office == ""
    assert reply.policy_version
    assert {d.department: d.breaker_state for d in reply.departments}["civil_affairs"] == "closed"
    assert reply.open_anomalies == 0  # inside opening hours, with case numbers
    mine = stub(env).Overview(
        audit_pb2.OverviewRequest(time=span(), office=OTHER), metadata=auditor(env)
    )
    assert [(h.office, h.allowed) for h in mine.hours] == [(OTHER, 1)]
    overview_entry = entries(env)[-1].event
    assert (overview_entry.rule_id, overview_entry.outcome) == ("audit.overview", "OK")
    assert f"office={OTHER}" in overview_entry.decision_id


def test_hall_supervisor_sees_their_own_office_only(aenv: tuple[Env, FakeClock]) -> None:  # noqa: F811
    env, clock = aenv
    seed(env, clock)
    supervisor = env.md(env.token(roles=("hall_supervisor",), sub="sup-1", office=HALL))
    reply = stub(env).Overview(audit_pb2.OverviewRequest(time=span()), metadata=supervisor)
    assert reply.office == HALL
    assert {h.office for h in reply.hours} == {HALL}
    with pytest.raises(grpc.RpcError) as refused:
        stub(env).Overview(audit_pb2.OverviewRequest(office=OTHER), metadata=supervisor)
    assert reason(refused.value) == "OFFICE_NOT_ALLOWED"
    with pytest.raises(grpc.RpcError) as other_rpc:
        stub(env).Anomalies(audit_pb2.AnomaliesRequest(), metadata=supervisor)
    assert reason(other_rpc.value) == "ROLE_NOT_ALLOWED"
    with pytest.raises(grpc.RpcError) as clerk:
        stub(env).Overview(audit_pb2.OverviewRequest(), metadata=env.md(env.token()))
    assert reason(clerk.value) == "ROLE_NOT_ALLOWED"
    refusals = [e.event for e in entries(env) if e.event.rule_id == "audit.overview"]
    assert [e.outcome for e in refusals] == ["OK", "OFFICE_NOT_ALLOWED", "ROLE_NOT_ALLOWED"]


def test_a_reviewed_finding_shows_its_review_and_is_no_longer_open(
    aenv: tuple[Env, FakeClock],  # noqa: F811
) -> None:
    env, _clock = aenv
    append(env, event(case_number=""))  # NO_CASE_NUMBER
    md = auditor(env)
    (finding,) = stub(env).Anomalies(audit_pb2.AnomaliesRequest(), metadata=md).findings
    assert finding.rule == "NO_CASE_NUMBER"
    assert len(finding.finding_id) == 16
    assert not finding.HasField("review")
    assert (
        stub(env).Overview(audit_pb2.OverviewRequest(time=span()), metadata=md).open_anomalies == 1
    )
    note = "asked the clerk; case; number was <missing>"
    reply = stub(env).ReviewFinding(
        audit_pb2.ReviewFindingRequest(finding_id=finding.finding_id, rule=finding.rule, note=note),
        metadata=md,
    )
    review_entry = entries(env)[reply.receipt.sequence - 1]
    assert review_entry.event.rule_id == "audit.review_finding"
    assert review_entry.event.decision_id.endswith(f"note={note}")
    (again,) = stub(env).Anomalies(audit_pb2.AnomaliesRequest(), metadata=md).findings
    assert again.finding_id == finding.finding_id
    assert (again.review.reviewer, again.review.note) == ("aud-1", note)
    assert again.review.entry_id == reply.receipt.entry_id
    assert (
        stub(env).Overview(audit_pb2.OverviewRequest(time=span()), metadata=md).open_anomalies == 0
    )


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (audit_pb2.ReviewFindingRequest(rule="NO_CASE_NUMBER", note="n"), "MISSING_ARGUMENT"),
        (
            audit_pb2.ReviewFindingRequest(finding_id="xyz", rule="NO_CASE_NUMBER", note="n"),
            "BAD_FINDING_ID",
        ),
        (audit_pb2.ReviewFindingRequest(finding_id="0" * 16, rule="X", note="n"), "UNKNOWN_RULE"),
        (
            audit_pb2.ReviewFindingRequest(finding_id="0" * 16, rule="NO_CASE_NUMBER"),
            "MISSING_ARGUMENT",
        ),
        (
            audit_pb2.ReviewFindingRequest(
                finding_id="0" * 16, rule="NO_CASE_NUMBER", note="x" * 501
            ),
            "ARGUMENT_TOO_LONG",
        ),
    ],
)
def test_review_finding_checks_its_request(
    aenv: tuple[Env, FakeClock],  # noqa: F811
    request_: audit_pb2.ReviewFindingRequest,
    expected: str,
) -> None:
    env, _clock = aenv
    with pytest.raises(grpc.RpcError) as refused:
        stub(env).ReviewFinding(request_, metadata=auditor(env))
    assert reason(refused.value) == expected
    assert entries(env)[-1].event.outcome == expected
