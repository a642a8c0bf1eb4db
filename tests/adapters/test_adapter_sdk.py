"""The adapter SDK: field filtering, presence, validation and the gRPC servicer (in-process)."""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from certbroker.adapters import sdk
from certbroker.contract import fields as record_fields
from certbroker.contract import resident_id
from certbroker.v1 import adapter_pb2, adapter_pb2_grpc, records_pb2

SUBJECT = resident_id.make("330825", dt.date(1980, 1, 2), 11)
SPOUSE = resident_id.make("330825", dt.date(1982, 5, 6), 22)

# Every field of every record type filled with a non-empty value.
FULL: dict[str, dict[str, Any]] = {
    "household": {
        "name": "王伟",
        "gender": "男",
        "birth_date": "1980-01-02",
        "ethnicity": "汉族",
        "registered_address": "浙江省衢州市龙游县龙洲街道荣昌路18号3栋2单元501室",
        "household_number": "330825001",
        "head_of_household": "王伟",
        "relation_to_head": "户主",
        "registration_authority": "龙游县公安局龙洲派出所",
        "members": [{"name": "李娜", "resident_id": SPOUSE, "relation_to_head": "配偶"}],
    },
    "social_security": {
        "name": "王伟",
        "social_security_number": SUBJECT,
        "insured_status": "参保缴费",
        "employer": "衢州恒通物流有限公司",
        "insured_since": "2002-03-01",
        "contribution_months": 280,
        "pension_status": "未领取",
        "monthly_pension_fen": 123456,
        "insured_city": "衢州市",
    },
    "property": {
        "holdings": [
            {
                "certificate_number": f"浙(2019)龙游县不动产权第{n:07d}号",
                "address": "浙江省衢州市龙游县龙洲街道荣昌路18号3栋2单元501室",
                "usage": "住宅",
                "area_sqm": 96.5,
                "ownership": "共同共有",
                "co_owner_names": ["李娜"],
                "registered_on": "2019-06-01",
                "mortgaged": True,
                "seized": True,
            }
            for n in (1, 2)
        ]
    },
    "marriage": {
        "marital_status": "已婚",
        "spouse_name": "李娜",
        "spouse_resident_id": SPOUSE,
        "registered_on": "2006-10-01",
        "registration_office": "龙游县民政局婚姻登记处",
        "certificate_number": "J330825-2006-001234",
    },
}


def present_paths(message: Message, prefix: str = "") -> set[str]:
    """Field paths set in a record message (dotted into property holdings)."""
    paths: set[str] = set()
    for field, value in message.ListFields():
        path = prefix + field.name
        if field.message_type is not None and field.message_type.name == "PropertyHolding":
            for item in value:
                paths |= present_paths(item, path + ".")
        else:
            paths.add(path)
    return paths


def body(record: records_pb2.Record) -> Message:
    case = record.WhichOneof("record")
    assert case is not None
    message: Message = getattr(record, case)
    return message


class FakeAdapter:
    """An adapter returning fixed data (or raising), recording its calls."""

    department = "test_department"

    def __init__(
        self,
        record_type: str,
        data: Mapping[str, Any] | None = None,
        error: Exception | None = None,
    ) -> None:
        self.record_type = record_type
        self.data = FULL[record_type] if data is None else data
        self.error = error
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def fetch(self, subject_id: str, fields: Sequence[str]) -> Mapping[str, Any]:
        self.calls.append((subject_id, tuple(fields)))
        if self.error is not None:
            raise self.error
        return self.data


# -- to_record -------------------------------------------------------------------------------


@pytest.mark.parametrize("record_type", sorted(FULL))
def test_full_data_matches_the_contract(record_type: str) -> None:
    # The fixture data really fills every field, so the subset test below means something.
    paths = record_fields.field_paths(record_type)
    record = sdk.to_record(record_type, FULL[record_type], paths)
    assert present_paths(body(record)) == set(paths)


@pytest.mark.parametrize("record_type", sorted(FULL))
def test_to_record_returns_exactly_the_asked_fields(record_type: str) -> None:
    rng = random.Random(record_type)
    paths = record_fields.field_paths(record_type)
    for _ in range(60):
        asked = rng.sample(paths, rng.randint(0, len(paths)))
        record = sdk.to_record(record_type, FULL[record_type], asked)
        assert record.WhichOneof("record") == record_type
        assert present_paths(body(record)) == set(asked)


