"""Catalogue-declared record types: their schema and the ``GenericRecord`` that carries them.

A record type declared in the policy catalogue alone (``credit``, ``housing_fund``, ...) has no
message of its own in the contract: its records travel as ``Record.generic``, a
:class:`~certbroker.v1.records_pb2.GenericRecord` whose values each carry their declared type.
This module is the one place that knows how such a record relates to its :class:`RecordSchema`,
for both sides:

* the adapter SDK builds one from a plain dict (:func:`build`), converting values to the
  declared types and keeping only the asked field paths;
* the broker checks what an adapter sent against the catalogue (:func:`check`: undeclared or
  duplicated fields, values of the wrong type or out of their type's range, sizes), then
  minimizes (:func:`keep_fields`) and masks (:func:`apply_masks`) exactly as it does typed
  records.

Field paths are those of the typed records: a top-level field by name (``balance``), a field of
a group, or of each item of a repeated group, with a dot (``deposits.amount``). Only leaf fields
(scalars) are field paths; a group is released through the paths inside it.
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import hashlib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from certbroker.v1 import records_pb2

#: Scalar field types and the ``FieldValue`` oneof case each is carried in.
SCALAR_CASES: Mapping[str, str] = {
    "string": "string_value",
    "integer": "integer_value",
    "decimal": "decimal_value",
    "boolean": "boolean_value",
    "date": "date_value",
    "timestamp": "timestamp_value",
    "enum": "enum_value",
}
#: Group field types and their ``FieldValue`` oneof case.
GROUP_CASES: Mapping[str, str] = {"group": "group_value", "repeated_group": "group_list_value"}
#: Every declarable field type, in documentation order.
FIELD_TYPES: tuple[str, ...] = (*SCALAR_CASES, *GROUP_CASES)
#: Types a mask may rewrite (a masked date or number would no longer be of its type).
MASKABLE_TYPES = frozenset({"string"})
#: Groups nest at most this deep (a field of a group of a group ...), so a schema stays readable
#: and a hostile reply cannot make the broker recurse far.
MAX_DEPTH = 4

#: ``[a-z][a-z0-9_]*``: field names travel in paths, policies, tokens and logs.
NAME = re.compile(r"[a-z][a-z0-9_]{0,63}", re.ASCII)
# Decimal text: no exponent, no sign but "-", at most 30 digits before and 18 after the point.
_DECIMAL = re.compile(r"-?\d{1,30}(\.\d{1,18})?", re.ASCII)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_TRUE = frozenset({"t", "true", "y", "yes", "1"})
_FALSE = frozenset({"f", "false", "n", "no", "0"})


@dataclass(frozen=True)
class FieldSpec:
    """One declared field. ``fields`` for groups only, ``values`` for enums only; ``masks`` are
    the masks a rule may apply to it, ``personal`` marks personal data (个人信息), ``label`` is
    its Chinese name for display."""

    name: str
    type: str
    label: str = ""
    personal: bool = False
    masks: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    fields: tuple[FieldSpec, ...] = ()

    @property
    def is_group(self) -> bool:
        """Whether this field holds other fields (a group or a repeated group)."""
        return self.type in GROUP_CASES

    @functools.cached_property
    def by_name(self) -> Mapping[str, FieldSpec]:
        """The group's fields by name."""
        return {f.name: f for f in self.fields}


@dataclass(frozen=True)
class RecordSchema:
    """The declared fields of one record type, in declaration order."""

    record_type: str
    fields: tuple[FieldSpec, ...]
    label: str = ""
    _root: FieldSpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_root", FieldSpec("", "group", fields=self.fields))

    @property
    def root(self) -> FieldSpec:
        """The record itself, as a group of its top-level fields."""
        return self._root

    @functools.cached_property
    def paths(self) -> tuple[str, ...]:
        """Every field path (leaf fields), in declaration order."""
        return tuple(path for path, spec in walk(self.fields) if not spec.is_group)

    @functools.cached_property
    def specs(self) -> Mapping[str, FieldSpec]:
        """Field path (groups included) → its declaration."""
        return dict(walk(self.fields))

    def shape(self) -> str:
        """The schema's structure as text, one ``path=type`` a line (labels, masks and enum
        values left out): what an adapter's own declaration must match."""
        return "\n".join(f"{path}={spec.type}" for path, spec in walk(self.fields))

    def digest(self) -> str:
        """Hex SHA-256 of :meth:`shape`: two schemas of one structure have one digest."""
        return hashlib.sha256(self.shape().encode()).hexdigest()


