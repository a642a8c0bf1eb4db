"""Packages of matters (一件事) through LookupMatter: real brokers on port 0, real gRPC."""

from __future__ import annotations

import collections
import datetime as dt
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from certbroker import audit, config
from certbroker.adapters.demo import synthetic
from certbroker.cli import client
from certbroker.config import AdapterRoute
from certbroker.contract import resident_id
from certbroker.routing.decision_token import DecisionSigner
from certbroker.v1 import broker_pb2, broker_pb2_grpc
from tests.cache_support import SpySource, spy
from tests.helpers import Env, make_config, running_env, start_adapter

PACKAGE = "YJS-ESF-001"
TRANSFER, UTILITIES, HUKOU = "BDC-ZY-001", "SDQ-GH-001", "HJ-QY-001"
MEMBERS = (TRANSFER, UTILITIES, HUKOU)
CASE = "GZ20261121-000999"
#: What each member matter needs, per record type, in catalogue order (policies/*.yaml).
NEEDS = {
    TRANSFER: ("household", "marriage", "property"),
    UTILITIES: ("household", "property"),
    HUKOU: ("household", "property"),
}
UTILITIES_HOUSEHOLD = {"name", "registered_address"}
HUKOU_HOUSEHOLD = {
    "name",
    "gender",
    "birth_date",
    "ethnicity",
    "registered_address",
    "household_number",
    "registration_authority",
}
TRANSFER_HOUSEHOLD = {"name", "gender", "birth_date", "registered_address"}


def package(
    stub: broker_pb2_grpc.CertificateBrokerStub,
    token: str,
    subjects: list[tuple[str, str]],
    code: str = PACKAGE,
    **kw: Any,
) -> broker_pb2.LookupMatterResponse:
    request = client.lookup_package_request(code, kw.pop("case", CASE), subjects, **kw)
    response: broker_pb2.LookupMatterResponse = stub.LookupMatter(
        request, metadata=client.bearer(token), timeout=30
    )
    return response


def refused(call: Any) -> client.CallError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return client.call_error(info.value)


def stored(db: Path) -> dict[str, audit.AuditEntry]:
    return {e.entry_id: e for e in audit.query(db, audit.QueryFilter())}


def released(item: broker_pb2.BundleItem) -> set[str]:
    """The field names an item's record holds."""
    record = getattr(item.response.record, item.record_type)
    return {f.name for f, _ in record.ListFields()}


def receipt_id(item: broker_pb2.BundleItem) -> str:
    if item.WhichOneof("result") == "response":
        return item.response.receipt.entry_id
    return item.error.metadata["audit_entry_id"]


@pytest.fixture
def spied(env: Env) -> dict[str, SpySource]:
    """Spies in front of every department of the in-process default."""
    return {rt: spy(env.broker, rt) for rt in ("household", "marriage", "property")}


