"""The certbroker.v1.Admin service on a real broker: each control refuses the very next call
with its exact reason, lifting it restores access, every admin call and every refusal is an
audit entry, and the controls survive a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import timestamp_pb2

from certbroker import audit
from certbroker.adapters.demo import synthetic
from certbroker.cli import client
from certbroker.v1 import admin_pb2, admin_pb2_grpc, audit_pb2, audit_pb2_grpc
from tests.helpers import Env, make_config, running_env

MATTER = "BDC-ZY-001"
CASE = "GZ20260302-000001"
WHY = admin_pb2.Justification(reason="clerk looked up a neighbour", ticket="SEC-2026-0042")


def admin(env: Env) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(env.channel)


def officer(env: Env) -> Any:
    return env.md(env.token(roles=("security_officer",), sub="sec-1", office="security-office"))


def lookup(env: Env, token: str, subject: str, record_type: str = "marriage") -> Any:
    request = client.lookup_request(record_type, subject, MATTER, CASE)
    return env.stub.Lookup(request, metadata=env.md(token), timeout=30)


def refused(env: Env, token: str, subject: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        lookup(env, token, subject)
    return info.value.code(), client.call_error(info.value).reason


def entries(env: Env) -> list[audit.AuditEntry]:
    return audit.query(env.state_dir / "audit.sqlite", audit.QueryFilter(limit=100_000))


def stamp(seconds: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromSeconds(int(seconds))
    return out


@pytest.fixture
def subject(dataset_dir: Path) -> str:
    return synthetic.sample_couple(dataset_dir)[0]


def test_disable_clerk_refuses_the_next_lookup_and_enable_restores(env: Env, subject: str) -> None:
    token = env.token()
    lookup(env, token, subject)
    reply = admin(env).DisableClerk(
        admin_pb2.DisableClerkRequest(sub="clerk-001", why=WHY), metadata=officer(env)
    )
    assert reply.control.kind == "clerk"
    assert reply.control.officer == "sec-1"
    assert reply.receipt.entry_id
    assert refused(env, token, subject) == (grpc.StatusCode.PERMISSION_DENIED, "CLERK_DISABLED")
    # The refusal is audited under the clerk; the admin call under the officer.
    last = entries(env)[-1].event
    assert (last.kind, last.clerk, last.outcome) == ("lookup", "clerk-001", "CLERK_DISABLED")
    admin_entry = next(e.event for e in entries(env) if e.event.kind == "admin")
    assert admin_entry.clerk == "sec-1"
    assert admin_entry.case_number == "SEC-2026-0042"
    details = json.loads(admin_entry.decision_id)
    assert details["reason"] == WHY.reason
    assert details["target"] == "clerk-001"
    assert admin_entry.rule_id == "admin.disable_clerk"
    assert admin_entry.outcome == "OK"
    back = admin(env).EnableClerk(
        admin_pb2.EnableClerkRequest(sub="clerk-001", why=WHY), metadata=officer(env)
    )
    assert back.changed
    lookup(env, token, subject)


def test_disable_until_in_the_past_is_not_in_force(env: Env, subject: str) -> None:
    admin(env).DisableClerk(
        admin_pb2.DisableClerkRequest(sub="clerk-001", until=stamp(time.time() - 60), why=WHY),
        metadata=officer(env),
    )
    lookup(env, env.token(), subject)
    listing = admin(env).ListControls(admin_pb2.ListControlsRequest(), metadata=officer(env))
    assert list(listing.controls) == []


def test_revoke_token_by_jti_and_before_time(env: Env, subject: str) -> None:
    old = env.token(now=time.time() - 120)
    other = env.token()
    claims = jwt.decode(other, options={"verify_signature": False})
    admin(env).RevokeToken(
        admin_pb2.RevokeTokenRequest(jti=claims["jti"], why=WHY), metadata=officer(env)
    )
    assert refused(env, other, subject) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
    lookup(env, old, subject)  # another token of the same clerk still works
    last = entries(env)[-2].event  # the refusal has its own entry, under the clerk
    assert (last.clerk, last.outcome) == ("clerk-001", "TOKEN_REVOKED")
    admin(env).RevokeTokensBefore(
        admin_pb2.RevokeTokensBeforeRequest(
            sub="clerk-001", before=stamp(time.time() - 60), why=WHY
        ),
        metadata=officer(env),
    )
    assert refused(env, old, subject) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
    lookup(env, env.token(), subject)  # a fresh token is issued after the cut


def test_disable_office(env: Env, subject: str) -> None:
    token = env.token()
    admin(env).DisableOffice(
        admin_pb2.DisableOfficeRequest(office="gz-haizhu-24h-01", why=WHY), metadata=officer(env)
    )
    assert refused(env, token, subject) == (grpc.StatusCode.PERMISSION_DENIED, "OFFICE_DISABLED")
    admin(env).EnableOffice(
        admin_pb2.EnableOfficeRequest(office="gz-haizhu-24h-01", why=WHY), metadata=officer(env)
    )
    lookup(env, token, subject)


def test_freeze_subject_with_exempt_role(env: Env, dataset_dir: Path) -> None:
    frozen, other = synthetic.sample_couple(dataset_dir)
    token = env.token()
    admin(env).FreezeSubject(
        admin_pb2.FreezeSubjectRequest(subject_id=frozen, except_roles=["supervisor"], why=WHY),
        metadata=officer(env),
    )
    assert refused(env, token, frozen) == (grpc.StatusCode.PERMISSION_DENIED, "SUBJECT_FROZEN")
    lookup(env, token, other)  # only that citizen
    entry = [e.event for e in entries(env) if e.event.outcome == "SUBJECT_FROZEN"]
    assert entry
    assert entry[0].subject_id == frozen
    assert entry[0].clerk == "clerk-001"
    # A clerk with an exempt role passes the freeze (the policy decides as usual).
    exempt = env.token(roles=("window_clerk", "supervisor"))
    lookup(env, exempt, frozen)
    admin(env).UnfreezeSubject(
        admin_pb2.UnfreezeSubjectRequest(subject_id=frozen, why=WHY), metadata=officer(env)
    )
    lookup(env, token, frozen)


def test_non_officer_is_refused_and_audited(env: Env) -> None:
    with pytest.raises(grpc.RpcError) as info:
        admin(env).DisableClerk(
            admin_pb2.DisableClerkRequest(sub="clerk-002", why=WHY), metadata=env.md(env.token())
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert client.call_error(info.value).reason == "ROLE_NOT_ALLOWED"
    last = entries(env)[-1].event
    assert (last.kind, last.clerk, last.decision) == ("admin", "clerk-001", "deny")
    assert json.loads(last.decision_id)["target"] == "clerk-002"
    listing = admin(env).ListControls(admin_pb2.ListControlsRequest(), metadata=officer(env))
    assert list(listing.controls) == []


@pytest.mark.parametrize(
    "why",
    [
        admin_pb2.Justification(ticket="SEC-1"),
        admin_pb2.Justification(reason="misuse"),
        admin_pb2.Justification(reason="bad\x07bell", ticket="SEC-1"),
        admin_pb2.Justification(reason="x" * 501, ticket="SEC-1"),
    ],
)
def test_reason_and_ticket_are_required_and_validated(
    env: Env, why: admin_pb2.Justification
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        admin(env).DisableClerk(
            admin_pb2.DisableClerkRequest(sub="clerk-001", why=why), metadata=officer(env)
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    if not (why.reason and why.ticket):
        assert client.call_error(info.value).reason == "MISSING_ARGUMENT"
    last = entries(env)[-1].event
    assert (last.kind, last.clerk, last.status) == ("admin", "sec-1", "INVALID_ARGUMENT")
    listing = admin(env).ListControls(admin_pb2.ListControlsRequest(), metadata=officer(env))
    assert list(listing.controls) == []


def test_disabled_auditor_is_refused_by_the_audit_service(env: Env) -> None:
    auditor = env.md(env.token(roles=("auditor",), sub="aud-1", office="audit-office"))
    admin(env).DisableClerk(
        admin_pb2.DisableClerkRequest(sub="aud-1", why=WHY), metadata=officer(env)
    )
    with pytest.raises(grpc.RpcError) as info:
        audit_pb2_grpc.AuditStub(env.channel).CitizenReport(
            audit_pb2.CitizenReportRequest(subject_id="110101199003077774"), metadata=auditor
        )
    assert client.call_error(info.value).reason == "CLERK_DISABLED"


def test_controls_survive_a_restart(tmp_path: Path, dataset_dir: Path, subject: str) -> None:
    cfg = make_config(tmp_path, dataset_dir)
    with running_env(cfg, dataset_dir) as env:
        admin(env).DisableClerk(
            admin_pb2.DisableClerkRequest(sub="clerk-001", why=WHY), metadata=officer(env)
        )
    with running_env(cfg, dataset_dir) as env:
        assert refused(env, env.token(), subject) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "CLERK_DISABLED",
        )
        listing = admin(env).ListControls(admin_pb2.ListControlsRequest(), metadata=officer(env))
        assert [(c.kind, c.target, c.ticket) for c in listing.controls] == [
            ("clerk", "clerk-001", "SEC-2026-0042")
        ]


def test_freeze_refuses_a_bundles_items_of_that_citizen_only(env: Env, dataset_dir: Path) -> None:
    frozen, other = synthetic.sample_couple(dataset_dir)
    admin(env).FreezeSubject(
        admin_pb2.FreezeSubjectRequest(subject_id=frozen, why=WHY), metadata=officer(env)
    )
    request = client.lookup_matter_request(MATTER, CASE, [(frozen, "seller"), (other, "buyer")])
    reply = env.stub.LookupMatter(request, metadata=env.md(env.token()), timeout=30)
    by_subject = {(i.subject_id, i.error.reason or "OK") for i in reply.items}
    assert {reason for s, reason in by_subject if s == frozen} == {"SUBJECT_FROZEN"}
    assert "SUBJECT_FROZEN" not in {reason for s, reason in by_subject if s == other}


def test_disabled_clerk_is_refused_a_whole_bundle(env: Env, dataset_dir: Path) -> None:
    subject, _ = synthetic.sample_couple(dataset_dir)
    admin(env).DisableClerk(
        admin_pb2.DisableClerkRequest(sub="clerk-001", why=WHY), metadata=officer(env)
    )
    request = client.lookup_matter_request(MATTER, CASE, [(subject, "seller")])
    with pytest.raises(grpc.RpcError) as info:
        env.stub.LookupMatter(request, metadata=env.md(env.token()), timeout=30)
    assert client.call_error(info.value).reason == "CLERK_DISABLED"
    last = entries(env)[-1].event
    assert (last.kind, last.clerk, last.outcome) == ("bundle", "clerk-001", "CLERK_DISABLED")
