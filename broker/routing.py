"""Routing: which source serves each record type, and the calls to it.

A ``RecordSource`` is the plug point: the in-process demo adapters (the embedded default) and
department adapters over gRPC both satisfy it. Errors from a source are translated here into
``BrokerError``s that name the department, so the servicer and the caller never see a raw
adapter failure.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from adapters import sdk
from broker import errors
from broker.config import AdapterRoute
from certbroker.v1 import adapter_pb2, adapter_pb2_grpc, records_pb2


@dataclass(frozen=True)
class Fetched:
    """A record as a source returned it."""

    record: records_pb2.Record
    as_of: dt.datetime


class RecordSource(Protocol):
    """Anything that can fetch one record type's records for the broker."""

    async def fetch(
        self,
        record_type: str,
        subject_id: str,
        fields: Sequence[str],
        decision_id: str,
        timeout_s: float,
    ) -> Fetched: ...

    async def aclose(self) -> None: ...


class InProcessSource:
    """A department adapter running inside the broker process (the embedded default)."""

    def __init__(self, adapter: sdk.Adapter, department: str) -> None:
        self._adapter = adapter
        self._department = department

    async def fetch(
        self,
        record_type: str,
        subject_id: str,
        fields: Sequence[str],
        decision_id: str,
        timeout_s: float,
    ) -> Fetched:
        try:
            # The demo adapters read SQLite: a thread keeps the event loop free.
            record = await asyncio.wait_for(
                asyncio.to_thread(sdk.fetch_record, self._adapter, subject_id, fields), timeout_s
            )
        except sdk.AdapterError as exc:
            # The SDK's errors carry the same status codes and reasons as over gRPC.
            raise errors.for_code(exc.code)(
                exc.reason, f"{self._department}: {exc.message}", department=self._department
            ) from None
        except TimeoutError:
            raise _timeout(self._department) from None
        return Fetched(record, dt.datetime.now(dt.UTC))

    async def aclose(self) -> None:
        close = getattr(self._adapter, "close", None)
        if callable(close):
            close()


class GrpcSource:
    """A department adapter reached over gRPC (``certbroker.v1.DepartmentAdapter``)."""

    def __init__(self, endpoint: str, department: str) -> None:
        self._department = department
        self._channel = grpc.aio.insecure_channel(endpoint)
        self._stub = adapter_pb2_grpc.DepartmentAdapterStub(self._channel)

    async def fetch(
        self,
        record_type: str,
        subject_id: str,
        fields: Sequence[str],
        decision_id: str,
        timeout_s: float,
    ) -> Fetched:
        request = adapter_pb2.FetchRequest(
            record_type=record_type, subject_id=subject_id, fields=fields, decision_id=decision_id
        )
        try:
            reply = await self._stub.Fetch(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc, record_type) from None
        if reply.record.WhichOneof("record") != record_type:
            raise errors.Unavailable(
                "ADAPTER_BAD_RESPONSE",
                f"{self._department} answered with the wrong record type",
                department=self._department,
            )
        return Fetched(reply.record, reply.as_of.ToDatetime(dt.UTC))

    def _translate(self, exc: grpc.aio.AioRpcError, record_type: str) -> errors.BrokerError:
        dept = self._department
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return errors.NotFound(
                "SUBJECT_NOT_FOUND",
                f"{dept} holds no {record_type} record for this citizen",
                department=dept,
            )
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return _timeout(dept)
        # Anything else is the department's problem, not the caller's input: UNAVAILABLE.
        return errors.Unavailable(
            "ADAPTER_UNAVAILABLE",
            f"department {dept} is unavailable ({exc.code().name})",
            department=dept,
            adapter_status=exc.code().name,
        )

    async def aclose(self) -> None:
        await self._channel.close(None)


def _timeout(department: str) -> errors.BrokerError:
    return errors.DeadlineExceeded(
        "ADAPTER_TIMEOUT", f"department {department} did not answer in time", department=department
    )


class Router:
    """Record type → source, built once from the configuration."""

    def __init__(self, sources: Mapping[str, RecordSource]) -> None:
        self._sources = dict(sources)

    def source(self, record_type: str) -> RecordSource:
        try:
            return self._sources[record_type]
        except KeyError:
            raise errors.Unavailable(
                "NO_ROUTE", f"no department adapter is configured for {record_type}"
            ) from None

    async def aclose(self) -> None:
        for source in self._sources.values():
            await source.aclose()


def build_router(
    routes: Mapping[str, AdapterRoute],
    departments: Mapping[str, str],
    dataset_dir: Path,
) -> Router:
    """Build sources: ``departments`` maps record type → department id (from the policy set)."""
    sources: dict[str, RecordSource] = {}
    in_process = None
    for record_type, route in routes.items():
        department = departments.get(record_type, record_type)
        if route.mode == "grpc":
            sources[record_type] = GrpcSource(route.endpoint, department)
            continue
        if in_process is None:
            from adapters import demo  # only the embedded default needs the demo datasets

            in_process = demo.build(dataset_dir)
        sources[record_type] = InProcessSource(in_process[record_type], department)
    return Router(sources)
