"""Calls refused before any caller is known cannot grow the audit log one entry per call.

They are counted per peer and reason and written as one summary entry per peer per interval
(and at shutdown); each peer's refusals are rate limited. Every call of a known caller still
has its own entry before its answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from certbroker import audit, errors
from certbroker.audit import AuditEvent, Receipt
from certbroker.audit.refusals import (
    MALFORMED_REQUEST,
    OTHER_PEERS,
    RATE_LIMITED,
    RefusalLedger,
    malformed_request,
    peer_key,
)
from certbroker.cli import client
from certbroker.v1 import audit_pb2, audit_pb2_grpc, broker_pb2, registry_pb2, registry_pb2_grpc
from tests.helpers import Env, FakeClock, make_config, running_env

CASE = "GZ20261121-000123"


# --- the ledger on its own --------------------------------------------------------------------


class FakeLog:
    """An audit log keeping what it is given; ``broken`` makes every write fail."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.broken = False
        self.writes = 0

    async def append(self, event: AuditEvent) -> Receipt:
        raise AssertionError("summaries are written together")

    async def append_many(self, events: Sequence[AuditEvent], *, link: Any = None) -> list[Any]:
        self.writes += 1
        if self.broken:
            raise errors.Unavailable("AUDIT_UNAVAILABLE", "disk full")
        self.events.extend(events)
        return []

    async def aclose(self) -> None:
        return None


def missing() -> errors.UnknownCaller:
    return errors.UnknownCaller("TOKEN_MISSING", "no token")


def ledger(log: FakeLog, clock: FakeClock, **kw: Any) -> RefusalLedger:
    kw = {"rate_per_s": 1.0, "burst": 3, "interval_s": 10.0} | kw
    return RefusalLedger(log, clock=clock, wall=lambda: 1_800_000_000.5, **kw)


def test_refusals_become_one_summary_per_peer() -> None:
    log, clock = FakeLog(), FakeClock()
    refusals = ledger(log, clock, burst=1000)
    for _ in range(200):
        assert refusals.refuse("ipv4:203.0.113.7:40001", missing()).reason == "TOKEN_MISSING"
    refusals.refuse("ipv4:203.0.113.7:40002", errors.UnknownCaller("TOKEN_BAD_SIGNATURE", "x"))
    refusals.refuse("ipv4:198.51.100.1:5", malformed_request())
    assert log.events == []
    assert refusals.pending == 202
    assert asyncio.run(refusals.flush())
    first, second = log.events
    assert (first.kind, first.subject_id, first.rule_id) == (
        "unauthenticated",
        "ipv4:203.0.113.7",  # the port is not the peer: every connection has a new one
        "unauthenticated.summary",
    )
    assert dict(first.outcome_counts) == {"TOKEN_BAD_SIGNATURE": 1, "TOKEN_MISSING": 200}
    assert first.decision_id.startswith("calls=201;rate_limited=0;first=2027-01-15T08:00:00.500Z")
    assert (first.clerk, first.office, first.roles, first.decision) == ("", "", (), "")
    assert (second.subject_id, dict(second.outcome_counts)) == (
        "ipv4:198.51.100.1",
        {MALFORMED_REQUEST: 1},
    )
    assert refusals.pending == 0
    assert asyncio.run(refusals.flush())
    assert len(log.events) == 2
    assert log.writes == 1


def test_each_peer_is_rate_limited_on_its_own() -> None:
    log, clock = FakeLog(), FakeClock()
    refusals = ledger(log, clock)  # 3 at once, then 1 a second
    got = [refusals.refuse("ipv4:10.0.0.1:1", missing()) for _ in range(5)]
    assert [e.reason for e in got] == ["TOKEN_MISSING"] * 3 + [RATE_LIMITED] * 2
    assert got[-1].code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert isinstance(got[-1], errors.ResourceExhausted)
    # Another address is not affected.
    assert refusals.refuse("ipv4:10.0.0.2:1", missing()).reason == "TOKEN_MISSING"
    clock.advance(1.0)  # one more a second
    assert refusals.refuse("ipv4:10.0.0.1:9", missing()).reason == "TOKEN_MISSING"
    assert refusals.refuse("ipv4:10.0.0.1:9", missing()).reason == RATE_LIMITED
    asyncio.run(refusals.flush())
    summary = next(e for e in log.events if e.subject_id == "ipv4:10.0.0.1")
    # Counted under their own reason, limited or not; how many were limited is said too.
    assert dict(summary.outcome_counts) == {"TOKEN_MISSING": 7}
    assert "calls=7;rate_limited=3;" in summary.decision_id


