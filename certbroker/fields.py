"""Field paths of records, shared by the broker and the adapter SDK (hand-written, not generated).

A record type's fields are the paths of its message: scalars by name (``spouse_name``), fields
of repeated or nested messages with a dot (``holdings.address``). Repeated scalars and repeated
messages taken whole are plain names too (``members``). Policies, requests and adapters all speak
these paths, so this module is the one place that turns them into message operations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from certbroker.v1 import records_pb2

# Messages whose fields are addressed with a dot rather than taken whole.
_EXPANDED = {"PropertyHolding"}


def _message_type(field: FieldDescriptor) -> Descriptor:
    assert field.message_type is not None, field.full_name
    return field.message_type


def _expanded(field: FieldDescriptor) -> bool:
    """A message field whose own fields are addressed with a dot."""
    return field.type == FieldDescriptor.TYPE_MESSAGE and _message_type(field).name in _EXPANDED


#: record type name -> message class, from the ``Record`` oneof (its case names are the types).
RECORD_TYPES: dict[str, type[Message]] = {
    f.name: getattr(records_pb2, _message_type(f).name)
    for f in records_pb2.Record.DESCRIPTOR.oneofs_by_name["record"].fields
}


def _descriptor(message: Message) -> Descriptor:
    # The C (upb) and Python descriptor classes are one type at run time; the stubs differ.
    return cast(Descriptor, message.DESCRIPTOR)


def field_paths(record_type: str) -> tuple[str, ...]:
    """Every field path of a record type, in declaration order."""
    return tuple(_paths(_descriptor(RECORD_TYPES[record_type]()), ""))


def _paths(desc: Descriptor, prefix: str) -> Iterable[str]:
    for field in desc.fields:
        if _expanded(field):
            yield from _paths(_message_type(field), f"{prefix}{field.name}.")
        else:
            yield prefix + field.name


def keep_fields(message: Message, allowed: Iterable[str]) -> None:
    """Clear, in place, every field of ``message`` whose path is not in ``allowed``."""
    _keep(message, set(allowed), "")


def _keep(message: Message, allowed: set[str], prefix: str) -> None:
    for field in _descriptor(message).fields:
        path = prefix + field.name
        if _expanded(field):
            if not any(a.startswith(path + ".") for a in allowed):
                message.ClearField(field.name)
                continue
            value = getattr(message, field.name)
            items = value if field.is_repeated else [value]
            for item in items:
                _keep(item, allowed, path + ".")
        elif path not in allowed:
            message.ClearField(field.name)


#: Masks a policy may name; each maps a string value to its masked form.
MASKS: Mapping[str, Callable[[str], str]] = {
    # 110101********1234: the last four characters stay readable.
    "last4": lambda v: "*" * max(len(v) - 4, 0) + v[-4:],
    # 张** : the surname stays readable.
    "surname": lambda v: v[:1] + "*" * (len(v) - 1),
    "redact": lambda v: "***",
}


def apply_masks(message: Message, masks: Mapping[str, str]) -> None:
    """Replace, in place, each string field named in ``masks`` by its masked form."""
    for path, mask in masks.items():
        _mask(message, path.split("."), MASKS[mask])


def _mask(message: Message, parts: list[str], fn: Callable[[str], str]) -> None:
    name, rest = parts[0], parts[1:]
    field = message.DESCRIPTOR.fields_by_name[name]
    repeated = field.is_repeated
    if rest:
        for item in getattr(message, name) if repeated else [getattr(message, name)]:
            _mask(item, rest, fn)
    elif repeated:
        values = [fn(v) for v in getattr(message, name)]
        del getattr(message, name)[:]
        getattr(message, name).extend(values)
    elif message.HasField(name):
        setattr(message, name, fn(getattr(message, name)))
