"""One error root for the broker; every subclass names its gRPC status.

The mapping from an exception to what the caller sees happens in exactly one place,
:func:`to_status`. A ``BrokerError`` becomes its own status code with a ``google.rpc.Status``
carrying an ``ErrorInfo`` (machine-readable ``reason``); anything else becomes INTERNAL with a
generic message, and the traceback goes to the log only.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "certbroker"
log = logging.getLogger(__name__)


class BrokerError(Exception):
    """Root of every error the broker reports to a caller.

    ``reason`` is an UPPER_SNAKE_CASE code callers can switch on; ``message`` is for humans and
    must never contain a token or record contents; ``metadata`` adds string details.
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, reason: str, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = metadata

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, {self.message!r})"


class InvalidArgument(BrokerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(BrokerError):
    code = grpc.StatusCode.UNAUTHENTICATED


class UnknownCaller(Unauthenticated):
    """UNAUTHENTICATED before any principal is known: the authenticator refused the call's
    token (``TOKEN_*``). Such refusals are not audited one by one but counted per peer and
    summarized (:mod:`certbroker.audit.refusals`); an ``Unauthenticated`` raised once the
    caller is known (a department refusing a call, say) is audited like any other error."""


class PermissionDenied(BrokerError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(BrokerError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(BrokerError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(BrokerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(BrokerError):
    """A caller went past a limit (``UNAUTHENTICATED_RATE_LIMITED``); trying later may work."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Internal(BrokerError):
    code = grpc.StatusCode.INTERNAL


def for_code(code: grpc.StatusCode) -> type[BrokerError]:
    """The BrokerError subclass that reports ``code`` (INTERNAL for codes we do not name)."""
    for cls in BrokerError.__subclasses__():
        if cls.code == code:
            return cls
    return Internal


def as_broker_error(exc: BaseException) -> BrokerError:
    """``exc`` as the caller will see it: unknown exceptions become a generic INTERNAL (and
    their traceback is logged, never sent)."""
    if isinstance(exc, BrokerError):
        return exc
    log.error("unexpected error", exc_info=exc)
    return Internal("INTERNAL", "internal error")


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str, status_pb2.Status]:
    """Map any exception to (status code, message, rich status). The one mapping point."""
    exc = as_broker_error(exc)
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    code_value = exc.code.value[0]
    status = status_pb2.Status(code=code_value, message=exc.message, details=[detail])
    return exc.code, exc.message, status


def reason_of(status: status_pb2.Status) -> str | None:
    """The ErrorInfo reason inside a rich status, for clients and tests."""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return None
