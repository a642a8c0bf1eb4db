"""What the broker accepts from a department adapter, whatever the adapter sends.

A registered adapter is another organisation's code. Before anything in a ``Fetch`` reply is
cached or released, :func:`accept` checks it against the contract and the request:

* it parses as a ``FetchResponse`` (``MALFORMED``); replies larger than the adapter channels
  accept are cut off by gRPC as they arrive (``REPLY_TOO_LARGE``, see
  :data:`certbroker.routing.channels.MAX_REPLY_BYTES`);
* the record is of the requested type (``WRONG_RECORD_TYPE``);
* the adapter echoes the request's ``subject_id`` (``SUBJECT_MISSING``, ``SUBJECT_MISMATCH``):
  records carry no subject, so without the echo another citizen's record would be believed;
* ``as_of`` is set and a real time, not more than a day ahead (``AS_OF_MISSING``,
  ``AS_OF_INVALID``);
* the record is within its record type's :class:`~certbroker.policy.RecordLimits`
  (``RECORD_TOO_LARGE``, ``STRING_TOO_LONG``, ``TOO_MANY_ITEMS``, naming the field path);
* fields the broker's contract does not know (an adapter on a newer schema, or one smuggling
  data) are dropped, in nested messages too;
* a record of a catalogue-declared type (``Record.generic``) holds only fields its catalogue
  schema declares, each of its declared type and a valid value of it (``UNDECLARED_FIELD``,
  ``DUPLICATE_FIELD``, ``WRONG_TYPE``, ``BAD_VALUE``; :func:`certbroker.contract.generic.check`).

A reply that fails is :func:`bad_response`: UNAVAILABLE ``ADAPTER_BAD_RESPONSE`` naming the
department and the ``problem`` (and ``field``), which counts against the department's circuit
breaker like any other failure.

An adapter's *error* text is not the broker's either: :func:`forwarded_reason` passes on only a
reason of the contract (:data:`certbroker.contract.reasons.ADAPTER_REASONS`), and
:func:`for_log` makes the rest safe to log.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from certbroker import errors
from certbroker.contract import fields as record_fields
from certbroker.contract import generic
from certbroker.contract.reasons import ADAPTER_REASONS
from certbroker.policy import RecordLimits
from certbroker.v1 import adapter_pb2, records_pb2

__all__ = [
    "AS_OF_MAX_AHEAD",
    "LOG_TEXT_LIMIT",
    "BadReply",
    "accept",
    "bad_response",
    "check_record",
    "for_log",
    "forwarded_reason",
    "parse",
]

#: How far ahead of the broker's clock an ``as_of`` may be: clocks drift, but not by a day.
AS_OF_MAX_AHEAD = dt.timedelta(days=1)
#: Characters of an adapter's text the broker logs (the rest is cut).
LOG_TEXT_LIMIT = 200

_STRINGS = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)


class BadReply(Exception):
    """A reply the broker refuses: ``problem`` says why, ``field`` where (a field path)."""

    def __init__(self, problem: str, field: str = "") -> None:
        super().__init__(f"{problem} ({field})" if field else problem)
        self.problem = problem
        self.field = field


def bad_response(department: str, bad: BadReply) -> errors.Unavailable:
    """UNAVAILABLE ``ADAPTER_BAD_RESPONSE`` for ``department``'s reply that failed ``bad``."""
    where = {"field": bad.field} if bad.field else {}
    return errors.Unavailable(
        "ADAPTER_BAD_RESPONSE",
        f"department {department} answered with a response the broker refuses ({bad})",
        department=department,
        problem=bad.problem,
        **where,
    )


def parse(data: bytes) -> adapter_pb2.FetchResponse:
    """The reply's bytes as a ``FetchResponse``; :class:`BadReply` ``MALFORMED`` if they are not
    one (a truncated or garbage message, invalid UTF-8 in a string, too deep a nesting)."""
    try:
        return adapter_pb2.FetchResponse.FromString(data)
    except (DecodeError, RecursionError, ValueError):
        raise BadReply("MALFORMED") from None


def accept(
    reply: adapter_pb2.FetchResponse,
    *,
    record_type: str,
    subject_id: str,
    limits: RecordLimits,
    now: dt.datetime | None = None,
    schema: generic.RecordSchema | None = None,
) -> tuple[records_pb2.Record, dt.datetime]:
    """The reply's record (unknown fields dropped) and ``as_of``, if it answers the request
    within ``limits``; else :class:`BadReply` (see the module docstring). ``now`` (aware)
    defaults to the current time; ``schema`` is the catalogue's of a declared record type."""
    record = reply.record
    if record_fields.record_type_of(record) != record_type:
        raise BadReply("WRONG_RECORD_TYPE")
    if not reply.subject_id:
        raise BadReply("SUBJECT_MISSING")
    if reply.subject_id != subject_id:
        raise BadReply("SUBJECT_MISMATCH")
    if not reply.HasField("as_of"):
        raise BadReply("AS_OF_MISSING")
    try:
        as_of = reply.as_of.ToDatetime(dt.UTC)
    except (ValueError, OverflowError, OSError):  # seconds or nanos out of Timestamp's range
        raise BadReply("AS_OF_INVALID") from None
    if as_of > (now or dt.datetime.now(dt.UTC)) + AS_OF_MAX_AHEAD:
        raise BadReply("AS_OF_INVALID")
    check_record(record, record_type, limits, schema)
    record.DiscardUnknownFields()  # recursive: nested messages' unknown fields go too
    return record, as_of