def walk(fields: Iterable[FieldSpec], prefix: str = "") -> Iterator[tuple[str, FieldSpec]]:
    """(path, declaration) of every field, groups before their fields, in declaration order."""
    for spec in fields:
        path = prefix + spec.name
        yield path, spec
        if spec.is_group:
            yield from walk(spec.fields, path + ".")


# --- the broker's check of what an adapter sent -------------------------------------------


class SchemaViolation(Exception):
    """A generic record that does not match its schema: ``problem`` says how, ``path`` where.

    Problems: ``UNDECLARED_FIELD``, ``DUPLICATE_FIELD``, ``WRONG_TYPE`` (a value of another type
    than declared), ``BAD_VALUE`` (of the declared type but not a value of it: a decimal that is
    not decimal text, a date that is no date, an enum value not declared, a timestamp out of
    range), ``STRING_TOO_LONG``, ``TOO_MANY_ITEMS``.
    """

    def __init__(self, problem: str, path: str = "") -> None:
        super().__init__(f"{problem} ({path})" if path else problem)
        self.problem = problem
        self.path = path


def check(
    record: records_pb2.GenericRecord,
    schema: RecordSchema,
    *,
    max_string_chars: int,
    max_repeated: int,
) -> None:
    """Raise :class:`SchemaViolation` unless every value of ``record`` is declared by ``schema``,
    of its declared type, a valid value of it, and within the limits (characters of one text
    value, items of one repeated group). Every value is looked at: a schema check, unlike the
    typed records' size check, cannot be skipped for small records."""
    _check_level(record.fields, schema.root, "", max_string_chars, max_repeated)


def _check_level(
    values: Iterable[records_pb2.FieldValue],
    group: FieldSpec,
    prefix: str,
    most_chars: int,
    most_items: int,
) -> None:
    seen: set[str] = set()
    for value in values:
        spec = group.by_name.get(value.name)
        path = prefix + value.name
        if spec is None:
            # The path of an undeclared name is the adapter's text: cut, never logged whole.
            raise SchemaViolation("UNDECLARED_FIELD", path[:100])
        if value.name in seen:
            raise SchemaViolation("DUPLICATE_FIELD", path)
        seen.add(value.name)
        case = value.WhichOneof("value")
        if case is None:
            continue  # released without a value
        if case != _case(spec):
            raise SchemaViolation("WRONG_TYPE", path)
        if spec.type == "group":
            _check_level(value.group_value.fields, spec, path + ".", most_chars, most_items)
        elif spec.type == "repeated_group":
            items = value.group_list_value.items
            if len(items) > most_items:
                raise SchemaViolation("TOO_MANY_ITEMS", path)
            for item in items:
                _check_level(item.fields, spec, path + ".", most_chars, most_items)
        elif spec.type == "timestamp":
            try:
                value.timestamp_value.ToDatetime(dt.UTC)
            except (ValueError, OverflowError, OSError):
                raise SchemaViolation("BAD_VALUE", path) from None
        elif spec.type not in ("integer", "boolean"):
            text: str = getattr(value, case)
            if len(text) > most_chars:
                raise SchemaViolation("STRING_TOO_LONG", path)
            if not _valid_text(spec, text):
                raise SchemaViolation("BAD_VALUE", path)


def _case(spec: FieldSpec) -> str:
    return SCALAR_CASES.get(spec.type) or GROUP_CASES[spec.type]


def _valid_text(spec: FieldSpec, text: str) -> bool:
    if spec.type == "decimal":
        return _DECIMAL.fullmatch(text) is not None
    if spec.type == "date":
        return _date(text) is not None
    if spec.type == "enum":
        return not spec.values or text in spec.values
    return True


