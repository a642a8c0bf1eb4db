"""The adapter SDK: what a department writes (an :class:`Adapter`) and what it gets for free.

A department implements one small class per record type it serves: ``fetch(subject_id,
fields)`` returns a plain dict shaped like the record message (protobuf JSON field names, e.g.
``{"name": "王伟", "members": [{"name": ...}]}``) and raises :class:`RecordNotFound` for a citizen
it does not know. It may return more than was asked: the SDK turns the dict into the typed
message and drops every field that was not asked for (:func:`to_record`), so no adapter can leak
a field the broker's decision did not allow.

The same adapter object then runs either in the broker's process (:func:`fetch_record`) or as the
department's own gRPC server (:class:`AdapterService`, :func:`serve`), which adds request
validation, rich error statuses, ``as_of``/``department`` and the standard health service.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import grpc
from google.protobuf import any_pb2, json_format, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from certbroker import fields as record_fields
from certbroker import resident_id
from certbroker.v1 import adapter_pb2, adapter_pb2_grpc, records_pb2

log = logging.getLogger(__name__)

#: ErrorInfo domain of every error an adapter reports; the reasons are part of the contract.
DOMAIN = "certbroker"
#: Full name of the DepartmentAdapter service, as registered with the health service.
SERVICE_NAME: str = adapter_pb2.DESCRIPTOR.services_by_name["DepartmentAdapter"].full_name


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


def check_fields(record_type: str, fields: Iterable[str]) -> tuple[str, ...]:
    """The requested field paths, de-duplicated; raises :class:`InvalidRequest` on an unknown
    record type or field."""
    if record_type not in record_fields.RECORD_TYPES:
        raise InvalidRequest("UNKNOWN_RECORD_TYPE", f"unknown record type {record_type!r}")
    known = set(record_fields.field_paths(record_type))
    wanted = tuple(dict.fromkeys(fields))
    unknown = [f for f in wanted if f not in known]
    if unknown:
        raise InvalidRequest("UNKNOWN_FIELD", f"unknown {record_type} field(s): {unknown}")
    return wanted


def to_record(
    record_type: str, data: Mapping[str, Any], fields: Sequence[str]
) -> records_pb2.Record:
    """The typed ``Record`` holding exactly the asked ``fields`` of ``data``.

    A field not asked for is absent whatever ``data`` holds. A scalar asked for but missing or
    ``None`` in ``data`` is present with its empty value, so a caller can tell "withheld" (absent)
    from "asked, and empty" (present, ``""``/``0``/``false``).
    """
    wanted = check_fields(record_type, fields)
    message = record_fields.RECORD_TYPES[record_type]()
    json_format.ParseDict(_without_none(data), message)
    record_fields.keep_fields(message, wanted)
    _mark_present(message, set(wanted), "")
    record = records_pb2.Record()
    case = getattr(record, record_type)
    case.SetInParent()  # an empty message is still this record type
    case.CopyFrom(message)
    return record


def _without_none(value: Any) -> Any:
    # JSON null would mean "clear" to ParseDict; adapters use None for "no value".
    if isinstance(value, Mapping):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_without_none(v) for v in value]
    return value


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
    wanted = check_fields(adapter.record_type, fields)
    return to_record(adapter.record_type, adapter.fetch(subject_id, wanted), wanted)


def rich_status(error: AdapterError, **metadata: str) -> grpc.Status:
    """The grpc status (code, message and google.rpc.Status with ErrorInfo) for an error."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata))
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=[detail])
    result: grpc.Status = rpc_status.to_status(status)
    return result


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class AdapterService(adapter_pb2_grpc.DepartmentAdapterServicer):
    """DepartmentAdapter servicer over one or more adapters, keyed by record type.

    Logs the decision ID, record type, field count and outcome of each call -- never the subject
    ID or record contents.
    """

    def __init__(
        self, adapters: Iterable[Adapter], *, clock: Callable[[], dt.datetime] = _utcnow
    ) -> None:
        self._adapters: dict[str, Adapter] = {}
        for adapter in adapters:
            if adapter.record_type not in record_fields.RECORD_TYPES:
                raise ValueError(f"unknown record type {adapter.record_type!r}")
            if adapter.record_type in self._adapters:
                raise ValueError(f"two adapters for record type {adapter.record_type!r}")
            self._adapters[adapter.record_type] = adapter
        if not self._adapters:
            raise ValueError("no adapters to serve")
        self._clock = clock

    async def Fetch(
        self,
        request: adapter_pb2.FetchRequest,
        context: grpc.aio.ServicerContext[adapter_pb2.FetchRequest, adapter_pb2.FetchResponse],
    ) -> adapter_pb2.FetchResponse:
        """Validate the request, fetch the record in a worker thread, stamp as_of/department."""
        adapter = self._adapters.get(request.record_type)
        error: AdapterError | None = None
        unexpected = ""
        try:
            if adapter is None:
                raise InvalidRequest(
                    "UNKNOWN_RECORD_TYPE", f"record type {request.record_type!r} is not served here"
                )
            # The adapter's look-up is blocking (sqlite); keep the event loop free.
            record = await asyncio.to_thread(
                fetch_record, adapter, request.subject_id, list(request.fields)
            )
        except AdapterError as exc:
            error = exc
        except Exception as exc:
            # Its text may quote record contents: log the type only, the traceback at DEBUG.
            log.debug("fetch failure detail", exc_info=True)
            error, unexpected = AdapterError("INTERNAL", "internal error"), type(exc).__name__
        # One line per call. The IDs are caller-supplied: %r keeps them on the line.
        log.log(
            logging.ERROR if unexpected else logging.INFO,
            "fetch decision_id=%r record_type=%s fields=%d outcome=%s%s",
            request.decision_id,
            adapter.record_type if adapter else "?",
            len(request.fields),
            error.reason if error else "OK",
            f" error={unexpected}" if unexpected else "",
        )
        if error is None and adapter is not None:
            as_of = timestamp_pb2.Timestamp()
            as_of.FromDatetime(self._clock())
            return adapter_pb2.FetchResponse(
                record=record, as_of=as_of, department=adapter.department
            )
        assert error is not None
        department = {"department": adapter.department} if adapter else {}
        # grpc-stubs does not declare the aio context's abort_with_status (grpc does).
        await context.abort_with_status(rich_status(error, **department))  # type: ignore[attr-defined]
        raise AssertionError("abort_with_status returned")  # pragma: no cover


async def serve(
    adapters: Sequence[Adapter],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start a gRPC server with DepartmentAdapter and grpc.health.v1.Health; return it and the
    bound port (``port=0`` picks a free one). Plaintext unless ``credentials`` are given.

    Health reports SERVING for the overall server ("") and for the DepartmentAdapter service.
    Call within a running event loop; stop with ``await server.stop(grace)``.
    """
    # No SO_REUSEPORT: a second adapter on the same explicit port must fail, not share it.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    adapter_pb2_grpc.add_DepartmentAdapterServicer_to_server(AdapterService(adapters), server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # re-exported
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    await server.start()
    for name in (health.OVERALL_HEALTH, SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
