"""A small client for counter software, the CLI and the demo: calls and readable output."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2
from grpc_status import rpc_status

from certbroker.contract import generic
from certbroker.contract.fields import GENERIC_CASE
from certbroker.errors import reason_of
from certbroker.v1 import audit_pb2, audit_pb2_grpc, broker_pb2, broker_pb2_grpc, records_pb2


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


def _consent(method: str) -> broker_pb2.ConsentMethod.ValueType:
    if not method:
        return broker_pb2.CONSENT_METHOD_UNSPECIFIED
    return broker_pb2.ConsentMethod.Value("CONSENT_METHOD_" + method.upper())


def lookup_request(
    record_type: str,
    subject_id: str,
    matter_code: str,
    case_number: str,
    consent: str = "id_card_read",
    consent_reference: str = "",
    fields: Sequence[str] = (),
) -> broker_pb2.LookupRequest:
    """A Lookup request; ``consent`` is a policy consent name ("" = none recorded)."""
    return broker_pb2.LookupRequest(
        record_type=record_type,
        subject_id=subject_id,
        matter_code=matter_code,
        case_number=case_number,
        consent=broker_pb2.Consent(method=_consent(consent), reference=consent_reference),
        fields=fields,
    )


def parse_subject(text: str) -> tuple[str, str]:
    """``"ID:relation"`` (as the CLI takes it) → ``(subject_id, relation)``."""
    subject_id, sep, relation = text.partition(":")
    if not sep or not subject_id or not relation:
        raise ValueError(f"expected RESIDENT_ID:relation, got {text!r}")
    return subject_id.strip(), relation.strip()


def lookup_matter_request(
    matter_code: str,
    case_number: str,
    subjects: Sequence[tuple[str, str]],
    consent: str = "id_card_read",
    consent_reference: str = "",
) -> broker_pb2.LookupMatterRequest:
    """A LookupMatter request; ``subjects`` are ``(resident ID, relation)`` pairs."""
    return broker_pb2.LookupMatterRequest(
        matter_code=matter_code,
        case_number=case_number,
        consent=broker_pb2.Consent(method=_consent(consent), reference=consent_reference),
        subjects=[broker_pb2.BundleSubject(subject_id=s, relation=r) for s, r in subjects],
    )


def lookup_package_request(
    package_code: str,
    case_number: str,
    subjects: Sequence[tuple[str, str]],
    consent: str = "id_card_read",
    consent_reference: str = "",
) -> broker_pb2.LookupMatterRequest:
    """A LookupMatter request for a package of matters (一件事) instead of one matter."""
    request = lookup_matter_request("", case_number, subjects, consent, consent_reference)
    request.package_code = package_code
    return request


def stub(target: str) -> tuple[grpc.Channel, broker_pb2_grpc.CertificateBrokerStub]:
    channel = grpc.insecure_channel(target)
    return channel, broker_pb2_grpc.CertificateBrokerStub(channel)


def audit_stub(target: str) -> tuple[grpc.Channel, audit_pb2_grpc.AuditStub]:
    """A channel to the broker's Audit service (auditor tokens) and its stub."""
    channel = grpc.insecure_channel(target)
    return channel, audit_pb2_grpc.AuditStub(channel)


def token_or_error(
    args: argparse.Namespace, hint: str, env: str = "CERTBROKER_TOKEN"
) -> str | None:
    """The ``--token`` or ``$env`` token; None, after an error naming both and ``hint`` (whose
    token, how to get one), when neither is set."""
    token = args.token or os.environ.get(env, "")
    if not token:
        print(f"error: pass --token or set {env} ({hint})", file=sys.stderr)
        return None
    return str(token)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def parse_time(text: str) -> datetime:
    """ISO 8601 as an auditor types it; a time without a zone is UTC. ValueError if not one."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def time_range(since: datetime | None, until: datetime | None) -> audit_pb2.TimeRange | None:
    """The Audit service's TimeRange (since inclusive, until exclusive); None if both open."""
    if since is None and until is None:
        return None
    span = audit_pb2.TimeRange()
    for name, moment in (("since", since), ("until", until)):
        if moment is not None:
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(moment)
            getattr(span, name).CopyFrom(stamp)
    return span


