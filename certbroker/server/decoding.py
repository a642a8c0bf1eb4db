"""Requests whose bytes are not the method's message: refused by our error mapping, not grpc's.

grpc.aio decodes a request before any handler runs; when the deserializer raises, grpc logs
the exception with its full traceback and answers UNKNOWN with the exception's class in the
details -- once per call, so a fuzzer fills the log. :func:`register` installs a servicer with
every request deserializer made tolerant: bytes that do not decode become :data:`UNDECODABLE`,
which the servicer wrapper (:func:`certbroker.server.app.guarded`) refuses as INVALID_ARGUMENT
``MALFORMED_REQUEST`` with a generic message, counted per peer like every refusal of an
unknown caller (:mod:`certbroker.audit.refusals`: rate limited, summarized, logged at most once
per interval).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeVar, cast

import grpc

__all__ = ["UNDECODABLE", "Undecodable", "register", "tolerant"]

_S = TypeVar("_S")


class Undecodable:
    """The type of :data:`UNDECODABLE`: what a request that did not decode arrives as."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNDECODABLE"


#: The request a handler gets instead of bytes that are not its message.
UNDECODABLE: Final = Undecodable()


def tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``deserializer``, returning :data:`UNDECODABLE` where it would raise."""

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - whatever the parser says, the caller sent garbage
            return UNDECODABLE

    return decode


def _tolerant_handler(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    decode = handler.request_deserializer
    if decode is None:  # raw bytes in: nothing to fail
        return handler
    decode = tolerant(decode)
    encode = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(handler.unary_unary, decode, encode)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(handler.unary_stream, decode, encode)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(handler.stream_unary, decode, encode)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(handler.stream_stream, decode, encode)
    return handler


class _TolerantGeneric:
    """A generic handler (``grpc.GenericRpcHandler``, by its ``service`` method) whose handlers
    decode tolerantly: grpc's fallback lookup, for methods not registered by name."""

    def __init__(self, inner: grpc.GenericRpcHandler[Any, Any]) -> None:
        self._inner = inner
        self._known: dict[
            str, grpc.RpcMethodHandler[Any, Any]
        ] = {}  # by method: one per RPC, bounded

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        known = self._known.get(method)
        if known is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:  # unknown methods are not remembered: callers name them
                return None
            known = self._known[method] = _tolerant_handler(handler)
        return known


class _TolerantServer:
    """What a generated ``add_*Servicer_to_server`` sees as the server: it passes every
    handler on with a tolerant request deserializer."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(
        self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        wrapped = tuple(
            cast("grpc.GenericRpcHandler[Any, Any]", _TolerantGeneric(h)) for h in handlers
        )
        self._server.add_generic_rpc_handlers(wrapped)

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        tolerant_handlers = {name: _tolerant_handler(h) for name, h in handlers.items()}
        self._server.add_registered_method_handlers(service, tolerant_handlers)  # type: ignore[attr-defined]


def register(add: Callable[[_S, Any], None], servicer: _S, server: grpc.aio.Server) -> None:
    """``add(servicer, server)`` -- a generated ``add_*Servicer_to_server`` -- with every
    request deserializer tolerant (module docstring)."""
    add(servicer, _TolerantServer(server))
