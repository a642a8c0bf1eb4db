"""Matter bundles (LookupMatter) end to end: real brokers on port 0, real adapter processes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from certbroker import audit, config
from certbroker.adapters.demo import synthetic
from certbroker.audit.store.rows import canonical_body, chain_hash
from certbroker.auth.authenticator import DevIdentityProvider
from certbroker.cli import client
from certbroker.cli.table import format_table
from certbroker.config import AdapterRoute
from certbroker.contract import resident_id
from certbroker.v1 import broker_pb2, broker_pb2_grpc
from tests.cache_support import write_policies
from tests.helpers import (
    DEFAULT_OFFICE,
    AdapterProcess,
    BrokerThread,
    Env,
    allow_appends,
    make_config,
    refuse_appends,
    start_adapter,
)

TRANSFER = "BDC-ZY-001"
CASE = "GZ20261121-000888"
NEEDS = ("household", "marriage", "property")  # what the transfer needs, in catalogue order
DEPARTMENT = {
    "household": "public_security",
    "marriage": "civil_affairs",
    "property": "natural_resources",
}
STRANGER = resident_id.make("440105", dt.date(1985, 6, 1), 997)


def bundle(
    stub: broker_pb2_grpc.CertificateBrokerStub,
    token: str | None,
    subjects: list[tuple[str, str]],
    matter: str = TRANSFER,
    timeout: float = 30,
    **kw: Any,
) -> broker_pb2.LookupMatterResponse:
    request = client.lookup_matter_request(matter, kw.pop("case", CASE), subjects, **kw)
    metadata = client.bearer(token) if token is not None else None
    response: broker_pb2.LookupMatterResponse = stub.LookupMatter(
        request, metadata=metadata, timeout=timeout
    )
    return response


def refused(call: Any) -> client.CallError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return client.call_error(info.value)


def entries(db: Path) -> dict[str, audit.AuditEntry]:
    return {e.entry_id: e for e in audit.query(db, audit.QueryFilter())}


def results(response: broker_pb2.LookupMatterResponse) -> dict[tuple[str, str], str]:
    """(relation, record type) → "OK" or the item's error code."""
    return {
        (i.relation, i.record_type): (
            "OK" if i.WhichOneof("result") == "response" else i.error.code
        )
        for i in response.items
    }


# --- all departments up (the in-process default) --------------------------------------------


