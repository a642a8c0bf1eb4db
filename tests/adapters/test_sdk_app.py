"""The SDK's process wiring in-process: options, AdapterServer, metrics."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from certbroker.adapters import sdk
from certbroker.contract import resident_id
from certbroker.v1 import adapter_pb2, adapter_pb2_grpc
from tests import tls
from tests.adapters.fake_registry import FakeRegistry
from tests.adapters.tokens import BrokerKey

SUBJECT = resident_id.make("510104", dt.date(1988, 8, 8), 1)


class Pensions:
    department = "human_resources_social_security"
    record_type = "social_security"

    def fetch(self, subject_id: str, fields: Sequence[str]) -> Mapping[str, Any]:
        if subject_id != SUBJECT:
            raise sdk.RecordNotFound()
        return {"name": "刘洋", "contribution_months": 120}


@pytest.mark.parametrize(
    ("advertise", "host", "expected"),
    [
        (None, "127.0.0.1", "127.0.0.1:5000"),
        (None, "::1", "[::1]:5000"),
        ("adapter.dept.internal", "0.0.0.0", "adapter.dept.internal:5000"),
        ("adapter.dept.internal:443", "0.0.0.0", "adapter.dept.internal:443"),
        ("[fd00::7]", "::", "[fd00::7]:5000"),
        ("[fd00::7]:443", "::", "[fd00::7]:443"),
        ("fd00::7", "::", "[fd00::7]:5000"),
    ],
)
def test_the_advertised_endpoint(advertise: str | None, host: str, expected: str) -> None:
    options = sdk.ServeOptions(host=host, advertise=advertise, no_decision_token=True)
    assert options.endpoint(5000) == expected


def test_a_wildcard_host_needs_an_advertised_endpoint(tmp_path: Path) -> None:
    options = sdk.ServeOptions(
        host="0.0.0.0",
        no_decision_token=True,
        register="127.0.0.1:1",
        credential_file=tmp_path / "c.jwt",
    )
    with pytest.raises(ValueError, match="--advertise"):
        options.check()


def test_options_are_checked_when_serving() -> None:
    with pytest.raises(ValueError, match="--broker-public-key is required"):
        sdk.AdapterServer([Pensions()], sdk.ServeOptions())


def test_server_with_tokens_metrics_registration_and_graceful_stop(
    run: Callable, tmp_path: Path
) -> None:
    key = BrokerKey()
    credential = tmp_path / "dept.jwt"
    credential.write_text("a.b.c")
    registry = FakeRegistry()
    options = sdk.ServeOptions(
        broker_public_key=key.write_public(tmp_path / "broker.pem"),
        register=registry.target,
        credential_file=credential,
        heartbeat_s=30,
    )
    server = sdk.AdapterServer([Pensions()], options)

    async def scenario() -> None:
        await server.start()
        target = f"127.0.0.1:{server.port}"
        async with grpc.aio.insecure_channel(target) as channel:
            stub = adapter_pb2_grpc.DepartmentAdapterStub(channel)
            for subject, decision in ((SUBJECT, "d-1"), (SUBJECT, "d-2")):
                token = key.mint(
                    department=Pensions.department,
                    subject_id=subject,
                    record_type="social_security",
                    fields=["name"],
                    decision_id=decision,
                )
                request = adapter_pb2.FetchRequest(
                    record_type="social_security",
                    subject_id=subject,
                    fields=["name"],
                    decision_id=decision,
                )
                await stub.Fetch(request, metadata=((sdk.METADATA_KEY, token),), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Fetch(request, timeout=10)  # no token
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Fetch(adapter_pb2.FetchRequest(record_type="pets"), timeout=10)
            health = health_pb2_grpc.HealthStub(channel)
            await server.stop(grace=1)
            with pytest.raises(grpc.aio.AioRpcError):
                await health.Check(health_pb2.HealthCheckRequest(), timeout=2)

    try:
        run(scenario())
    finally:
        registry.stop()
    assert registry.methods() == ["Register", "Deregister"]
    sample = server.metrics.registry.get_sample_value
    fetches = "certbroker_adapter_fetches_total"
    assert sample(fetches, {"record_type": "social_security", "outcome": "OK"}) == 2
    missing = {"record_type": "social_security", "outcome": "DECISION_TOKEN_MISSING"}
    assert sample(fetches, missing) == 1
    # A record type a caller made up never becomes a label value.
    assert sample(fetches, {"record_type": "unknown", "outcome": "DECISION_TOKEN_MISSING"}) == 1
    assert sample("certbroker_adapter_fetch_seconds_count", {"record_type": "social_security"}) == 3
    assert sample("certbroker_adapter_registered") == 0


def test_tls_files_are_checked_with_clear_errors(tmp_path: Path) -> None:
    ours, theirs = tls.generate(tmp_path / "ours"), tls.generate(tmp_path / "theirs")
    assert sdk.server_credentials(ours.server_cert, ours.server_key, ours.ca_cert)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("garbage")
    with pytest.raises(ValueError, match=r"garbage\.pem: not a PEM certificate chain"):
        sdk.server_credentials(garbage, ours.server_key)
    with pytest.raises(ValueError, match=r"garbage\.pem: not an unencrypted PEM private key"):
        sdk.server_credentials(ours.server_cert, garbage)
    with pytest.raises(ValueError, match=r"server\.key: does not match the certificate"):
        sdk.server_credentials(ours.server_cert, theirs.server_key)
    with pytest.raises(ValueError, match=r"garbage\.pem: not a PEM CA certificate"):
        sdk.server_credentials(ours.server_cert, ours.server_key, garbage)
    with pytest.raises(ValueError, match=r"absent\.pem: cannot read"):
        sdk.server_credentials(tmp_path / "absent.pem", ours.server_key)
