"""The department's gRPC server: DepartmentAdapter over adapters, health, TLS.

:class:`AdapterService` turns a call into: decision token check (when a verifier is configured),
request validation, the adapter's blocking ``fetch`` in a worker thread, field filtering,
``as_of``/``department``, the ``subject_id`` echo the broker requires, a rich error status, one
log line and metrics.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from certbroker.adapters.sdk.core import (
    Adapter,
    AdapterError,
    InvalidRequest,
    fetch_record,
    rich_status,
    schema_of,
)
from certbroker.adapters.sdk.metrics import AdapterMetrics
from certbroker.adapters.sdk.token import (
    DecisionTokenInvalid,
    DecisionTokenVerifier,
    token_from_metadata,
)
from certbroker.contract import fields as record_fields
from certbroker.v1 import adapter_pb2, adapter_pb2_grpc, records_pb2

log = logging.getLogger("certbroker.adapters.sdk")

#: Full name of the DepartmentAdapter service, as registered with the health service.
SERVICE_NAME: str = adapter_pb2.DESCRIPTOR.services_by_name["DepartmentAdapter"].full_name


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class AdapterService(adapter_pb2_grpc.DepartmentAdapterServicer):
    """DepartmentAdapter servicer over one or more adapters, keyed by record type.

    With a ``verifier``, every call must carry a decision token covering it (see
    :mod:`certbroker.adapters.sdk.token`); ``None`` turns the check off (development only).
    ``delay_s`` adds
    latency to each fetch (demos, tests, benchmarks). Logs the decision ID, record type, field
    count and outcome of each call -- never the subject ID or record contents.
    """

    def __init__(
        self,
        adapters: Iterable[Adapter],
        *,
        verifier: DecisionTokenVerifier | None,
        metrics: AdapterMetrics | None = None,
        delay_s: float = 0.0,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self._adapters: dict[str, Adapter] = {}
        for adapter in adapters:
            if adapter.record_type not in record_fields.RECORD_TYPES and schema_of(adapter) is None:
                raise ValueError(
                    f"unknown record type {adapter.record_type!r} (a catalogue-declared type's "
                    "adapter needs its schema)"
                )
            if adapter.record_type in self._adapters:
                raise ValueError(f"two adapters for record type {adapter.record_type!r}")
            self._adapters[adapter.record_type] = adapter
        if not self._adapters:
            raise ValueError("no adapters to serve")
        if delay_s < 0:
            raise ValueError("delay_s must not be negative")
        self._departments = frozenset(a.department for a in self._adapters.values())
        self._verifier = verifier
        self._metrics = metrics
        self._delay_s = delay_s
        self._clock = clock

    @property
    def record_types(self) -> tuple[str, ...]:
        """The record types served, sorted."""
        return tuple(sorted(self._adapters))

    async def Fetch(
        self,
        request: adapter_pb2.FetchRequest,
        context: grpc.aio.ServicerContext[adapter_pb2.FetchRequest, adapter_pb2.FetchResponse],
    ) -> adapter_pb2.FetchResponse:
        """Check the decision token and the request, fetch the record in a worker thread,
        stamp as_of/department and echo the subject_id."""
        started = time.perf_counter()
        adapter = self._adapters.get(request.record_type)
        error: AdapterError | None = None
        unexpected = ""
        decision_id = request.decision_id
        try:
            record = await self._fetch(request, adapter, context)
        except AdapterError as exc:
            error = exc
        except Exception as exc:
            # Its text may quote record contents: log the type only, the traceback at DEBUG.
            log.debug("fetch failure detail", exc_info=True)
            error, unexpected = AdapterError("INTERNAL", "internal error"), type(exc).__name__
        record_type = adapter.record_type if adapter else "unknown"
        outcome = error.reason if error else "OK"
        # One line per call. The IDs are caller-supplied: %r keeps them on the line.
        log.log(
            logging.ERROR if unexpected else logging.INFO,
            "fetch decision_id=%r record_type=%s fields=%d outcome=%s%s%s",
            decision_id,
            record_type,
            len(request.fields),
            outcome,
            f" error={unexpected}" if unexpected else "",
            f" detail={error.message!r}" if error and error.reason.startswith("DECISION") else "",
        )
        if self._metrics is not None:
            self._metrics.fetches.labels(record_type, outcome).inc()
            self._metrics.fetch_latency.labels(record_type).observe(time.perf_counter() - started)
        if error is None and adapter is not None:
            as_of = timestamp_pb2.Timestamp()
            as_of.FromDatetime(self._clock())
            # subject_id echoed: the broker refuses a record not bound to the citizen it asked
            # about (a response without the echo included).
            return adapter_pb2.FetchResponse(
                record=record,
                as_of=as_of,
                department=adapter.department,
                subject_id=request.subject_id,
            )
        assert error is not None
        department = {"department": adapter.department} if adapter else {}
        # grpc-stubs does not declare the aio context's abort_with_status (grpc does).
        await context.abort_with_status(rich_status(error, **department))  # type: ignore[attr-defined]
        raise AssertionError("abort_with_status returned")  # pragma: no cover

    async def _fetch(
        self,
        request: adapter_pb2.FetchRequest,
        adapter: Adapter | None,
        context: grpc.aio.ServicerContext[adapter_pb2.FetchRequest, adapter_pb2.FetchResponse],
    ) -> records_pb2.Record:
        fields = list(request.fields)
        if self._verifier is not None:
            # Authenticate before looking at the request: an unauthorised caller learns nothing,
            # not even which record types are served here.
            # At run time the aio servicer context hands over a tuple of (key, value) pairs.
            metadata = cast(Sequence[tuple[str, str | bytes]], context.invocation_metadata() or ())
            token = token_from_metadata(metadata)
            decision = self._verifier.verify(token, request, self._departments)
            if adapter is not None and decision.department != adapter.department:
                raise DecisionTokenInvalid("decision token is for another department")
            # The verifier checked request.fields ⊆ the token's fields; filtering to the token's
            # fields once more keeps that true even if the check above ever changes.
            fields = [f for f in fields if f in decision.fields]
        if adapter is None:
            raise InvalidRequest(
                "UNKNOWN_RECORD_TYPE", f"record type {request.record_type!r} is not served here"
            )
        if self._delay_s:
            await asyncio.sleep(self._delay_s)
        # The adapter's look-up is blocking (a database); keep the event loop free.
        return await asyncio.to_thread(fetch_record, adapter, request.subject_id, fields)


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with ``client_ca``, clients must present a certificate it
    signed (mutual TLS). The files are checked here -- gRPC would only say "failed to bind" --
    and ``ValueError`` names the file at fault."""
    cert_pem, key_pem = _read(cert), _read(key)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ValueError(f"{cert}: not a PEM certificate chain") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):  # TypeError: the key is encrypted
        raise ValueError(f"{key}: not an unencrypted PEM private key") from None
    leaf = chain[0].public_key().public_bytes(*_SPKI)
    if private.public_key().public_bytes(*_SPKI) != leaf:
        raise ValueError(f"{key}: does not match the certificate in {cert}")
    ca_pem = None
    if client_ca is not None:
        ca_pem = _read(client_ca)
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError:
            raise ValueError(f"{client_ca}: not a PEM CA certificate") from None
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None
    )


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None


