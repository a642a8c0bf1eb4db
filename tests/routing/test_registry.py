"""The Registry: departments register adapter instances, leases keep them in routing.

A real broker on port 0 with an injected lease clock; callers are real gRPC clients, and the
end-to-end tests run real adapter processes that register themselves (``--register``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from certbroker import audit, errors
from certbroker.adapters.demo import synthetic
from certbroker.audit.events import AuditEvent, Receipt
from certbroker.auth.authenticator import Authenticator, DevIdentityProvider
from certbroker.cli import client
from certbroker.config import AdapterRoute
from certbroker.contract import resident_id
from certbroker.routing.breaker import BreakerBoard
from certbroker.routing.registry.servicer import RegistryService
from certbroker.routing.registry.store import RegistryStore
from certbroker.v1 import broker_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.cache_support import uncached_policies
from tests.helpers import (
    AdapterProcess,
    BrokerThread,
    FakeClock,
    make_config,
    start_adapter,
)

CASE = "GZ20261121-000888"
Md = tuple[tuple[str, str], ...]


@dataclass
class Reg:
    """A broker routing marriage through the Registry, and clients of it."""

    broker: BrokerThread
    clock: FakeClock
    idp: DevIdentityProvider
    channel: grpc.Channel
    stub: registry_pb2_grpc.RegistryStub

    def dept(self, dept: str = "civil_affairs", **kw: Any) -> Md:
        return client.bearer(self.idp.issue_department(dept, **kw))

    def operator(self) -> Md:
        return client.bearer(self.idp.issue_operator("ops-1"))

    def clerk(self) -> Md:
        return client.bearer(self.idp.issue("clerk-1", ["window_clerk"], "gz-haizhu-24h-01"))

    def register(self, md: Md | None = None, **fields: Any) -> registry_pb2.RegisterResponse:
        request = registry_pb2.RegisterRequest(
            department=fields.get("department", "civil_affairs"),
            record_types=fields.get("record_types", ["marriage"]),
            endpoint=fields.get("endpoint", "127.0.0.1:7004"),
            schema_version=fields.get("schema_version", "certbroker.v1"),
        )
        return self.stub.Register(request, metadata=self.dept() if md is None else md, timeout=10)

    def listed(self, md: Md | None = None, department: str = "") -> list[Any]:
        reply = self.stub.ListAdapters(
            registry_pb2.ListAdaptersRequest(department=department),
            metadata=self.operator() if md is None else md,
            timeout=10,
        )
        return list(reply.adapters)

    def heartbeat(self, instance_id: str, md: Md | None = None) -> int:
        reply = self.stub.Heartbeat(
            registry_pb2.HeartbeatRequest(instance_id=instance_id),
            metadata=self.dept() if md is None else md,
            timeout=10,
        )
        return int(reply.lease_seconds)

    def registry_entries(self) -> list[audit.AuditEntry]:
        entries = audit.query(self.broker.config.audit_file, audit.QueryFilter())
        return [e for e in entries if e.event.kind == "registry"]

    def credential_file(self, path: Path, dept: str = "civil_affairs") -> Path:
        path.write_text(self.idp.issue_department(dept) + "\n")
        return path

    def lookup(self, subject: str) -> Any:
        token = self.idp.issue("clerk-9", ["window_clerk"], "gz-haizhu-24h-01")
        with grpc.insecure_channel(self.broker.target) as channel:
            return broker_pb2_grpc.CertificateBrokerStub(channel).Lookup(
                client.lookup_request("marriage", subject, "BDC-ZY-001", CASE),
                metadata=client.bearer(token),
                timeout=30,
            )


#: civil_affairs' endpoints in the shipped (demo) catalogue, and a rule allowing any endpoint.
LOOPBACK_ENDPOINTS = "    name: 民政局（婚姻登记）\n    endpoints: *loopback\n"
ANYWHERE = """    name: 民政局（婚姻登记）
    endpoints:
      - {hosts: ["0.0.0.0/0", "::/0", "*"], ports: ["1-65535"]}
