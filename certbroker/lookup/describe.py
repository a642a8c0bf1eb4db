"""``DescribeRecordType``: the schema of each record type, for counter software to render any
record (catalogue-declared ones included) with its Chinese labels.

A catalogue-declared type is described from its declaration (types, labels, personal data,
allowed masks, enum values, groups). A typed (contract) record type is described from the
contract's messages: its field paths, each with the closest declarable type; the catalogue
gives typed records no labels, counter software knows them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from certbroker import errors
from certbroker.contract import fields as record_fields
from certbroker.contract import generic
from certbroker.policy import PolicySet, RecordType
from certbroker.v1 import broker_pb2

__all__ = ["describe"]

_TYPED: dict[int, str] = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BOOL: "boolean",
    FieldDescriptor.TYPE_DOUBLE: "decimal",
    FieldDescriptor.TYPE_FLOAT: "decimal",
    FieldDescriptor.TYPE_MESSAGE: "repeated_group",
}


def describe(policy: PolicySet, record_type: str) -> broker_pb2.DescribeRecordTypeResponse:
    """The schema of ``record_type`` ("": every record type) under ``policy``; INVALID_ARGUMENT
    ``UNKNOWN_RECORD_TYPE`` for a name the policy does not know."""
    reply = broker_pb2.DescribeRecordTypeResponse(policy_version=policy.version)
    if record_type:
        known = policy.record_types.get(record_type)
        if known is None:
            raise errors.InvalidArgument(
                "UNKNOWN_RECORD_TYPE",
                f"unknown record type; known: {', '.join(policy.record_types)}",
            )
        chosen: Iterable[RecordType] = (known,)
    else:
        chosen = policy.record_types.values()
    for rt in chosen:
        out = reply.record_types.add(
            name=rt.name,
            label=rt.label,
            department=rt.department,
            generic=rt.schema is not None,
            cache_ttl_s=rt.cache_ttl_s,
        )
        if rt.schema is not None:
            _declared(out.fields, rt.schema.fields, "")
        else:
            _typed(out.fields, rt)
    return reply


def _declared(out: Any, specs: Iterable[generic.FieldSpec], prefix: str) -> None:
    for spec in specs:
        path = prefix + spec.name
        field = out.add(
            name=spec.name,
            path=path,
            type=spec.type,
            label=spec.label,
            personal=spec.personal,
            masks=spec.masks,
            enum_values=spec.values,
        )
        _declared(field.fields, spec.fields, path + ".")


def _typed(out: Any, rt: RecordType) -> None:
    message: Any = record_fields.RECORD_TYPES[rt.name].DESCRIPTOR
    for path in rt.fields:
        desc = message
        *parents, leaf = path.split(".")
        for parent in parents:
            desc = desc.fields_by_name[parent].message_type
        field = desc.fields_by_name[leaf]
        kind = _TYPED.get(field.type, "integer")
        out.add(
            name=leaf,
            path=path,
            type=kind,
            masks=tuple(record_fields.MASKS) if kind == "string" else (),
        )