def record_data(
    record: records_pb2.Record, labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The record's values by field name: a typed record as protobuf JSON, a generic one
    (catalogue-declared type) with its values in their declared types as text, keys shown as
    ``label (name)`` when ``labels`` (field path → Chinese label, from DescribeRecordType)
    has them."""
    case = record.WhichOneof("record") or ""
    if not case:
        return {}
    if case == GENERIC_CASE:
        return _labelled(generic.to_dict(record.generic), labels or {}, "")
    data: dict[str, Any] = json_format.MessageToDict(
        getattr(record, case), preserving_proto_field_name=True
    )
    return data


def _labelled(data: Mapping[str, Any], labels: Mapping[str, str], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in data.items():
        path = prefix + name
        key = f"{labels[path]} ({name})" if labels.get(path) else name
        value = raw
        if isinstance(raw, dict):
            value = _labelled(raw, labels, path + ".")
        elif isinstance(raw, list):
            value = [_labelled(v, labels, path + ".") for v in raw]
        elif isinstance(raw, bool):
            value = "是" if raw else "否"
        elif isinstance(raw, datetime):
            value = f"{raw:%Y-%m-%d %H:%M:%S} UTC"
        elif raw is None:
            value = "（无）"
        out[key] = value
    return out


def labels_of(reply: broker_pb2.DescribeRecordTypeResponse) -> dict[str, str]:
    """Field path → label of every field DescribeRecordType described."""
    out: dict[str, str] = {}
    todo = [f for rt in reply.record_types for f in rt.fields]
    while todo:
        field = todo.pop()
        out[field.path] = field.label
        todo.extend(field.fields)
    return out


def record_lines(
    response: broker_pb2.LookupResponse, labels: Mapping[str, str] | None = None
) -> list[str]:
    """The record, one `field: value` line each, then what was withheld and the receipt."""
    data = record_data(response.record, labels)
    lines = []
    for name, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"  {name}:")
            for item in value:
                lines.append("    - " + ", ".join(f"{k}={v}" for k, v in item.items()))
        elif isinstance(value, dict):
            lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
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


def _summary(response: broker_pb2.LookupResponse, limit: int = 2) -> str:
    """A few released values of the record, on one line (lists shown as counts)."""
    if not response.record.WhichOneof("record"):
        return "(empty record)"
    data = record_data(response.record)
    if not data:
        return "(nothing on record)"
    parts = [
        f"{len(v)} {k}" if isinstance(v, list) else f"{k}={v}"
        for k, v in list(data.items())[:limit]
    ]
    more = len(data) - limit
    return ", ".join(parts) + (f", +{more} more" if more > 0 else "")


def all_items(response: broker_pb2.LookupMatterResponse) -> list[broker_pb2.BundleItem]:
    """Every item of a LookupMatter reply: its ``items``, or a package's, matter by matter."""
    return [*response.items, *(item for group in response.matters for item in group.items)]


def _item_lines(
    items: Sequence[broker_pb2.BundleItem], relation_width: int, type_width: int
) -> list[str]:
    lines = []
    for item in items:
        head = (
            f"  {item.relation:<{relation_width}}  {item.subject_id}  "
            f"{item.record_type:<{type_width}}"
        )
        if item.WhichOneof("result") == "response":
            r = item.response
            tail = f"  #{r.receipt.sequence}"
            if r.from_cache:
                tail = "  (shared)" + tail
            if r.masked_fields:
                tail = f"  (masked: {', '.join(r.masked_fields)})" + tail
            lines.append(f"{head}  OK  {_summary(r)}{tail}")
        else:
            e = item.error
            entry = e.metadata.get("audit_entry_id", "")
            lines.append(f"{head}  {e.code} {e.reason}: {e.message}  (entry {entry[:8]})")
    return lines


def bundle_lines(response: broker_pb2.LookupMatterResponse) -> list[str]:
    """One compact line per item (record summary or error), then the bundle's receipt. A
    package's items come under a heading per member matter; ``(shared)`` marks a record this
    item did not fetch itself (another member's fetch of it, or the cache)."""
    items = all_items(response)
    relation_width = max((len(i.relation) for i in items), default=0)
    type_width = max((len(i.record_type) for i in items), default=0)
    lines = _item_lines(response.items, relation_width, type_width)
    for group in response.matters:
        lines.append(f"  [{group.matter_code} {group.name}]")
        lines.extend(_item_lines(group.items, relation_width, type_width))
    what = f"package {response.package_code}, bundle" if response.package_code else "bundle"
    lines.append(
        f"  {what} {response.bundle_id}: {len(items)} items, audit receipt "
        f"#{response.receipt.sequence} sha256:{response.receipt.entry_hash[:16]}…"
    )
    return lines