def test_package_groups_minimised_items_by_matter(
    env: Env, couple: tuple[str, str], spied: dict[str, SpySource]
) -> None:
    seller, spouse = couple
    subjects = [(seller, "seller"), (spouse, "co_owner")]
    reply = package(env.stub, env.token(sub="clerk-088"), subjects)

    assert reply.package_code == PACKAGE
    assert list(reply.items) == []  # a package's items are in its matter groups
    assert [(g.matter_code, g.name) for g in reply.matters] == [
        (TRANSFER, "不动产转移登记"),
        (UTILITIES, "水电气过户（不动产转移后）"),
        (HUKOU, "户口迁移（购房入户）"),
    ]
    for group in reply.matters:
        assert [(i.subject_id, i.relation, i.record_type, i.matter_code) for i in group.items] == [
            (s, r, rt, group.matter_code) for s, r in subjects for rt in NEEDS[group.matter_code]
        ]
        assert all(i.WhichOneof("result") == "response" for i in group.items)
    by = {(g.matter_code, i.subject_id, i.record_type): i for g in reply.matters for i in g.items}
    # Each member sees only its own matter's fields of the one record fetched for all three.
    assert released(by[UTILITIES, seller, "household"]) == UTILITIES_HOUSEHOLD
    assert released(by[HUKOU, seller, "household"]) == HUKOU_HOUSEHOLD
    assert released(by[TRANSFER, seller, "household"]) == TRANSFER_HOUSEHOLD
    utilities_home = by[UTILITIES, seller, "property"].response
    assert "holdings.usage" in utilities_home.withheld_fields
    for holding in utilities_home.record.property.holdings:
        assert {f.name for f, _ in holding.ListFields()} <= {"certificate_number", "address"}
    transfer_home = by[TRANSFER, seller, "property"].response.record.property
    assert any(h.HasField("area_sqm") for h in transfer_home.holdings)
    # Masks stay per matter: the transfer's marriage record masks the spouse's ID.
    marriage = by[TRANSFER, seller, "marriage"].response
    assert marriage.record.marriage.spouse_resident_id == "*" * 14 + spouse[-4:]

    # Fetched once per (record type, subject), for the union of the members' fields, under
    # the first member's decision; the other members did not call the department.
    for record_type, source in spied.items():
        assert sorted(s for s, _, _ in source.calls) == sorted((seller, spouse)), record_type
    union = TRANSFER_HOUSEHOLD | UTILITIES_HOUSEHOLD | HUKOU_HOUSEHOLD
    for subject, fields, decision_id in spied["household"].calls:
        assert set(fields) == union
        lead = by[TRANSFER, subject, "household"].response
        assert (decision_id, lead.from_cache) == (lead.decision_id, False)
        for member in (UTILITIES, HUKOU):
            assert by[member, subject, "household"].response.from_cache is True

    # Audited per matter that uses it: matter × subject × record type, then the package entry.
    db = env.state_dir / "audit.sqlite"
    entries = stored(db)
    items = [i for g in reply.matters for i in g.items]
    assert len(items) == 2 * (3 + 2 + 2)
    per_record = collections.Counter(
        (entries[receipt_id(i)].event.subject_id, entries[receipt_id(i)].event.record_type)
        for i in items
    )
    assert per_record[seller, "household"] == 3  # fetched once, audited three times
    assert per_record[seller, "marriage"] == 1
    for item in items:
        ev = entries[receipt_id(item)].event
        assert (ev.kind, ev.bundle_id, ev.matter_code) == (
            "lookup",
            reply.bundle_id,
            item.matter_code,
        )
        assert (ev.decision, ev.outcome, ev.case_number) == ("allow", "OK", CASE)
        assert ev.decision_id == item.response.decision_id
        assert ev.from_cache is item.response.from_cache
    linking = entries[reply.receipt.entry_id]
    assert (linking.event.kind, linking.event.matter_code) == ("package", PACKAGE)
    assert (linking.event.bundle_id, linking.event.clerk) == (reply.bundle_id, "clerk-088")
    assert list(linking.event.item_entry_ids) == [receipt_id(i) for i in items]
    assert dict(linking.event.outcome_counts) == {"OK": 14}
    assert linking.sequence == max(entries[receipt_id(i)].sequence for i in items) + 1
    assert audit.verify_chain(db).ok


UTILITIES_ONLY = """\
roles:
  - id: utilities_desk
    name: 水电气窗口（测试）
rules:
  - id: utilities-desk-24h
    roles: [utilities_desk]
    matters: [SDQ-GH-001, HJ-QY-001]
    conditions:
      offices: ["gz-haizhu-24h-*"]
      consent: [id_card_read]
"""


@pytest.fixture
def desk_env(tmp_path: Path, dataset_dir: Path) -> Iterator[Env]:
    """The shipped policies plus a role for the follow-up matters only (not the transfer)."""
    policies = tmp_path / "policies"
    shutil.copytree(config.DEFAULT_POLICY_DIR, policies)
    (policies / "zz-test.yaml").write_text(UTILITIES_ONLY, "utf-8")
    cfg = make_config(tmp_path, dataset_dir, policy_dir=policies)
    with running_env(cfg, dataset_dir) as env:
        yield env


def test_a_member_matter_the_clerk_may_not_handle_is_denied_the_others_proceed(
    desk_env: Env, couple: tuple[str, str]
) -> None:
    env = desk_env
    spied = spy(env.broker, "household")
    seller = couple[0]
    reply = package(env.stub, env.token(roles=("utilities_desk",)), [(seller, "seller")])
    outcome = {
        (g.matter_code, i.record_type): (
            "OK" if i.WhichOneof("result") == "response" else i.error.reason
        )
        for g in reply.matters
        for i in g.items
    }
    assert outcome == {
        **{(TRANSFER, rt): "POLICY_DENIED" for rt in NEEDS[TRANSFER]},
        **{(m, rt): "OK" for m in (UTILITIES, HUKOU) for rt in NEEDS[m]},
    }
    # The denied member's fields are not fetched: the union is the allowed members' only.
    ((_, fields, _),) = spied.calls
    assert set(fields) == UTILITIES_HOUSEHOLD | HUKOU_HOUSEHOLD
    entries = stored(env.state_dir / "audit.sqlite")
    for item in reply.matters[0].items:
        assert (item.error.code, item.error.metadata["rule"]) == (
            "PERMISSION_DENIED",
            "default-deny",
        )
        ev = entries[item.error.metadata["audit_entry_id"]].event
        assert (ev.decision, ev.matter_code, ev.bundle_id) == ("deny", TRANSFER, reply.bundle_id)
    counts = entries[reply.receipt.entry_id].event.outcome_counts
    assert dict(counts) == {"OK": 4, "POLICY_DENIED": 3}

    # ListMatters shows the package with the transfer unavailable to this clerk.
    listed = env.stub.ListMatters(
        broker_pb2.ListMattersRequest(), metadata=env.md(env.token(roles=("utilities_desk",)))
    )
    (shown,) = listed.packages
    assert (shown.code, list(shown.matter_codes)) == (PACKAGE, list(MEMBERS))
    assert list(shown.unavailable_matter_codes) == [TRANSFER]
    assert {m.code for m in listed.matters} == {UTILITIES, HUKOU}