async def serve(
    adapters: Sequence[Adapter],
    *,
    verifier: DecisionTokenVerifier | None,
    host: str = "127.0.0.1",
    port: int = 0,
    credentials: grpc.ServerCredentials | None = None,
    metrics: AdapterMetrics | None = None,
    delay_s: float = 0.0,
) -> tuple[grpc.aio.Server, int]:
    """Start a gRPC server with DepartmentAdapter and grpc.health.v1.Health; return it and the
    bound port (``port=0`` picks a free one). Plaintext unless ``credentials`` are given.

    ``verifier`` is required on purpose: pass ``None`` to serve without decision tokens
    (development only). Health reports SERVING for the overall server ("") and for the
    DepartmentAdapter service. Call within a running event loop; stop with
    ``await server.stop(grace)``.
    """
    server, bound, _health = await start_server(
        AdapterService(adapters, verifier=verifier, metrics=metrics, delay_s=delay_s),
        host=host,
        port=port,
        credentials=credentials,
    )
    return server, bound


async def start_server(
    service: AdapterService,
    *,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None,
) -> tuple[grpc.aio.Server, int, Any]:
    """Like :func:`serve` for a ready-made servicer; also returns the health servicer so the
    caller can report NOT_SERVING while it shuts down."""
    # No SO_REUSEPORT: a second adapter on the same explicit port must fail, not share it.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    adapter_pb2_grpc.add_DepartmentAdapterServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # re-exported
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    await server.start()
    await set_health(health_servicer, serving=True)
    return server, bound, health_servicer


async def set_health(health_servicer: Any, *, serving: bool) -> None:
    """Report SERVING or NOT_SERVING for the server and the DepartmentAdapter service."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in (health.OVERALL_HEALTH, SERVICE_NAME):
        await health_servicer.set(name, status)
