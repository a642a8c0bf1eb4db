"""Bytes that are not the method's request message: INVALID_ARGUMENT ``MALFORMED_REQUEST``.

Not grpc's UNKNOWN with the parser's exception class in the details, and not a traceback in the
log per call: counted per peer like every refusal of an unknown caller, logged at most once per
interval with a count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from certbroker import audit
from certbroker.cli import client
from certbroker.v1 import broker_pb2
from tests.helpers import Env, make_config, running_env

#: A field 1 (record_type, a string) of length 5 with only 2 bytes after it: truncated.
TRUNCATED = b"\x0a\x05ab"
#: A string field holding bytes that are not UTF-8 (proto3 strings must be).
NOT_UTF8 = b"\x0a\x02\xff\xfe"


def raw(env: Env, method: str) -> grpc.UnaryUnaryMultiCallable:  # type: ignore[type-arg]
    return env.channel.unary_unary(method, request_serializer=None, response_deserializer=None)


@pytest.fixture
def generous(tmp_path: Path, dataset_dir: Path) -> Iterator[Env]:
    cfg = make_config(tmp_path, dataset_dir, unauthenticated_burst=10_000)
    with running_env(cfg, dataset_dir) as env:
        yield env


@pytest.mark.parametrize("payload", [TRUNCATED, NOT_UTF8, b"\xff" * 64], ids=["cut", "utf8", "ff"])
@pytest.mark.parametrize(
    "method",
    [
        "/certbroker.v1.CertificateBroker/Lookup",
        "/certbroker.v1.CertificateBroker/LookupMatter",
        "/certbroker.v1.Audit/Query",  # server streaming
        "/certbroker.v1.Registry/Register",
    ],
)
def test_undecodable_requests_are_malformed_requests(
    generous: Env, caplog: pytest.LogCaptureFixture, method: str, payload: bytes
) -> None:
    env = generous
    call = raw(env, method)
    with caplog.at_level(logging.DEBUG), pytest.raises(grpc.RpcError) as info:
        call(payload, metadata=env.md(env.token()), timeout=30)
    err = client.call_error(info.value)
    assert (info.value.code(), err.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
    )
    assert "Error" not in err.message
    assert "Decode" not in err.message
    assert "Traceback" not in caplog.text
    assert not any(r.exc_info for r in caplog.records)


def test_many_malformed_requests_log_one_line_and_one_summary(
    generous: Env, caplog: pytest.LogCaptureFixture
) -> None:
    env = generous
    call = raw(env, "/certbroker.v1.CertificateBroker/Lookup")
    with caplog.at_level(logging.DEBUG):
        for _ in range(50):
            with pytest.raises(grpc.RpcError) as info:
                call(TRUNCATED, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert env.broker.broker is not None
        env.broker.call(env.broker.broker.refusals.flush())
    lines = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(lines) == 1
    assert "50 undecodable" in lines[0].getMessage()
    assert "Traceback" not in caplog.text
    (summary,) = audit.query(env.state_dir / "audit.sqlite", audit.QueryFilter())
    assert dict(summary.event.outcome_counts) == {"MALFORMED_REQUEST": 50}
    # The broker still answers well-formed requests.
    reply = env.stub.ListMatters(broker_pb2.ListMattersRequest(), metadata=env.md(env.token()))
    assert reply.matters


def test_malformed_requests_are_rate_limited(tmp_path: Path, dataset_dir: Path) -> None:
    cfg = make_config(
        tmp_path, dataset_dir, unauthenticated_burst=2, unauthenticated_rate_per_s=0.01
    )
    with running_env(cfg, dataset_dir) as env:
        call = raw(env, "/certbroker.v1.CertificateBroker/Lookup")
        codes = []
        for _ in range(4):
            with pytest.raises(grpc.RpcError) as info:
                call(TRUNCATED, timeout=30)
            codes.append(info.value.code())
        assert (
            codes
            == [grpc.StatusCode.INVALID_ARGUMENT] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        )
        assert client.call_error(info.value).reason == "UNAUTHENTICATED_RATE_LIMITED"
