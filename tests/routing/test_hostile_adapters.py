"""A registered adapter is another organisation's code: the broker releases only what the
contract and the decision allow, whatever the adapter sends.

One hostile adapter process (``tests/routing/hostile_adapter.py``, started like the demo
adapters, dialled over the network) serves marriage and property records to a real broker; a
control file tells it how to misbehave on each call. Every misbehaviour must reach the clerk as
a status and reason of the broker's own, with nothing released or cached, an audit entry
written and the department's circuit breaker told (``breaker_failures = 1``: one failure opens
it, and the breaker's fake clock lets the next good answer close it again).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from certbroker import audit
from certbroker.adapters.demo import synthetic
from certbroker.auth.authenticator import DevIdentityProvider
from certbroker.cli import client
from certbroker.config import AdapterRoute
from certbroker.contract import resident_id
from certbroker.policy import RecordLimits
from certbroker.routing.router import GrpcSource
from certbroker.v1 import broker_pb2, broker_pb2_grpc
from tests.helpers import AdapterProcess, BrokerThread, FakeClock, make_config, start_process
from tests.routing import hostile_adapter

CASE = "GZ20261121-000777"
DEPARTMENTS = {"marriage": "civil_affairs", "property": "natural_resources"}
_subjects = itertools.count(1)


def fresh_subject() -> str:
    """A valid resident ID no other test of this module asks about (no cache entry yet)."""
    return resident_id.make("440105", dt.date(1985, 3, 1), next(_subjects))


@dataclass
class Hostile:
    """The hostile adapter process, its control file, and a broker routed to it."""

    adapter: AdapterProcess
    control: Path
    broker: BrokerThread
    clock: FakeClock
    channel: grpc.Channel
    token: str

    def steer(self, **control: Any) -> None:
        self.control.write_text(json.dumps(control))

    def calls(self) -> int:
        """Fetch calls that reached the adapter."""
        return self.adapter.log.read_text().count("fetch mode=")

    def lookup(self, record_type: str, subject: str) -> broker_pb2.LookupResponse:
        stub = broker_pb2_grpc.CertificateBrokerStub(self.channel)
        response: broker_pb2.LookupResponse = stub.Lookup(
            client.lookup_request(record_type, subject, "BDC-ZY-001", CASE),
            metadata=client.bearer(self.token),
            timeout=30,
        )
        return response

    def failure(self, record_type: str, subject: str) -> client.CallError:
        with pytest.raises(grpc.RpcError) as info:
            self.lookup(record_type, subject)
        return client.call_error(info.value)

    def breaker(self, record_type: str) -> str:
        assert self.broker.broker is not None
        return str(self.broker.broker.breakers.state(DEPARTMENTS[record_type]))

    def entry(self, entry_id: str) -> audit.AuditEntry:
        entries = audit.query(self.broker.config.audit_file, audit.QueryFilter())
        (found,) = [e for e in entries if e.entry_id == entry_id]
        return found


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path) -> Iterator[Hostile]:
    tmp = tmp_path_factory.mktemp("hostile")
    control = tmp / "control.json"
    control.write_text(json.dumps({"mode": "ok"}))
    adapter = start_process(
        ["-m", "tests.routing.hostile_adapter", "--control", str(control), "--port", "0"],
        tmp / "hostile.log",
        "marriage",
    )
    routes = {rt: AdapterRoute() for rt in synthetic.DATASETS}
    for record_type in DEPARTMENTS:
        routes[record_type] = AdapterRoute("grpc", adapter.target)
    cfg = make_config(tmp, dataset_dir, adapters=routes, adapter_timeout_s=1.0, breaker_failures=1)
    clock = FakeClock(0.0)
    broker = BrokerThread(cfg, breaker_clock=clock)
    channel = grpc.insecure_channel(broker.target)
    token = DevIdentityProvider(cfg.state_dir).issue(
        "clerk-9", ["window_clerk"], "gz-haizhu-24h-01"
    )
    try:
        yield Hostile(adapter, control, broker, clock, channel, token)
    finally:
        channel.close()
        broker.stop()
        adapter.stop()


def released(response: broker_pb2.LookupResponse) -> bytes:
    """Everything the clerk received, as bytes."""
    return response.SerializeToString()


# --- fields the contract does not know --------------------------------------------------------


def test_unknown_fields_are_dropped_before_release_and_caching(hostile: Hostile) -> None:
    hostile.steer(mode="unknown_fields")
    subject = fresh_subject()
    first = hostile.lookup("marriage", subject)
    assert first.record.marriage.marital_status == "已婚"
    assert hostile_adapter.SMUGGLED not in released(first)
    calls = hostile.calls()
    again = hostile.lookup("marriage", subject)  # the next clerk: from the cache (TTL 300 s)
    assert again.from_cache
    assert hostile.calls() == calls
    assert hostile_adapter.SMUGGLED not in released(again)
    assert again.record == first.record
    entry = hostile.entry(first.receipt.entry_id)
    assert (entry.event.decision, entry.event.outcome) == ("allow", "OK")
    assert hostile.breaker("marriage") == "closed"  # well-formed otherwise: an answer


def test_unknown_fields_in_nested_messages_are_dropped(hostile: Hostile) -> None:
    hostile.steer(mode="unknown_fields", count=2)
    response = hostile.lookup("property", fresh_subject())
    assert len(response.record.property.holdings) == 2
    assert response.record.property.holdings[0].usage == "住宅"
    assert hostile_adapter.SMUGGLED not in released(response)


# --- replies the broker refuses ----------------------------------------------------------------

BAD = ("UNAVAILABLE", "ADAPTER_BAD_RESPONSE")


@pytest.mark.parametrize(
    ("record_type", "control", "expected", "problem"),
    [
        pytest.param("marriage", {"mode": "wrong_subject"}, BAD, "SUBJECT_MISMATCH", id="subject"),
        pytest.param("marriage", {"mode": "no_echo"}, BAD, "SUBJECT_MISSING", id="no-echo"),
        pytest.param(
            "marriage", {"mode": "long_string", "size": 1025}, BAD, "STRING_TOO_LONG", id="string"
        ),
        pytest.param(  # 3 MB: refused as it arrives, before it is even parsed
            "marriage",
            {"mode": "long_string", "size": 1_000_000},
            BAD,
            "REPLY_TOO_LARGE",
            id="3MB-string",
        ),
        pytest.param(
            "property",
            {"mode": "big_record", "count": 60, "size": 400},  # 60 × 1.2 KB > 64 KiB
            BAD,
            "RECORD_TOO_LARGE",
            id="record",
        ),
        pytest.param(
            "property", {"mode": "many_items", "count": 65}, BAD, "TOO_MANY_ITEMS", id="repeated"
        ),
        pytest.param("marriage", {"mode": "corrupt"}, BAD, "MALFORMED", id="corrupt"),
        pytest.param("marriage", {"mode": "bad_as_of"}, BAD, "AS_OF_INVALID", id="bad-as-of"),
        pytest.param("marriage", {"mode": "no_as_of"}, BAD, "AS_OF_MISSING", id="no-as-of"),
        pytest.param(
            "marriage",
            {"mode": "slow", "delay_s": 3},
            ("DEADLINE_EXCEEDED", "ADAPTER_TIMEOUT"),
            None,
            id="slow",
        ),
    ],
)
def test_a_hostile_reply_is_refused_audited_uncached_and_counted(
    hostile: Hostile,
    record_type: str,
    control: dict[str, Any],
    expected: tuple[str, str],
    problem: str | None,
) -> None:
    subject = fresh_subject()
    hostile.steer(**control)
    calls = hostile.calls()
    err = hostile.failure(record_type, subject)
    assert (err.code, err.reason) == expected
    assert err.metadata["department"] == DEPARTMENTS[record_type]
    if problem is not None:
        assert err.metadata["problem"] == problem
    assert hostile.calls() == calls + 1  # it did reach the adapter
    entry = hostile.entry(err.metadata["audit_entry_id"])
    assert (entry.event.decision, entry.event.outcome, entry.event.status) == (
        "allow",
        expected[1],
        expected[0],
    )
    assert entry.event.subject_id == subject
    assert hostile.breaker(record_type) == "open"  # counted: one failure opens it here
    assert hostile.failure(record_type, subject).reason == "CIRCUIT_OPEN"
    assert hostile.calls() == calls + 1

    # Nothing was cached: once the breaker lets a probe through, the next lookup of the same
    # record reaches the (now well-behaved) adapter and gets its answer.
    hostile.clock.advance(60)
    hostile.steer(mode="ok")
    good = hostile.lookup(record_type, subject)
    assert not good.from_cache
    assert hostile.calls() == calls + 2
    assert hostile.breaker(record_type) == "closed"


def test_several_corrupt_replies_open_the_breaker(
    tmp_path: Path, dataset_dir: Path, hostile: Hostile
) -> None:
    """The issue's case: seven corrupt replies in a row never opened a breaker of five."""
    routes = {rt: AdapterRoute() for rt in synthetic.DATASETS}
    routes["marriage"] = AdapterRoute("grpc", hostile.adapter.target)
    broker = BrokerThread(make_config(tmp_path, dataset_dir, adapters=routes, breaker_failures=5))
    hostile.steer(mode="corrupt")
    token = DevIdentityProvider(broker.config.state_dir).issue(
        "clerk-9", ["window_clerk"], "gz-haizhu-24h-01"
    )
    reasons = []
    try:
        with grpc.insecure_channel(broker.target) as channel:
            stub = broker_pb2_grpc.CertificateBrokerStub(channel)
            for _ in range(7):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Lookup(
                        client.lookup_request("marriage", fresh_subject(), "BDC-ZY-001", CASE),
                        metadata=client.bearer(token),
                        timeout=30,
                    )
                err = client.call_error(info.value)
                reasons.append((err.code, err.reason))
    finally:
        broker.stop()
        hostile.steer(mode="ok")
    assert reasons == [BAD] * 5 + [("UNAVAILABLE", "CIRCUIT_OPEN")] * 2


