"""The certbroker.v1.Citizen service on a real broker: a citizen sees every access to their
own records (never anyone else's, never another person of the case), covert matters only after
their delay, disputes are audited, raised to auditors and freeze the records; every access has
exactly one notice in the outbox, written with its entry, without record values."""

from __future__ import annotations

import base64
import datetime
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from certbroker import audit
from certbroker.adapters.demo import synthetic
from certbroker.audit.anomalies import CITIZEN_DISPUTE, find
from certbroker.audit.outbox import pending, read_notices
from certbroker.audit.store.db import backend_for
from certbroker.citizen.notices import now_iso, render
from certbroker.cli import client
from certbroker.contract import resident_id
from certbroker.v1 import admin_pb2, admin_pb2_grpc, citizen_pb2
from tests.citizen.support import (
    CASE,
    COVERT,
    HOME_PACKAGE,
    TRANSFER,
    accesses,
    citizen_md,
    citizen_stub,
    lookup,
    policy_dir,
    refused,
)
from tests.helpers import Env, FakeClock, make_config, running_env

DAY = 86400.0


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    """The audit clock: starts 31 days ago, so a covert access made first is past its delay."""
    return FakeClock(time.time() - 31 * DAY)


@pytest.fixture(scope="module")
def cenv(
    tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path, clock: FakeClock
) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("citizen")
    cfg = make_config(tmp, dataset_dir, policy_dir=policy_dir(tmp))
    with running_env(cfg, dataset_dir, audit_clock=clock) as env:
        yield env


@pytest.fixture(scope="module")
def people(dataset_dir: Path) -> list[str]:
    return synthetic.sample_citizens(dataset_dir, 12)


def entries(env: Env) -> list[audit.AuditEntry]:
    return audit.query(env.state_dir / "audit.sqlite", audit.QueryFilter(limit=100_000))


def test_covert_access_is_hidden_until_its_delay_and_always_seen_by_auditors(
    cenv: Env, people: list[str], clock: FakeClock
) -> None:
    subject = people[0]
    police = cenv.token(("police_investigator",), sub="police-7")
    old = lookup(cenv, "household", subject, COVERT, token=police)  # 31 days ago
    clock.now = time.time()
    new = lookup(cenv, "household", subject, COVERT, token=police)  # just now
    shown = [a.entry_id for a in accesses(cenv, subject).accesses]
    assert old in shown
    assert new not in shown
    assert {old, new} <= {e.entry_id for e in entries(cenv)}  # auditors see both
    # The notice of the recent covert access is not due yet; the old one's is.
    due = {
        p.entry_id for p in pending(backend_for(cenv.state_dir / "audit.sqlite"), now_iso(), 10_000)
    }
    assert old in due
    assert new not in due
    # Disputing the hidden one: as if it did not exist.
    assert refused(
        lambda: citizen_stub(cenv).Dispute(
            citizen_pb2.DisputeRequest(entry_id=new), metadata=citizen_md(cenv, subject)
        )
    )[:2] == (grpc.StatusCode.NOT_FOUND, "ENTRY_NOT_FOUND")


def test_my_accesses_lists_my_lookups_allowed_and_denied_and_nothing_else(
    cenv: Env, people: list[str]
) -> None:
    me, other = people[1], people[2]
    allowed = lookup(cenv, "marriage", me)
    denied = lookup(cenv, "social_security", me)  # not needed for a property transfer
    lookup(cenv, "household", other)
    reply = accesses(cenv, me)
    by_id = {a.entry_id: a for a in reply.accesses}
    assert set(by_id) == {allowed, denied}
    a = by_id[allowed]
    assert (a.decision, a.office, a.clerk) == ("allow", "gz-haizhu-24h-01", "clerk-001")
    assert (a.matter_code, a.matter_name, a.case_number) == (TRANSFER, "不动产转移登记", CASE)
    assert (a.record_type, a.record_label) == ("marriage", "婚姻登记信息")
    assert "marital_status" in a.fields
    assert (by_id[denied].decision, list(by_id[denied].fields)) == ("deny", [])
    assert other not in str(reply)
    # The call itself is audited under the citizen.
    mine = next(e for e in entries(cenv) if e.entry_id == reply.receipt.entry_id)
    assert (mine.event.kind, mine.event.subject_id, mine.event.rule_id) == (
        "citizen",
        me,
        "citizen.my_accesses",
    )
    # Another citizen's token sees only their own.
    assert {x.entry_id for x in accesses(cenv, other).accesses}.isdisjoint(by_id)


