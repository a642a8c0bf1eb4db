"""gRPC channels from the broker to adapter endpoints, and the TLS that protects them.

One channel per endpoint, reused for every call (a channel is a connection pool; making one per
call would pay a TCP and TLS handshake each time). All channels share one set of credentials:
plaintext, TLS verifying the adapters against ``[routing] tls_ca``, or mutual TLS presenting
``tls_cert``/``tls_key`` as well.

``Fetch`` is called raw: the reply arrives as bytes, at most :data:`MAX_REPLY_BYTES` of them,
and :mod:`certbroker.routing.replies` parses and checks it. (With gRPC's own deserializer a
reply that does not parse became ``None`` and an ``AttributeError`` in routing.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import cast

import grpc
from google.rpc import status_pb2

from certbroker.config import ConfigError
from certbroker.errors import reason_of
from certbroker.policy import MAX_RECORD_BYTES
from certbroker.v1 import adapter_pb2

log = logging.getLogger(__name__)

#: The DepartmentAdapter Fetch method, as it goes on the wire.
FETCH_METHOD = "/{}/Fetch".format(
    adapter_pb2.DESCRIPTOR.services_by_name["DepartmentAdapter"].full_name
)
#: Largest reply the broker reads (bytes): the largest record a catalogue may allow, with room
#: for the rest of the reply. gRPC refuses a larger one as it arrives (RESOURCE_EXHAUSTED),
#: before it is held in memory or parsed; routing reports ``ADAPTER_BAD_RESPONSE``.
MAX_REPLY_BYTES = MAX_RECORD_BYTES + 64 * 1024
#: What gRPC says when a reply is over :data:`MAX_REPLY_BYTES` (RESOURCE_EXHAUSTED).
TOO_LARGE_DETAILS = "Received message larger than max"

#: ``Fetch`` on one endpoint: a FetchRequest in, the reply's bytes out.
FetchCall = grpc.aio.UnaryUnaryMultiCallable[adapter_pb2.FetchRequest, bytes]

#: Seconds in-flight calls get when a channel to a deregistered endpoint is closed.
CLOSE_GRACE_S = 10.0
# Reconnect quickly once an adapter is back: gRPC's default backoff grows to two minutes, which
# would keep a restarted adapter out of use long after its heartbeat put it back in routing.
# (Not grpc.min_reconnect_backoff_ms: gRPC core also uses it as the connect timeout, and a
# short one turns a hung adapter into UNAVAILABLE instead of waiting out the call's deadline.)
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
)


def channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials for adapter channels: None (plaintext) without ``ca``; mutual TLS when
    ``cert`` and ``key`` are given too. ``ConfigError`` if a file cannot be read."""
    if ca is None:
        if cert is not None or key is not None:
            raise ConfigError("routing.tls_cert/tls_key need routing.tls_ca")
        return None
    if (cert is None) != (key is None):
        raise ConfigError("routing.tls_cert and routing.tls_key go together")
    try:
        root = ca.read_bytes()
        chain = cert.read_bytes() if cert is not None else None
        private = key.read_bytes() if key is not None else None
    except OSError as exc:
        raise ConfigError(f"routing TLS: cannot read {exc.filename}: {exc.strerror}") from exc
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=private, certificate_chain=chain
    )


class AdapterChannels:
    """Channels (and their raw ``Fetch`` callables) by endpoint.

    With ``keep`` (the endpoints still registered), opening a channel to a new endpoint also
    closes the channels to endpoints no longer in ``keep``, after :data:`CLOSE_GRACE_S` for
    calls in flight: adapters that come and go do not leave channels behind.
    """

    def __init__(
        self,
        credentials: grpc.ChannelCredentials | None,
        *,
        keep: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self._credentials = credentials
        self._keep = keep
        self._stubs: dict[str, tuple[grpc.aio.Channel, FetchCall]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def fetch(self, endpoint: str) -> FetchCall:
        """``Fetch`` on ``endpoint`` (a FetchRequest in, the reply's raw bytes out), opening
        its channel on first use."""
        found = self._stubs.get(endpoint)
        if found is not None:
            return found[1]
        if self._keep is not None:
            self._prune(set(self._keep()))
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
        else:
            channel = grpc.aio.secure_channel(endpoint, self._credentials, options=_CHANNEL_OPTIONS)
        call = channel.unary_unary(
            FETCH_METHOD,
            request_serializer=adapter_pb2.FetchRequest.SerializeToString,
            response_deserializer=None,  # bytes: routing.replies parses and checks them
        )
        self._stubs[endpoint] = (channel, call)
        return call

    def _prune(self, keep: set[str]) -> None:
        for endpoint in [e for e in self._stubs if e not in keep]:
            channel, _ = self._stubs.pop(endpoint)
            log.info("closing the channel to %s (no longer registered)", endpoint)
            task = asyncio.get_running_loop().create_task(channel.close(CLOSE_GRACE_S))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Close every channel now (calls in flight are cancelled)."""
        stubs, self._stubs = self._stubs, {}
        for channel, _ in stubs.values():
            await channel.close(None)
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)


def adapter_reason(exc: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of an adapter's rich status ("" if it sent none)."""
    # grpc-stubs type it as a Call's metadata; at run time it is aio Metadata, a pair sequence.
    pairs = cast(Sequence[tuple[str, str | bytes]], exc.trailing_metadata() or ())
    for key, value in pairs:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            try:
                return reason_of(status_pb2.Status.FromString(value)) or ""
            except Exception:  # noqa: BLE001 - a malformed detail is no reason
                return ""
    return ""