def test_asked_and_empty_is_present_not_asked_is_absent() -> None:
    record = sdk.to_record(
        "marriage",
        {"marital_status": "未婚", "spouse_name": None, "certificate_number": "J1"},
        ["marital_status", "spouse_name", "registered_on"],
    )
    marriage = record.marriage
    assert marriage.marital_status == "未婚"
    # Asked, no value: present and empty.
    assert marriage.HasField("spouse_name")
    assert marriage.spouse_name == ""
    assert marriage.HasField("registered_on")
    assert marriage.registered_on == ""
    # Not asked: absent even though the adapter returned a value.
    assert not marriage.HasField("certificate_number")
    assert not marriage.HasField("spouse_resident_id")


def test_asked_numbers_and_flags_are_present_when_missing() -> None:
    record = sdk.to_record(
        "social_security", {"name": "王伟"}, ["monthly_pension_fen", "contribution_months"]
    )
    assert record.social_security.HasField("monthly_pension_fen")
    assert record.social_security.monthly_pension_fen == 0
    assert not record.social_security.HasField("name")
    holding = {"certificate_number": "浙(2019)龙游县不动产权第0000001号"}
    record = sdk.to_record("property", {"holdings": [holding]}, ["holdings.seized"])
    (only,) = record.property.holdings
    assert only.HasField("seized")
    assert not only.seized
    assert not only.HasField("certificate_number")


def test_nested_holding_fields_are_filtered_per_holding() -> None:
    record = sdk.to_record("property", FULL["property"], ["holdings.address", "holdings.seized"])
    assert len(record.property.holdings) == 2
    for holding in record.property.holdings:
        assert present_paths(holding) == {"address", "seized"}
    record = sdk.to_record("property", FULL["property"], ["holdings.co_owner_names"])
    assert [list(h.co_owner_names) for h in record.property.holdings] == [["李娜"], ["李娜"]]
    assert not any(h.HasField("address") for h in record.property.holdings)


def test_no_fields_gives_an_empty_record_of_the_type() -> None:
    record = sdk.to_record("household", FULL["household"], [])
    assert record.WhichOneof("record") == "household"
    assert present_paths(record.household) == set()


@pytest.mark.parametrize(
    ("record_type", "fields", "reason"),
    [
        ("household", ["name", "salary"], "UNKNOWN_FIELD"),
        ("property", ["holdings"], "UNKNOWN_FIELD"),  # nested fields are addressed with a dot
        ("household", ["holdings.address"], "UNKNOWN_FIELD"),
        ("vehicle", ["name"], "UNKNOWN_RECORD_TYPE"),
    ],
)
def test_unknown_fields_and_types_are_invalid(
    record_type: str, fields: list[str], reason: str
) -> None:
    with pytest.raises(sdk.InvalidRequest) as caught:
        sdk.to_record(record_type, {}, fields)
    assert caught.value.reason == reason
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_data_outside_the_message_is_an_adapter_bug() -> None:
    with pytest.raises(json_format.ParseError):
        sdk.to_record("marriage", {"marital_status": "已婚", "income": 1}, ["marital_status"])


# -- fetch_record ----------------------------------------------------------------------------


def test_fetch_record_filters_and_passes_the_checked_fields() -> None:
    adapter = FakeAdapter("marriage")
    record = sdk.fetch_record(adapter, SUBJECT, ["spouse_name", "spouse_name"])
    assert present_paths(record.marriage) == {"spouse_name"}
    assert adapter.calls == [(SUBJECT, ("spouse_name",))]


@pytest.mark.parametrize(
    ("subject", "fields", "reason"),
    [
        ("33082519800102001", ["spouse_name"], "BAD_SUBJECT_ID"),  # 17 characters
        (SUBJECT[:-1] + ("0" if SUBJECT[-1] != "0" else "1"), ["spouse_name"], "BAD_SUBJECT_ID"),
        (SUBJECT, ["spouse_name", "income"], "UNKNOWN_FIELD"),
    ],
)
def test_fetch_record_rejects_before_calling_the_adapter(
    subject: str, fields: list[str], reason: str
) -> None:
    adapter = FakeAdapter("marriage")
    with pytest.raises(sdk.InvalidRequest) as caught:
        sdk.fetch_record(adapter, subject, fields)
    assert caught.value.reason == reason
    assert adapter.calls == []


