"""The console's calls to the broker: the Audit and Admin services, with the user's token.

One ``grpc.aio`` channel for the console process; each call carries the signed-in user's own
bearer token, so the broker authorizes it and writes it to the audit log as that user's call.
A refused call becomes a :class:`BrokerRefusal` the pages show (a refusal page for
PERMISSION_DENIED, the sign-in page for UNAUTHENTICATED, the form again for INVALID_ARGUMENT).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2, status_pb2

from certbroker.v1 import admin_pb2, admin_pb2_grpc, audit_pb2, audit_pb2_grpc

#: Seconds a call may take; an export or a large page streams within it.
CALL_TIMEOUT_S = 30.0
_DETAILS_KEY = "grpc-status-details-bin"


@dataclass  # not frozen: contextlib sets __traceback__ on exceptions passing through
class BrokerRefusal(Exception):
    """The broker refused or failed a call: gRPC ``code`` name, ErrorInfo ``reason``."""

    code: str
    reason: str
    message: str
    metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code} {self.reason}: {self.message}"


def refusal(exc: grpc.RpcError) -> BrokerRefusal:
    """The broker's rich status (``google.rpc.Status`` with an ``ErrorInfo``) of a failed call."""
    reason, metadata = "", {}
    trailing: Sequence[tuple[str, Any]] = ()
    if isinstance(exc, grpc.aio.AioRpcError):
        # grpc-stubs type aio trailing metadata loosely; it is (key, value) pairs.
        trailing = cast(Sequence[tuple[str, Any]], tuple(exc.trailing_metadata() or ()))
    for key, value in trailing:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    reason, metadata = str(info.reason), dict(info.metadata)
    code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "UNKNOWN"
    details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else ""
    return BrokerRefusal(code, reason, details or "", metadata)


class BrokerClient:
    """The broker's Audit and Admin services over one channel to ``target``."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel = grpc.aio.insecure_channel(target)
        self.audit = audit_pb2_grpc.AuditStub(self._channel)
        self.admin = admin_pb2_grpc.AdminStub(self._channel)

    async def close(self) -> None:
        """Close the channel (the console is stopping)."""
        await self._channel.close(None)

    @staticmethod
    def _md(token: str) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {token}"),)

    async def unary(self, method: Any, request: Any, token: str) -> Any:
        """One unary call as the user; BrokerRefusal when refused."""
        try:
            return await method(request, metadata=self._md(token), timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise refusal(exc) from None

    async def stream(self, method: Any, request: Any, token: str) -> AsyncIterator[Any]:
        """The messages of one server-streaming call as the user; BrokerRefusal when refused."""
        try:
            async for item in method(request, metadata=self._md(token), timeout=CALL_TIMEOUT_S):
                yield item
        except grpc.aio.AioRpcError as exc:
            raise refusal(exc) from None

    async def query(
        self, request: audit_pb2.QueryRequest, token: str
    ) -> list[audit_pb2.AuditEntry]:
        """One page of the access log."""
        return [e async for e in self.stream(self.audit.Query, request, token)]

    async def export(self, first: int, last: int, token: str) -> bytes:
        """Entries ``first..last`` as an export file."""
        request = audit_pb2.ExportRequest(from_sequence=first, to_sequence=last)
        return b"".join([c.data async for c in self.stream(self.audit.Export, request, token)])

    async def overview(
        self, request: audit_pb2.OverviewRequest, token: str
    ) -> audit_pb2.OverviewResponse:
        """A hall at a glance."""
        reply: audit_pb2.OverviewResponse = await self.unary(self.audit.Overview, request, token)
        return reply

    async def controls(self, token: str) -> admin_pb2.ListControlsResponse:
        """The access controls in force."""
        reply: admin_pb2.ListControlsResponse = await self.unary(
            self.admin.ListControls, admin_pb2.ListControlsRequest(), token
        )
        return reply
