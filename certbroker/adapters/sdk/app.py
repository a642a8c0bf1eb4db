"""An adapter process: the server, TLS, decision tokens, registration and metrics, wired from
command-line flags, so a department's ``main`` is one call (:func:`main`).

Flags every adapter process understands (docs/design.md, "Adapter process flags")::

    [--host H] [--port P]
    --broker-public-key PEM | --no-decision-token
    [--register BROKER_HOST:PORT --credential-file FILE [--advertise HOST[:PORT]]
     [--heartbeat-s N] [--broker-ca PEM]]
    [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]]
    [--delay-ms N] [--metrics-port P] [--log-level L]

The process prints exactly one line to stdout, ``READY port=<N>``, once it serves (and has made
its first registration attempt); logs go to stderr. SIGTERM or SIGINT stop it gracefully:
health turns NOT_SERVING, the instance deregisters, in-flight calls get a grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc

from certbroker.adapters.sdk.core import Adapter
from certbroker.adapters.sdk.metrics import AdapterMetrics
from certbroker.adapters.sdk.registry import Registration, RegistrationConfig, RegistrationError
from certbroker.adapters.sdk.service import (
    AdapterService,
    server_credentials,
    set_health,
    start_server,
)
from certbroker.adapters.sdk.token import DecisionTokenVerifier

log = logging.getLogger("certbroker.adapters.sdk")

#: Seconds in-flight calls get to finish on shutdown.
GRACE_SECONDS = 5.0
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 - recognised, not bound


@dataclass(frozen=True)
class ServeOptions:
    """How to run an adapter server; mirrors the flags (see :func:`add_arguments`)."""

    host: str = "127.0.0.1"
    port: int = 0
    broker_public_key: Path | None = None
    no_decision_token: bool = False
    register: str | None = None
    credential_file: Path | None = None
    advertise: str | None = None
    heartbeat_s: float | None = None
    broker_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    delay_ms: float = 0.0
    metrics_port: int | None = None

    def check(self) -> None:
        """Raise ``ValueError`` (naming the flag) for an inconsistent set of options."""
        if self.broker_public_key is None and not self.no_decision_token:
            raise ValueError(
                "--broker-public-key is required: the adapter verifies the broker's decision "
                "token on every call (--no-decision-token turns that off, for development only)"
            )
        if self.broker_public_key is not None and self.no_decision_token:
            raise ValueError("--broker-public-key and --no-decision-token contradict each other")
        if self.register is None:
            for flag, value in (
                ("--credential-file", self.credential_file),
                ("--advertise", self.advertise),
                ("--heartbeat-s", self.heartbeat_s),
                ("--broker-ca", self.broker_ca),
            ):
                if value is not None:
                    raise ValueError(f"{flag} only makes sense with --register")
        elif self.credential_file is None:
            raise ValueError("--register needs --credential-file (the department credential)")
        elif self.advertise is None and self.host in _WILDCARD_HOSTS:
            raise ValueError(f"--host {self.host!r} is not dialable: give --advertise HOST[:PORT]")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.heartbeat_s is not None and self.heartbeat_s <= 0:
            raise ValueError("--heartbeat-s must be positive")
        if self.delay_ms < 0:
            raise ValueError("--delay-ms must not be negative")
        for flag, port in (("--port", self.port), ("--metrics-port", self.metrics_port)):
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{flag} must be 0..65535")

    def endpoint(self, bound_port: int) -> str:
        """The ``host:port`` to register: ``--advertise`` (its port defaulting to the bound
        one) or the listening host and bound port."""
        if self.advertise is None:
            host = self.host
        elif self.advertise.startswith("["):  # [v6]:port or [v6]
            host, _, port = self.advertise[1:].partition("]")
            return f"[{host}]:{port[1:] or bound_port}"
        elif self.advertise.count(":") == 1:
            return self.advertise
        else:
            host = self.advertise
        return f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"


class AdapterServer:
    """A running adapter: gRPC server, optional metrics endpoint and registration.

    ``await start()`` then ``await stop()``; ``port`` and ``metrics_port`` are the bound ports.
    """

    def __init__(
        self,
        adapters: Sequence[Adapter],
        options: ServeOptions,
        *,
        metrics: AdapterMetrics | None = None,
    ) -> None:
        options.check()
        self.options = options
        self.metrics = metrics or AdapterMetrics()
        verifier = (
            None
            if options.broker_public_key is None
            else DecisionTokenVerifier.from_pem_file(options.broker_public_key)
        )
        self.service = AdapterService(
            adapters, verifier=verifier, metrics=self.metrics, delay_s=options.delay_ms / 1000
        )
        self._credentials = None
        if options.tls_cert is not None and options.tls_key is not None:
            self._credentials = server_credentials(
                options.tls_cert, options.tls_key, options.tls_client_ca
            )
        self._broker_credentials = None
        if options.broker_ca is not None:
            try:
                ca = options.broker_ca.read_bytes()
            except OSError as exc:
                raise ValueError(f"{options.broker_ca}: cannot read ({exc.strerror})") from None
            self._broker_credentials = grpc.ssl_channel_credentials(ca)
        self._departments = sorted({a.department for a in adapters})
        if options.register is not None and len(self._departments) != 1:
            raise ValueError("one registration serves one department")
        self.port = 0
        self.metrics_port: int | None = None
        self.registration: Registration | None = None
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._metrics_http: WSGIServer | None = None

    async def start(self) -> None:
        """Serve, expose metrics, register. Raises ``RegistrationError`` if the broker refuses,
        ``OSError`` if the metrics port is taken, ``RuntimeError`` if the gRPC port is; whatever
        had started is stopped again then."""
        o = self.options
        self._server, self.port, self._health = await start_server(
            self.service, host=o.host, port=o.port, credentials=self._credentials
        )
        if o.no_decision_token:
            log.warning("decision tokens are NOT verified (--no-decision-token): development only")
        if self._credentials is None:
            log.warning("serving without TLS: requests and records travel in clear")
        try:
            if o.metrics_port is not None:
                self._metrics_http, self.metrics_port = self.metrics.serve(o.host, o.metrics_port)
                log.info("metrics on http://%s:%d/metrics", o.host, self.metrics_port)
            if o.register is not None:
                await self._register(o)
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _register(self, o: ServeOptions) -> None:
        assert o.register is not None
        assert o.credential_file is not None  # check() made sure
        registration = Registration(
            RegistrationConfig(
                broker=o.register,
                credential_file=o.credential_file,
                department=self._departments[0],
                record_types=self.service.record_types,
                endpoint=o.endpoint(self.port),
                heartbeat_s=o.heartbeat_s,
                channel_credentials=self._broker_credentials,
            ),
            metrics=self.metrics,
        )
        await registration.start()
        # Only a started registration is stopped (and deregistered) by stop().
        self.registration = registration

    async def stop(self, grace: float | None = GRACE_SECONDS) -> None:
        """Report NOT_SERVING, deregister, then stop serving after ``grace`` seconds at most."""
        if self._health is not None:
            await set_health(self._health, serving=False)
        if self.registration is not None:
            await self.registration.stop()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags every adapter process understands (see the module docstring)."""
    net = parser.add_argument_group("serving")
    net.add_argument("--host", default="127.0.0.1")
    net.add_argument("--port", type=int, default=0, help="0 picks a free port")
    net.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate chain")
    net.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key")
    net.add_argument(
        "--tls-client-ca", type=Path, metavar="PEM", help="require client certs (mutual TLS)"
    )
    net.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics (0 = any port)")
    net.add_argument("--delay-ms", type=float, default=0.0, help="added latency (demos/tests)")
    net.add_argument("--log-level", default="INFO")
    tok = parser.add_argument_group("decision tokens")
    tok.add_argument(
        "--broker-public-key", type=Path, metavar="PEM", help="verify the broker's tokens"
    )
    tok.add_argument(
        "--no-decision-token", action="store_true", help="accept calls without (development)"
    )
    reg = parser.add_argument_group("registration with the broker")
    reg.add_argument("--register", metavar="BROKER_HOST:PORT", help="the broker's Registry")
    reg.add_argument("--credential-file", type=Path, metavar="FILE", help="department JWT")
    reg.add_argument("--advertise", metavar="HOST[:PORT]", help="endpoint the broker dials")
    reg.add_argument("--heartbeat-s", type=float, help="default: a third of the lease")
    reg.add_argument("--broker-ca", type=Path, metavar="PEM", help="register over TLS")


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    """The :class:`ServeOptions` of parsed flags (unchecked)."""
    names = ServeOptions.__dataclass_fields__
    return ServeOptions(**{name: getattr(args, name) for name in names})