def test_a_failing_record_fails_every_member_that_shares_it(
    env: Env, couple: tuple[str, str]
) -> None:
    class Broken:
        async def fetch(self, *args: Any) -> Any:
            raise RuntimeError("department exploded")

        async def aclose(self) -> None:
            return None

    assert env.broker.broker is not None
    env.broker.broker.router._sources["property"] = Broken()
    reply = package(env.stub, env.token(), [(couple[0], "seller")])
    for group in reply.matters:
        for item in group.items:
            expected = "INTERNAL" if item.record_type == "property" else "OK"
            got = "OK" if item.WhichOneof("result") == "response" else item.error.code
            assert got == expected, (group.matter_code, item.record_type)
    counts = stored(env.state_dir / "audit.sqlite")[reply.receipt.entry_id].event.outcome_counts
    assert dict(counts) == {"OK": 4, "INTERNAL": 3}


VALID = resident_id.make("440105", dt.date(1980, 5, 17), 998)


@pytest.mark.parametrize(
    ("matter", "code", "reason", "argument"),
    [
        (TRANSFER, PACKAGE, "MATTER_AND_PACKAGE", "package_code"),
        ("", "", "MISSING_ARGUMENT", "matter_code"),
        ("", "YJS-NOPE-001", "UNKNOWN_PACKAGE", "package_code"),
        ("", TRANSFER, "UNKNOWN_PACKAGE", "package_code"),  # a matter is not a package
        ("", "YJS\n001", "CONTROL_CHARACTERS", "package_code"),
    ],
)
def test_bad_package_requests_fail_whole_and_are_audited(
    env: Env, matter: str, code: str, reason: str, argument: str
) -> None:
    request = client.lookup_package_request(code, CASE, [(VALID, "buyer")])
    request.matter_code = matter
    err = refused(lambda: env.stub.LookupMatter(request, metadata=env.md(env.token()), timeout=30))
    assert (err.code, err.reason, err.metadata["argument"]) == (
        "INVALID_ARGUMENT",
        reason,
        argument,
    )
    (entry,) = stored(env.state_dir / "audit.sqlite").values()  # no items
    assert entry.entry_id == err.metadata["audit_entry_id"]
    kind = "package" if code else "bundle"  # what was asked for
    assert (entry.event.kind, entry.event.outcome, entry.event.matter_code) == (kind, reason, "")
    assert entry.event.item_entry_ids == ()


def test_decision_tokens_name_the_union_the_adapter_serves(
    tmp_path: Path, dataset_dir: Path, couple: tuple[str, str]
) -> None:
    """A real household adapter process verifying the broker's decision tokens: the shared
    fetch asks for the union of the members' fields, which the token allows."""
    key = DecisionSigner(tmp_path / "state").public_key_path
    log = tmp_path / "household.log"
    adapter = start_adapter("household", dataset_dir, log, "--broker-public-key", str(key))
    routes = {rt: AdapterRoute() for rt in synthetic.DATASETS}
    routes["household"] = AdapterRoute("grpc", adapter.target)
    cfg = make_config(tmp_path, dataset_dir, adapters=routes)
    try:
        with running_env(cfg, dataset_dir) as env:
            reply = package(env.stub, env.token(), [(couple[0], "seller")])
    finally:
        adapter.stop()
    households = [i for g in reply.matters for i in g.items if i.record_type == "household"]
    assert all(i.WhichOneof("result") == "response" for i in households)
    lines = log.read_text().count("fetch decision_id=")
    assert lines == 1  # one fetch for three matters
    assert f"decision_id='{households[0].response.decision_id}'" in log.read_text()


def test_lookup_matter_package_command(env: Env, couple: tuple[str, str]) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        base = ["lookup-matter", "--target", env.broker.target, "--token", env.token()]
        return subprocess.run(
            [sys.executable, "-m", "certbroker", *base, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    subject = ["--subject", f"{couple[0]}:seller"]
    ok = run("--package", PACKAGE, "--case", CASE, *subject)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"package {PACKAGE}, case {CASE}:")
    for code in MEMBERS:
        assert f"[{code} " in ok.stdout
    assert sum(" OK " in line for line in ok.stdout.splitlines()) == 7
    assert ok.stdout.count("(shared)") == 4  # household and property, two members each
    assert f"package {PACKAGE}, bundle " in ok.stdout.splitlines()[-1]
    both = run("--package", PACKAGE, "--matter", TRANSFER, *subject)
    assert both.returncode == 2  # argparse: not allowed with each other
    unknown = run("--package", "YJS-NOPE-001", "--case", CASE, *subject)
    assert unknown.returncode == 1
    assert "INVALID_ARGUMENT UNKNOWN_PACKAGE" in unknown.stderr
