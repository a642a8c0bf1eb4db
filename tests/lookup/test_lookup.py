"""The lookup path end to end: a real broker on port 0, real clerk tokens, real SQLite files."""

from __future__ import annotations

import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from certbroker import audit
from certbroker.adapters.demo import synthetic
from certbroker.cli import client
from certbroker.contract import fields as record_fields
from certbroker.contract import resident_id
from certbroker.errors import reason_of
from certbroker.v1 import broker_pb2
from tests.helpers import Env, allow_appends, refuse_appends, stored_rows

PROPERTY_TRANSFER, PENSION, ENROLMENT = "BDC-ZY-001", "SB-YL-001", "JY-RX-001"
CASE = "GZ20261121-000123"


def lookup(
    env: Env,
    token: str | None,
    record_type: str,
    subject: str,
    matter: str = PROPERTY_TRANSFER,
    **kw: Any,
) -> broker_pb2.LookupResponse:
    request = client.lookup_request(record_type, subject, matter, kw.pop("case", CASE), **kw)
    metadata = env.md(token) if token is not None else None
    return env.stub.Lookup(request, metadata=metadata, timeout=30)


def failure(call: Any) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = client.call_error(info.value)
    return info.value.code(), err.reason, err.metadata


def entries(env: Env) -> list[audit.AuditEntry]:
    return audit.query(env.state_dir / "audit.sqlite", audit.QueryFilter())


def test_property_transfer_records_for_a_married_couple(env: Env, couple: tuple[str, str]) -> None:
    a, b = couple
    token = env.token()
    marriage = lookup(env, token, "marriage", a)
    assert marriage.record.WhichOneof("record") == "marriage"
    m = marriage.record.marriage
    assert m.marital_status == "已婚"
    # The spouse's ID is masked to its last four digits by the window-clerk rules.
    assert m.spouse_resident_id.endswith(b[-4:])
    assert m.spouse_resident_id.startswith("*")
    assert "spouse_resident_id" in marriage.masked_fields
    assert "certificate_number" in marriage.withheld_fields  # not needed by the matter
    assert not m.HasField("certificate_number")
    assert marriage.department == "civil_affairs"
    assert marriage.from_cache is False
    assert marriage.as_of.seconds > 0

    household = lookup(env, token, "household", a)
    assert household.record.household.name
    assert household.record.household.HasField("registered_address")
    assert not household.record.household.HasField("household_number")  # withheld
    assert household.department == "public_security"

    prop = lookup(env, token, "property", a)
    holdings = prop.record.property.holdings
    assert holdings, "the sample couple jointly owns a home"
    joint = [h for h in holdings if h.ownership == "共同共有"]
    assert joint
    assert all(h.HasField("certificate_number") for h in joint)
    assert prop.department == "natural_resources"


def test_receipt_is_the_audit_entry(env: Env, couple: tuple[str, str]) -> None:
    response = lookup(env, env.token(sub="clerk-042"), "marriage", couple[0])
    receipt = response.receipt
    (entry,) = [e for e in entries(env) if e.entry_id == receipt.entry_id]
    assert entry.entry_hash == receipt.entry_hash
    assert entry.sequence == receipt.sequence
    ev = entry.event
    assert (ev.clerk, ev.office, ev.subject_id) == ("clerk-042", "gz-haizhu-24h-01", couple[0])
    assert (ev.matter_code, ev.case_number, ev.consent_method) == (
        PROPERTY_TRANSFER,
        CASE,
        "id_card_read",
    )
    assert (ev.decision, ev.rule_id, ev.outcome, ev.status) == (
        "allow",
        response.rule_id,
        "OK",
        "OK",
    )
    assert ev.department == "civil_affairs"
    assert "certificate_number" in ev.withheld_fields
    assert ev.decision_id == response.decision_id
    assert ev.policy_version
    assert ev.latency_ms >= 0
    # Never record contents: the spouse's name appears nowhere in the stored entry.
    (row,) = stored_rows(env.state_dir / "audit.sqlite", receipt.entry_id)
    assert response.record.marriage.spouse_name not in row.body
    assert audit.verify_chain(env.state_dir / "audit.sqlite").ok