def _date(text: str) -> dt.date | None:
    if _DATE.fullmatch(text) is None:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        return None


# --- minimizing and masking -----------------------------------------------------------------


def keep_fields(record: records_pb2.GenericRecord, allowed: Iterable[str]) -> None:
    """Remove, in place, every value whose field path is not in ``allowed``; a group stays (with
    only its allowed fields) when a path inside it is allowed. Unknown (protobuf) fields go too."""
    record.DiscardUnknownFields()
    _keep(record.fields, frozenset(allowed), "")


def _keep(values: Any, allowed: frozenset[str], prefix: str) -> None:
    for index in reversed(range(len(values))):
        value = values[index]
        path = prefix + value.name
        case = value.WhichOneof("value")
        inside = any(a.startswith(path + ".") for a in allowed)
        if case == "group_value" and inside:
            _keep(value.group_value.fields, allowed, path + ".")
        elif case == "group_list_value" and inside:
            for item in value.group_list_value.items:
                _keep(item.fields, allowed, path + ".")
        elif path not in allowed and not (case is None and inside):
            del values[index]


def apply_masks(
    record: records_pb2.GenericRecord, masks: Mapping[str, str], fns: Mapping[str, Any]
) -> None:
    """Replace, in place, each text value whose path is in ``masks`` by its masked form
    (``fns``: mask name → function, :data:`certbroker.contract.fields.MASKS`)."""
    for path, mask in masks.items():
        _mask(record.fields, path.split("."), fns[mask])


def _mask(values: Any, parts: Sequence[str], fn: Callable[[str], str]) -> None:
    name, rest = parts[0], parts[1:]
    for value in values:
        if value.name != name:
            continue
        case = value.WhichOneof("value")
        if rest and case == "group_value":
            _mask(value.group_value.fields, rest, fn)
        elif rest and case == "group_list_value":
            for item in value.group_list_value.items:
                _mask(item.fields, rest, fn)
        elif not rest and case == "string_value":
            value.string_value = fn(value.string_value)


# --- building a record from an adapter's dict (the SDK side) -------------------------------


class ValueTypeError(TypeError):
    """A value an adapter returned cannot be one of its field's declared type (the message names
    the field and the types, never the value)."""


def build(
    schema: RecordSchema, data: Mapping[str, Any], wanted: Sequence[str]
) -> records_pb2.GenericRecord:
    """The generic record of ``data`` (a dict shaped like the record: field names as keys,
    a dict for a group, a list of dicts for a repeated group, ``None`` for no value) holding
    exactly the ``wanted`` field paths, in declaration order. A wanted field missing from
    ``data`` is present without a value; keys not declared are ignored (never sent).

    Values are converted to their declared types (:func:`coerce`); :class:`ValueTypeError` when
    one cannot be.
    """
    record = records_pb2.GenericRecord(record_type=schema.record_type)
    _fill(record.fields, schema.root, data, frozenset(wanted), "")
    return record


def _fill(
    out: Any, group: FieldSpec, data: Mapping[str, Any], wanted: frozenset[str], prefix: str
) -> None:
    for spec in group.fields:
        path = prefix + spec.name
        raw = data.get(spec.name)
        if spec.is_group:
            if not any(w.startswith(path + ".") for w in wanted):
                continue
            value = out.add(name=spec.name)
            if raw is None:
                if spec.type == "group":
                    _fill(value.group_value.fields, spec, {}, wanted, path + ".")
                else:
                    value.group_list_value.SetInParent()
                continue
            if spec.type == "group":
                if not isinstance(raw, Mapping):
                    raise ValueTypeError(f"field {path!r}: a group needs a mapping")
                _fill(value.group_value.fields, spec, raw, wanted, path + ".")
            else:
                if not isinstance(raw, list | tuple):
                    raise ValueTypeError(f"field {path!r}: a repeated group needs a list")
                value.group_list_value.SetInParent()
                for item in raw:
                    if not isinstance(item, Mapping):
                        raise ValueTypeError(f"field {path!r}: items must be mappings")
                    _fill(value.group_list_value.items.add().fields, spec, item, wanted, path + ".")
        elif path in wanted:
            value = out.add(name=spec.name)
            if raw is not None:
                set_value(value, spec, coerce(spec, raw, path))


