"""Wiring: builds the gRPC server from a ``Config``, runs it, and stops it cleanly.

The server carries the CertificateBroker, Registry and Audit services, the standard health
service and server reflection (so ``grpcurl`` works). Each of our servicers is registered
:func:`~certbroker.server.calls.guarded`, which maps exceptions to gRPC status (unary and
server-streaming alike) -- the only place where that mapping happens -- and counts and logs
each call. Requests are decoded tolerantly (:mod:`certbroker.server.decoding`): bytes that are
not the request message are refused INVALID_ARGUMENT ``MALFORMED_REQUEST``, counted like every
refusal of an unknown caller by the broker's :class:`~certbroker.audit.refusals.RefusalLedger`.

Start and stop
--------------
:func:`start` opens the broker's parts one after the other (registry file, routes, audit
writer, keys, metrics endpoint, gRPC server, checkpoint task) on one
:class:`contextlib.AsyncExitStack`: if any step fails, what was opened before it is closed
again, in reverse order, and the failure is raised. :meth:`Broker.stop` first drains the server
(below), then closes the same stack; a part whose closing fails is logged and the others are
still closed, and the failure is raised at the end.

The drain (SIGTERM or SIGINT in :func:`serve`): every health service -- the overall "" and each
service name -- goes NOT_SERVING, so load balancers watching health move on; the server stops
accepting calls; the calls in flight get ``[server] shutdown_grace_s`` to finish, each with its
audit entry, and only calls still running after that are cancelled. Health ``Watch`` streams
end once they sent NOT_SERVING (:mod:`certbroker.server.health`), so they do not hold the stop
for the whole grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from certbroker.admin.servicer import AdminService
from certbroker.audit import BatchingAuditLog, CheckpointSigner, checkpoint_task, open_audit_log
from certbroker.audit.integrity.proofs import latest_checkpoint, tree_size
from certbroker.audit.outbox import NoticeOutbox
from certbroker.audit.refusals import RefusalLedger
from certbroker.audit.service.servicer import AuditService
from certbroker.auth.authenticator import (
    Authenticator,
    DevIdentityProvider,
    TrustedIssuer,
    load_issuer,
)
from certbroker.auth.citizens import CitizenAuthenticator
from certbroker.auth.controls import Controls
from certbroker.cache import RecordCache
from certbroker.citizen.notices import notices_of
from certbroker.citizen.relay import NatsPublisher, OutboxRelay
from certbroker.citizen.servicer import CitizenService
from certbroker.cluster.shared import shared_state_for
from certbroker.config import Config
from certbroker.evidence.document import Issuer
from certbroker.lookup.pipeline import fetched_size
from certbroker.lookup.servicer import CertificateBrokerService
from certbroker.metrics import BrokerState, Metrics
from certbroker.policy.counters import open_counter
from certbroker.routing.breaker import BreakerBoard
from certbroker.routing.channels import channel_credentials
from certbroker.routing.decision_token import DecisionSigner
from certbroker.routing.registry.endpoints import EndpointGuard, broker_ports
from certbroker.routing.registry.servicer import RegistryService
from certbroker.routing.registry.store import RegistryStore
from certbroker.routing.router import Fetched, Router, build_router
from certbroker.server import ports
from certbroker.server.calls import Calls, guarded
from certbroker.server.decoding import register
from certbroker.server.health import Health
from certbroker.server.policy_holder import PolicyHolder
from certbroker.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    broker_pb2,
    broker_pb2_grpc,
    citizen_pb2,
    citizen_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)

log = logging.getLogger(__name__)

#: The services the health service reports on, besides the overall "".
SERVICE_NAMES: Final = (
    broker_pb2.DESCRIPTOR.services_by_name["CertificateBroker"].full_name,
    registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["Audit"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    citizen_pb2.DESCRIPTOR.services_by_name["Citizen"].full_name,
)


class StartError(Exception):
    """The broker could not start (a key that cannot be read, a port that cannot be bound);
    the message says what. Everything opened before the failure is closed again."""


class StopError(Exception):
    """A part of the broker failed to stop or close (each failure is logged as it happens);
    every other part was closed all the same. The first failure is the ``__cause__``."""


def authenticator(config: Config, metrics: Metrics | None = None) -> Authenticator:
    """The clerk/department authenticator of ``config``; its issuer keys are re-read from
    their files by :meth:`Authenticator.reload_keys` (SIGHUP), which also empties the cache."""

    def trusted() -> list[TrustedIssuer]:
        issuers: list[TrustedIssuer] = [
            load_issuer(
                i.issuer,
                i.audience,
                pem_files=i.public_keys,
                jwks_file=i.jwks,
                max_lifetime_s=i.max_token_lifetime_s,
            )
            for i in config.issuers
        ]
        if config.dev_idp:
            dev = DevIdentityProvider(config.state_dir)
            issuers.append(dev.trusted_issuer(config.dev_idp_max_token_lifetime_s))
        return issuers

    return Authenticator(
        trusted,
        leeway_s=config.leeway_s,
        token_max_age_s=config.token_cache_max_age_s,
        token_max_entries=config.token_cache_max_entries,
        metrics=metrics,
    )


def citizen_authenticator(config: Config, auth: Authenticator) -> CitizenAuthenticator | None:
    """The citizens' authenticator of ``config`` (``[citizen]`` issuer, and the dev IdP's
    citizen issuer while ``[auth] dev_idp`` is on); None when no citizen issuer is trusted."""

    if bool(config.citizen_issuer) != (config.citizen_public_key is not None):
        raise StartError("citizen.issuer and citizen.public_key go together")

    def trusted() -> list[TrustedIssuer]:
        issuers: list[TrustedIssuer] = []
        if config.citizen_issuer and config.citizen_public_key is not None:
            issuers.append(
                load_issuer(
                    config.citizen_issuer,
                    config.citizen_audience,
                    pem_files=(config.citizen_public_key,),
                )
            )
        if config.dev_idp:
            dev = DevIdentityProvider(config.state_dir)
            issuers.append(dev.citizen_trusted_issuer(config.dev_idp_max_token_lifetime_s))
        return issuers

    if not trusted():
        return None
    return CitizenAuthenticator(
        trusted,
        is_clerk_issuer=auth.trusts,
        id_claim=config.citizen_id_claim,
        leeway_s=config.leeway_s,
    )


@dataclass(kw_only=True)
class Broker:
    """A running broker: its bound ports and the pieces tests and the CLI reach into."""

    config: Config
    server: grpc.aio.Server
    port: int
    metrics_port: int
    policies: PolicyHolder
    audit: BatchingAuditLog
    router: Router
    metrics: Metrics
    registry: RegistryStore
    breakers: BreakerBoard
    signer: DecisionSigner
    checkpoint_signer: CheckpointSigner
    auth: Authenticator
    health: Health
    calls: Calls
    refusals: RefusalLedger  # calls refused before their caller was known
    evidence: Issuer  # signs evidence documents (certbroker.evidence)
    #: Closes every part :func:`start` opened, in reverse order (module docstring).
    _parts: _Parts = field(repr=False)
    _stopping: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    citizen_auth: CitizenAuthenticator | None = None
    #: The notice relay, when ``[notify] nats_url`` is set (and this process checkpoints).
    relay: OutboxRelay | None = None

    def reload(self) -> None:
        """SIGHUP: re-read the issuer keys (emptying the token cache), then reload the
        policies (an audited reload, scheduled on the running loop)."""
        self._reload_keys()
        self._reload_evidence_key()
        self.policies.reload_soon()

    def _reload_evidence_key(self) -> None:
        # After `certbroker keys rotate --evidence`; a ring that cannot be read keeps the key.
        try:
            self.evidence.reload()
        except (OSError, ValueError):
            log.exception(
                "cannot reload the evidence key; still signing with %s", self.evidence.kid
            )

    async def reload_now(self) -> None:
        """:meth:`reload`, finished before it returns (a worker catching up on a SIGHUP that
        came while it started)."""
        self._reload_keys()
        self._reload_evidence_key()
        await self.policies.reload()

    def _reload_keys(self) -> None:
        self.auth.reload_keys()
        if self.citizen_auth is not None:
            self.citizen_auth.reload_keys()

    async def stop(self, grace: float | None = None) -> None:
        """Drain (health NOT_SERVING, no new calls, in-flight calls get ``grace`` seconds;
        default ``[server] shutdown_grace_s``), then close every part.

        Closing goes on past a part that fails to close (logged); :class:`StopError` is raised
        once everything else is closed. Calling it again waits for the first stop.
        """
        if self._stopping is None:
            grace = self.config.shutdown_grace_s if grace is None else grace
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float) -> None:
        failure: BaseException | None = None
        try:
            await self._drain(grace)
        except Exception as exc:  # the parts are closed all the same
            log.exception("draining the gRPC server failed")
            failure = exc
        await self._parts.stack.aclose()  # never raises: failures are logged and kept
        failure = failure or next(iter(self._parts.failures), None)
        if failure is not None:
            raise StopError(f"the broker did not stop cleanly: {failure}") from failure
        log.info("certbroker stopped")

    async def _drain(self, grace: float) -> None:
        log.info(
            "stopping: health NOT_SERVING, no new calls, %d in flight (grace %.1f s)",
            self.calls.active,
            grace,
        )
        # Health Watch streams end once they sent NOT_SERVING (certbroker.server.health), so
        # the server's one stop below waits only for the calls in flight.
        await self.health.enter_graceful_shutdown()
        self._parts.server_stopped = True
        stopping = asyncio.ensure_future(self.server.stop(grace))  # no new calls from here
        try:
            if not await self.calls.wait_idle(grace):
                log.warning(
                    "%d calls still running after the %.1f s grace period: cancelled",
                    self.calls.active,
                    grace,
                )
        finally:
            await stopping


@dataclass
class _Parts:
    """What :func:`start` opened, closed in reverse order by one exit stack; the failures of
    closing, in the order they happened (each also logged)."""

    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    failures: list[Exception] = field(default_factory=list)
    server_stopped: bool = False  # Broker.stop drained the gRPC server

    def handed_over(self) -> _Parts:
        """These parts, to be closed by someone else: the start succeeded, so leaving
        ``async with self.stack`` must close nothing. The closers keep referring to ``self``
        (its failures, ``server_stopped``), so the new owner gets ``self`` with a new stack."""
        self.stack = self.stack.pop_all()
        return self

    def on_close(self, what: str, close: Callable[[], Awaitable[object]]) -> None:
        """Close ``what`` with ``close()``. A failure is logged and kept in :attr:`failures`,
        not raised: the stack goes on with the next part, and a failed start still raises
        its own error rather than one of closing."""

        async def closer() -> None:
            try:
                await close()
            except Exception as exc:  # logged and kept, see the docstring
                log.exception("closing the %s failed", what)
                self.failures.append(exc)

        self.stack.push_async_callback(closer)


def _checkpoint_signer(config: Config) -> CheckpointSigner:
    try:
        return CheckpointSigner.load(config.state_dir, config.checkpoint_key)
    except (OSError, ValueError) as exc:
        where = config.checkpoint_key or config.state_dir / "checkpoint-key"
        raise StartError(f"cannot load the checkpoint signing key {where}: {exc}") from exc


def _evidence_issuer(config: Config) -> Issuer:
    try:
        return Issuer(config.state_dir)
    except (OSError, ValueError) as exc:
        raise StartError(f"cannot load the evidence key ring in {config.state_dir}: {exc}") from exc


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def broker_state(
    config: Config,
    policies: PolicyHolder,
    breakers: BreakerBoard,
    registry: RegistryStore,
    calls: Calls,
) -> BrokerState:
    """The scrape-time readings of a broker's state (:meth:`Metrics.watch`)."""
    location = config.audit_location

    def departments() -> dict[str, Any]:
        return dict.fromkeys(policies.current.departments)

    def breaker_states() -> Mapping[str, str]:
        states = dict.fromkeys(policies.current.departments, "closed")
        states.update((name, str(state)) for name, state in breakers.states().items())
        return states

    def live_instances() -> Mapping[str, int]:
        now = registry.now()
        counts = dict.fromkeys(departments(), 0)
        for instance in registry.instances():
            counts[instance.department] = counts.get(instance.department, 0) + int(
                instance.live(now)
            )
        return counts

    def last_checkpoint() -> float | None:
        latest = latest_checkpoint(location)
        return None if latest is None else _epoch(latest.time)

    return BrokerState(
        policy_version=lambda: policies.current.version,
        breaker_states=breaker_states,
        live_instances=live_instances,
        audit_tree_size=lambda: tree_size(location),
        last_checkpoint=last_checkpoint,
        rpcs_in_flight=lambda: calls.active,
    )