def test_field_subset_and_fields_the_matter_does_not_need(
    env: Env, couple: tuple[str, str]
) -> None:
    response = lookup(
        env, env.token(), "marriage", couple[0], fields=["marital_status", "certificate_number"]
    )
    m = response.record.marriage
    assert m.HasField("marital_status")
    assert not m.HasField("spouse_name")  # not asked for
    assert not m.HasField("certificate_number")  # asked for, but the matter does not need it
    assert list(response.withheld_fields) == ["certificate_number"]


def test_pension_claim_social_security(env: Env, dataset_dir: Path) -> None:
    # 50: within the shipped quotas (60 distinct citizens an hour, 120 lookups a minute).
    subjects = synthetic.sample_citizens(dataset_dir, 50)
    token = env.token()
    found = 0
    for subject in subjects:
        try:
            response = lookup(env, token, "social_security", subject, matter=PENSION)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND  # not everyone is insured
            continue
        found += 1
        ss = response.record.social_security
        assert ss.social_security_number.startswith("*")  # last4 mask
        assert not ss.HasField("employer")  # the pension claim does not need it
        assert response.department == "human_resources_social_security"
    assert found > 0


@pytest.mark.parametrize(
    ("roles", "office", "record_type", "matter", "condition"),
    [
        # The matter does not need social security: out of its scope.
        (("window_clerk",), "gz-haizhu-24h-01", "social_security", PROPERTY_TRANSFER, ""),
        # A property clerk may not handle a pension claim: no rule, default deny.
        (("property_clerk",), "gz-tianhe-hall-01", "household", PENSION, ""),
        # An auditor looks at logs, not at citizens.
        (("auditor",), "gz-haizhu-24h-01", "household", ENROLMENT, ""),
        # Wrong hall for the rule.
        (("window_clerk",), "bj-xicheng-hall-01", "household", ENROLMENT, "OFFICE_NOT_ALLOWED"),
    ],
)
def test_policy_denials_are_permission_denied_and_audited(
    env: Env,
    couple: tuple[str, str],
    roles: tuple[str, ...],
    office: str,
    record_type: str,
    matter: str,
    condition: str,
) -> None:
    token = env.token(roles=roles, office=office)
    code, reason, meta = failure(lambda: lookup(env, token, record_type, couple[0], matter=matter))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert reason == "POLICY_DENIED"
    assert meta["rule"]
    if condition:
        assert meta["condition"] == condition
    (entry,) = [e for e in entries(env) if e.entry_id == meta["audit_entry_id"]]
    assert entry.event.decision == "deny"
    assert entry.event.rule_id == meta["rule"]
    assert entry.event.outcome == "POLICY_DENIED"
    assert entry.event.subject_id == couple[0]


def test_case_number_and_consent_conditions(env: Env, couple: tuple[str, str]) -> None:
    token = env.token()
    _, _, meta = failure(lambda: lookup(env, token, "household", couple[0], case=""))
    assert meta["condition"] == "CASE_NUMBER_REQUIRED"
    _, _, meta = failure(lambda: lookup(env, token, "household", couple[0], consent=""))
    assert meta["condition"] == "CONSENT_REQUIRED"


VALID = resident_id.make("440105", __import__("datetime").date(1980, 5, 17), 998)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"subject": VALID[:17] + ("0" if VALID[17] != "0" else "1")}, "BAD_SUBJECT_ID"),
        ({"subject": ""}, "MISSING_ARGUMENT"),
        ({"record_type": "pets"}, "UNKNOWN_RECORD_TYPE"),
        ({"matter": "NOPE-001"}, "UNKNOWN_MATTER"),
        ({"matter": ""}, "MISSING_ARGUMENT"),
        ({"fields": ["name", "shoe_size"]}, "UNKNOWN_FIELD"),
        ({"fields": [*record_fields.field_paths("household"), "name"]}, "DUPLICATE_FIELD"),
        ({"case": "GZ2026\n1121"}, "CONTROL_CHARACTERS"),
        ({"case": "9" * 65}, "ARGUMENT_TOO_LONG"),
        ({"consent_reference": "x" * 129}, "ARGUMENT_TOO_LONG"),
    ],
)
def test_bad_input_is_invalid_argument(env: Env, change: dict[str, Any], reason: str) -> None:
    args: dict[str, Any] = {
        "record_type": "household",
        "subject": VALID,
        "matter": PROPERTY_TRANSFER,
    }
    args.update(change)
    token = env.token()
    code, got, meta = failure(
        lambda: lookup(
            env, token, args.pop("record_type"), args.pop("subject"), args.pop("matter"), **args
        )
    )
    assert (code, got) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    (entry,) = entries(env)
    assert entry.entry_id == meta["audit_entry_id"]
    assert entry.event.outcome == reason
    assert entry.event.decision == ""
    assert "\n" not in entry.event.case_number
    assert audit.verify_chain(env.state_dir / "audit.sqlite").ok


