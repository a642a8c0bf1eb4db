"""A small client for counter software, the CLI and the demo: calls and readable output."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import json_format
from grpc_status import rpc_status

from broker.errors import reason_of
from certbroker.v1 import broker_pb2, broker_pb2_grpc


@dataclass(frozen=True)
class CallError:
    """A failed call as the counter sees it: status, machine reason, human message."""

    code: str
    reason: str
    message: str
    metadata: dict[str, str]

    def __str__(self) -> str:
        return f"{self.code} {self.reason}: {self.message}"


def call_error(exc: grpc.RpcError) -> CallError:
    """Read the rich google.rpc.Status a broker error carries."""
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    metadata: dict[str, str] = {}
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                metadata = dict(info.metadata)
    code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return CallError(code, (reason_of(status) if status else None) or "", details or "", metadata)


def lookup_request(
    record_type: str,
    subject_id: str,
    matter_code: str,
    case_number: str,
    consent: str = "id_card_read",
    consent_reference: str = "",
    fields: Sequence[str] = (),
) -> broker_pb2.LookupRequest:
    method = (
        broker_pb2.ConsentMethod.Value("CONSENT_METHOD_" + consent.upper())
        if consent
        else broker_pb2.CONSENT_METHOD_UNSPECIFIED
    )
    return broker_pb2.LookupRequest(
        record_type=record_type,
        subject_id=subject_id,
        matter_code=matter_code,
        case_number=case_number,
        consent=broker_pb2.Consent(method=method, reference=consent_reference),
        fields=fields,
    )


def stub(target: str) -> tuple[grpc.Channel, broker_pb2_grpc.CertificateBrokerStub]:
    channel = grpc.insecure_channel(target)
    return channel, broker_pb2_grpc.CertificateBrokerStub(channel)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def record_lines(response: broker_pb2.LookupResponse) -> list[str]:
    """The record, one `field: value` line each, then what was withheld and the receipt."""
    case = response.record.WhichOneof("record") or ""
    data = (
        json_format.MessageToDict(getattr(response.record, case), preserving_proto_field_name=True)
        if case
        else {}
    )
    lines = []
    for name, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"  {name}:")
            for item in value:
                lines.append("    - " + ", ".join(f"{k}={v}" for k, v in item.items()))
        else:
            lines.append(f"  {name}: {value}")
    if response.masked_fields:
        lines.append(f"  (masked: {', '.join(response.masked_fields)})")
    if response.withheld_fields:
        lines.append(f"  (withheld by policy: {', '.join(response.withheld_fields)})")
    lines.append(
        f"  source: {response.department}, as of {response.as_of.ToDatetime():%Y-%m-%d %H:%M:%S}"
        f" UTC, rule {response.rule_id}"
    )
    lines.append(
        f"  audit receipt: #{response.receipt.sequence} {response.receipt.entry_id} "
        f"sha256:{response.receipt.entry_hash[:16]}…"
    )
    return lines
