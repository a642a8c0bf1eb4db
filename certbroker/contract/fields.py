"""Field paths of records, shared by the broker and the adapter SDK (hand-written, not generated).

A record type's fields are the paths of its message: scalars by name (``spouse_name``), fields
of repeated or nested messages with a dot (``holdings.address``). Repeated scalars and repeated
messages taken whole are plain names too (``members``). Policies, requests and adapters all speak
these paths, so this module is the one place that turns them into message operations.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from certbroker.contract import generic
from certbroker.v1 import records_pb2

# Messages whose fields are addressed with a dot rather than taken whole.
_EXPANDED = {"PropertyHolding"}


def _message_type(field: FieldDescriptor) -> Descriptor:
    assert field.message_type is not None, field.full_name
    return field.message_type


def _expanded(field: FieldDescriptor) -> bool:
    """A message field whose own fields are addressed with a dot."""
    return field.type == FieldDescriptor.TYPE_MESSAGE and _message_type(field).name in _EXPANDED


#: The ``Record`` oneof case holding every catalogue-declared record type
#: (:mod:`certbroker.contract.generic`); not itself a record type.
GENERIC_CASE = "generic"

#: record type name -> message class, from the ``Record`` oneof (its case names are the types,
#: :data:`GENERIC_CASE` apart): the well-known, typed records.
RECORD_TYPES: dict[str, type[Message]] = {
    f.name: getattr(records_pb2, _message_type(f).name)
    for f in records_pb2.Record.DESCRIPTOR.oneofs_by_name["record"].fields
    if f.name != GENERIC_CASE
}


def case_of(record_type: str) -> str:
    """The ``Record`` oneof case that holds records of ``record_type``: its own name for a
    typed record, :data:`GENERIC_CASE` for a catalogue-declared one."""
    return record_type if record_type in RECORD_TYPES else GENERIC_CASE


def record_type_of(record: records_pb2.Record) -> str:
    """The record type a ``Record`` holds ("" if none): the oneof case, or the declared name
    inside a generic record."""
    case = record.WhichOneof("record")
    if case == GENERIC_CASE:
        return record.generic.record_type
    return case or ""


def _descriptor(message: Message) -> Descriptor:
    # The C (upb) and Python descriptor classes are one type at run time; the stubs differ.
    return cast(Descriptor, message.DESCRIPTOR)


@functools.cache
def field_paths(record_type: str) -> tuple[str, ...]:
    """Every field path of a record type, in declaration order."""
    return tuple(_paths(_descriptor(RECORD_TYPES[record_type]()), ""))


def _paths(desc: Descriptor, prefix: str) -> Iterable[str]:
    for field in desc.fields:
        if _expanded(field):
            yield from _paths(_message_type(field), f"{prefix}{field.name}.")
        else:
            yield prefix + field.name


@dataclass(frozen=True)
class _Plan:
    """What :func:`keep_fields` does to one message type for one set of allowed paths."""

    clear: tuple[str, ...]  # fields cleared whole
    descend: tuple[tuple[str, bool, _Plan], ...]  # (name, repeated, plan) of expanded fields


def keep_fields(message: Message, allowed: Iterable[str]) -> None:
    """Clear, in place, every field of ``message`` whose path is not in ``allowed``, and every
    field the contract does not know (unknown fields of nested messages too): no path names
    those, so none is ever allowed."""
    message.DiscardUnknownFields()  # recursive
    _apply(message, _plan(_descriptor(message), frozenset(allowed), ""))


@functools.lru_cache(maxsize=1024)
def _plan(desc: Descriptor, allowed: frozenset[str], prefix: str) -> _Plan:
    # Worked out once per (message type, allowed set): the same few sets come back on every
    # lookup (they are policy decisions), and walking descriptors costs more than clearing.
    clear: list[str] = []
    descend: list[tuple[str, bool, _Plan]] = []
    for field in desc.fields:
        path = prefix + field.name
        if _expanded(field):
            if any(a.startswith(path + ".") for a in allowed):
                sub = _plan(_message_type(field), allowed, path + ".")
                descend.append((field.name, field.is_repeated, sub))
            else:
                clear.append(field.name)
        elif path not in allowed:
            clear.append(field.name)
    return _Plan(tuple(clear), tuple(descend))


def _apply(message: Message, plan: _Plan) -> None:
    for name in plan.clear:
        message.ClearField(name)
    for name, repeated, sub in plan.descend:
        value = getattr(message, name)
        for item in value if repeated else (value,):
            _apply(item, sub)


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
        _mask(message, _split(path), MASKS[mask])


@functools.lru_cache(maxsize=1024)
def _split(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def _mask(message: Message, parts: tuple[str, ...], fn: Callable[[str], str]) -> None:
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


def keep_record(record: records_pb2.Record, allowed: Iterable[str]) -> None:
    """:func:`keep_fields` on the record a ``Record`` holds, typed or generic
    (:func:`certbroker.contract.generic.keep_fields`)."""
    case = record.WhichOneof("record")
    if case == GENERIC_CASE:
        generic.keep_fields(record.generic, allowed)
    elif case is not None:
        keep_fields(getattr(record, case), allowed)


def mask_record(record: records_pb2.Record, masks: Mapping[str, str]) -> None:
    """:func:`apply_masks` on the record a ``Record`` holds, typed or generic."""
    case = record.WhichOneof("record")
    if case == GENERIC_CASE:
        generic.apply_masks(record.generic, masks, MASKS)
    elif case is not None:
        apply_masks(getattr(record, case), masks)


# --- dicts to messages ---------------------------------------------------------------------

_SCALAR_KINDS: Mapping[int, type] = {
    FieldDescriptor.TYPE_STRING: str,
    FieldDescriptor.TYPE_BOOL: bool,
    FieldDescriptor.TYPE_DOUBLE: float,
    **{
        t: int
        for t in (
            FieldDescriptor.TYPE_INT32,
            FieldDescriptor.TYPE_INT64,
            FieldDescriptor.TYPE_UINT32,
            FieldDescriptor.TYPE_UINT64,
            FieldDescriptor.TYPE_SINT32,
            FieldDescriptor.TYPE_SINT64,
            FieldDescriptor.TYPE_FIXED32,
            FieldDescriptor.TYPE_FIXED64,
            FieldDescriptor.TYPE_SFIXED32,
            FieldDescriptor.TYPE_SFIXED64,
        )
    },
}
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Nesting beyond which the fast path hands over (json_format stops at 100).
_MAX_DEPTH = 32


class _Unsupported(Exception):
    """Something the fast path leaves to ``json_format.ParseDict``."""


def from_dict(data: Mapping[str, Any], message: Message) -> None:
    """Fill ``message`` from a dict shaped like it (field names as keys), ``None`` meaning no
    value: exactly what ``json_format.ParseDict`` does with the ``None`` entries of ``data``
    (and of the dicts in it) removed.

    Adapters return such dicts for every record they serve, and ``ParseDict`` walks the
    descriptors in Python for each one. Here each message type's fields are looked up once;
    strings, integers, doubles, booleans, messages and their repeated forms are set directly,
    checked as ``ParseDict`` checks them. Anything else (JSON names, enums, bytes, maps,
    oneofs, well-known types, a value of the wrong type, an unknown key) is handed to
    ``ParseDict`` itself, so what it accepts, rejects and raises is unchanged.
    """
    if not message.ListFields():  # the fast path assumes it starts from an empty message
        try:
            _fill(message, data, 0)
            return
        except (_Unsupported, ValueError, TypeError, OverflowError, RecursionError):
            message.Clear()
    json_format.ParseDict(_without_none(data), message)


def _fill(message: Message, data: Mapping[str, Any], depth: int) -> None:
    if type(data) is not dict or depth > _MAX_DEPTH:
        raise _Unsupported
    fields = _settable(_descriptor(message))
    for name, value in data.items():
        if value is None:
            continue
        found = fields.get(name)
        if found is None:
            raise _Unsupported
        field, kind = found
        if field.is_repeated:
            if type(value) is not list and type(value) is not tuple:
                raise _Unsupported
            message.ClearField(name)  # as ParseDict does: the list replaces what was there
            target = getattr(message, name)
            if kind is None:  # messages
                for item in value:
                    _fill(target.add(), item, depth + 1)
            else:
                target.extend([_scalar(kind, item) for item in value])
        elif kind is None:
            sub = getattr(message, name)
            sub.SetInParent()
            _fill(sub, value, depth + 1)
        else:
            setattr(message, name, _scalar(kind, value))


def _scalar(kind: type, value: Any) -> Any:
    """``value`` for a field of ``kind``, as ``ParseDict`` would take it, or _Unsupported."""
    # By exact type, not isinstance: a bool is an int, and ParseDict refuses it for numbers.
    if type(value) is not kind:
        if kind is float and type(value) is int:
            return float(value)
        raise _Unsupported
    if kind is float and not math.isfinite(cast(float, value)):
        raise _Unsupported  # ParseDict refuses unquoted NaN and infinities
    if kind is str:
        text = cast(str, value)
        if not text.isascii() and _SURROGATE.search(text):
            raise _Unsupported  # ParseDict refuses unpaired surrogates
    return value


@functools.lru_cache(maxsize=64)
def _settable(desc: Descriptor) -> Mapping[str, tuple[FieldDescriptor, type | None]]:
    """Field name → (field, scalar kind or None for a message) for the fields the fast path
    sets itself; the others are left out, so naming one hands the dict to ParseDict."""
    out: dict[str, tuple[FieldDescriptor, type | None]] = {}
    for field in desc.fields:
        oneof = field.containing_oneof
        if oneof is not None and len(oneof.fields) > 1:  # a real oneof (not proto3 optional)
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            sub = _message_type(field)
            if sub.full_name.startswith("google.protobuf.") or sub.GetOptions().map_entry:
                continue
            out[field.name] = (field, None)
        elif field.type in _SCALAR_KINDS:
            out[field.name] = (field, _SCALAR_KINDS[field.type])
    return out


def _without_none(value: Any) -> Any:
    # JSON null would mean "clear" to ParseDict; adapters use None for "no value".
    if isinstance(value, Mapping):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_without_none(v) for v in value]
    return value