def test_too_many_fields(env: Env) -> None:
    many = [*record_fields.field_paths("marriage"), "x1"]
    code, reason, _ = failure(lambda: lookup(env, env.token(), "marriage", VALID, fields=many))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_FIELDS")


def test_unknown_citizen_is_not_found(env: Env) -> None:
    code, reason, meta = failure(lambda: lookup(env, env.token(), "household", VALID))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "SUBJECT_NOT_FOUND")
    assert meta["department"] == "public_security"
    (entry,) = entries(env)
    assert (entry.event.decision, entry.event.outcome) == ("allow", "SUBJECT_NOT_FOUND")


def test_unauthenticated_lookups_are_refused_and_summarized(
    env: Env, couple: tuple[str, str]
) -> None:
    code, reason, _ = failure(lambda: lookup(env, None, "household", couple[0]))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING")
    expired = env.token(ttl_s=60, now=1_000_000_000.0)
    code, reason, _ = failure(lambda: lookup(env, expired, "household", couple[0]))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED")
    assert entries(env) == []  # no entry per refused call
    assert env.broker.broker is not None
    env.broker.call(env.broker.broker.refusals.flush())
    (summary,) = entries(env)  # one per peer per interval
    assert (summary.event.kind, summary.event.clerk) == ("unauthenticated", "")
    assert dict(summary.event.outcome_counts) == {"TOKEN_EXPIRED": 1, "TOKEN_MISSING": 1}
    assert couple[0] not in str(summary)  # nothing about the citizen before authentication


def test_no_audit_no_answer(env: Env, couple: tuple[str, str]) -> None:
    token = env.token()
    lookup(env, token, "household", couple[0])
    db = sqlite3.connect(env.state_dir / "audit.sqlite")
    refuse_appends(db)
    code, reason, _ = failure(lambda: lookup(env, token, "household", couple[0]))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "AUDIT_UNAVAILABLE")
    allow_appends(db)
    db.close()
    assert len(entries(env)) == 1  # nothing half-written
    lookup(env, token, "household", couple[0])  # and the broker recovers
    assert audit.verify_chain(env.state_dir / "audit.sqlite").ok


def test_unexpected_errors_are_generic_internal(env: Env, couple: tuple[str, str]) -> None:
    class Broken:
        async def fetch(self, *args: Any) -> Any:
            raise RuntimeError("adapter exploded with secret 42")

        async def aclose(self) -> None:
            return None

    assert env.broker.broker is not None
    env.broker.broker.router._sources["household"] = Broken()
    code, reason, metadata = failure(lambda: lookup(env, env.token(), "household", couple[0]))
    assert (code, reason) == (grpc.StatusCode.INTERNAL, "INTERNAL")
    assert metadata["audit_entry_id"] == entries(env)[-1].entry_id  # audited like any error
    with pytest.raises(grpc.RpcError) as info:
        lookup(env, env.token(), "household", couple[0])
    assert "secret" not in (info.value.details() or "")
    assert entries(env)[-1].event.outcome == "INTERNAL"