# --- the adapter's error text -------------------------------------------------------------------

A_RESIDENT_ID = "110105194912310021"


def test_adapter_error_text_never_reaches_the_clerk(
    hostile: Hostile, caplog: pytest.LogCaptureFixture
) -> None:
    reason = f"EVIL\x1b[2J\r\nFAKE LOG LINE {A_RESIDENT_ID} " + "A" * 2000
    message = f"lookup of {A_RESIDENT_ID} failed:\x00\x07 " + "B" * 1000
    hostile.steer(mode="error", code="UNAVAILABLE", reason=reason, message=message)
    subject = fresh_subject()
    with caplog.at_level(logging.WARNING, logger="certbroker.routing"):
        err = hostile.failure("marriage", subject)
    assert (err.code, err.reason) == ("UNAVAILABLE", "ADAPTER_UNAVAILABLE")
    assert err.metadata["adapter_status"] == "UNAVAILABLE"
    assert "adapter_reason" not in err.metadata  # not a reason of the contract
    seen = err.message + json.dumps(err.metadata)
    for leaked in (A_RESIDENT_ID, "EVIL", "AAAA", "BBBB", "\x1b", "\x00"):
        assert leaked not in seen
    entry = hostile.entry(err.metadata["audit_entry_id"])
    assert entry.event.outcome == "ADAPTER_UNAVAILABLE"
    assert hostile.breaker("marriage") == "open"

    # The broker's log keeps what the adapter said, cleaned and cut.
    (logged,) = [r.getMessage() for r in caplog.records if "EVIL" in r.getMessage()]
    assert A_RESIDENT_ID not in logged
    assert "\x1b" not in logged
    assert "\\x1b" in logged
    assert "\r" not in logged
    assert "\n" not in logged
    assert "\x00" not in logged
    assert "AAAA" * 100 not in logged
    assert len(logged) < 800

    hostile.clock.advance(60)
    hostile.steer(mode="ok")
    assert not hostile.lookup("marriage", subject).from_cache  # nothing cached, breaker closes