def set_value(value: records_pb2.FieldValue, spec: FieldSpec, converted: Any) -> None:
    """Set ``value``'s oneof case of ``spec``'s type to ``converted`` (from :func:`coerce`)."""
    if spec.type == "timestamp":
        value.timestamp_value.FromDatetime(converted)
    else:
        setattr(value, SCALAR_CASES[spec.type], converted)


def coerce(spec: FieldSpec, raw: Any, path: str = "") -> Any:
    """``raw`` as the Python value of ``spec``'s scalar type (str, int, bool, an aware
    ``datetime`` for timestamps), accepting what databases commonly return: 0/1 and yes/no text
    for booleans, integral floats and digit text for integers, numbers for decimals, ``date``
    objects or ISO text for dates, naive datetimes (taken as UTC) or ISO text for timestamps.
    Raises :class:`ValueTypeError` otherwise."""
    kind = spec.type
    got = _coerce(kind, raw)
    if got is None or (kind == "enum" and spec.values and got not in spec.values):
        what = type(raw).__name__
        raise ValueTypeError(f"field {path or spec.name!r}: a {what} cannot be a {kind} value")
    return got


def _coerce(kind: str, raw: Any) -> Any:
    if kind in ("string", "enum"):
        if isinstance(raw, str):
            return raw
        if isinstance(raw, int | decimal.Decimal) and not isinstance(raw, bool):
            return str(raw)
        return None
    if kind == "integer":
        if isinstance(raw, bool):
            return None
        if isinstance(raw, int):
            return raw if -(2**63) <= raw < 2**63 else None
        if isinstance(raw, float | decimal.Decimal) and math.isfinite(raw) and raw == int(raw):
            return int(raw)
        if isinstance(raw, str) and re.fullmatch(r"-?\d{1,18}", raw.strip(), re.ASCII):
            return int(raw)
        return None
    if kind == "decimal":
        if isinstance(raw, bool):
            return None
        if isinstance(raw, float):
            raw = decimal.Decimal(repr(raw))
        if isinstance(raw, int | decimal.Decimal):
            text = format(decimal.Decimal(raw), "f")
        elif isinstance(raw, str):
            text = raw.strip()
        else:
            return None
        return text if _DECIMAL.fullmatch(text) else None
    if kind == "boolean":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        return None
    if kind == "date":
        if isinstance(raw, dt.datetime):
            return None
        if isinstance(raw, dt.date):
            return raw.isoformat()
        if isinstance(raw, str) and _date(raw.strip()) is not None:
            return raw.strip()
        return None
    if kind == "timestamp":
        if isinstance(raw, str):
            try:
                raw = dt.datetime.fromisoformat(raw.strip())
            except ValueError:
                return None
        if isinstance(raw, dt.datetime):
            return raw if raw.tzinfo is not None else raw.replace(tzinfo=dt.UTC)
        return None
    return None


# --- reading a record (display, tests) ------------------------------------------------------


def to_dict(record: records_pb2.GenericRecord) -> dict[str, Any]:
    """The record as a dict shaped like :func:`build`'s input: text for text, decimals and
    dates, int, bool, an aware ``datetime`` for timestamps, ``None`` for no value."""
    return _level(record.fields)


def _level(values: Iterable[records_pb2.FieldValue]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for value in values:
        case = value.WhichOneof("value")
        if case is None:
            out[value.name] = None
        elif case == "group_value":
            out[value.name] = _level(value.group_value.fields)
        elif case == "group_list_value":
            out[value.name] = [_level(i.fields) for i in value.group_list_value.items]
        elif case == "timestamp_value":
            out[value.name] = value.timestamp_value.ToDatetime(dt.UTC)
        else:
            out[value.name] = getattr(value, case)
    return out