def test_paging_and_time_range(cenv: Env, people: list[str]) -> None:
    me = people[3]
    made = [lookup(cenv, rt, me) for rt in ("household", "marriage", "property")]
    first = accesses(cenv, me, page_size=2)
    assert [a.entry_id for a in first.accesses] == made[:2]
    rest = accesses(cenv, me, page_size=2, page_token=first.next_page_token)
    assert [a.entry_id for a in rest.accesses] == made[2:]
    assert rest.next_page_token == ""
    future = citizen_pb2.MyAccessesRequest()
    future.since.FromSeconds(int(time.time()) + 3600)
    assert list(citizen_stub(cenv).MyAccesses(future, metadata=citizen_md(cenv, me)).accesses) == []
    for bad, reason in (
        ({"page_size": 5000}, "BAD_PAGE_SIZE"),
        ({"page_token": "x"}, "BAD_PAGE_TOKEN"),
    ):
        code, got, _ = refused(lambda bad=bad: accesses(cenv, me, **bad))
        assert (code, got) == (grpc.StatusCode.INVALID_ARGUMENT, reason)


def test_bundle_co_owner_sees_the_case_not_the_seller(cenv: Env, couple: tuple[str, str]) -> None:
    seller, spouse = couple
    request = client.lookup_matter_request(
        TRANSFER, CASE, [(seller, "seller"), (spouse, "co_owner")], consent_reference="R-1"
    )
    cenv.stub.LookupMatter(request, metadata=cenv.md(cenv.token()), timeout=30)
    reply = accesses(cenv, spouse)
    assert {a.record_type for a in reply.accesses} >= {"household", "marriage", "property"}
    assert {a.case_number for a in reply.accesses} == {CASE}
    text = str(reply) + reply.SerializeToString().decode("utf-8", "replace")
    assert seller not in text  # the seller's ID never appears, though the case is theirs too
    # The package (二手房交易一件事) for the seller and a buyer: the buyer sees none of the seller.
    buyer = next(c for c in synthetic.sample_citizens(cenv.dataset_dir, 20) if c not in couple)
    package = client.lookup_package_request(
        HOME_PACKAGE, CASE, [(seller, "seller"), (buyer, "buyer")], consent_reference="R-1"
    )
    cenv.stub.LookupMatter(package, metadata=cenv.md(cenv.token()), timeout=30)
    seen = accesses(cenv, buyer)
    assert seen.accesses
    assert seller not in str(seen)
    for notice in read_notices(backend_for(cenv.state_dir / "audit.sqlite"), buyer):
        assert seller not in json.dumps(notice, ensure_ascii=False)


def test_dispute_is_audited_raised_and_freezes_until_an_officer_unfreezes(
    cenv: Env, people: list[str]
) -> None:
    me, other = people[4], people[5]
    mine = lookup(cenv, "marriage", me, token=cenv.token(sub="clerk-nosy"))
    theirs = lookup(cenv, "marriage", other)
    stub = citizen_stub(cenv)
    for entry_id in (theirs, "0" * 32, "not-an-id"):  # never "exists, but not yours"
        code, reason, _ = refused(
            lambda entry_id=entry_id: stub.Dispute(
                citizen_pb2.DisputeRequest(entry_id=entry_id), metadata=citizen_md(cenv, me)
            )
        )
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "ENTRY_NOT_FOUND")
    reply = stub.Dispute(
        citizen_pb2.DisputeRequest(entry_id=mine, text="不是我本人办理"),
        metadata=citizen_md(cenv, me),
    )
    assert reply.frozen
    assert reply.receipt.entry_id
    # Frozen: the next lookup of my records is refused.
    code, reason, _ = refused(
        lambda: cenv.stub.Lookup(
            client.lookup_request("household", me, TRANSFER, CASE),
            metadata=cenv.md(cenv.token()),
        )
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "SUBJECT_FROZEN")
    assert next(a for a in accesses(cenv, me).accesses if a.entry_id == mine).disputed
    # Auditors: a CITIZEN_DISPUTE finding under the disputed access's clerk.
    found = [
        f
        for f in find(entries(cenv), cenv.broker.broker.policies.current)
        if f.rule == CITIZEN_DISPUTE
    ]
    assert any(f.clerk == "clerk-nosy" and mine in f.description for f in found)
    # An officer reviews and unfreezes: lookups work again.
    officer = cenv.md(cenv.token(("security_officer",), sub="sec-1", office="security-office"))
    admin_pb2_grpc.AdminStub(cenv.channel).UnfreezeSubject(
        admin_pb2.UnfreezeSubjectRequest(
            subject_id=me, why=admin_pb2.Justification(reason="reviewed", ticket="T-1")
        ),
        metadata=officer,
    )
    lookup(cenv, "household", me)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"resident_id": None}, "TOKEN_MISSING_CLAIM"),
        ({"resident_id": "110101199003070001"}, "TOKEN_BAD_CLAIM"),  # wrong check digit
        ({"resident_id": 110101}, "TOKEN_BAD_CLAIM"),
        ({"roles": ["window_clerk"]}, "TOKEN_NOT_CITIZEN"),
    ],
)
def test_bad_citizen_tokens_are_unauthenticated_with_a_reason(
    cenv: Env, people: list[str], claims: dict[str, object], reason: str
) -> None:
    code, got, _ = refused(
        lambda: citizen_stub(cenv).MyAccesses(
            citizen_pb2.MyAccessesRequest(), metadata=citizen_md(cenv, people[6], **claims)
        )
    )
    assert (code, got) == (grpc.StatusCode.UNAUTHENTICATED, reason)