def test_peers_beyond_the_bound_share_one_bucket_and_summary() -> None:
    log, clock = FakeLog(), FakeClock()
    refusals = ledger(log, clock, max_peers=2, burst=2)
    for i in range(10):
        refusals.refuse(f"ipv4:10.0.1.{i}:1", missing())
    asyncio.run(refusals.flush())
    assert [e.subject_id for e in log.events] == ["ipv4:10.0.1.0", "ipv4:10.0.1.1", OTHER_PEERS]
    other = log.events[-1]
    assert dict(other.outcome_counts) == {"TOKEN_MISSING": 8}
    assert "rate_limited=6;" in other.decision_id  # many addresses, one budget


def test_idle_peers_are_forgotten() -> None:
    log, clock = FakeLog(), FakeClock()
    refusals = ledger(log, clock)
    refusals.refuse("ipv4:10.0.0.1:1", missing())
    asyncio.run(refusals.flush())
    clock.advance(60)  # its bucket is full again
    asyncio.run(refusals.flush())
    assert refusals._peers == {}


def test_a_summary_that_cannot_be_written_is_kept_for_the_next_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log, clock = FakeLog(), FakeClock()
    refusals = ledger(log, clock, burst=100)
    for _ in range(3):
        refusals.refuse("ipv4:10.0.0.1:1", missing())
    log.broken = True
    assert not asyncio.run(refusals.flush())
    assert "not written" in caplog.text
    refusals.refuse("ipv4:10.0.0.1:1", missing())
    log.broken = False
    assert asyncio.run(refusals.flush())
    counts = [dict(e.outcome_counts) for e in log.events]
    assert sum(c["TOKEN_MISSING"] for c in counts) == 4  # nothing lost


def test_undecodable_requests_are_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log, clock = FakeLog(), FakeClock()
    refusals = ledger(log, clock, burst=1000)
    with caplog.at_level(logging.INFO):
        for _ in range(500):
            refusals.refuse("ipv4:10.0.0.1:1", malformed_request())
        assert caplog.records == []
        asyncio.run(refusals.flush())
    (record,) = caplog.records
    assert "500 undecodable request(s)" in record.getMessage()
    assert record.exc_info is None


def test_the_periodic_task_writes_summaries_and_close_writes_the_rest() -> None:
    log = FakeLog()
    refusals = RefusalLedger(log, interval_s=0.05)

    async def scenario() -> None:
        refusals.start()
        refusals.refuse("ipv4:10.0.0.1:1", missing())
        for _ in range(100):
            if log.events:
                break
            await asyncio.sleep(0.01)
        assert len(log.events) == 1
        refusals.refuse("ipv4:10.0.0.1:1", missing())
        await refusals.aclose()  # shutdown: the last interval is not lost
        assert len(log.events) == 2

    asyncio.run(scenario())


