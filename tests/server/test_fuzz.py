"""A seeded fuzz run over every gRPC method of the broker, as a hostile caller would send them.

Random bytes, mutated valid requests and requests with random field values go through a
generic channel as raw bytes, with no token, a forged one or the real tokens of a clerk, an
auditor, a department and an operator. Only the outcome classes are checked: every status is
one the broker means to give (never UNKNOWN or INTERNAL), no traceback reaches the log, and
afterwards the broker is still healthy and serves a valid lookup. ``derandomize=True``: the
same calls every run, 2,000 of them in some seconds.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certbroker.cli import client
from certbroker.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    broker_pb2,
    broker_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.helpers import Env, make_config, running_env

#: The broker's own services: every ``add_*Servicer_to_server`` the server calls.
SERVICE_MODULES = ((broker_pb2, broker_pb2_grpc), (audit_pb2, audit_pb2_grpc))
SERVICE_MODULES += ((registry_pb2, registry_pb2_grpc),)
SERVICES = [
    service for pb2, _ in SERVICE_MODULES for service in pb2.DESCRIPTOR.services_by_name.values()
]
METHODS = [(f"/{s.full_name}/{m.name}", m) for s in SERVICES for m in s.methods]

#: What a hostile caller may get. Never UNKNOWN (an exception grpc caught) or INTERNAL (ours).
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
CALLS_PER_EXAMPLE = 25
EXAMPLES = 80  # 2,000 calls

CASE = "GZ20261121-000123"
STRINGS = [
    "",
    "household",
    "marriage",
    "property",
    "social_security",
    "BDC-ZY-001",
    "SB-YL-001",
    CASE,
    "GZ２０２６１１２１-０００１２３",
    "110101199003077774",
    "seller",
    "civil_affairs",
    "certbroker.v1",
    "127.0.0.1:7004",
    "holdings.address",
    "marital_status",
    "1",
    "0" * 32,
    "\x1b[2J",
    "\u202eevil",
    "a" * 300,
    "名" * 70,
]


def test_every_service_of_the_server_is_fuzzed() -> None:
    registered = {
        name.removeprefix("add_").removesuffix("Servicer_to_server")
        for _, grpc_module in SERVICE_MODULES
        for name in vars(grpc_module)
        if name.startswith("add_") and name.endswith("Servicer_to_server")
    }
    assert registered == {s.name for s in SERVICES} == {"CertificateBroker", "Audit", "Registry"}


def _field_value(field: descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    cpp = field.cpp_type
    fd = descriptor.FieldDescriptor
    if cpp == fd.CPPTYPE_STRING:
        if field.type == fd.TYPE_BYTES:
            return st.binary(max_size=24)
        return st.one_of(st.sampled_from(STRINGS), st.text(max_size=24))
    if cpp == fd.CPPTYPE_BOOL:
        return st.booleans()
    if cpp == fd.CPPTYPE_ENUM:
        return st.integers(-3, 8)  # proto3 enums are open: unknown numbers arrive too
    if cpp in (fd.CPPTYPE_DOUBLE, fd.CPPTYPE_FLOAT):
        return st.floats(width=32 if cpp == fd.CPPTYPE_FLOAT else 64)
    bits = 32 if cpp in (fd.CPPTYPE_INT32, fd.CPPTYPE_UINT32) else 64
    if cpp in (fd.CPPTYPE_UINT32, fd.CPPTYPE_UINT64):
        return st.one_of(st.integers(0, 20), st.integers(0, 2**bits - 1))
    limit = 2 ** (bits - 1)
    return st.one_of(st.integers(-3, 20), st.integers(-limit, limit - 1))


def messages(desc: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of type ``desc`` with random values in random fields (nested up to 3 deep)."""
    cls = message_factory.GetMessageClass(desc)
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in desc.fields:
        if field.message_type is not None:
            if depth >= 3 or field.message_type.GetOptions().map_entry:
                continue
            value: st.SearchStrategy[Any] = st.deferred(
                lambda f=field: messages(f.message_type, depth + 1)
            )
        else:
            value = _field_value(field, depth)
        repeated = field.is_repeated
        optional[field.name] = st.lists(value, max_size=4) if repeated else value

    def build(values: dict[str, Any]) -> Message:
        msg = cls()
        for name, value in values.items():
            field = desc.fields_by_name[name]
            target = getattr(msg, name)
            if field.message_type is not None and isinstance(value, list):
                for item in value:
                    target.add().CopyFrom(item)
            elif field.message_type is not None:
                target.CopyFrom(value)
            elif isinstance(value, list):
                target.extend(value)
            else:
                setattr(msg, name, value)
        return msg

    return st.fixed_dictionaries({}, optional=optional).map(build)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes flipped, inserted, deleted or cut off."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, len(out)))
        if op == "flip" and out:
            out[min(at, len(out) - 1)] ^= draw(st.integers(1, 255))
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 4))]
        else:
            del out[at:]
    return bytes(out)


