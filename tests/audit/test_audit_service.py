"""The certbroker.v1.Audit service on a real broker: role gate, self-audit, Query, reports.

The proof and export RPCs are in test_audit_service_proofs.py."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from certbroker import audit
from certbroker.adapters.demo import synthetic
from certbroker.audit.events import AuditEvent
from certbroker.cli import client
from certbroker.v1 import audit_pb2, audit_pb2_grpc
from tests.helpers import Env, FakeClock, make_config, running_env

CASE = "GZ20260302-000001"
# Monday 2026-03-02 10:00 at UTC+08:00: inside the staffed halls' hours.
MONDAY_10 = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)


@pytest.fixture
def aenv(tmp_path: Path, dataset_dir: Path) -> Iterator[tuple[Env, FakeClock]]:
    """A broker whose audit entries carry the times of a clock the test moves."""
    clock = FakeClock(MONDAY_10.timestamp())
    cfg = make_config(tmp_path, dataset_dir)
    with running_env(cfg, dataset_dir, audit_clock=clock) as env:
        yield env, clock


def stub(env: Env) -> audit_pb2_grpc.AuditStub:
    return audit_pb2_grpc.AuditStub(env.channel)


def auditor(env: Env) -> Any:
    return env.md(env.token(roles=("auditor",), sub="aud-1", office="audit-office"))


def event(**overrides: Any) -> AuditEvent:
    fields: dict[str, Any] = {
        "kind": "lookup",
        "clerk": "clerk-001",
        "office": "gz-tianhe-hall-01",
        "roles": ("window_clerk",),
        "subject_id": "110101199003077774",
        "matter_code": "BDC-ZY-001",
        "case_number": CASE,
        "consent_method": "id_card_read",
        "record_type": "marriage",
        "decision": "allow",
        "rule_id": "window-clerk-hall",
        "withheld_fields": ("certificate_number",),
        "outcome": "OK",
        "status": "OK",
        "policy_version": "v",
        "department": "civil_affairs",
        "latency_ms": 1.0,
        "decision_id": "d",
    }
    fields.update(overrides)
    return AuditEvent(**fields)


def append(env: Env, ev: AuditEvent) -> int:
    assert env.broker.broker is not None
    receipt: audit.Receipt = env.broker.call(env.broker.broker.audit.append(ev))
    return receipt.sequence


def entries(env: Env) -> list[audit.AuditEntry]:
    return audit.query(env.state_dir / "audit.sqlite", audit.QueryFilter(limit=100_000))


def reason(exc: grpc.RpcError) -> str:
    return client.call_error(exc).reason


def stamp(moment: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(moment)
    return out


def query(env: Env, **kw: Any) -> list[audit_pb2.AuditEntry]:
    return list(stub(env).Query(audit_pb2.QueryRequest(**kw), metadata=auditor(env), timeout=30))


CALLS: list[tuple[str, Any]] = [
    ("query", lambda s, md: list(s.Query(audit_pb2.QueryRequest(), metadata=md, timeout=30))),
    (
        "citizen_report",
        lambda s, md: s.CitizenReport(
            audit_pb2.CitizenReportRequest(subject_id="110101199003077774"), metadata=md
        ),
    ),
    ("anomalies", lambda s, md: s.Anomalies(audit_pb2.AnomaliesRequest(), metadata=md)),
    (
        "get_checkpoint",
        lambda s, md: s.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=md),
    ),
    (
        "get_inclusion_proof",
        lambda s, md: s.GetInclusionProof(audit_pb2.InclusionProofRequest(), metadata=md),
    ),
    (
        "get_consistency_proof",
        lambda s, md: s.GetConsistencyProof(audit_pb2.ConsistencyProofRequest(), metadata=md),
    ),
    ("export", lambda s, md: list(s.Export(audit_pb2.ExportRequest(), metadata=md))),
]


def test_non_auditor_is_refused_on_every_rpc_and_audited(env: Env) -> None:
    clerk = env.md(env.token())
    for rpc, call in CALLS:
        with pytest.raises(grpc.RpcError) as info:
            call(stub(env), clerk)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, rpc
        assert reason(info.value) == "ROLE_NOT_ALLOWED"
        last = entries(env)[-1]
        assert last.event.kind == "audit_query"
        assert last.event.rule_id == f"audit.{rpc}"
        assert (last.event.clerk, last.event.decision) == ("clerk-001", "deny")
        assert last.event.outcome == "ROLE_NOT_ALLOWED"


def test_unauthenticated_call_is_counted_in_the_peer_summary(env: Env) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub(env).Anomalies(audit_pb2.AnomaliesRequest(), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert entries(env) == []  # nobody to name: no entry of its own
    assert env.broker.broker is not None
    env.broker.call(env.broker.broker.refusals.flush())
    (summary,) = entries(env)
    assert (summary.event.kind, summary.event.clerk, summary.event.decision) == (
        "unauthenticated",
        "",
        "",
    )
    assert dict(summary.event.outcome_counts) == {"TOKEN_MISSING": 1}


def test_auditor_calls_are_audited_with_the_filter(env: Env) -> None:
    assert query(env, clerk="clerk-9", decision="deny", subject_id="110101199003077774") == []
    last = entries(env)[-1]
    assert (last.event.kind, last.event.rule_id, last.event.decision) == (
        "audit_query",
        "audit.query",
        "allow",
    )
    assert last.event.clerk == "aud-1"
    assert last.event.subject_id == "110101199003077774"
    assert "clerk=clerk-9" in last.event.decision_id.split(";")
    assert "decision=deny" in last.event.decision_id.split(";")


def test_query_filters_each_criterion(aenv: tuple[Env, FakeClock]) -> None:
    env, clock = aenv
    base = append(env, event())
    variants = {
        "clerk": ("clerk-002", {"clerk": "clerk-002"}),
        "office": ("gz-yuexiu-hall-02", {"office": "gz-yuexiu-hall-02"}),
        "subject_id": ("11010519491231002X", {"subject_id": "11010519491231002X"}),
        "matter_code": ("SB-YL-001", {"matter_code": "SB-YL-001"}),
        "case_number": ("GZ20260302-000999", {"case_number": "GZ20260302-000999"}),
        "record_type": ("household", {"record_type": "household"}),
        "decision": ("deny", {"decision": "deny"}),
    }
    seqs = {name: append(env, event(**fields)) for name, (_, fields) in variants.items()}
    for name, (value, _) in variants.items():
        got = [e.sequence for e in query(env, **{name: value})]
        assert got == [seqs[name]], name
    got = [e.sequence for e in query(env, clerk="clerk-001", office="gz-tianhe-hall-01")]
    others = [seqs[n] for n in ("subject_id", "matter_code", "case_number", "record_type")]
    assert got == [base, *others, seqs["decision"]]
    clock.advance(3600)
    later = append(env, event(clerk="clerk-late"))
    since = MONDAY_10 + timedelta(minutes=30)
    window = audit_pb2.TimeRange(since=stamp(since))
    assert [e.sequence for e in query(env, clerk="clerk-late", time=window)] == [later]
    before = audit_pb2.TimeRange(until=stamp(since))
    assert query(env, clerk="clerk-late", time=before) == []


def test_query_pages_without_gaps_or_duplicates(env: Env) -> None:
    wanted = [append(env, event(clerk="pager")) for _ in range(7)]
    append(env, event(clerk="someone-else"))
    seen: list[int] = []
    token = ""
    pages = 0
    while True:
        page = query(env, clerk="pager", page_size=3, page_token=token)
        pages += 1
        seen += [e.sequence for e in page]
        token = page[-1].next_page_token if page else ""
        assert all(not e.next_page_token for e in page[:-1])
        if not token:
            break
    assert seen == wanted
    assert pages == 3


def test_citizen_report_lists_exactly_that_citizens_accesses(env: Env, dataset_dir: Path) -> None:
    a, b = synthetic.sample_couple(dataset_dir)
    token = env.md(env.token())
    for record_type, subject in (("marriage", a), ("household", a), ("marriage", b)):
        request = client.lookup_request(record_type, subject, "BDC-ZY-001", CASE)
        env.stub.Lookup(request, metadata=token, timeout=30)
    denied = client.lookup_request("social_security", a, "BDC-ZY-001", CASE)
    with pytest.raises(grpc.RpcError):
        env.stub.Lookup(denied, metadata=token, timeout=30)
    report = stub(env).CitizenReport(
        audit_pb2.CitizenReportRequest(subject_id=a), metadata=auditor(env), timeout=30
    )
    assert report.subject_id == a
    kinds = [(x.record_type, x.decision) for x in report.accesses]
    assert kinds == [("marriage", "allow"), ("household", "allow"), ("social_security", "deny")]
    marriage, household, refused = report.accesses
    assert marriage.matter_name == "不动产转移登记"
    assert (marriage.clerk, marriage.office, marriage.case_number) == (
        "clerk-001",
        "gz-haizhu-24h-01",
        CASE,
    )
    assert list(marriage.fields) == [
        "marital_status",
        "spouse_name",
        "spouse_resident_id",
        "registered_on",
        "registration_office",
    ]
    assert list(household.fields) == ["name", "gender", "birth_date", "registered_address"]
    assert list(refused.fields) == []
    assert refused.outcome != "OK"
    assert all(x.entry_id for x in report.accesses)


def test_anomalies_on_a_seeded_log(aenv: tuple[Env, FakeClock]) -> None:
    env, clock = aenv
    clean = append(env, event())
    nameless = append(env, event(clerk="lazy", case_number=""))
    clock.advance(12 * 3600)  # 22:00 local: the staffed hall is closed
    night = append(env, event(clerk="owl"))
    night_24h = append(env, event(clerk="owl-24h", office="gz-haizhu-24h-01"))
    reply = stub(env).Anomalies(audit_pb2.AnomaliesRequest(), metadata=auditor(env), timeout=30)
    found = {(f.rule, f.clerk): list(f.sequences) for f in reply.findings}
    assert found == {("NO_CASE_NUMBER", "lazy"): [nameless], ("OUTSIDE_HOURS", "owl"): [night]}
    assert clean not in [s for seqs in found.values() for s in seqs]
    assert night_24h not in [s for seqs in found.values() for s in seqs]
    window = audit_pb2.TimeRange(until=stamp(MONDAY_10 + timedelta(hours=1)))
    early = stub(env).Anomalies(
        audit_pb2.AnomaliesRequest(time=window), metadata=auditor(env), timeout=30
    )
    assert [(f.rule, f.clerk) for f in early.findings] == [("NO_CASE_NUMBER", "lazy")]


BAD: list[tuple[str, Any]] = [
    ("BAD_PAGE_SIZE", audit_pb2.QueryRequest(page_size=1001)),
    ("BAD_PAGE_SIZE", audit_pb2.QueryRequest(page_size=-1)),
    ("BAD_PAGE_TOKEN", audit_pb2.QueryRequest(page_token="abc")),
    ("BAD_PAGE_TOKEN", audit_pb2.QueryRequest(page_token="-5")),
    ("CONTROL_CHARACTERS", audit_pb2.QueryRequest(clerk="x\x1b[31m")),
    ("BAD_DECISION", audit_pb2.QueryRequest(decision="maybe")),
    (
        "BAD_TIME_RANGE",
        audit_pb2.QueryRequest(
            time=audit_pb2.TimeRange(since=stamp(MONDAY_10), until=stamp(MONDAY_10))
        ),
    ),
]


@pytest.mark.parametrize(("expected", "request_"), BAD)
def test_bad_query_inputs_are_invalid_argument(env: Env, expected: str, request_: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub(env).Query(request_, metadata=auditor(env), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(info.value) == expected
    assert entries(env)[-1].event.outcome == expected


def test_bad_citizen_report_and_anomalies_inputs(env: Env) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub(env).CitizenReport(
            audit_pb2.CitizenReportRequest(subject_id="110101199003077778"), metadata=auditor(env)
        )
    assert reason(info.value) == "BAD_SUBJECT_ID"
    backwards = audit_pb2.TimeRange(since=stamp(MONDAY_10), until=stamp(MONDAY_10 - timedelta(1)))
    with pytest.raises(grpc.RpcError) as info:
        stub(env).Anomalies(audit_pb2.AnomaliesRequest(time=backwards), metadata=auditor(env))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(info.value) == "BAD_TIME_RANGE"