def test_closing_during_a_periodic_write_loses_nothing() -> None:
    class SlowLog(FakeLog):
        async def append_many(self, events: Sequence[AuditEvent], *, link: Any = None) -> list[Any]:
            await asyncio.sleep(0.2)  # stopped while this write is under way
            return await super().append_many(events)

    log = SlowLog()
    refusals = RefusalLedger(log, interval_s=0.01)

    async def scenario() -> None:
        refusals.refuse("ipv4:10.0.0.1:1", missing())
        refusals.start()
        await asyncio.sleep(0.05)  # the periodic write has begun
        refusals.refuse("ipv4:10.0.0.2:1", missing())
        await refusals.aclose()

    asyncio.run(scenario())
    assert sorted(e.subject_id for e in log.events) == ["ipv4:10.0.0.1", "ipv4:10.0.0.2"]


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("ipv4:127.0.0.1:54321", "ipv4:127.0.0.1"),
        ("ipv6:[::1]:443", "ipv6:[::]/64"),
        ("ipv6:[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:5000", "ipv6:[2001:db8:1:2::]/64"),
        ("ipv6:%5B2001:db8::1%5D:5000", "ipv6:%5B2001:db8::1%5D:5000"),
        ("unix:/run/certbroker.sock", "unix:/run/certbroker.sock"),
        ("unix:/tmp/\x1b[2J", "unix:/tmp/?[2J"),
        ("", "unknown"),
    ],
)
def test_peer_keys(peer: str, key: str) -> None:
    assert peer_key(peer) == key


# --- a running broker -------------------------------------------------------------------------


def entries(env: Env) -> list[audit.AuditEntry]:
    return audit.query(env.state_dir / "audit.sqlite", audit.QueryFilter())


def flush(env: Env) -> None:
    assert env.broker.broker is not None
    env.broker.call(env.broker.broker.refusals.flush())


def code_and_reason(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), client.call_error(info.value).reason


def lookup_request(subject: str) -> broker_pb2.LookupRequest:
    return client.lookup_request("household", subject, "BDC-ZY-001", CASE)


@pytest.fixture
def generous(tmp_path: Path, dataset_dir: Path) -> Iterator[Env]:
    """A broker whose unauthenticated-call limit is out of the way (summaries only)."""
    cfg = make_config(tmp_path, dataset_dir, unauthenticated_burst=10_000)
    with running_env(cfg, dataset_dir) as env:
        yield env


def test_two_hundred_calls_without_metadata_are_one_entry(
    generous: Env, couple: tuple[str, str]
) -> None:
    env = generous
    for _ in range(200):
        code, reason = code_and_reason(lambda: env.stub.Lookup(lookup_request(couple[0])))
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING")
    assert entries(env) == []
    flush(env)
    (summary,) = entries(env)
    assert (summary.event.kind, summary.event.subject_id) == ("unauthenticated", "ipv4:127.0.0.1")
    assert dict(summary.event.outcome_counts) == {"TOKEN_MISSING": 200}
    assert audit.verify_chain(env.state_dir / "audit.sqlite").ok