def test_a_reason_of_the_contract_is_forwarded(hostile: Hostile) -> None:
    hostile.steer(mode="error", code="UNAVAILABLE", reason="SOURCE_UNAVAILABLE", message="db down")
    err = hostile.failure("marriage", fresh_subject())
    assert (err.code, err.reason) == ("UNAVAILABLE", "ADAPTER_UNAVAILABLE")
    assert err.metadata["adapter_reason"] == "SOURCE_UNAVAILABLE"
    assert "db down" not in err.message
    hostile.clock.advance(60)
    hostile.steer(mode="ok")
    hostile.lookup("marriage", fresh_subject())
    assert hostile.breaker("marriage") == "closed"


# --- limits from the catalogue ------------------------------------------------------------------


def test_the_record_types_limits_are_those_given(hostile: Hostile) -> None:
    """RemoteSource checks against the limits the policy in force gives the record type."""
    hostile.steer(mode="ok")
    source = GrpcSource(hostile.adapter.target, "civil_affairs")
    subject = fresh_subject()

    async def fetch(limits: RecordLimits) -> Any:
        try:
            return await source.fetch(
                "marriage", subject, ["registration_office"], "d" * 32, 5.0, limits
            )
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            return exc

    async def both() -> tuple[Any, Any]:
        try:
            return (
                # The longest value it sends (not asked for, but sent): J440105-2010-001234.
                await fetch(RecordLimits(max_string_chars=19)),
                await fetch(RecordLimits(max_string_chars=18)),
            )
        finally:
            await source.aclose()

    fits, refused = asyncio.run(both())
    assert fits.record.marriage.registration_office == "广州市海珠区民政局"
    assert fits.record.marriage.HasField("certificate_number")  # the source does not filter
    assert (refused.reason, refused.metadata["problem"]) == (
        "ADAPTER_BAD_RESPONSE",
        "STRING_TOO_LONG",
    )
    assert refused.metadata["field"] == "certificate_number"