def check_record(
    record: records_pb2.Record,
    record_type: str,
    limits: RecordLimits,
    schema: generic.RecordSchema | None = None,
) -> None:
    """Raise :class:`BadReply` unless ``record`` (as the adapter sent it, unknown fields
    included) is within ``limits``: its size, every string value and every repeated field; and,
    for a catalogue-declared type (``schema``), unless it matches its schema."""
    size = record.ByteSize()
    if size > limits.max_record_bytes:
        raise BadReply("RECORD_TOO_LARGE")
    if record.WhichOneof("record") == record_fields.GENERIC_CASE or schema is not None:
        if schema is None or record.WhichOneof("record") != record_fields.GENERIC_CASE:
            raise BadReply("WRONG_RECORD_TYPE")  # a typed record type sent as generic, or back
        try:
            generic.check(
                record.generic,
                schema,
                max_string_chars=limits.max_string_chars,
                max_repeated=limits.max_repeated,
            )
        except generic.SchemaViolation as bad:
            raise BadReply(bad.problem, bad.path) from None
        return
    # A string of N characters takes at least N bytes on the wire, an item of a repeated field
    # at least one: a record smaller than a limit cannot break it. Typical records are a few
    # hundred bytes, so usually only the repeated fields are counted (from the descriptors,
    # without walking every value: a full walk cost tens of microseconds a record).
    inner = getattr(record, record_type)
    if size > limits.max_string_chars:
        _check_all(inner, limits, "")
    elif size > limits.max_repeated:
        _check_counts(inner, _shape(inner.DESCRIPTOR), limits.max_repeated, "")


@dataclass(frozen=True)
class _Shape:
    """Where a message type's repeated fields are: its own, and its nested messages' ones."""

    repeated: tuple[tuple[str, _Shape | None], ...]  # (name, the items' shape if messages)
    nested: tuple[tuple[str, _Shape], ...]  # singular message fields holding repeated fields

    def __bool__(self) -> bool:
        return bool(self.repeated or self.nested)


@functools.cache
def _shape(desc: Descriptor) -> _Shape:
    repeated: list[tuple[str, _Shape | None]] = []
    nested: list[tuple[str, _Shape]] = []
    for field in desc.fields:
        sub = _shape(field.message_type) if field.message_type is not None else None
        if field.is_repeated:
            repeated.append((field.name, sub or None))
        elif sub:
            nested.append((field.name, sub))
    return _Shape(tuple(repeated), tuple(nested))


def _check_counts(message: Message, shape: _Shape, most: int, prefix: str) -> None:
    for name, items in shape.repeated:
        values = getattr(message, name)
        if len(values) > most:
            raise BadReply("TOO_MANY_ITEMS", prefix + name)
        if items is not None:
            for item in values:
                _check_counts(item, items, most, f"{prefix}{name}.")
    for name, sub in shape.nested:
        if message.HasField(name):
            _check_counts(getattr(message, name), sub, most, f"{prefix}{name}.")


def _check_all(message: Message, limits: RecordLimits, prefix: str) -> None:
    # Every value that is set (unknown fields are not listed here).
    most = limits.max_string_chars
    for field, value in message.ListFields():
        kind = field.type
        if field.is_repeated:
            if len(value) > limits.max_repeated:
                raise BadReply("TOO_MANY_ITEMS", prefix + field.name)
            if kind == FieldDescriptor.TYPE_MESSAGE:
                for item in value:
                    _check_all(item, limits, f"{prefix}{field.name}.")
            elif kind in _STRINGS and max(map(len, value), default=0) > most:
                raise BadReply("STRING_TOO_LONG", prefix + field.name)
        elif kind == FieldDescriptor.TYPE_MESSAGE:
            _check_all(value, limits, f"{prefix}{field.name}.")
        elif kind in _STRINGS and len(value) > most:
            raise BadReply("STRING_TOO_LONG", prefix + field.name)


def forwarded_reason(reason: str) -> str | None:
    """``reason`` if it is one of the contract's adapter reasons (safe to show the clerk)."""
    return reason if reason in ADAPTER_REASONS else None


# Resident-ID-like runs: 15 digits (first generation) up to 17 digits and a check character.
_ID_LIKE = re.compile(r"\d{15,17}[\dXx]?")


def for_log(text: str, limit: int = LOG_TEXT_LIMIT) -> str:
    """An adapter's text made safe for the broker's log: resident-ID-like digit runs masked,
    control and other unprintable characters escaped (one line, no terminal escapes), cut to
    ``limit`` characters (marked with "...")."""
    cut = len(text) > limit
    text = _ID_LIKE.sub(lambda m: "*" * len(m[0]), text[: limit + 18])  # a run across the cut
    escaped = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    if cut or len(escaped) > limit:
        return escaped[:limit] + "..."
    return escaped