def test_every_service_counts_its_unknown_callers(
    generous: Env, couple: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    env = generous
    forged = env.token()[:-8] + "AAAAAAAA"
    hostile = env.token(sub="clerk\x1b[2J\u202e")
    audit_stub = audit_pb2_grpc.AuditStub(env.channel)
    registry = registry_pb2_grpc.RegistryStub(env.channel)
    bundle = broker_pb2.LookupMatterRequest(
        matter_code="BDC-ZY-001",
        case_number=CASE,
        subjects=[broker_pb2.BundleSubject(subject_id=couple[0], relation="seller")],
    )
    calls = [
        lambda md: env.stub.Lookup(lookup_request(couple[0]), metadata=md),
        lambda md: env.stub.LookupMatter(bundle, metadata=md),
        lambda md: env.stub.ListMatters(broker_pb2.ListMattersRequest(), metadata=md),
        lambda md: audit_stub.CitizenReport(
            audit_pb2.CitizenReportRequest(subject_id=couple[0]), metadata=md
        ),
        lambda md: list(audit_stub.Query(audit_pb2.QueryRequest(), metadata=md)),
        lambda md: registry.ListAdapters(registry_pb2.ListAdaptersRequest(), metadata=md),
        lambda md: registry.Register(
            registry_pb2.RegisterRequest(department="civil_affairs"), metadata=md
        ),
    ]
    expected = {"TOKEN_MISSING": 0, "TOKEN_BAD_SIGNATURE": 0, "TOKEN_BAD_CLAIM": 0}
    for call in calls:
        for md, reason in (
            (None, "TOKEN_MISSING"),
            (env.md(forged), "TOKEN_BAD_SIGNATURE"),
            (env.md(hostile), "TOKEN_BAD_CLAIM"),
        ):
            got = code_and_reason(lambda call=call, md=md: call(md))
            assert got == (grpc.StatusCode.UNAUTHENTICATED, reason)  # as the caller saw before
            expected[reason] += 1
    assert entries(env) == []
    flush(env)
    (summary,) = entries(env)
    assert dict(summary.event.outcome_counts) == expected
    assert "clerk\x1b" not in caplog.text  # the hostile claim is nowhere


def test_unknown_callers_are_rate_limited_but_known_ones_are_not(
    tmp_path: Path, dataset_dir: Path, couple: tuple[str, str]
) -> None:
    cfg = make_config(
        tmp_path, dataset_dir, unauthenticated_burst=5, unauthenticated_rate_per_s=0.01
    )
    with running_env(cfg, dataset_dir) as env:
        got = [
            code_and_reason(lambda: env.stub.Lookup(lookup_request(couple[0]))) for _ in range(8)
        ]
        assert got[:5] == [(grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING")] * 5
        assert got[5:] == [(grpc.StatusCode.RESOURCE_EXHAUSTED, RATE_LIMITED)] * 3
        # A clerk at the same address is served, and a denial is audited on its own.
        token = env.token()
        assert env.stub.Lookup(lookup_request(couple[0]), metadata=env.md(token)).receipt.entry_id
        denied = client.lookup_request("social_security", couple[0], "BDC-ZY-001", CASE)
        code, _reason = code_and_reason(lambda: env.stub.Lookup(denied, metadata=env.md(token)))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert [e.event.decision for e in entries(env)] == ["allow", "deny"]
    # Stopping the broker wrote the summary of what was still counted.
    summaries = [e for e in entries(env) if e.event.kind == "unauthenticated"]
    (summary,) = summaries
    assert dict(summary.event.outcome_counts) == {"TOKEN_MISSING": 8}
    assert "rate_limited=3;" in summary.event.decision_id


def test_summaries_are_written_every_interval(
    tmp_path: Path, dataset_dir: Path, couple: tuple[str, str]
) -> None:
    cfg = make_config(tmp_path, dataset_dir, unauthenticated_summary_interval_s=0.2)
    with running_env(cfg, dataset_dir) as env:
        code_and_reason(lambda: env.stub.Lookup(lookup_request(couple[0])))
        deadline = time.monotonic() + 10
        while not entries(env) and time.monotonic() < deadline:
            time.sleep(0.05)
        (summary,) = entries(env)
        assert summary.event.kind == "unauthenticated"


# --- the guard --------------------------------------------------------------------------------


class PeerContext:
    def peer(self) -> str:
        return "ipv4:192.0.2.9:4242"


def test_the_guard_counts_unknown_callers_and_audits_known_ones() -> None:
    from certbroker.audit.guard import AuditedCall, Result

    log, clock = FakeLog(), FakeClock()
    refusals = ledger(log, clock, burst=1)
    described: list[Result] = []

    def describe(result: Result) -> None:
        described.append(result)

    async def call(error: errors.BrokerError) -> errors.BrokerError:
        context = cast(Any, PeerContext())
        with pytest.raises(errors.BrokerError) as info:
            async with AuditedCall(log, describe, refusals=refusals, context=context):
                raise error
        return info.value

    async def scenario() -> None:
        first = missing()
        assert await call(first) is first  # the caller's refusal, as it was
        assert (await call(missing())).reason == RATE_LIMITED
        assert described == []  # no entry of their own
        # Unauthenticated once the caller is known (a department refusing): audited as usual.
        later = errors.Unauthenticated("DECISION_TOKEN_MISSING", "adapter refused")
        assert await call(later) is later
        assert [r.outcome for r in described] == ["DECISION_TOKEN_MISSING"]

    asyncio.run(scenario())
    asyncio.run(refusals.flush())
    (summary,) = log.events
    assert summary.subject_id == "ipv4:192.0.2.9"