def valid_requests(couple: tuple[str, str]) -> dict[str, Message]:
    """One well-formed request per method, the seeds of the mutations."""
    subject = couple[0]
    return {
        "Lookup": client.lookup_request("household", subject, "BDC-ZY-001", CASE),
        "ListMatters": broker_pb2.ListMattersRequest(),
        "DescribeRecordType": broker_pb2.DescribeRecordTypeRequest(record_type="housing_fund"),
        "LookupMatter": client.lookup_matter_request("BDC-ZY-001", CASE, [(subject, "seller")]),
        "Query": audit_pb2.QueryRequest(clerk="clerk-001", page_size=5),
        "CitizenReport": audit_pb2.CitizenReportRequest(subject_id=subject),
        "Anomalies": audit_pb2.AnomaliesRequest(),
        "GetCheckpoint": audit_pb2.GetCheckpointRequest(fresh=True),
        "GetInclusionProof": audit_pb2.InclusionProofRequest(sequence=1),
        "GetConsistencyProof": audit_pb2.ConsistencyProofRequest(old_size=1),
        "Export": audit_pb2.ExportRequest(from_sequence=1, to_sequence=2),
        "Overview": audit_pb2.OverviewRequest(office="gz-haizhu-24h-01"),
        "ReviewFinding": audit_pb2.ReviewFindingRequest(
            finding_id="0123456789abcdef", rule="NO_CASE_NUMBER", note="checked"
        ),
        "GetEvidenceKeys": audit_pb2.GetEvidenceKeysRequest(),
        "Register": registry_pb2.RegisterRequest(
            department="civil_affairs",
            record_types=["marriage"],
            endpoint="127.0.0.1:7004",
            schema_version="certbroker.v1",
        ),
        "Heartbeat": registry_pb2.HeartbeatRequest(instance_id="0" * 32),
        "Deregister": registry_pb2.DeregisterRequest(instance_id="0" * 32),
        "ListAdapters": registry_pb2.ListAdaptersRequest(department="civil_affairs"),
    }


@pytest.fixture
def fuzzed(tmp_path: Path, dataset_dir: Path) -> Iterator[Env]:
    # The unauthenticated limit out of the way, so that most calls get past it.
    cfg = make_config(tmp_path, dataset_dir, unauthenticated_burst=1_000_000)
    with running_env(cfg, dataset_dir) as env:
        yield env


def call(env: Env, path: str, method: descriptor.MethodDescriptor, payload: bytes, md: Any) -> Any:
    if method.server_streaming:
        stream = env.channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        for _ in stream(payload, metadata=md, timeout=30):
            pass
        return grpc.StatusCode.OK
    unary = env.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    unary(payload, metadata=md, timeout=30)
    return grpc.StatusCode.OK


def test_fuzz_every_method(
    fuzzed: Env, couple: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    env = fuzzed
    assert {m.name for _, m in METHODS} == set(valid_requests(couple))
    seeds = {name: msg.SerializeToString() for name, msg in valid_requests(couple).items()}
    clerk = env.token()
    metadata = [
        None,
        env.md(clerk),
        env.md(env.token(roles=("auditor",), sub="aud-1")),
        env.md(env.idp.issue_department("civil_affairs")),
        env.md(env.idp.issue_operator("ops-1")),
        env.md(clerk[:-8] + "AAAAAAAA"),
        env.md("not-a-jwt"),
        (("authorization", "Bearer " + "A" * 9000),),
    ]
    payloads = {
        name: st.one_of(
            st.binary(max_size=64),
            st.just(seed),
            mutated(seed),
            requests.map(lambda m: m.SerializeToString()),
            requests.map(lambda m: m.SerializeToString()).flatmap(mutated),
        )
        for name, seed in seeds.items()
        for requests in [messages(next(m for _, m in METHODS if m.name == name).input_type)]
    }
    seen: Counter[tuple[str, str]] = Counter()
    unexpected: list[str] = []

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        for _ in range(CALLS_PER_EXAMPLE):
            path, method = data.draw(st.sampled_from(METHODS))
            payload = data.draw(payloads[method.name])
            md = data.draw(st.sampled_from(metadata))
            try:
                code = call(env, path, method, payload, md)
            except grpc.RpcError as exc:
                code = exc.code()
            seen[(method.name, code.name)] += 1
            if code not in EXPECTED:
                unexpected.append(f"{path} {code.name} {payload!r:.80}")

    with caplog.at_level(logging.DEBUG):
        run()
    assert unexpected == [], unexpected[:10]
    assert sum(seen.values()) >= EXAMPLES * CALLS_PER_EXAMPLE
    assert {name for name, _ in seen} == {m.name for _, m in METHODS}  # every method was called
    assert "Traceback" not in caplog.text
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    # Still alive, and still serving clerks.
    health = health_pb2_grpc.HealthStub(env.channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    request = client.lookup_request("household", couple[0], "BDC-ZY-001", CASE)
    reply = env.stub.Lookup(request, metadata=env.md(clerk), timeout=30)
    assert reply.receipt.entry_id