def test_list_matters_per_role(env: Env) -> None:
    reply = env.stub.ListMatters(broker_pb2.ListMattersRequest(), metadata=env.md(env.token()))
    codes = {m.code: m for m in reply.matters}
    # The 24-hour hall: the core matters, three hall matters (rules-hall.yaml) and the package's
    # member matters (packages.yaml).
    assert set(codes) == {
        PROPERTY_TRANSFER,
        PENSION,
        ENROLMENT,
        "SB-ZG-001",
        "BDC-CX-001",
        "MZ-GL-001",
        "SDQ-GH-001",
        "HJ-QY-001",
    }
    transfer = codes[PROPERTY_TRANSFER]
    assert transfer.name == "不动产转移登记"
    needs = {n.record_type: n for n in transfer.needs}
    assert set(needs) == {"household", "marriage", "property"}
    assert "spouse_resident_id" in needs["marriage"].masked_fields
    assert transfer.case_number_required
    assert reply.policy_version
    ss = env.stub.ListMatters(
        broker_pb2.ListMattersRequest(),
        metadata=env.md(env.token(roles=("social_security_clerk",), office="gz-yuexiu-hall-01")),
    )
    assert {m.code for m in ss.matters} == {
        PENSION,
        *("SB-ZY-001", "SB-CB-001", "SB-ZG-001", "SB-SY-001", "SB-SZ-001", "SB-LX-001"),
    }
    auditor = env.stub.ListMatters(
        broker_pb2.ListMattersRequest(), metadata=env.md(env.token(roles=("auditor",)))
    )
    assert list(auditor.matters) == []
    code, reason, _ = failure(lambda: env.stub.ListMatters(broker_pb2.ListMattersRequest()))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING")


def test_health_reflection_and_metrics(env: Env, couple: tuple[str, str]) -> None:
    health = health_pb2_grpc.HealthStub(env.channel)
    for service in ("", "certbroker.v1.CertificateBroker"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(env.channel)
    (answer,) = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for s in answer.list_services_response.service}
    assert {"certbroker.v1.CertificateBroker", "grpc.health.v1.Health"} <= names

    lookup(env, env.token(), "household", couple[0])
    assert env.broker.broker is not None
    url = f"http://127.0.0.1:{env.broker.broker.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert (
        'certbroker_lookups_total{decision="allow",department="public_security",'
        'record_type="household",status="OK"} 1.0'
    ) in text
    assert "certbroker_lookup_latency_seconds_bucket" in text
    assert "certbroker_audit_append_seconds_count 1.0" in text
    assert couple[0] not in text  # no subject IDs in labels


def test_rich_status_carries_error_info(env: Env) -> None:
    with pytest.raises(grpc.RpcError) as info:
        lookup(env, env.token(), "household", "123")
    from grpc_status import rpc_status

    status = rpc_status.from_call(info.value)
    assert status is not None
    assert reason_of(status) == "BAD_SUBJECT_ID"


def test_consent_names_follow_the_proto_enum() -> None:
    from certbroker.errors import InvalidArgument
    from certbroker.lookup.pipeline import consent_name, consent_value
    from certbroker.v1 import broker_pb2

    for value in broker_pb2.ConsentMethod.DESCRIPTOR.values:
        name = consent_name(value.number)
        if value.number == broker_pb2.CONSENT_METHOD_UNSPECIFIED:
            assert name == ""
        else:
            assert value.name == "CONSENT_METHOD_" + name.upper()
            assert consent_value(name) == value.number
    for unknown in (-1, 99):
        with pytest.raises(InvalidArgument) as exc:
            consent_name(unknown)  # type: ignore[arg-type]
        assert exc.value.reason == "UNKNOWN_CONSENT_METHOD"


def test_fetched_timestamps_equal_protobufs() -> None:
    import datetime as dt

    from google.protobuf import timestamp_pb2

    from certbroker.routing.router import Fetched
    from certbroker.v1 import records_pb2

    moments = [
        dt.datetime(2026, 11, 21, 9, 0, 0, 123456, tzinfo=dt.UTC),
        dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
        dt.datetime(2026, 5, 1, 8, 0, 0, 1, tzinfo=dt.timezone(dt.timedelta(hours=8))),
    ]
    for moment in moments:
        expected = timestamp_pb2.Timestamp()
        expected.FromDatetime(moment)
        fetched = Fetched(records_pb2.Record(), moment)
        assert fetched.as_of_timestamp == (expected.seconds, expected.nanos)