def test_property_transfer_bundle_for_a_couple(env: Env, couple: tuple[str, str]) -> None:
    seller, spouse = couple
    token = env.token(sub="clerk-077")
    reply = bundle(env.stub, token, [(seller, "seller"), (spouse, "co_owner")])

    assert [(i.subject_id, i.relation, i.record_type) for i in reply.items] == [
        (s, r, rt) for s, r in ((seller, "seller"), (spouse, "co_owner")) for rt in NEEDS
    ]
    assert all(i.WhichOneof("result") == "response" for i in reply.items)
    by_key = {(i.subject_id, i.record_type): i.response for i in reply.items}
    marriage = by_key[seller, "marriage"]
    assert marriage.record.marriage.spouse_resident_id == "*" * 14 + spouse[-4:]  # masked
    assert list(marriage.masked_fields) == ["spouse_resident_id"]
    assert list(marriage.withheld_fields) == ["certificate_number"]
    assert not marriage.record.marriage.HasField("certificate_number")
    household = by_key[spouse, "household"]
    assert "household_number" in household.withheld_fields
    assert not household.record.household.HasField("household_number")
    assert {r.department for r in by_key.values()} == set(DEPARTMENT.values())

    # Released exactly as a single Lookup releases it.
    single = env.stub.Lookup(
        client.lookup_request("marriage", seller, TRANSFER, CASE),
        metadata=env.md(token),
        timeout=30,
    )
    assert single.record == marriage.record
    assert list(single.withheld_fields) == list(marriage.withheld_fields)
    # ... and from the same record cache: the bundle fetched it, the lookup reused it.
    assert (marriage.from_cache, single.from_cache) == (False, True)

    # Every item has its own entry with the bundle id; the bundle entry links them.
    db = env.state_dir / "audit.sqlite"
    stored = entries(db)
    item_ids = [r.receipt.entry_id for r in by_key.values()]
    for item in reply.items:
        entry = stored[item.response.receipt.entry_id]
        assert entry.entry_hash == item.response.receipt.entry_hash
        assert entry.sequence == item.response.receipt.sequence
        ev = entry.event
        assert (ev.kind, ev.bundle_id, ev.relation) == ("lookup", reply.bundle_id, item.relation)
        assert (ev.subject_id, ev.record_type) == (item.subject_id, item.record_type)
        assert (ev.clerk, ev.matter_code, ev.case_number) == ("clerk-077", TRANSFER, CASE)
        assert (ev.decision, ev.outcome, ev.decision_id) == (
            "allow",
            "OK",
            item.response.decision_id,
        )
        assert ev.from_cache is False
    linking = stored[reply.receipt.entry_id]
    assert linking.event.kind == "bundle"
    assert linking.event.bundle_id == reply.bundle_id
    assert sorted(linking.event.item_entry_ids) == sorted(item_ids)
    assert list(linking.event.item_entry_ids) == [i.response.receipt.entry_id for i in reply.items]
    assert dict(linking.event.outcome_counts) == {"OK": 6}
    assert (linking.event.outcome, linking.event.status) == ("OK", "OK")
    assert linking.sequence > max(stored[i].sequence for i in item_ids)  # after the items
    assert linking.entry_hash == reply.receipt.entry_hash
    assert audit.verify_chain(db).ok

    assert env.broker.broker is not None
    url = f"http://127.0.0.1:{env.broker.broker.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'certbroker_bundle_latency_seconds_count{matter="BDC-ZY-001"} 1.0' in text
    assert "certbroker_bundle_items_sum 6.0" in text
    assert (
        'certbroker_lookups_total{decision="allow",department="civil_affairs",'
        'record_type="marriage",status="OK"} 3.0'
    ) in text  # two bundle items and the single lookup


def test_an_unknown_citizen_fails_only_their_items(env: Env, couple: tuple[str, str]) -> None:
    reply = bundle(env.stub, env.token(), [(couple[0], "seller"), (STRANGER, "buyer")])
    assert results(reply) == {
        **{("seller", rt): "OK" for rt in NEEDS},
        **{("buyer", rt): "NOT_FOUND" for rt in NEEDS},
    }
    stored = entries(env.state_dir / "audit.sqlite")
    for item in reply.items[3:]:
        assert item.error.reason == "SUBJECT_NOT_FOUND"
        assert item.error.metadata["department"] == DEPARTMENT[item.record_type]
        entry = stored[item.error.metadata["audit_entry_id"]]
        assert (entry.event.outcome, entry.event.bundle_id) == (
            "SUBJECT_NOT_FOUND",
            reply.bundle_id,
        )
    counts = stored[reply.receipt.entry_id].event.outcome_counts
    assert dict(counts) == {"OK": 3, "SUBJECT_NOT_FOUND": 3}


def test_an_unexpected_error_in_one_source_is_one_internal_item(
    env: Env, couple: tuple[str, str]
) -> None:
    class Broken:
        async def fetch(self, *args: Any) -> Any:
            raise RuntimeError("adapter exploded with secret 42")

        async def aclose(self) -> None:
            return None

    assert env.broker.broker is not None
    env.broker.broker.router._sources["property"] = Broken()
    reply = bundle(env.stub, env.token(), [(couple[0], "seller")])
    assert results(reply) == {
        ("seller", "household"): "OK",
        ("seller", "marriage"): "OK",
        ("seller", "property"): "INTERNAL",
    }
    assert "secret" not in reply.items[2].error.message


# --- policy decides each item ------------------------------------------------------------