async def start(
    config: Config,
    *,
    lease_clock: Callable[[], float] = time.time,
    breaker_clock: Callable[[], float] = time.monotonic,
    audit_clock: Callable[[], float] = time.time,
    decision_clock: Callable[[], datetime] | None = None,
    reuse_port: bool = False,
    checkpoints: bool = True,
) -> Broker:
    """Start a broker on ``config``'s ports (0 = any free port) and return it.

    ``lease_clock`` (epoch seconds) drives registry leases, ``breaker_clock`` (monotonic
    seconds) the circuit breakers, ``audit_clock`` (epoch seconds) the audit entries' times,
    ``decision_clock`` (an aware datetime; default the wall clock) the "now" that opening hours
    are decided at; tests pass fakes to step through time.

    ``reuse_port`` binds with SO_REUSEPORT so the worker processes of one supervisor share the
    port (:mod:`certbroker.server.ports`); without it, a port anything else serves on is
    refused. ``checkpoints=False`` leaves the periodic checkpoint (and archive) task to
    another worker (:mod:`certbroker.server.workers`).

    A failure at any step closes what the steps before it opened (module docstring) and raises:
    :class:`StartError`, :class:`~certbroker.server.ports.PortInUse` or the failing part's own
    error.
    """
    # First what needs nothing closed: TLS files, the port, the policies, the decision key.
    credentials = channel_credentials(config.tls_ca, config.tls_cert, config.tls_key)
    if not reuse_port:  # a clear error before anything is opened (the bind below decides)
        ports.check_free(config.host, config.port)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(enabled=config.metrics_enabled)
    policies = PolicyHolder(config.policy_dir, metrics)
    departments = {name: rt.department for name, rt in policies.current.record_types.items()}
    signer = DecisionSigner(config.state_dir)
    evidence = _evidence_issuer(config)
    breakers = BreakerBoard(
        failures=config.breaker_failures, reset_s=config.breaker_reset_s, clock=breaker_clock
    )
    calls = Calls()
    parts = _Parts()
    async with parts.stack:
        # Controls and registry: SQLite in the state dir, or PostgreSQL shared by a cluster of
        # brokers when [audit] dsn is set (certbroker.cluster.shared).
        shared = shared_state_for(config)
        parts.on_close("shared state", lambda: asyncio.to_thread(shared.close))
        registry = RegistryStore(shared.registry, lease_s=config.lease_s, clock=lease_clock)
        # Where departments may register adapters; the ports bound below are added once known.
        endpoints = EndpointGuard(policies, broker_ports(config))
        router = build_router(
            config.adapters,
            departments,
            config.datasets,
            registry=registry,
            signer=signer,
            breakers=breakers,
            credentials=credentials,
            timeout_s=config.adapter_timeout_s,
            endpoint_allowed=endpoints.allows,
        )
        parts.on_close("department routes", router.aclose)
        audit = open_audit_log(
            config.audit_location,
            max_batch=config.audit_max_batch,
            max_wait_s=config.audit_batch_wait_ms / 1000,
            clock=audit_clock,
            on_commit=metrics.observe_audit_commit,
            # Every access's notice, in its entry's transaction (certbroker.audit.outbox).
            hook=NoticeOutbox(notices_of(lambda: policies.current)),
            on_lock_wait=metrics.audit_lock_wait.observe,
            entry_format=config.audit_entry_format,
        )
        parts.on_close("audit log", audit.aclose)
        policies.audit = audit  # reloads are audited from here on
        refusals = RefusalLedger(
            audit,
            rate_per_s=config.unauthenticated_rate_per_s,
            burst=config.unauthenticated_burst,
            interval_s=config.unauthenticated_summary_interval_s,
            policy_version=lambda: policies.current.version,
        )
        # Closed before the audit log (the stack unwinds in reverse): the last summaries are
        # written after the drain, while the log is still open.
        parts.on_close("refusal summaries", refusals.aclose)
        checkpoint_signer = _checkpoint_signer(config)
        auth = authenticator(config, metrics)
        # The security officers' controls: durable (state dir or cluster), reloaded here,
        # enforced by every servicer through the authenticator (certbroker.auth.controls).
        controls = await asyncio.to_thread(Controls, shared.controls)
        auth.controls = controls
        # Quota counts: the audit log's PostgreSQL (every broker), the state dir (every worker
        # of this broker) or, one process, its memory; see certbroker.policy.counters.
        quota_counter = open_counter(
            config.audit_location, config.state_dir, workers=config.workers
        )
        parts.on_close("quota counters", lambda: asyncio.to_thread(quota_counter.close))
        record_cache: RecordCache[Fetched] = RecordCache(
            max_entries=config.record_cache_max_entries,
            max_bytes=config.record_cache_max_bytes,
            sizeof=fetched_size,
        )

        # Metrics before the gRPC server: /metrics answers until the drain is over.
        state = broker_state(config, policies, breakers, registry, calls)
        metrics.watch(state)
        try:
            metrics_http, metrics_port = metrics.serve(config.host, config.metrics_port)
        except OSError as exc:
            raise StartError(
                f"cannot bind metrics port {config.host}:{config.metrics_port}: {exc}"
            ) from exc

        async def close_metrics() -> None:
            # shutdown() waits for the server thread's poll loop (up to half a second).
            await asyncio.to_thread(metrics_http.shutdown)
            metrics_http.server_close()

        parts.on_close("metrics endpoint", close_metrics)
        endpoints.refuse_ports(broker_ports(config, metrics_port))

        server = grpc.aio.server(options=ports.server_options(reuse_port))

        async def stop_server() -> None:
            # After a failed start (after server.start(), or not: a server never started has
            # nothing to stop, and that returns at once). Broker.stop drains it instead: one
            # stop per server, as grpcio can crash on a stop while another is running.
            if not parts.server_stopped:
                await server.stop(0)

        parts.on_close("gRPC server", stop_server)
        broker_service = CertificateBrokerService(
            auth,
            policies,
            router,
            audit,
            metrics,
            adapter_timeout_s=config.adapter_timeout_s,
            record_cache=record_cache,
            refusals=refusals,
            evidence=evidence,
            quotas=quota_counter,
            **({"now": decision_clock} if decision_clock is not None else {}),
        )
        registry_service = RegistryService(
            auth, policies, registry, breakers, audit, endpoints=endpoints, refusals=refusals
        )
        audit_service = AuditService(
            auth,
            policies,
            audit,
            config.audit_location,
            signer=checkpoint_signer,
            refusals=refusals,
            state=state,
            evidence_keys=lambda: (evidence.jwks(), evidence.kid),
            archive_dir=config.archive_directory,
        )
        admin_service = AdminService(auth, policies, audit, controls, refusals=refusals)
        citizen_auth = citizen_authenticator(config, auth)
        citizen_service = CitizenService(
            citizen_auth,
            policies,
            audit,
            config.audit_location,
            controls,
            refusals=refusals,
            archive_dir=config.archive_directory,
        )
        # Tolerant decoding (certbroker.server.decoding): undecodable bytes reach guarded().
        register(
            broker_pb2_grpc.add_CertificateBrokerServicer_to_server,
            guarded(broker_service, calls, refusals),
            server,
        )
        register(
            registry_pb2_grpc.add_RegistryServicer_to_server,
            guarded(registry_service, calls, refusals),
            server,
        )
        register(
            audit_pb2_grpc.add_AuditServicer_to_server,
            guarded(audit_service, calls, refusals),
            server,
        )
        register(
            admin_pb2_grpc.add_AdminServicer_to_server,
            guarded(admin_service, calls, refusals),
            server,
        )
        register(
            citizen_pb2_grpc.add_CitizenServicer_to_server,
            guarded(citizen_service, calls, refusals),
            server,
        )
        health_servicer = Health()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            port = server.add_insecure_port(f"{config.host}:{config.port}")
        except RuntimeError as exc:  # grpc's "Failed to bind": taken since the check above
            raise ports.PortInUse(
                f"cannot bind gRPC port {config.host}:{config.port}: {exc}"
            ) from exc
        if port == 0:
            raise ports.PortInUse(f"cannot bind gRPC port {config.host}:{config.port}")
        endpoints.refuse_ports(broker_ports(config, port))
        await server.start()
        refusals.start()
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        following = shared.follower(controls, registry)
        if following is not None:  # a cluster: the other brokers' changes reach this one
            _background(parts, following, "cluster follower")
        if checkpoints:
            _background(
                parts,
                checkpoint_task(
                    config.audit_location,
                    checkpoint_signer,
                    config.checkpoint_interval_s,
                    archive=config.archive,
                    may_sign=shared.may_sign,  # in a cluster, one broker signs at a time
                ),
                "checkpoint task",
            )
        relay = None
        if checkpoints and config.nats_url:  # one relay per log, beside the checkpoints
            relay = OutboxRelay(
                audit.backend,
                NatsPublisher(config.nats_url, config.notify_stream, config.notify_subject),
                interval_s=config.notify_interval_s,
            )
            _background(parts, relay.run(), "notice relay")
        log.info(
            "certbroker serving on %s:%d (metrics :%d), policy %s",
            config.host,
            port,
            metrics_port,
            policies.current.version[:12],
        )
        return Broker(
            config=config,
            server=server,
            port=port,
            metrics_port=metrics_port,
            policies=policies,
            audit=audit,
            router=router,
            metrics=metrics,
            registry=registry,
            breakers=breakers,
            signer=signer,
            checkpoint_signer=checkpoint_signer,
            auth=auth,
            health=health_servicer,
            calls=calls,
            refusals=refusals,
            citizen_auth=citizen_auth,
            relay=relay,
            evidence=evidence,
            _parts=parts.handed_over(),  # closed by Broker.stop
        )
    raise AssertionError("unreachable")  # pragma: no cover - the block returns or raises


def _background(parts: _Parts, work: Coroutine[Any, Any, None], what: str) -> None:
    """Run ``work`` as a task until the broker stops (cancelled on close)."""
    task = asyncio.create_task(work, name=f"certbroker {what}")

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    parts.on_close(what, stop)


def pid_file(state_dir: Path) -> Path:
    return state_dir / "broker.pid"


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[Broker]:
    """A started broker, stopped (drained, ``[server] shutdown_grace_s``) on exit."""
    broker = await start(config)
    try:
        yield broker
    finally:
        await broker.stop()


async def serve(config: Config, ready: Callable[[Broker], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM, then drain and stop (module docstring). SIGHUP reloads the
    policies."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    async with running(config) as broker:
        loop.add_signal_handler(signal.SIGHUP, broker.reload)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        pid = pid_file(config.state_dir)
        pid.write_text(f"{os.getpid()}\n")
        if ready is not None:
            ready(broker)
        try:
            await stop.wait()
        finally:
            pid.unlink(missing_ok=True)
