"""Adapters as their own gRPC processes: ``python -m certbroker.adapters`` started for real."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from certbroker.adapters.demo import synthetic
from certbroker.adapters.sdk import SERVICE_NAME
from certbroker.v1 import adapter_pb2, adapter_pb2_grpc, records_pb2
from tests.helpers import AdapterProcess, start_adapter


@pytest.fixture(scope="module", params=sorted(synthetic.DATASETS))
def adapter_process(
    request: pytest.FixtureRequest, dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdapterProcess]:
    record_type: str = request.param
    log = tmp_path_factory.mktemp("logs") / f"{record_type}.log"
    started = start_adapter(record_type, dataset_dir, log)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def household_process(
    dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdapterProcess]:
    started = start_adapter(
        "household", dataset_dir, tmp_path_factory.mktemp("logs") / "household.log"
    )
    yield started
    started.stop()


@pytest.fixture
def channel(household_process: AdapterProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(household_process.target) as ch:
        yield ch


def fetch(
    channel: grpc.Channel, record_type: str, subject: str, fields: list[str]
) -> adapter_pb2.FetchResponse:
    stub = adapter_pb2_grpc.DepartmentAdapterStub(channel)
    request = adapter_pb2.FetchRequest(
        record_type=record_type, subject_id=subject, fields=fields, decision_id="dec-proc-1"
    )
    response: adapter_pb2.FetchResponse = stub.Fetch(request, timeout=10)
    return response


def reason_of(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no rich status"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info.reason


# Two asked fields per record type, and the field whose absence proves the filtering.
ASKED = {
    "household": (["name", "members"], "birth_date"),
    "social_security": (["name", "pension_status"], "social_security_number"),
    "property": (["holdings.certificate_number", "holdings.ownership"], "holdings.address"),
    "marriage": (["marital_status", "spouse_resident_id"], "certificate_number"),
}


def test_known_citizen_gets_a_typed_record_with_only_the_asked_fields(
    adapter_process: AdapterProcess, dataset_dir: Path
) -> None:
    record_type = adapter_process.record_type
    husband, wife = synthetic.sample_couple(dataset_dir)
    asked, withheld = ASKED[record_type]
    with grpc.insecure_channel(adapter_process.target) as ch:
        response = fetch(ch, record_type, husband, asked)
    assert response.department == synthetic.DATASETS[record_type][1]
    assert response.as_of.seconds > 0
    assert isinstance(response.record, records_pb2.Record)
    assert response.record.WhichOneof("record") == record_type
    body = getattr(response.record, record_type)
    if record_type == "property":
        assert body.holdings
        for holding in body.holdings:
            assert [f.name for f, _ in holding.ListFields()] == ["certificate_number", "ownership"]
            assert not holding.HasField(withheld.split(".")[1])
    else:
        assert sorted(f.name for f, _ in body.ListFields()) == sorted(asked)
        assert not body.HasField(withheld)
    if record_type == "marriage":
        assert body.spouse_resident_id == wife


def test_health_is_serving(adapter_process: AdapterProcess) -> None:
    with grpc.insecure_channel(adapter_process.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICE_NAME):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_unknown_citizen_is_not_found(channel: grpc.Channel, unknown_id: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        fetch(channel, "household", unknown_id, ["name"])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert reason_of(caught.value) == "SUBJECT_NOT_FOUND"


@pytest.mark.parametrize(
    ("record_type", "subject", "fields", "reason"),
    [
        ("household", "11010219850303001", ["name"], "BAD_SUBJECT_ID"),
        ("household", "110102198503030010", ["name"], "BAD_SUBJECT_ID"),  # wrong check digit
        ("household", None, ["name", "salary"], "UNKNOWN_FIELD"),
        ("marriage", None, ["marital_status"], "UNKNOWN_RECORD_TYPE"),  # not served here
    ],
)
def test_invalid_requests_are_invalid_argument(
    channel: grpc.Channel,
    dataset_dir: Path,
    record_type: str,
    subject: str | None,
    fields: list[str],
    reason: str,
) -> None:
    subject = subject or synthetic.sample_citizens(dataset_dir, 1)[0]
    with pytest.raises(grpc.RpcError) as caught:
        fetch(channel, record_type, subject, fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert reason_of(caught.value) == reason


def test_log_names_the_decision_but_no_citizen(
    household_process: AdapterProcess, channel: grpc.Channel, dataset_dir: Path
) -> None:
    subject = synthetic.sample_citizens(dataset_dir, 1)[0]
    name = fetch(channel, "household", subject, ["name"]).record.household.name
    log = household_process.log.read_text()
    assert "decision_id='dec-proc-1'" in log
    assert subject not in log
    assert name not in log


def test_sigterm_stops_the_process_cleanly(dataset_dir: Path, tmp_path: Path) -> None:
    started = start_adapter("marriage", dataset_dir, tmp_path / "marriage.log")
    assert started.stop() == 0
    assert started.more_output == ""  # READY was the one line on stdout
    with pytest.raises(grpc.FutureTimeoutError), grpc.insecure_channel(started.target) as ch:
        grpc.channel_ready_future(ch).result(timeout=0.5)