@pytest.fixture
def narrow_policy(tmp_path: Path) -> Path:
    """The shipped policies plus a role whose only rule narrows record types."""
    policy_dir = tmp_path / "policies"
    subprocess.run(["cp", "-r", str(config.DEFAULT_POLICY_DIR), str(policy_dir)], check=True)
    rules = policy_dir / "rules.yaml"
    text = rules.read_text().replace(
        "roles:\n", "roles:\n  - id: transfer_checker\n    name: 婚姻与不动产核验\n", 1
    )
    text += """
  - id: transfer-checker-no-household
    roles: [transfer_checker]
    matters: [BDC-ZY-001]
    record_types: [marriage, property]
    masks:
      marriage: {spouse_resident_id: last4}
    conditions:
      offices: ["gz-haizhu-24h-*"]
      consent: [id_card_read]
"""
    rules.write_text(text)
    return policy_dir


def test_one_item_denied_by_policy_while_the_others_succeed(
    tmp_path: Path, dataset_dir: Path, narrow_policy: Path, couple: tuple[str, str]
) -> None:
    broker = BrokerThread(make_config(tmp_path, dataset_dir, policy_dir=narrow_policy))
    try:
        token = DevIdentityProvider(broker.config.state_dir).issue(
            "clerk-5", ["transfer_checker"], DEFAULT_OFFICE
        )
        with grpc.insecure_channel(broker.target) as channel:
            stub = broker_pb2_grpc.CertificateBrokerStub(channel)
            reply = bundle(stub, token, [(couple[0], "seller"), (couple[1], "spouse")])
    finally:
        broker.stop()
    assert results(reply) == {
        (relation, rt): "PERMISSION_DENIED" if rt == "household" else "OK"
        for relation in ("seller", "spouse")
        for rt in NEEDS
    }
    stored = entries(broker.config.audit_file)
    for item in reply.items:
        if item.record_type != "household":
            continue
        assert (item.error.reason, item.error.metadata["rule"]) == ("POLICY_DENIED", "default-deny")
        entry = stored[item.error.metadata["audit_entry_id"]]
        assert (entry.event.decision, entry.event.rule_id) == ("deny", "default-deny")
        assert entry.event.bundle_id == reply.bundle_id
    linking = stored[reply.receipt.entry_id].event
    assert dict(linking.outcome_counts) == {"OK": 4, "POLICY_DENIED": 2}
    assert audit.verify_chain(broker.config.audit_file).ok


# --- refused bundles ------------------------------------------------------------------------

VALID = resident_id.make("440105", dt.date(1980, 5, 17), 998)
OTHER = resident_id.make("440105", dt.date(1982, 3, 9), 996)
BAD_ID = VALID[:17] + ("0" if VALID[17] != "0" else "1")


@pytest.mark.parametrize(
    ("subjects", "change", "reason", "argument"),
    [
        ([], {}, "NO_SUBJECTS", "subjects"),
        (
            [(resident_id.make("440105", dt.date(1980, 1, n), 990), "child") for n in range(1, 10)],
            {},
            "TOO_MANY_SUBJECTS",
            "subjects",
        ),
        ([(VALID, "seller"), (VALID, "spouse")], {}, "DUPLICATE_SUBJECT", "subjects[1].subject_id"),
        ([(VALID, "seller"), (OTHER, "landlord")], {}, "UNKNOWN_RELATION", "subjects[1].relation"),
        ([(VALID, "seller"), (OTHER, "")], {}, "MISSING_ARGUMENT", "subjects[1].relation"),
        ([(VALID, "seller"), (BAD_ID, "spouse")], {}, "BAD_SUBJECT_ID", "subjects[1].subject_id"),
        ([(VALID, "seller")], {"matter": "NOPE-001"}, "UNKNOWN_MATTER", "matter_code"),
        ([(VALID, "seller")], {"matter": ""}, "MISSING_ARGUMENT", "matter_code"),
        ([(VALID, "seller")], {"case": "GZ\n1"}, "CONTROL_CHARACTERS", "case_number"),
    ],
)
def test_bad_input_fails_the_whole_call_and_is_audited(
    env: Env,
    subjects: list[tuple[str, str]],
    change: dict[str, str],
    reason: str,
    argument: str,
) -> None:
    err = refused(lambda: bundle(env.stub, env.token(), subjects, **change))
    assert (err.code, err.reason, err.metadata["argument"]) == (
        "INVALID_ARGUMENT",
        reason,
        argument,
    )
    assert BAD_ID not in err.message  # the offending value is never echoed
    db = env.state_dir / "audit.sqlite"
    (entry,) = entries(db).values()  # one bundle entry, no items
    assert entry.entry_id == err.metadata["audit_entry_id"]
    ev = entry.event
    assert (ev.kind, ev.outcome, ev.status) == ("bundle", reason, "INVALID_ARGUMENT")
    assert (ev.item_entry_ids, dict(ev.outcome_counts), ev.subject_id) == ((), {}, "")
    assert "\n" not in ev.case_number
    assert audit.verify_chain(db).ok


