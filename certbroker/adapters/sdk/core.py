"""SDK core: what a department implements (an :class:`Adapter`) and how its dict becomes a record.

A department implements one small class per record type it serves: ``fetch(subject_id,
fields)`` returns a plain dict shaped like the record message (protobuf JSON field names, e.g.
``{"name": "王伟", "members": [{"name": ...}]}``) and raises :class:`RecordNotFound` for a citizen
it does not know. It may return more than was asked: the SDK turns the dict into the typed
message and drops every field that was not asked for (:func:`to_record`), so no adapter can leak
a field the broker's decision did not allow.

Import the public API from :mod:`certbroker.adapters.sdk`; this module is one part of it.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import grpc
from google.protobuf import any_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from certbroker.contract import fields as record_fields
from certbroker.contract import generic, resident_id
from certbroker.v1 import records_pb2

#: ErrorInfo domain of every error an adapter reports; the reasons are part of the contract.
DOMAIN = "certbroker"


class AdapterError(Exception):
    """An error reported to the caller as a gRPC status with an ErrorInfo ``reason``.

    ``message`` is for humans and never contains a subject ID or record contents.
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class InvalidRequest(AdapterError):
    """The request itself is wrong (reasons ``UNKNOWN_RECORD_TYPE``, ``UNKNOWN_FIELD``,
    ``BAD_SUBJECT_ID``); the broker should have caught it first."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class RecordNotFound(AdapterError):
    """The department has no record of this citizen (gRPC NOT_FOUND, ``SUBJECT_NOT_FOUND``)."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, message: str = "no record for this subject") -> None:
        super().__init__("SUBJECT_NOT_FOUND", message)


class Adapter(Protocol):
    """One department's source of one record type."""

    #: Department serving the records, e.g. ``"public_security"``.
    department: str
    #: Record type served, a ``Record`` oneof case name, e.g. ``"household"``.
    record_type: str

    # A catalogue-declared record type's adapter also has ``schema``, a
    # certbroker.contract.generic.RecordSchema (see schema_of): not declared here, so that the
    # adapters of the typed records need not have it.

    def fetch(self, subject_id: str, fields: Sequence[str]) -> Mapping[str, Any]:
        """The citizen's record as a dict shaped like the record message.

        ``subject_id`` is a valid resident ID and ``fields`` are known field paths (the SDK
        checked both). May return more fields than asked and ``None`` for "no value"; raises
        :class:`RecordNotFound` for an unknown citizen. Called from a worker thread.
        """
        ...