def test_clerk_tokens_and_forged_claims_are_refused(cenv: Env, people: list[str]) -> None:
    stub = citizen_stub(cenv)
    code, reason, _ = refused(
        lambda: stub.MyAccesses(citizen_pb2.MyAccessesRequest(), metadata=cenv.md(cenv.token()))
    )
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_NOT_CITIZEN")
    # A citizen's token with someone else's ID put into its payload: the signature breaks.
    token = cenv.idp.issue_citizen(people[7])
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["resident_id"] = people[8]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    code, reason, _ = refused(
        lambda: stub.MyAccesses(
            citizen_pb2.MyAccessesRequest(), metadata=cenv.md(f"{header}.{forged}.{signature}")
        )
    )
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_BAD_SIGNATURE")
    # And a citizen token is no clerk's.
    code, reason, _ = refused(
        lambda: cenv.stub.Lookup(
            client.lookup_request("household", people[8], TRANSFER, CASE),
            metadata=cenv.md(cenv.idp.issue_citizen(people[8])),
        )
    )
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_UNKNOWN_ISSUER")


def test_every_access_has_exactly_one_notice_without_record_values(
    cenv: Env, people: list[str]
) -> None:
    me = people[9]
    response = cenv.stub.Lookup(
        client.lookup_request("household", me, TRANSFER, CASE),
        metadata=cenv.md(cenv.token()),
        timeout=30,
    )
    values = [str(v) for _, v in response.record.household.ListFields() if str(v)]
    assert values
    made = {
        response.receipt.entry_id,
        lookup(cenv, "social_security", me),  # denied
        lookup(cenv, "marriage", me, case=""),  # denied: no case number
    }
    valid = resident_id.make("440105", datetime.date(1985, 6, 1), 997)
    invalid = valid[:17] + ("0" if valid[17] != "0" else "1")  # a wrong check digit
    lookup_invalid = refused(
        lambda: cenv.stub.Lookup(
            client.lookup_request("household", invalid, TRANSFER, CASE),
            metadata=cenv.md(cenv.token()),
        )
    )
    assert lookup_invalid[0] == grpc.StatusCode.INVALID_ARGUMENT  # no decision: no notice
    notices = list(read_notices(backend_for(cenv.state_dir / "audit.sqlite"), me))
    assert sorted(n["entry_id"] for n in notices) == sorted(made)
    for notice in notices:
        text = json.dumps(notice, ensure_ascii=False)
        assert not any(value in text for value in values), text
        assert render(notice).startswith("您的")
    # Every access in the whole log has exactly one notice, and nothing else has one.
    access_ids = sorted(
        e.entry_id
        for e in entries(cenv)
        if e.event.kind == "lookup" and e.event.subject_id and e.event.decision in ("allow", "deny")
    )
    all_notices = sorted(
        n["entry_id"] for n in read_notices(backend_for(cenv.state_dir / "audit.sqlite"))
    )
    assert all_notices == access_ids
