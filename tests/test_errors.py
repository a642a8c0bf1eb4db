from __future__ import annotations

import logging

import grpc
import pytest

from certbroker import errors


def test_every_error_names_its_status() -> None:
    expected = {
        errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
        errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
        errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
        errors.NotFound: grpc.StatusCode.NOT_FOUND,
        errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
        errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
        errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
        errors.Internal: grpc.StatusCode.INTERNAL,
    }
    for cls, code in expected.items():
        got, message, status = errors.to_status(cls("SOME_REASON", "human text", k="v"))
        assert got == code
        assert message == "human text"
        assert status.code == code.value[0]
        assert errors.reason_of(status) == "SOME_REASON"


def test_unknown_exception_is_generic_internal(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        code, message, status = errors.to_status(KeyError("secret-detail"))
    assert code == grpc.StatusCode.INTERNAL
    assert message == "internal error"
    assert "secret-detail" not in status.SerializeToString().decode("latin-1")
    assert errors.reason_of(status) == "INTERNAL"
    assert "KeyError" in caplog.text  # the traceback goes to the log, not to the caller