def test_unauthenticated_bundle_is_refused_and_counted(env: Env, couple: tuple[str, str]) -> None:
    err = refused(lambda: bundle(env.stub, None, [(couple[0], "seller")]))
    assert (err.code, err.reason) == ("UNAUTHENTICATED", "TOKEN_MISSING")
    assert "audit_entry_id" not in err.metadata
    assert entries(env.state_dir / "audit.sqlite") == {}  # no bundle entry of its own
    assert env.broker.broker is not None
    env.broker.call(env.broker.broker.refusals.flush())
    (entry,) = entries(env.state_dir / "audit.sqlite").values()
    assert (entry.event.kind, entry.event.clerk, entry.event.subject_id) == (
        "unauthenticated",
        "",
        "ipv4:127.0.0.1",
    )
    assert dict(entry.event.outcome_counts) == {"TOKEN_MISSING": 1}


@pytest.mark.parametrize(
    "refuse_when",
    [
        "1",  # nothing can be written
        "NEW.record_type = ''",  # the bundle entry cannot: its items are not kept either
    ],
)
def test_no_audit_no_answer(env: Env, couple: tuple[str, str], refuse_when: str) -> None:
    db = sqlite3.connect(env.state_dir / "audit.sqlite")
    refuse_appends(db, refuse_when)
    token = env.token()
    err = refused(lambda: bundle(env.stub, token, [(couple[0], "seller")]))
    assert (err.code, err.reason) == ("UNAVAILABLE", "AUDIT_UNAVAILABLE")
    allow_appends(db)
    db.close()
    assert entries(env.state_dir / "audit.sqlite") == {}  # nothing half-written
    reply = bundle(env.stub, token, [(couple[0], "seller")])  # and the broker recovers
    assert len(reply.items) == 3
    assert len(entries(env.state_dir / "audit.sqlite")) == 4
    assert audit.verify_chain(env.state_dir / "audit.sqlite").ok


# --- the audit log's side of bundles -------------------------------------------------------


def _event(**overrides: Any) -> audit.AuditEvent:
    fields: dict[str, Any] = {
        "kind": "lookup",
        "clerk": "clerk-1",
        "office": "hall-07",
        "roles": ("window_clerk",),
        "subject_id": VALID,
        "matter_code": TRANSFER,
        "case_number": CASE,
        "consent_method": "id_card_read",
        "record_type": "household",
        "decision": "allow",
        "rule_id": "r",
        "withheld_fields": (),
        "outcome": "OK",
        "status": "OK",
        "policy_version": "a" * 64,
        "department": "public_security",
        "latency_ms": 1.0,
        "decision_id": "d",
    }
    fields.update(overrides)
    return audit.AuditEvent(**fields)