"""


def start_reg(
    tmp_path: Path, dataset_dir: Path, clock: FakeClock, *, anywhere: bool = False
) -> Reg:
    """A broker routing marriage through the Registry; with ``anywhere``, its policy lets
    civil_affairs register any endpoint (the shipped demo catalogue: loopback only)."""
    routes = {rt: AdapterRoute() for rt in synthetic.DATASETS}
    routes["marriage"] = AdapterRoute("registry")
    uncached = uncached_policies(tmp_path)  # every lookup reaches a registered instance
    if anywhere:
        catalogue = uncached / "catalogue.yaml"
        text = catalogue.read_text(encoding="utf-8")
        assert LOOPBACK_ENDPOINTS in text
        catalogue.write_text(text.replace(LOOPBACK_ENDPOINTS, ANYWHERE), encoding="utf-8")
    cfg = make_config(tmp_path, dataset_dir, adapters=routes, lease_s=15, policy_dir=uncached)
    broker = BrokerThread(cfg, lease_clock=clock)
    channel = grpc.insecure_channel(broker.target)
    return Reg(
        broker,
        clock,
        DevIdentityProvider(cfg.state_dir),
        channel,
        registry_pb2_grpc.RegistryStub(channel),
    )


@pytest.fixture
def reg(tmp_path: Path, dataset_dir: Path) -> Iterator[Reg]:
    env = start_reg(tmp_path, dataset_dir, FakeClock())
    yield env
    env.channel.close()
    env.broker.stop()


@pytest.fixture
def open_reg(tmp_path: Path, dataset_dir: Path) -> Iterator[Reg]:
    """:func:`reg` on a policy that lets civil_affairs register any endpoint."""
    env = start_reg(tmp_path, dataset_dir, FakeClock(), anywhere=True)
    yield env
    env.channel.close()
    env.broker.stop()


def failure(call: Any) -> client.CallError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return client.call_error(info.value)


# --- register / list / heartbeat / deregister ---------------------------------------------------


def test_register_list_heartbeat_deregister_round_trip(reg: Reg) -> None:
    reply = reg.register()
    assert re.fullmatch(r"[0-9a-f]{32}", reply.instance_id)
    assert reply.lease_seconds == 15
    (listed,) = reg.listed()
    assert (listed.instance_id, listed.department, list(listed.record_types)) == (
        reply.instance_id,
        "civil_affairs",
        ["marriage"],
    )
    assert (listed.endpoint, listed.schema_version) == ("127.0.0.1:7004", "certbroker.v1")
    assert listed.live
    assert listed.breaker_state == "closed"
    registered = listed.registered_at.ToNanoseconds() / 1e9
    assert listed.lease_expires_at.ToNanoseconds() / 1e9 == registered + 15
    assert registered == reg.clock.now

    assert reg.heartbeat(reply.instance_id) == 15
    reg.stub.Deregister(
        registry_pb2.DeregisterRequest(instance_id=reply.instance_id),
        metadata=reg.dept(),
        timeout=10,
    )
    assert reg.listed() == []
    err = failure(lambda: reg.heartbeat(reply.instance_id))
    assert (err.code, err.reason) == ("NOT_FOUND", "INSTANCE_NOT_FOUND")

    register_entry, deregister_entry = reg.registry_entries()
    for entry, action in ((register_entry, "register"), (deregister_entry, "deregister")):
        event = entry.event
        assert (event.decision, event.outcome, event.status) == ("allow", "OK", "OK")
        assert event.rule_id == f"registry.{action}"
        assert (event.clerk, event.roles) == ("adapter:civil_affairs", ("department",))
        assert (event.department, event.record_type) == ("civil_affairs", "marriage")
        assert (event.subject_id, event.decision_id) == ("127.0.0.1:7004", reply.instance_id)


def test_registering_the_same_endpoint_again_keeps_the_instance(reg: Reg) -> None:
    first = reg.register()
    reg.clock.advance(20)  # lapsed meanwhile: registering again revives it
    again = reg.register()
    assert again.instance_id == first.instance_id
    (listed,) = reg.listed()
    assert listed.live
    other = reg.register(endpoint="localhost:7004")
    assert other.instance_id != first.instance_id
    assert len(reg.listed()) == 2


def test_a_record_type_the_department_does_not_serve_is_refused_and_audited(reg: Reg) -> None:
    err = failure(lambda: reg.register(record_types=["marriage", "household"]))
    assert (err.code, err.reason) == ("PERMISSION_DENIED", "RECORD_TYPE_NOT_SERVED")
    assert (err.metadata["department"], err.metadata["record_type"]) == (
        "civil_affairs",
        "household",
    )
    assert reg.listed() == []  # nothing registered, not even the marriage part
    (entry,) = reg.registry_entries()
    assert err.metadata["audit_entry_id"] == entry.entry_id
    event = entry.event
    assert (event.decision, event.outcome, event.status) == (
        "deny",
        "RECORD_TYPE_NOT_SERVED",
        "PERMISSION_DENIED",
    )
    assert (event.rule_id, event.clerk) == ("registry.register", "adapter:civil_affairs")
    assert (event.department, event.record_type) == ("civil_affairs", "marriage,household")


def test_a_department_cannot_register_for_another_department(reg: Reg) -> None:
    err = failure(lambda: reg.register(department="public_security", record_types=["household"]))
    assert (err.code, err.reason) == ("PERMISSION_DENIED", "DEPARTMENT_MISMATCH")
    (entry,) = reg.registry_entries()
    assert (entry.event.decision, entry.event.department) == ("deny", "public_security")


def test_a_department_unknown_to_the_policy_cannot_register(reg: Reg) -> None:
    md = reg.dept("tax_bureau")
    err = failure(lambda: reg.register(md, department="tax_bureau"))
    assert (err.code, err.reason) == ("PERMISSION_DENIED", "UNKNOWN_DEPARTMENT")
    assert len(reg.registry_entries()) == 1


def test_an_operator_registers_for_any_department_within_the_policy(reg: Reg) -> None:
    reply = reg.register(reg.operator(), department="public_security", record_types=["household"])
    assert reg.listed()[0].instance_id == reply.instance_id
    err = failure(
        lambda: reg.register(
            reg.operator(), department="public_security", record_types=["property"]
        )
    )
    assert err.reason == "RECORD_TYPE_NOT_SERVED"
    assert [e.event.clerk for e in reg.registry_entries()] == ["ops-1", "ops-1"]


# --- who may call ------------------------------------------------------------------------------


def _calls(reg: Reg) -> dict[str, Any]:
    return {
        "Register": reg.register,
        "Heartbeat": lambda md: reg.heartbeat("0" * 32, md),
        "Deregister": lambda md: reg.stub.Deregister(
            registry_pb2.DeregisterRequest(instance_id="0" * 32), metadata=md, timeout=10
        ),
        "ListAdapters": reg.listed,
    }


@pytest.mark.parametrize("method", ["Register", "Heartbeat", "Deregister", "ListAdapters"])
def test_unauthenticated_registry_calls_are_refused(reg: Reg, method: str) -> None:
    call = _calls(reg)[method]
    expired = reg.idp.issue_department("civil_affairs", ttl_s=60, now=1_000_000)
    no_dept = reg.idp.issue("adapter-x", ["department"], "office", extra_claims={})
    cases: list[tuple[Md, str]] = [
        ((), "TOKEN_MISSING"),
        (client.bearer("not-a-jwt"), "TOKEN_MALFORMED"),
        (client.bearer(expired), "TOKEN_EXPIRED"),
        (client.bearer(no_dept), "TOKEN_MISSING_CLAIM"),  # role department, no dept claim
    ]
    for md, reason in cases:
        err = failure(lambda md=md: call(md))
        assert (err.code, err.reason) == ("UNAUTHENTICATED", reason)
    assert reg.registry_entries() == []  # no verified caller: nobody to write down


@pytest.mark.parametrize("method", ["Register", "Heartbeat", "Deregister", "ListAdapters"])
def test_clerk_tokens_are_refused_by_the_registry_and_audited(reg: Reg, method: str) -> None:
    err = failure(lambda: _calls(reg)[method](reg.clerk()))
    assert (err.code, err.reason) == ("PERMISSION_DENIED", "ROLE_NOT_ALLOWED")
    (entry,) = reg.registry_entries()
    assert (entry.event.clerk, entry.event.decision) == ("clerk-1", "deny")
    assert entry.event.outcome == "ROLE_NOT_ALLOWED"


def test_departments_see_and_touch_only_their_own_instances(reg: Reg) -> None:
    ours = reg.register().instance_id
    theirs = reg.register(
        reg.dept("public_security"), department="public_security", record_types=["household"]
    ).instance_id
    assert [a.instance_id for a in reg.listed(reg.dept())] == [ours]
    assert {a.instance_id for a in reg.listed()} == {ours, theirs}  # operator: everything
    assert [a.instance_id for a in reg.listed(department="public_security")] == [theirs]
    err = failure(lambda: reg.listed(reg.dept(), department="public_security"))
    assert (err.code, err.reason) == ("PERMISSION_DENIED", "DEPARTMENT_MISMATCH")
    err = failure(lambda: reg.heartbeat(theirs, reg.dept()))
    assert (err.code, err.reason) == ("PERMISSION_DENIED", "DEPARTMENT_MISMATCH")
    err = failure(
        lambda: reg.stub.Deregister(
            registry_pb2.DeregisterRequest(instance_id=theirs), metadata=reg.dept(), timeout=10
        )
    )
    assert err.reason == "DEPARTMENT_MISMATCH"
    assert len(reg.listed()) == 2
    denials = [e.event for e in reg.registry_entries() if e.event.decision == "deny"]
    assert [d.rule_id for d in denials] == [
        "registry.list",
        "registry.heartbeat",
        "registry.deregister",
    ]
    # An operator may deregister any department's instance.
    reg.stub.Deregister(
        registry_pb2.DeregisterRequest(instance_id=theirs), metadata=reg.operator(), timeout=10
    )
    assert [a.instance_id for a in reg.listed()] == [ours]


# --- input validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"department": ""}, "MISSING_ARGUMENT"),
        ({"department": "Civil Affairs"}, "BAD_DEPARTMENT"),
        ({"department": "c" * 65}, "ARGUMENT_TOO_LONG"),
        ({"record_types": []}, "MISSING_ARGUMENT"),
        ({"record_types": ["pets"]}, "UNKNOWN_RECORD_TYPE"),
        ({"record_types": ["marriage", "marriage"]}, "DUPLICATE_RECORD_TYPE"),
        ({"endpoint": ""}, "MISSING_ARGUMENT"),
        ({"endpoint": "127.0.0.1"}, "BAD_ENDPOINT"),
        ({"endpoint": "grpc://127.0.0.1:7004"}, "BAD_ENDPOINT"),
        ({"endpoint": "127.0.0.1:0"}, "BAD_ENDPOINT"),
        ({"endpoint": "127.0.0.1:65536"}, "BAD_ENDPOINT"),
        ({"endpoint": "127.0.0.1:+80"}, "BAD_ENDPOINT"),
        ({"endpoint": "0.0.0.0:7004"}, "BAD_ENDPOINT"),
        ({"endpoint": "[::]:7004"}, "BAD_ENDPOINT"),
        ({"endpoint": "[::1:7004"}, "BAD_ENDPOINT"),
        ({"endpoint": "::1:7004"}, "BAD_ENDPOINT"),
        ({"endpoint": "999.1.1.1:7004"}, "BAD_ENDPOINT"),
        ({"endpoint": "-bad-.example:7004"}, "BAD_ENDPOINT"),
        ({"endpoint": "host/path:7004"}, "BAD_ENDPOINT"),
        ({"endpoint": "\u212aelvin.example:7004"}, "BAD_ENDPOINT"),
        ({"endpoint": "a\n.example:7004"}, "CONTROL_CHARACTERS"),
        ({"endpoint": "a" * 300 + ":7004"}, "ARGUMENT_TOO_LONG"),
        ({"schema_version": ""}, "MISSING_ARGUMENT"),
        ({"schema_version": "certbroker.v2"}, "UNSUPPORTED_SCHEMA_VERSION"),
    ],
)
def test_register_validates_every_input(reg: Reg, fields: dict[str, Any], reason: str) -> None:
    err = failure(lambda: reg.register(**fields))
    assert (err.code, err.reason) == ("INVALID_ARGUMENT", reason)
    assert err.message
    assert "7004" not in err.message
    assert reg.listed() == []


@pytest.mark.parametrize(
    "endpoint",
    ["127.0.0.1:7004", "localhost:1", "[::1]:65535", "adapter-2.civil.example.cn:443"],
)
def test_register_accepts_dialable_endpoints(open_reg: Reg, endpoint: str) -> None:
    open_reg.register(endpoint=endpoint)
    assert open_reg.listed()[0].endpoint == endpoint


# --- where adapters may be ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint",
    [
        "127.0.0.1:5432",  # PostgreSQL
        "127.0.0.1:6379",  # Redis
        "localhost:2375",  # the Docker API
        "127.0.0.1:80",  # a privileged port
        "[::ffff:127.0.0.1]:5432",  # loopback, spelled as IPv6
        "10.0.0.2:7004",  # not loopback
        "db.internal.example:7004",  # a name the catalogue does not list
        "LOCALHOST:6379",
    ],
)
def test_an_endpoint_the_catalogue_does_not_allow_is_refused_and_audited(
    reg: Reg, endpoint: str
) -> None:
    err = failure(lambda: reg.register(endpoint=endpoint))
    assert (err.code, err.reason) == ("PERMISSION_DENIED", "ENDPOINT_NOT_ALLOWED")
    assert err.metadata["department"] == "civil_affairs"
    assert reg.listed() == []
    (entry,) = reg.registry_entries()
    assert err.metadata["audit_entry_id"] == entry.entry_id
    event = entry.event
    assert (event.decision, event.outcome, event.status) == (
        "deny",
        "ENDPOINT_NOT_ALLOWED",
        "PERMISSION_DENIED",
    )
    assert (event.rule_id, event.subject_id) == ("registry.register", endpoint)


@pytest.mark.parametrize("endpoint", ["127.0.0.1:7004", "[::1]:45000", "localhost:60999"])
def test_loopback_is_allowed_by_the_shipped_catalogue(reg: Reg, endpoint: str) -> None:
    reg.register(endpoint=endpoint)
    assert [a.endpoint for a in reg.listed()] == [endpoint]


def test_the_brokers_own_ports_are_refused_on_any_host(open_reg: Reg) -> None:
    """Even where the catalogue allows every endpoint: gRPC and metrics ports, any host."""
    broker = open_reg.broker.broker
    assert broker is not None
    for port in (broker.port, broker.metrics_port):
        for host in ("127.0.0.1", "localhost", "broker.example.cn"):
            err = failure(lambda: open_reg.register(endpoint=f"{host}:{port}"))  # noqa: B023
            assert (err.code, err.reason) == ("PERMISSION_DENIED", "ENDPOINT_NOT_ALLOWED")
    assert open_reg.listed() == []
    assert len(open_reg.registry_entries()) == 6  # every refusal audited


def test_an_endpoint_the_policy_does_not_allow_is_never_dialled(reg: Reg) -> None:
    """Registered before endpoints were checked (or under a wider policy): not routed to."""
    broker = reg.broker.broker
    assert broker is not None
    broker.registry.register("civil_affairs", ["marriage"], "127.0.0.1:5432", "certbroker.v1")
    assert [a.live for a in reg.listed()] == [True]
    with pytest.raises(grpc.RpcError) as info:
        reg.lookup(resident_id.make("440105", dt.date(1985, 3, 1), 1))
    err = client.call_error(info.value)
    assert (err.code, err.reason) == ("UNAVAILABLE", "NO_LIVE_INSTANCE")


@pytest.mark.parametrize("instance_id", ["", "xyz", "A" * 32, "0" * 33])
def test_instance_ids_are_validated(reg: Reg, instance_id: str) -> None:
    err = failure(lambda: reg.heartbeat(instance_id))
    assert err.code == "INVALID_ARGUMENT"
    assert err.reason in {"MISSING_ARGUMENT", "BAD_INSTANCE_ID", "ARGUMENT_TOO_LONG"}


def test_list_validates_the_department_filter(reg: Reg) -> None:
    err = failure(lambda: reg.listed(department="bad dept"))
    assert (err.code, err.reason) == ("INVALID_ARGUMENT", "BAD_DEPARTMENT")


# --- leases and persistence --------------------------------------------------------------------


def test_a_lapsed_lease_shows_as_not_live_and_a_heartbeat_revives_it(reg: Reg) -> None:
    instance_id = reg.register().instance_id
    store = reg.broker.broker.registry  # type: ignore[union-attr]
    assert store.live_endpoints("civil_affairs", "marriage") == ["127.0.0.1:7004"]
    reg.clock.advance(14.9)
    assert reg.listed()[0].live
    reg.clock.advance(0.1)  # exactly at expiry: lapsed
    assert not reg.listed()[0].live
    assert store.live_endpoints("civil_affairs", "marriage") == []
    reg.heartbeat(instance_id)
    (listed,) = reg.listed()
    assert listed.live
    assert listed.lease_expires_at.ToNanoseconds() / 1e9 == reg.clock.now + 15


def test_registrations_survive_a_broker_restart(tmp_path: Path, dataset_dir: Path) -> None:
    clock = FakeClock()
    first = start_reg(tmp_path, dataset_dir, clock)
    try:
        instance_id = first.register().instance_id
        first.heartbeat(instance_id)
    finally:
        first.channel.close()
        first.broker.stop()
    clock.advance(10)
    second = start_reg(tmp_path, dataset_dir, clock)  # same state dir
    try:
        (listed,) = second.listed()
        assert (listed.instance_id, listed.endpoint, listed.live) == (
            instance_id,
            "127.0.0.1:7004",
            True,
        )
        assert second.heartbeat(instance_id) == 15  # the adapter carries on where it was
        clock.advance(16)
        assert not second.listed()[0].live
    finally:
        second.channel.close()
        second.broker.stop()
    assert (tmp_path / "state" / "registry.sqlite").is_file()


def test_long_lapsed_instances_are_forgotten(tmp_path: Path) -> None:
    clock = FakeClock()
    store = RegistryStore(tmp_path / "r.sqlite", lease_s=15, clock=clock)
    old, _ = store.register("civil_affairs", ["marriage"], "10.0.0.1:1", "certbroker.v1")
    clock.advance(24 * 3600 + 16)
    store.register("civil_affairs", ["marriage"], "10.0.0.2:1", "certbroker.v1")
    assert [i.endpoint for i in store.instances()] == ["10.0.0.2:1"]
    store.close()
    reopened = RegistryStore(tmp_path / "r.sqlite", lease_s=15, clock=clock)
    assert reopened.get(old.instance_id) is None
    assert [i.endpoint for i in reopened.instances()] == ["10.0.0.2:1"]
    reopened.close()


class _BrokenAudit:
    """An audit log whose appends fail, as when its disk is full."""

    async def append(self, event: AuditEvent) -> Receipt:
        raise errors.Unavailable("AUDIT_UNAVAILABLE", "cannot write the audit log")

    async def aclose(self) -> None:
        return None


class _Policies:
    def __init__(self, policy_dir: Path) -> None:
        from certbroker import policy

        self.current = policy.load(policy_dir)


class _Context:
    def __init__(self, token: str) -> None:
        self._md = client.bearer(token)

    def invocation_metadata(self) -> Md:
        return self._md


def test_no_audit_no_change(tmp_path: Path) -> None:
    from certbroker.config import DEFAULT_POLICY_DIR

    idp = DevIdentityProvider(tmp_path)
    store = RegistryStore(tmp_path / "r.sqlite")
    service = RegistryService(
        Authenticator([idp.trusted_issuer()]),
        _Policies(DEFAULT_POLICY_DIR),
        store,
        BreakerBoard(),
        _BrokenAudit(),
    )
    existing, _ = store.register("civil_affairs", ["marriage"], "10.0.0.1:1", "certbroker.v1")
    context: Any = _Context(idp.issue_department("civil_affairs"))

    async def attempt(coro: Any) -> errors.BrokerError:
        with pytest.raises(errors.Unavailable) as info:
            await coro
        return info.value

    async def scenario() -> None:
        request = registry_pb2.RegisterRequest(
            department="civil_affairs",
            record_types=["marriage"],
            endpoint="127.0.0.1:7005",
            schema_version="certbroker.v1",
        )
        err = await attempt(service.Register(request, context))
        assert err.reason == "AUDIT_UNAVAILABLE"
        err = await attempt(
            service.Deregister(
                registry_pb2.DeregisterRequest(instance_id=existing.instance_id), context
            )
        )
        assert err.reason == "AUDIT_UNAVAILABLE"

    asyncio.run(scenario())
    assert store.instances() == [existing]  # neither change happened
    store.close()


# --- real adapter processes --------------------------------------------------------------------


def registered_adapter(
    reg: Reg, tmp_path: Path, dataset_dir: Path, name: str, *extra: str
) -> AdapterProcess:
    """A marriage adapter process that registers itself with the broker and verifies tokens."""
    signer = reg.broker.broker.signer  # type: ignore[union-attr]
    return start_adapter(
        "marriage",
        dataset_dir,
        tmp_path / f"{name}.log",
        "--register",
        reg.broker.target,
        "--credential-file",
        str(reg.credential_file(tmp_path / f"{name}.jwt")),
        "--broker-public-key",
        str(signer.public_key_path),
        *extra,
    )


def test_an_adapter_process_registers_serves_and_deregisters(
    reg: Reg, tmp_path: Path, dataset_dir: Path
) -> None:
    husband, _ = synthetic.sample_couple(dataset_dir)
    adapter = registered_adapter(reg, tmp_path, dataset_dir, "a")
    try:
        (listed,) = reg.listed()
        assert (listed.endpoint, listed.live) == (adapter.target, True)
        response = reg.lookup(husband)
        assert response.record.marriage.marital_status == "已婚"
        # The adapter verified the broker's decision token and logged the decision id.
        assert f"decision_id='{response.decision_id}'" in adapter.log.read_text()
    finally:
        assert adapter.stop() == 0
    assert reg.listed() == []  # a graceful stop deregisters
    assert [e.event.rule_id for e in reg.registry_entries()] == [
        "registry.register",
        "registry.deregister",
    ]


def test_lease_expiry_takes_an_adapter_out_of_routing_and_a_heartbeat_restores_it(
    reg: Reg, tmp_path: Path, dataset_dir: Path
) -> None:
    husband, _ = synthetic.sample_couple(dataset_dir)
    # Heartbeats far apart: the test decides when the lease is renewed.
    adapter = registered_adapter(reg, tmp_path, dataset_dir, "a", "--heartbeat-s", "3600")
    try:
        instance_id = reg.listed()[0].instance_id
        assert reg.lookup(husband).record.marriage.marital_status == "已婚"
        reg.clock.advance(15)
        err = failure(lambda: reg.lookup(husband))
        assert (err.code, err.reason) == ("UNAVAILABLE", "NO_LIVE_INSTANCE")
        assert err.metadata["department"] == "civil_affairs"
        reg.heartbeat(instance_id)  # what the adapter's next heartbeat does
        assert reg.lookup(husband).record.marriage.marital_status == "已婚"
    finally:
        adapter.stop()


def test_a_registered_adapter_is_routed_to_after_a_broker_restart(
    tmp_path: Path, dataset_dir: Path
) -> None:
    husband, _ = synthetic.sample_couple(dataset_dir)
    clock = FakeClock()
    first = start_reg(tmp_path, dataset_dir, clock)
    adapter = registered_adapter(first, tmp_path, dataset_dir, "a", "--heartbeat-s", "3600")
    first.channel.close()
    first.broker.stop()
    second = start_reg(tmp_path, dataset_dir, clock)
    try:
        response = second.lookup(husband)
        assert response.record.marriage.marital_status == "已婚"
        assert f"decision_id='{response.decision_id}'" in adapter.log.read_text()
    finally:
        adapter.stop()
        second.channel.close()
        second.broker.stop()


# --- certbroker adapters / token CLI -----------------------------------------------------------


def cli(*args: str, token: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CERTBROKER_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "certbroker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_cli_tokens_and_adapters_commands(reg: Reg) -> None:
    state = str(reg.broker.config.state_dir)
    issued = cli("token", "issue", "--state-dir", state, "--operator", "--sub", "ops-cli")
    assert issued.returncode == 0, issued.stderr
    operator = issued.stdout.strip()
    dept = cli("token", "issue", "--state-dir", state, "--department", "civil_affairs")
    assert dept.returncode == 0, dept.stderr
    auth = Authenticator([reg.idp.trusted_issuer()])
    principal = auth.verify_department(client.bearer(dept.stdout.strip()))
    assert (principal.department, principal.roles) == ("civil_affairs", ("department",))
    assert auth.verify_department(client.bearer(operator)).is_operator
    target = ("--target", reg.broker.target)

    added = cli(
        "adapters",
        "register",
        *target,
        "--department",
        "civil_affairs",
        "--record-types",
        "marriage",
        "--endpoint",
        "127.0.0.1:7004",
        token=operator,
    )
    assert added.returncode == 0, added.stderr
    instance_id = re.search(r"instance ([0-9a-f]{32})", added.stdout).group(1)  # type: ignore[union-attr]
    listed = cli("adapters", "list", *target, token=operator)
    assert listed.returncode == 0, listed.stderr
    assert instance_id in listed.stdout
    assert "closed" in listed.stdout
    assert "(1 instances)" in listed.stdout
    as_json = cli(
        "adapters", "list", *target, "--json", "--department", "civil_affairs", token=operator
    )
    assert '"endpoint": "127.0.0.1:7004"' in as_json.stdout
    refused = cli(
        "adapters",
        "deregister",
        *target,
        instance_id,
        token=reg.idp.issue("clerk-1", ["window_clerk"], "gz-haizhu-24h-01"),
    )
    assert refused.returncode == 1
    assert "PERMISSION_DENIED ROLE_NOT_ALLOWED" in refused.stderr
    removed = cli("adapters", "deregister", *target, instance_id, token=operator)
    assert removed.returncode == 0, removed.stderr
    assert reg.listed() == []
    no_token = cli("adapters", "list", *target)
    assert no_token.returncode == 2
    assert "CERTBROKER_TOKEN" in no_token.stderr
    incomplete = cli("token", "issue", "--state-dir", state, "--sub", "clerk-1")
    assert incomplete.returncode == 2
    assert "--roles" in incomplete.stderr
