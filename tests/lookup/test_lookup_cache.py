"""The record cache on the lookup path, over real brokers: what may be served from it, to whom,
and how the audit log tells. Department calls are counted by a spy in front of the broker's
real (in-process) source; nothing about the cache itself is faked."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from certbroker import audit
from certbroker.cli import client
from certbroker.v1 import broker_pb2
from tests.cache_support import reload_policies, running, sample, spy, write_policies
from tests.helpers import Env, stored_rows

TRANSFER = "BDC-ZY-001"
CASE = "GZ20261121-000321"
WIDE_HOUSEHOLD = ("name", "gender", "birth_date", "registered_address")  # window clerk, transfer


def lookup(env: Env, token: str, record_type: str, subject: str, **kw: Any) -> Any:
    request = client.lookup_request(record_type, subject, TRANSFER, CASE, **kw)
    return env.stub.Lookup(request, metadata=env.md(token), timeout=30)


def refused(env: Env, token: str, record_type: str, subject: str) -> client.CallError:
    with pytest.raises(grpc.RpcError) as info:
        lookup(env, token, record_type, subject)
    return client.call_error(info.value)


def set_fields(message: Any) -> set[str]:
    return {field.name for field, _ in message.ListFields()}


def entries(env: Env) -> dict[str, audit.AuditEntry]:
    return {e.entry_id: e for e in audit.query(env.state_dir / "audit.sqlite", audit.QueryFilter())}


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    return write_policies(tmp_path / "policies")


@pytest.fixture
def cenv(tmp_path: Path, dataset_dir: Path, policy_dir: Path) -> Iterator[Env]:
    with running(tmp_path, dataset_dir, policy_dir) as env:
        yield env


def test_a_narrower_release_never_gets_fields_cached_for_a_wider_one(
    cenv: Env, couple: tuple[str, str]
) -> None:
    household = spy(cenv.broker, "household")
    clerk, registrar = cenv.token(), cenv.token(roles=("registrar",), sub="reg-1")

    wide = lookup(cenv, clerk, "household", couple[0])
    assert set_fields(wide.record.household) == set(WIDE_HOUSEHOLD)
    narrow = lookup(cenv, registrar, "household", couple[0])
    assert not narrow.from_cache  # another set of released fields: another entry
    assert set_fields(narrow.record.household) == {"name", "gender"}
    assert {"birth_date", "registered_address"} <= set(narrow.withheld_fields)
    assert narrow.record.household.name == wide.record.household.name
    again = lookup(cenv, registrar, "household", couple[0])
    assert again.from_cache
    assert again.record == narrow.record
    wide_again = lookup(cenv, clerk, "household", couple[0])
    assert wide_again.from_cache
    assert wide_again.record == wide.record
    # The window clerk asking for fewer fields than allowed is a narrower release too.
    name_only = lookup(cenv, clerk, "household", couple[0], fields=["name"])
    assert not name_only.from_cache
    assert set_fields(name_only.record.household) == {"name"}
    # The department itself was only ever asked for what each request was released.
    assert [fields for _, fields, _ in household.calls] == [
        WIDE_HOUSEHOLD,
        ("name", "gender"),
        ("name",),
    ]


def test_masks_apply_to_cache_hits_and_never_change_the_cached_record(
    cenv: Env, couple: tuple[str, str]
) -> None:
    marriage = spy(cenv.broker, "marriage")
    husband, wife = couple
    registrar, clerk = cenv.token(roles=("registrar",), sub="reg-1"), cenv.token()

    plain = lookup(cenv, registrar, "marriage", husband)  # no mask for the registrar
    assert plain.record.marriage.spouse_resident_id == wife
    assert list(plain.masked_fields) == []
    masked = lookup(cenv, clerk, "marriage", husband)  # same fields: the same entry
    assert masked.from_cache
    assert masked.record.marriage.spouse_resident_id == "*" * 14 + wife[-4:]
    assert list(masked.masked_fields) == ["spouse_resident_id"]
    unmasked = lookup(cenv, registrar, "marriage", husband)
    assert unmasked.from_cache
    assert unmasked.record.marriage.spouse_resident_id == wife  # the entry was not masked
    assert len(marriage.calls) == 1


def test_cache_hits_are_audited_and_say_so(cenv: Env, couple: tuple[str, str]) -> None:
    marriage = spy(cenv.broker, "marriage")
    token = cenv.token(sub="clerk-5")
    first = lookup(cenv, token, "marriage", couple[0])
    second = lookup(cenv, token, "marriage", couple[0])
    assert (first.from_cache, second.from_cache) == (False, True)
    assert first.decision_id != second.decision_id  # every lookup is its own decision
    # Only the first decision reached the department.
    assert [decision for _, _, decision in marriage.calls] == [first.decision_id]

    stored = entries(cenv)
    one, two = stored[first.receipt.entry_id], stored[second.receipt.entry_id]
    assert (one.event.from_cache, two.event.from_cache) == (False, True)
    assert (two.event.decision, two.event.outcome, two.event.decision_id) == (
        "allow",
        "OK",
        second.decision_id,
    )
    assert two.event.clerk == "clerk-5"
    (row,) = stored_rows(cenv.state_dir / "audit.sqlite", second.receipt.entry_id)
    body = row.body
    assert json.loads(body)["from_cache"] is True
    assert second.record.marriage.spouse_name not in body  # still no record contents
    assert audit.verify_chain(cenv.state_dir / "audit.sqlite").ok


def test_ttl_zero_record_types_are_never_cached(cenv: Env, couple: tuple[str, str]) -> None:
    prop = spy(cenv.broker, "property")  # cache_ttl_s: 0 in the shipped catalogue
    token = cenv.token()
    answers = [lookup(cenv, token, "property", couple[0]) for _ in range(3)]
    assert [a.from_cache for a in answers] == [False, False, False]
    assert len(prop.calls) == 3
    stored = entries(cenv)
    assert [stored[a.receipt.entry_id].event.from_cache for a in answers] == [False] * 3


def test_a_policy_reload_takes_effect_on_the_next_call_with_a_warm_cache(
    cenv: Env, policy_dir: Path, couple: tuple[str, str]
) -> None:
    marriage = spy(cenv.broker, "marriage")
    token = cenv.token()
    lookup(cenv, token, "marriage", couple[0])
    assert lookup(cenv, token, "marriage", couple[0]).from_cache  # warm

    # The 24-hour hall loses marriage records: a role's access revoked by policy.
    write_policies(
        policy_dir, window_clerk_24h="    record_types: [household, property, social_security]\n"
    )
    reload_policies(cenv.broker)
    err = refused(cenv, token, "marriage", couple[0])
    assert (err.code, err.reason) == ("PERMISSION_DENIED", "POLICY_DENIED")
    denial = entries(cenv)[err.metadata["audit_entry_id"]].event
    assert (denial.decision, denial.from_cache) == ("deny", False)
    assert len(marriage.calls) == 1

    # Access back, but fewer fields: the next answer has only those, fetched afresh.
    write_policies(policy_dir, window_clerk_24h="    fields:\n      marriage: [marital_status]\n")
    reload_policies(cenv.broker)
    narrowed = lookup(cenv, token, "marriage", couple[0])
    assert not narrowed.from_cache
    assert set_fields(narrowed.record.marriage) == {"marital_status"}
    assert marriage.calls[-1][1] == ("marital_status",)


def test_a_reload_setting_ttl_zero_bypasses_entries_already_cached(
    cenv: Env, policy_dir: Path, couple: tuple[str, str]
) -> None:
    marriage = spy(cenv.broker, "marriage")
    token = cenv.token()
    lookup(cenv, token, "marriage", couple[0])
    assert lookup(cenv, token, "marriage", couple[0]).from_cache
    write_policies(policy_dir, ttl={"marriage": 0})
    reload_policies(cenv.broker)
    assert not lookup(cenv, token, "marriage", couple[0]).from_cache
    assert not lookup(cenv, token, "marriage", couple[0]).from_cache
    assert len(marriage.calls) == 3


def test_single_flight_makes_one_department_call_for_concurrent_identical_lookups(
    cenv: Env, couple: tuple[str, str]
) -> None:
    n = 6
    marriage = spy(cenv.broker, "marriage")
    # The department call is held until all n lookups have been decided. A lookup goes from
    # its decision to the cache without yielding the event loop (which runs this check too),
    # so by then every one of them has joined the call or started it.
    decided = "certbroker_policy_evaluation_seconds_count"
    marriage.release = lambda: sample(cenv.broker, decided) >= n
    coalesced = "certbroker_record_cache_coalesced_total"
    token = cenv.token()
    request = client.lookup_request("marriage", couple[0], TRANSFER, CASE)
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        calls = [
            pool.submit(cenv.stub.Lookup, request, metadata=cenv.md(token), timeout=60)
            for _ in range(n)
        ]
        answers: list[broker_pb2.LookupResponse] = [c.result() for c in calls]
    assert len(marriage.calls) == 1
    assert sample(cenv.broker, coalesced, record_type="marriage") == n - 1
    assert all(a.record == answers[0].record for a in answers)
    assert sorted(a.from_cache for a in answers) == [False] + [True] * (n - 1)
    assert len({a.decision_id for a in answers}) == n
    stored = entries(cenv)
    assert sorted(stored[a.receipt.entry_id].event.from_cache for a in answers) == [False] + [
        True
    ] * (n - 1)
    assert lookup(cenv, token, "marriage", couple[0]).from_cache  # and now it is cached
    assert len(marriage.calls) == 1


def test_a_cached_record_answers_while_its_department_is_down(
    cenv: Env, couple: tuple[str, str]
) -> None:
    class Down:
        async def fetch(self, *args: Any) -> Any:
            from certbroker import errors

            raise errors.Unavailable("ADAPTER_UNAVAILABLE", "civil_affairs: down")

        async def aclose(self) -> None:
            return None

    token = cenv.token()
    lookup(cenv, token, "marriage", couple[0])
    assert cenv.broker.broker is not None
    cenv.broker.broker.router._sources["marriage"] = Down()
    assert lookup(cenv, token, "marriage", couple[0]).from_cache
    err = refused(cenv, token, "marriage", couple[1])  # never fetched: needs the department
    assert (err.code, err.reason) == ("UNAVAILABLE", "ADAPTER_UNAVAILABLE")