def test_append_many_links_items_in_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    items = [_event(bundle_id="b1", relation="seller", record_type=rt) for rt in NEEDS]

    def link(ids: list[str]) -> audit.AuditEvent:
        return _event(
            kind="bundle",
            subject_id="",
            record_type="",
            decision="",
            bundle_id="b1",
            item_entry_ids=tuple(ids),
            outcome_counts={"OK": len(ids)},
        )

    async def main() -> tuple[list[audit.Receipt], int]:
        async with audit.SQLiteAuditLog(path) as log:
            assert await log.append_many([]) == []
            receipts = await log.append_many(items, link=link)
            return receipts, log.commits

    receipts, commits = asyncio.run(main())
    assert commits == 1
    assert [r.sequence for r in receipts] == [1, 2, 3, 4]
    stored = audit.query(path, audit.QueryFilter())
    assert [e.event for e in stored[:3]] == items
    assert stored[3].event.item_entry_ids == tuple(r.entry_id for r in receipts[:3])
    assert dict(stored[3].event.outcome_counts) == {"OK": 3}
    assert "[bundle of 3]" in format_table(stored)
    assert audit.verify_chain(path).ok


def test_entries_written_before_bundles_still_read_and_verify(tmp_path: Path) -> None:
    """An entry body without the bundle keys (the format before them) reads with defaults."""
    path = tmp_path / "audit.sqlite"

    async def main() -> None:
        async with audit.SQLiteAuditLog(path) as log:
            await log.append(_event())

    asyncio.run(main())
    with closing(sqlite3.connect(path)) as conn:
        body = json.loads(conn.execute("SELECT body FROM audit_log").fetchone()[0])
        for key in ("bundle_id", "relation", "item_entry_ids", "outcome_counts"):
            del body[key]
        text = canonical_body(body)
        conn.execute(
            "UPDATE audit_log SET body = ?, entry_hash = ?", (text, chain_hash("0" * 64, text))
        )
        conn.commit()
    (entry,) = audit.query(path, audit.QueryFilter())
    assert entry.event == _event()
    assert audit.verify_chain(path).ok


# --- departments as real processes --------------------------------------------------------


@dataclass
class Routed:
    """A broker whose transfer departments are adapter processes."""

    broker: BrokerThread
    stub: broker_pb2_grpc.CertificateBrokerStub
    token: str
    departments: dict[str, AdapterProcess]


@pytest.fixture
def start_routed(tmp_path: Path, dataset_dir: Path) -> Iterator[Callable[..., Routed]]:
    """Starts the three departments a transfer needs as adapter processes (``slow`` ones with
    a one-minute ``--delay-ms``) and a broker routed to them over gRPC (with ``uncached``, on
    a policy that caches no record type, so every lookup reaches its department)."""
    with contextlib.ExitStack() as stack:

        def start(slow: tuple[str, ...] = (), uncached: bool = False) -> Routed:
            processes: dict[str, AdapterProcess] = {}
            for record_type in NEEDS:
                extra = ("--delay-ms", "60000") if record_type in slow else ()
                log = tmp_path / f"{record_type}.log"
                process = start_adapter(record_type, dataset_dir, log, *extra)
                stack.callback(_stop, process)
                processes[record_type] = process
            routes = {rt: AdapterRoute() for rt in synthetic.DATASETS}
            for record_type, process in processes.items():
                routes[record_type] = AdapterRoute("grpc", process.target)
            extra: dict[str, Any] = {}
            if uncached:
                never = {rt: 0 for rt in synthetic.DATASETS}
                extra["policy_dir"] = write_policies(tmp_path / "policies", ttl=never)
            # A generous cap: the caller's deadline, not the configuration, bounds the bundles.
            cfg = make_config(
                tmp_path, dataset_dir, adapters=routes, adapter_timeout_s=60.0, **extra
            )
            broker = BrokerThread(cfg)
            stack.callback(broker.stop)
            channel = stack.enter_context(grpc.insecure_channel(broker.target))
            token = DevIdentityProvider(cfg.state_dir).issue(
                "clerk-9", ["window_clerk"], DEFAULT_OFFICE
            )
            stub = broker_pb2_grpc.CertificateBrokerStub(channel)
            return Routed(broker, stub, token, processes)

        yield start


def _stop(process: AdapterProcess) -> None:
    if process.process.poll() is None:
        os.kill(process.process.pid, signal.SIGCONT)  # in case a test stopped it
    process.stop()