def test_record_not_found_is_not_found() -> None:
    adapter = FakeAdapter("marriage", error=sdk.RecordNotFound())
    with pytest.raises(sdk.RecordNotFound) as caught:
        sdk.fetch_record(adapter, SUBJECT, ["marital_status"])
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.reason == "SUBJECT_NOT_FOUND"


# -- AdapterService over gRPC, in-process ----------------------------------------------------


def reason_of(error: grpc.RpcError) -> str | None:
    status: status_pb2.Status | None = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no rich status"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert info.domain == sdk.DOMAIN
            return info.reason
    return None


async def fetch(
    adapters: Sequence[sdk.Adapter], request: adapter_pb2.FetchRequest
) -> adapter_pb2.FetchResponse | grpc.aio.AioRpcError:
    server, port = await sdk.serve(adapters, verifier=None)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = adapter_pb2_grpc.DepartmentAdapterStub(channel)
            try:
                response: adapter_pb2.FetchResponse = await stub.Fetch(request, timeout=10)
            except grpc.aio.AioRpcError as error:
                return error
            return response
    finally:
        await server.stop(None)


def request(
    record_type: str = "marriage", subject: str = SUBJECT, fields: Sequence[str] = ()
) -> Any:
    return adapter_pb2.FetchRequest(
        record_type=record_type, subject_id=subject, fields=list(fields), decision_id="dec-42"
    )


def test_service_returns_the_filtered_record_with_as_of_department_and_subject(
    run: Callable,
) -> None:
    before = dt.datetime.now(dt.UTC)
    adapters = [FakeAdapter("marriage"), FakeAdapter("household")]
    response = run(fetch(adapters, request("household", fields=["name", "members"])))
    assert isinstance(response, adapter_pb2.FetchResponse)
    assert response.department == "test_department"
    assert response.subject_id == SUBJECT  # echoed: the broker binds the record to it
    assert present_paths(response.record.household) == {"name", "members"}
    assert response.record.household.members[0].resident_id == SPOUSE
    as_of = response.as_of.ToDatetime(tzinfo=dt.UTC)
    assert before - dt.timedelta(seconds=1) <= as_of <= dt.datetime.now(dt.UTC)


@pytest.mark.parametrize(
    ("req", "code", "reason"),
    [
        (request("property"), grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_RECORD_TYPE"),
        (request("nonsense"), grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_RECORD_TYPE"),
        (request(fields=["income"]), grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_FIELD"),
        (request(subject="not-an-id"), grpc.StatusCode.INVALID_ARGUMENT, "BAD_SUBJECT_ID"),
    ],
)
def test_service_rejects_invalid_requests(
    run: Callable, req: Any, code: grpc.StatusCode, reason: str
) -> None:
    adapter = FakeAdapter("marriage")
    error = run(fetch([adapter], req))
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == code
    assert reason_of(error) == reason
    assert adapter.calls == []


def test_service_reports_unknown_citizen_as_not_found(run: Callable) -> None:
    error = run(fetch([FakeAdapter("marriage", error=sdk.RecordNotFound())], request()))
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(error) == "SUBJECT_NOT_FOUND"


def test_service_hides_unexpected_errors_and_logs_no_contents(
    run: Callable, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="certbroker.adapters.sdk")
    broken = FakeAdapter("marriage", error=RuntimeError("row for 李娜 is corrupt"))
    error = run(fetch([broken], request(fields=["spouse_name"])))
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error"
    assert reason_of(error) == "INTERNAL"
    ok = run(fetch([FakeAdapter("marriage")], request(fields=["spouse_name"])))
    assert ok.record.marriage.spouse_name == "李娜"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged.count("decision_id='dec-42'") == 2
    assert "outcome=INTERNAL error=RuntimeError" in logged
    for secret in ("李娜", SUBJECT, SPOUSE):
        assert secret not in logged


def test_service_needs_distinct_known_record_types() -> None:
    with pytest.raises(ValueError, match="two adapters"):
        sdk.AdapterService([FakeAdapter("marriage"), FakeAdapter("marriage")], verifier=None)
    odd = FakeAdapter("household")
    odd.record_type = "vehicle"
    with pytest.raises(ValueError, match="unknown record type"):
        sdk.AdapterService([odd], verifier=None)
    with pytest.raises(ValueError, match="no adapters"):
        sdk.AdapterService([], verifier=None)