class SqliteSource:
    """A department dataset opened read-only, shareable between threads.

    One connection behind a lock rather than one per thread: look-ups take a millisecond, and
    per-thread connections of an executor would never be closed deterministically.
    """

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"dataset not found: {path}")
        # A URI so that mode=ro holds: the adapter can never modify the department's data.
        uri = path.resolve().as_uri() + "?mode=ro"
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        """All rows of a query."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def row(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Row | None:
        """The first row of a query, or None."""
        with self._lock:
            row: sqlite3.Row | None = self._conn.execute(sql, params).fetchone()
            return row

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()


def schema_of(adapter: Adapter) -> generic.RecordSchema | None:
    """The adapter's declared schema (its ``schema`` attribute) if it serves a
    catalogue-declared record type, else None; ``ValueError`` if the schema is not one of
    ``adapter.record_type`` or a typed record type has one."""
    schema = getattr(adapter, "schema", None)
    if schema is None:
        return None
    if not isinstance(schema, generic.RecordSchema) or schema.record_type != adapter.record_type:
        raise ValueError(f"{adapter.record_type}: schema is not a RecordSchema of it")
    if adapter.record_type in record_fields.RECORD_TYPES:
        raise ValueError(f"{adapter.record_type} is a typed record type: it has no schema")
    return schema


def check_fields(
    record_type: str, fields: Iterable[str], schema: generic.RecordSchema | None = None
) -> tuple[str, ...]:
    """The requested field paths, de-duplicated; raises :class:`InvalidRequest` on an unknown
    record type or field. ``schema``: that of a catalogue-declared record type."""
    if schema is not None:
        known = set(schema.paths)
    elif record_type not in record_fields.RECORD_TYPES:
        raise InvalidRequest("UNKNOWN_RECORD_TYPE", f"unknown record type {record_type!r}")
    else:
        known = set(record_fields.field_paths(record_type))
    wanted = tuple(dict.fromkeys(fields))
    unknown = [f for f in wanted if f not in known]
    if unknown:
        raise InvalidRequest("UNKNOWN_FIELD", f"unknown {record_type} field(s): {unknown}")
    return wanted


def to_record(
    record_type: str,
    data: Mapping[str, Any],
    fields: Sequence[str],
    schema: generic.RecordSchema | None = None,
) -> records_pb2.Record:
    """The typed ``Record`` holding exactly the asked ``fields`` of ``data``.

    A field not asked for is absent whatever ``data`` holds. A scalar asked for but missing or
    ``None`` in ``data`` is present with its empty value, so a caller can tell "withheld" (absent)
    from "asked, and empty" (present, ``""``/``0``/``false``). With ``schema`` (a
    catalogue-declared type), the record is ``Record.generic``, values converted to their
    declared types (:func:`certbroker.contract.generic.build`; a value asked for but missing is
    present without a value).
    """
    return _build(record_type, data, check_fields(record_type, fields, schema), schema)


def _build(
    record_type: str,
    data: Mapping[str, Any],
    wanted: Sequence[str],
    schema: generic.RecordSchema | None = None,
) -> records_pb2.Record:
    # ``wanted`` is already checked (check_fields).
    if schema is not None:
        return records_pb2.Record(generic=generic.build(schema, data, wanted))
    message = record_fields.RECORD_TYPES[record_type]()
    # json_format.ParseDict with None entries dropped, set directly for plain records.
    record_fields.from_dict(data, message)
    record_fields.keep_fields(message, wanted)
    _mark_present(message, set(wanted), "")
    record = records_pb2.Record()
    case = getattr(record, record_type)
    case.SetInParent()  # an empty message is still this record type
    case.CopyFrom(message)
    return record


def _mark_present(message: Message, wanted: set[str], prefix: str) -> None:
    for field in message.DESCRIPTOR.fields:
        path = prefix + field.name
        if field.type == FieldDescriptor.TYPE_MESSAGE and any(
            w.startswith(path + ".") for w in wanted
        ):
            # Dotted paths address the fields of each nested item (holdings.address).
            value = getattr(message, field.name)
            for item in value if field.is_repeated else [value]:
                _mark_present(item, wanted, path + ".")
        elif path in wanted and field.has_presence and not message.HasField(field.name):
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, field.name).SetInParent()
            else:
                setattr(message, field.name, field.default_value)


def fetch_record(adapter: Adapter, subject_id: str, fields: Sequence[str]) -> records_pb2.Record:
    """Validate, fetch and filter one record in-process (the broker's embedded path).

    Raises :class:`InvalidRequest` (bad subject ID, unknown field) or :class:`RecordNotFound`.
    """
    problem = resident_id.problem(subject_id)
    if problem is not None:
        raise InvalidRequest("BAD_SUBJECT_ID", f"subject_id is not a valid resident ID: {problem}")
    schema = schema_of(adapter)
    wanted = check_fields(adapter.record_type, fields, schema)
    return _build(adapter.record_type, adapter.fetch(subject_id, wanted), wanted, schema)


def rich_status(error: AdapterError, **metadata: str) -> grpc.Status:
    """The grpc status (code, message and google.rpc.Status with ErrorInfo) for an error."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata))
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=[detail])
    result: grpc.Status = rpc_status.to_status(status)
    return result