def test_slow_department_is_deadline_exceeded_and_the_rest_answer(
    start_routed: Callable[..., Routed], couple: tuple[str, str]
) -> None:
    routed = start_routed(slow=("property",))
    # The property adapter adds a minute to every fetch; the caller allows two seconds. The
    # bundle answering at all (rather than the call failing DEADLINE_EXCEEDED) shows it
    # answered within the caller's deadline.
    subjects = [(couple[0], "seller"), (couple[1], "co_owner")]
    reply = bundle(routed.stub, routed.token, subjects, timeout=2.0)
    assert results(reply) == {
        (relation, rt): "DEADLINE_EXCEEDED" if rt == "property" else "OK"
        for relation in ("seller", "co_owner")
        for rt in NEEDS
    }
    stored = entries(routed.broker.config.audit_file)
    for item in reply.items:
        if item.record_type == "property":
            assert item.error.reason == "ADAPTER_TIMEOUT"
            assert item.error.metadata["department"] == "natural_resources"
            entry = stored[item.error.metadata["audit_entry_id"]]
            assert (entry.event.decision, entry.event.outcome) == ("allow", "ADAPTER_TIMEOUT")
    counts = stored[reply.receipt.entry_id].event.outcome_counts
    assert dict(counts) == {"ADAPTER_TIMEOUT": 2, "OK": 4}


def test_killed_and_hung_adapter_processes(
    start_routed: Callable[..., Routed], couple: tuple[str, str]
) -> None:
    routed = start_routed(uncached=True)  # outages show on the next call, not after a TTL
    seller = [(couple[0], "seller")]
    reply = bundle(routed.stub, routed.token, seller, timeout=10.0)
    assert set(results(reply).values()) == {"OK"}  # all three departments up

    marriage = routed.departments["marriage"]
    marriage.process.kill()  # the civil-affairs server dies
    marriage.stop()
    reply = bundle(routed.stub, routed.token, seller, timeout=10.0)
    assert results(reply) == {
        ("seller", "household"): "OK",
        ("seller", "marriage"): "UNAVAILABLE",
        ("seller", "property"): "OK",
    }
    dead = reply.items[1].error
    assert dead.metadata["department"] == "civil_affairs"
    assert "civil_affairs" in dead.message

    household = routed.departments["household"].process
    os.kill(household.pid, signal.SIGSTOP)  # alive, but answers nothing
    try:
        hung = bundle(routed.stub, routed.token, seller, timeout=2.0)
    finally:
        os.kill(household.pid, signal.SIGCONT)
    assert results(hung) == {
        ("seller", "household"): "DEADLINE_EXCEEDED",
        ("seller", "marriage"): "UNAVAILABLE",
        ("seller", "property"): "OK",
    }
    assert hung.items[0].error.metadata["department"] == "public_security"
    assert audit.verify_chain(routed.broker.config.audit_file).ok


# --- the CLI -----------------------------------------------------------------------------


def test_lookup_matter_command(env: Env, couple: tuple[str, str]) -> None:
    def run(*subjects: str) -> subprocess.CompletedProcess[str]:
        args = ["lookup-matter", "--target", env.broker.target, "--token", env.token()]
        args += ["--matter", TRANSFER, "--case", CASE]
        for subject in subjects:
            args += ["--subject", subject]
        return subprocess.run(
            [sys.executable, "-m", "certbroker", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    ok = run(f"{couple[0]}:seller", f"{couple[1]}:co_owner")
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert sum(" OK " in line for line in lines) == 6
    assert "(masked: spouse_resident_id)" in ok.stdout
    assert "bundle " in lines[-1]
    partial = run(f"{couple[0]}:seller", f"{STRANGER}:buyer")
    assert partial.returncode == 3
    assert "NOT_FOUND SUBJECT_NOT_FOUND" in partial.stdout
    bad = run(f"{couple[0]}:landlord")
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT UNKNOWN_RELATION" in bad.stderr
    assert run("no-relation").returncode == 2
