"""Record types routed to department adapters running as their own gRPC processes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapters import synthetic
from broker import audit, client
from broker.config import AdapterRoute
from certbroker.v1 import broker_pb2_grpc
from tests.helpers import AdapterProcess, BrokerThread, make_config, start_adapter

CASE = "GZ20261121-000555"


@pytest.fixture
def marriage_adapter(dataset_dir: Path, tmp_path: Path) -> Iterator[AdapterProcess]:
    started = start_adapter("marriage", dataset_dir, tmp_path / "marriage.log")
    yield started
    if started.process.poll() is None:
        os.kill(started.process.pid, signal.SIGCONT)  # in case a test stopped it
    started.stop()


@pytest.fixture
def broker(
    tmp_path: Path, dataset_dir: Path, marriage_adapter: AdapterProcess
) -> Iterator[BrokerThread]:
    routes = {rt: AdapterRoute() for rt in synthetic.DATASETS}
    routes["marriage"] = AdapterRoute("grpc", marriage_adapter.target)
    cfg = make_config(tmp_path, dataset_dir, adapters=routes, adapter_timeout_s=1.0)
    thread = BrokerThread(cfg)
    yield thread
    thread.stop()


def call(broker: BrokerThread, subject: str, fields: tuple[str, ...] = ()) -> object:
    from broker.auth import DevIdentityProvider

    token = DevIdentityProvider(broker.config.state_dir).issue(
        "clerk-9", ["window_clerk"], "gz-haizhu-24h-01"
    )
    with grpc.insecure_channel(broker.target) as channel:
        stub = broker_pb2_grpc.CertificateBrokerStub(channel)
        return stub.Lookup(
            client.lookup_request("marriage", subject, "BDC-ZY-001", CASE, fields=fields),
            metadata=client.bearer(token),
            timeout=30,
        )


def error(broker: BrokerThread, subject: str) -> client.CallError:
    with pytest.raises(grpc.RpcError) as info:
        call(broker, subject)
    return client.call_error(info.value)


def test_lookup_through_an_adapter_process(broker: BrokerThread, dataset_dir: Path) -> None:
    husband, wife = synthetic.sample_couple(dataset_dir)
    response = call(broker, husband)
    m = response.record.marriage  # type: ignore[attr-defined]
    assert m.marital_status == "已婚"
    assert m.spouse_resident_id == "*" * 14 + wife[-4:]  # masked by the broker
    assert not m.HasField("certificate_number")  # the decision did not ask for it
    assert response.department == "civil_affairs"  # type: ignore[attr-defined]
    subset = call(broker, husband, ("marital_status",))
    assert not subset.record.marriage.HasField("spouse_name")  # type: ignore[attr-defined]


def test_unknown_citizen_over_grpc_is_not_found(broker: BrokerThread, dataset_dir: Path) -> None:
    err = error(broker, "11010519491231002X")
    assert (err.code, err.reason) == ("NOT_FOUND", "SUBJECT_NOT_FOUND")
    assert err.metadata["department"] == "civil_affairs"


def test_dead_adapter_is_unavailable_naming_the_department(
    broker: BrokerThread, marriage_adapter: AdapterProcess, dataset_dir: Path
) -> None:
    husband, _ = synthetic.sample_couple(dataset_dir)
    marriage_adapter.stop()
    err = error(broker, husband)
    assert (err.code, err.reason) == ("UNAVAILABLE", "ADAPTER_UNAVAILABLE")
    assert err.metadata["department"] == "civil_affairs"
    (entry,) = audit.query(broker.config.audit_file, audit.QueryFilter())
    assert (entry.event.decision, entry.event.outcome) == ("allow", "ADAPTER_UNAVAILABLE")


def test_hung_adapter_is_deadline_exceeded(
    broker: BrokerThread, marriage_adapter: AdapterProcess, dataset_dir: Path
) -> None:
    husband, _ = synthetic.sample_couple(dataset_dir)
    os.kill(marriage_adapter.process.pid, signal.SIGSTOP)  # alive, but answers nothing
    try:
        err = error(broker, husband)
    finally:
        os.kill(marriage_adapter.process.pid, signal.SIGCONT)
    assert (err.code, err.reason) == ("DEADLINE_EXCEEDED", "ADAPTER_TIMEOUT")
    assert err.metadata["department"] == "civil_affairs"
