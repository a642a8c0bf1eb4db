"""Registration and heartbeats with the broker's Registry (against a fake Registry)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from certbroker.adapters import sdk
from certbroker.adapters.sdk.metrics import AdapterMetrics
from certbroker.adapters.sdk.registry import read_credential
from tests.adapters.fake_registry import Call, FakeRegistry


class Births:
    department = "public_security"
    record_type = "household"

    def fetch(self, subject_id: str, fields: Sequence[str]) -> Mapping[str, Any]:
        raise sdk.RecordNotFound()


@pytest.fixture
def registry() -> Iterator[FakeRegistry]:
    fake = FakeRegistry()
    yield fake
    fake.stop()


@pytest.fixture
def credential(tmp_path: Path) -> Path:
    path = tmp_path / "dept.jwt"
    path.write_text("header.payload.signature\n")
    return path


def config(registry: FakeRegistry, credential: Path, **kw: Any) -> sdk.RegistrationConfig:
    values: dict[str, Any] = {
        "broker": registry.target,
        "credential_file": credential,
        "department": "public_security",
        "record_types": ["household"],
        "endpoint": "adapter.example:7001",
    }
    values.update(kw)
    return sdk.RegistrationConfig(**values)


async def until(registry: FakeRegistry, predicate: Callable[[list[Call]], bool]) -> None:
    # The fake's wait blocks: off the loop, so the registration's task keeps running.
    await asyncio.to_thread(registry.wait_for, predicate)


def count(method: str) -> Callable[[list[Call]], int]:
    return lambda calls: sum(c.method == method for c in calls)


def test_registers_heartbeats_and_deregisters(
    run: Callable, registry: FakeRegistry, credential: Path
) -> None:
    metrics = AdapterMetrics()

    async def scenario() -> None:
        registration = sdk.Registration(
            config(registry, credential, heartbeat_s=0.1), metrics=metrics
        )
        await registration.start()
        assert registration.instance_id == "inst-1"
        assert registration.lease_s == 15
        assert metrics.registry.get_sample_value("certbroker_adapter_registered") == 1
        await until(registry, lambda calls: count("Heartbeat")(calls) >= 3)
        await registration.stop()
        assert metrics.registry.get_sample_value("certbroker_adapter_registered") == 0

    run(scenario())
    first, *rest = registry.calls
    assert first.method == "Register"
    assert first.request.department == "public_security"
    assert list(first.request.record_types) == ["household"]
    assert first.request.endpoint == "adapter.example:7001"
    assert first.request.schema_version == "certbroker.v1"
    assert rest[-1].method == "Deregister"
    assert rest[-1].request.instance_id == "inst-1"
    assert {c.request.instance_id for c in rest} == {"inst-1"}
    assert {c.authorization for c in registry.calls} == {"Bearer header.payload.signature"}
    assert registry.instances == {}
    sample = metrics.registry.get_sample_value
    assert (
        sample("certbroker_adapter_registry_calls_total", {"method": "Register", "status": "OK"})
        == 1
    )


def test_heartbeats_come_at_a_third_of_the_lease(registry: FakeRegistry, credential: Path) -> None:
    registration = sdk.Registration(config(registry, credential))
    assert registration.interval_s == 5.0  # no lease yet: the retry interval
    registration.lease_s = 15
    assert registration.interval_s == 5.0
    registration.lease_s = 3
    assert registration.interval_s == pytest.approx(1.0)
    assert sdk.Registration(config(registry, credential, heartbeat_s=0.5)).interval_s == 0.5
    with pytest.raises(ValueError, match="positive"):
        sdk.Registration(config(registry, credential, heartbeat_s=0))


def test_lease_driven_heartbeats(run: Callable, registry: FakeRegistry, credential: Path) -> None:
    registry.lease_s = 1  # heartbeats every 1/3 s

    async def scenario() -> None:
        registration = sdk.Registration(config(registry, credential))
        await registration.start()
        await until(registry, lambda calls: count("Heartbeat")(calls) >= 2)
        await registration.stop()

    run(scenario())


def test_registers_again_when_the_broker_forgot_the_instance(
    run: Callable, registry: FakeRegistry, credential: Path
) -> None:
    async def scenario() -> None:
        registration = sdk.Registration(config(registry, credential, heartbeat_s=0.1))
        await registration.start()
        await until(registry, lambda calls: count("Heartbeat")(calls) >= 1)
        registry.forget()
        await until(registry, lambda calls: count("Register")(calls) >= 2)
        await until(registry, lambda calls: calls[-1].method == "Heartbeat")
        assert registration.instance_id == "inst-2"
        await registration.stop()

    run(scenario())
    assert registry.methods().count("Register") == 2
    heartbeats = [c.request.instance_id for c in registry.calls if c.method == "Heartbeat"]
    assert "inst-1" in heartbeats
    assert heartbeats[-1] == "inst-2"


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED]
)
def test_a_refusal_at_start_is_final(
    run: Callable, registry: FakeRegistry, credential: Path, code: grpc.StatusCode
) -> None:
    registry.refuse = code

    async def scenario() -> None:
        registration = sdk.Registration(config(registry, credential))
        with pytest.raises(sdk.RegistrationError, match=code.name):
            await registration.start()

    run(scenario())
    assert registry.methods() == ["Register"]


def test_a_missing_credential_fails_before_calling(
    run: Callable, registry: FakeRegistry, tmp_path: Path
) -> None:
    async def scenario() -> None:
        registration = sdk.Registration(config(registry, tmp_path / "absent.jwt"))
        with pytest.raises(sdk.RegistrationError, match=r"absent\.jwt"):
            await registration.start()

    (tmp_path / "empty.jwt").write_text("\n")
    run(scenario())
    with pytest.raises(sdk.RegistrationError, match=r"empty\.jwt: expected one JWT"):
        read_credential(tmp_path / "empty.jwt")
    assert registry.calls == []


def test_a_broker_down_at_start_is_retried(run: Callable, credential: Path) -> None:
    first = FakeRegistry()
    port = first.port
    first.stop()  # nobody listens there now

    async def scenario() -> None:
        registration = sdk.Registration(
            config(first, credential, heartbeat_s=0.1)  # same target, nobody home
        )
        await registration.start()  # does not raise: the adapter serves, and keeps trying
        assert registration.instance_id is None
        later = FakeRegistry(port=port)
        try:
            await until(later, lambda calls: count("Register")(calls) >= 1)
            await asyncio.wait_for(registration.renewed.wait(), 10)
            assert registration.instance_id == "inst-1"
            await registration.stop()
        finally:
            later.stop()

    run(scenario())


def test_the_credential_is_reread_on_each_call(
    run: Callable, registry: FakeRegistry, credential: Path
) -> None:
    async def scenario() -> None:
        registration = sdk.Registration(config(registry, credential, heartbeat_s=0.1))
        await registration.start()
        credential.write_text("rotated.credential.jwt")
        await until(
            registry, lambda calls: calls[-1].authorization.endswith("rotated.credential.jwt")
        )
        await registration.stop()

    run(scenario())