def close_adapters(adapters: Iterable[Adapter]) -> None:
    """Close adapters that hold resources (those with a ``close()``)."""
    for adapter in adapters:
        close = getattr(adapter, "close", None)
        if callable(close):
            close()


def main(
    build: Callable[[argparse.Namespace], Sequence[Adapter]],
    *,
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    description: str | None = None,
    add_adapter_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    log_label: Callable[[argparse.Namespace], str] | None = None,
) -> int:
    """Run an adapter process until signalled; the exit status.

    ``build(args)`` makes the adapters from the parsed flags (``add_adapter_arguments`` adds the
    adapter's own, e.g. a database path). Exit status 2 for bad flags or configuration (the
    message names the flag or file), 1 when the broker refuses the registration.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if add_adapter_arguments is not None:
        add_adapter_arguments(parser)
    add_arguments(parser)
    args = parser.parse_args(argv)
    options = options_from_args(args)
    try:
        options.check()
    except ValueError as exc:
        parser.error(str(exc))
    label = log_label(args) if log_label else (prog or "adapter")
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s adapter[{label}] %(name)s: %(message)s",
    )
    try:
        adapters = build(args)
    except (ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(adapters, options, parser.prog))
    finally:
        close_adapters(adapters)


async def _serve(adapters: Sequence[Adapter], options: ServeOptions, prog: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        server = AdapterServer(adapters, options)
    except ValueError as exc:  # an unreadable key or certificate file, a bad public key
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        await server.start()
    except RegistrationError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # grpc: the port is taken or the address is not ours
        print(
            f"{prog}: error: cannot listen on {options.host}:{options.port}: {exc}", file=sys.stderr
        )
        return 1
    try:
        print(f"READY port={server.port}", flush=True)
        log.info(
            "serving %s on %s:%d (%s, decision tokens %s)",
            ",".join(server.service.record_types),
            options.host,
            server.port,
            "mutual TLS" if options.tls_client_ca else "TLS" if options.tls_cert else "plaintext",
            "off" if options.no_decision_token else "required",
        )
        await stop.wait()
    finally:
        await server.stop(GRACE_SECONDS)
    return 0
