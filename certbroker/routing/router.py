"""Routing: which source serves each record type, and the calls to it.

A ``RecordSource`` is the plug point: the in-process demo adapters (the embedded default),
one fixed gRPC endpoint (mode "grpc") and the instances departments registered with the
Registry (mode "registry") all satisfy it. Errors from a source are translated here into
``BrokerError``s that name the department, so the servicer and the caller never see a raw
adapter failure.

Remote calls (:class:`RemoteSource`), in order:

1. **Budget.** ``timeout_s`` is the remaining budget: what is left of the caller's deadline
   less the servicer's reserve for audit and answer, capped by ``[routing] timeout_s``
   (:func:`certbroker.lookup.pipeline.fetch_budget`). Retries share it; nothing outlives it.
2. **Breaker.** The department's circuit breaker admits the call or fails it fast with
   UNAVAILABLE ``CIRCUIT_OPEN`` (:mod:`certbroker.routing.breaker`).
3. **Instances.** Live endpoints in a stable order, rotated round-robin per call; the call goes
   to the first and, on UNAVAILABLE only (nothing reached the adapter, or it is shutting down),
   once more to the next one with what is left of the budget. Registered endpoints the policy
   in force no longer allows are left out (:mod:`certbroker.routing.registry.endpoints`).
4. **Decision token.** Every Fetch carries ``x-certbroker-decision``
   (:mod:`certbroker.routing.decision_token`).
5. **The reply.** Checked before anything in it is cached or released
   (:mod:`certbroker.routing.replies`): a reply that is not a well-formed answer to this request
   within the record type's limits is UNAVAILABLE ``ADAPTER_BAD_RESPONSE`` and counts against
   the breaker; fields unknown to the contract are dropped. An adapter's refusal reaches the
   caller as ``ADAPTER_UNAVAILABLE`` with its reason only if the contract knows that reason;
   its other text is logged here, cleaned.
"""

from __future__ import annotations

import calendar
import datetime as dt
import functools
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from certbroker import errors
from certbroker.adapters import sdk
from certbroker.config import AdapterRoute
from certbroker.contract.generic import RecordSchema
from certbroker.policy import RecordLimits
from certbroker.routing import replies
from certbroker.routing.breaker import BreakerBoard, CircuitBreaker, Outcome
from certbroker.routing.channels import TOO_LARGE_DETAILS, AdapterChannels, adapter_reason
from certbroker.routing.decision_token import METADATA_KEY, DecisionSigner
from certbroker.v1 import adapter_pb2, records_pb2

__all__ = [
    "DEFAULT_LIMITS",
    "AdapterChannels",
    "Fetched",
    "GrpcSource",
    "InProcessSource",
    "RecordSource",
    "RemoteSource",
    "Router",
    "build_router",
]

log = logging.getLogger(__name__)

#: Share of the configured adapter timeout a call must have had for its timeout to count as the
#: department's failure (a bundle item's budget is always a little under the full timeout).
FAIR_SHARE = 0.5


@dataclass(frozen=True)
class Fetched:
    """A record as a source returned it."""

    record: records_pb2.Record
    as_of: dt.datetime

    @functools.cached_property
    def as_of_timestamp(self) -> tuple[int, int]:
        """``as_of`` as protobuf Timestamp (seconds, nanos), worked out once: a cached record
        answers many lookups. The same values as ``Timestamp.FromDatetime(as_of)``."""
        return calendar.timegm(self.as_of.utctimetuple()), self.as_of.microsecond * 1000


#: The catalogue's defaults, for callers without a policy at hand (tools, tests).
DEFAULT_LIMITS = RecordLimits()


class RecordSource(Protocol):
    """Anything that can fetch one record type's records for the broker.

    ``timeout_s`` is the remaining budget: the fetch, retries included, answers or fails with
    DEADLINE_EXCEEDED ``ADAPTER_TIMEOUT`` within it. ``limits`` are the record type's in the
    policy in force: a record over them is UNAVAILABLE ``ADAPTER_BAD_RESPONSE``; so is a record
    of a catalogue-declared type that does not match ``schema``, the catalogue's.
    """

    async def fetch(
        self,
        record_type: str,
        subject_id: str,
        fields: Sequence[str],
        decision_id: str,
        timeout_s: float,
        limits: RecordLimits = DEFAULT_LIMITS,
        schema: RecordSchema | None = None,
    ) -> Fetched: ...

    async def aclose(self) -> None: ...


class InProcessSource:
    """A department adapter running inside the broker process (the embedded default).

    Its fetch runs on the event loop itself. The demo adapters read small, read-only SQLite
    datasets on local disk (tens of microseconds a record, no network); handing each read to a
    thread cost more than the read: two GIL hand-offs and a wake-up of the loop, which under
    load, competing with the audit writer thread, made up most of a cache miss. A department
    across a network is a gRPC adapter (:class:`RemoteSource`), never in-process.
    """

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
        limits: RecordLimits = DEFAULT_LIMITS,
        schema: RecordSchema | None = None,
    ) -> Fetched:
        if timeout_s <= 0:
            raise adapter_timeout(self._department)
        try:
            record = sdk.fetch_record(self._adapter, subject_id, fields)
        except sdk.AdapterError as exc:
            # The SDK's errors carry the same status codes and reasons as over gRPC.
            raise errors.for_code(exc.code)(
                exc.reason, f"{self._department}: {exc.message}", department=self._department
            ) from None
        try:  # the same limits as a remote department's: one rule for every source
            replies.check_record(record, record_type, limits, schema)
        except replies.BadReply as bad:
            raise replies.bad_response(self._department, bad) from None
        return Fetched(record, dt.datetime.now(dt.UTC))

    async def aclose(self) -> None:
        sdk.close_adapters([self._adapter])


class RemoteSource:
    """One department's adapter instances over gRPC (``certbroker.v1.DepartmentAdapter``).

    ``endpoints(record_type)`` lists the live instances to balance over; ``signer`` mints the
    decision token (None sends none: tests of adapters without verification only).
    ``full_budget_s`` is the configured adapter timeout. A timeout counts against the
    department's breaker only if the call had at least :data:`FAIR_SHARE` of it: running out of
    a budget the *caller's* near deadline cut short says nothing about the department.
    """

    def __init__(
        self,
        department: str,
        endpoints: Callable[[str], Sequence[str]],
        channels: AdapterChannels,
        *,
        signer: DecisionSigner | None,
        breaker: CircuitBreaker | None = None,
        full_budget_s: float = 0.0,
        owns_channels: bool = False,
    ) -> None:
        self._department = department
        self._full_budget_s = full_budget_s
        self._endpoints = endpoints
        self._channels = channels
        self._signer = signer
        self._breaker = breaker
        self._owns_channels = owns_channels
        self._turn = itertools.count()

    async def fetch(
        self,
        record_type: str,
        subject_id: str,
        fields: Sequence[str],
        decision_id: str,
        timeout_s: float,
        limits: RecordLimits = DEFAULT_LIMITS,
        schema: RecordSchema | None = None,
    ) -> Fetched:
        if timeout_s <= 0:
            raise adapter_timeout(self._department)
        permit = self._breaker.admit() if self._breaker else None
        outcome = Outcome.NEUTRAL  # cancelled (caller gone, bundle deadline): no news
        try:
            fetched = await self._call(
                record_type,
                subject_id,
                fields,
                decision_id,
                time.monotonic() + timeout_s,
                limits,
                schema,
            )
            outcome = Outcome.SUCCESS
            return fetched
        except errors.BrokerError as exc:
            cut_by_caller = timeout_s < FAIR_SHARE * self._full_budget_s
            outcome = _judge(exc, cut_by_caller=cut_by_caller)
            raise
        finally:
            if self._breaker is not None and permit is not None:
                self._breaker.record(permit, outcome)

    async def _call(
        self,
        record_type: str,
        subject_id: str,
        fields: Sequence[str],
        decision_id: str,
        deadline: float,
        limits: RecordLimits,
        schema: RecordSchema | None = None,
    ) -> Fetched:
        dept = self._department
        endpoints = list(self._endpoints(record_type))
        if not endpoints:
            raise errors.Unavailable(
                "NO_LIVE_INSTANCE",
                f"department {dept} has no live {record_type} adapter",
                department=dept,
            )
        turn = next(self._turn) % len(endpoints)
        order = endpoints[turn:] + endpoints[:turn]
        request = adapter_pb2.FetchRequest(
            record_type=record_type, subject_id=subject_id, fields=fields, decision_id=decision_id
        )
        metadata: tuple[tuple[str, str], ...] = ()
        if self._signer is not None:
            token = self._signer.mint(
                department=dept,
                subject_id=subject_id,
                record_type=record_type,
                fields=fields,
                decision_id=decision_id,
            )
            metadata = ((METADATA_KEY, token),)
        for attempt, endpoint in enumerate(order[:2]):  # one retry, to another instance
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise adapter_timeout(dept)
            try:
                data: bytes = await self._channels.fetch(endpoint)(
                    request, timeout=remaining, metadata=metadata
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE and attempt == 0 and len(order) > 1:
                    log.warning("%s instance %s unavailable, trying %s", dept, endpoint, order[1])
                    continue
                raise self._translate(exc, record_type, endpoint) from None
            try:
                record, as_of = replies.accept(
                    replies.parse(data),
                    record_type=record_type,
                    subject_id=subject_id,
                    limits=limits,
                    schema=schema,
                )
            except replies.BadReply as bad:
                log.warning("%s instance %s: bad %s response: %s", dept, endpoint, record_type, bad)
                raise replies.bad_response(dept, bad) from None
            return Fetched(record, as_of)
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    def _translate(
        self, exc: grpc.aio.AioRpcError, record_type: str, endpoint: str
    ) -> errors.BrokerError:
        dept = self._department
        code = exc.code()
        if code == grpc.StatusCode.NOT_FOUND:
            return errors.NotFound(
                "SUBJECT_NOT_FOUND",
                f"{dept} holds no {record_type} record for this citizen",
                department=dept,
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return adapter_timeout(dept)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and TOO_LARGE_DETAILS in (
            exc.details() or ""
        ):
            log.warning("%s instance %s: %s reply over the size limit", dept, endpoint, record_type)
            return replies.bad_response(dept, replies.BadReply("REPLY_TOO_LARGE"))
        # Anything else is the department's problem, not the caller's input: UNAVAILABLE. What
        # the adapter said is its own free text: logged here, cleaned; the caller gets its
        # reason only if the contract knows it (e.g. DECISION_TOKEN_INVALID: what to fix).
        said = adapter_reason(exc)
        log.warning(
            "%s instance %s refused a %s fetch: %s reason=%s details=%s",
            dept,
            endpoint,
            record_type,
            code.name,
            replies.for_log(said),
            replies.for_log(exc.details() or ""),
        )
        details = {"adapter_status": code.name}
        reason = replies.forwarded_reason(said)
        if reason:
            details["adapter_reason"] = reason
        return errors.Unavailable(
            "ADAPTER_UNAVAILABLE",
            f"department {dept} is unavailable ({code.name})",
            department=dept,
            **details,
        )

    async def aclose(self) -> None:
        if self._owns_channels:
            await self._channels.aclose()


class GrpcSource(RemoteSource):
    """A department adapter at one fixed gRPC endpoint (route mode "grpc")."""

    def __init__(
        self,
        endpoint: str,
        department: str,
        *,
        signer: DecisionSigner | None = None,
        breaker: CircuitBreaker | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        full_budget_s: float = 0.0,
    ) -> None:
        super().__init__(
            department,
            lambda _record_type: (endpoint,),
            AdapterChannels(credentials),
            signer=signer,
            breaker=breaker,
            full_budget_s=full_budget_s,
            owns_channels=True,
        )


def _judge(exc: errors.BrokerError, *, cut_by_caller: bool) -> Outcome:
    """What an error says about the department's health (for its breaker)."""
    if isinstance(exc, errors.NotFound):
        return Outcome.SUCCESS  # it answered
    if exc.reason in {"CIRCUIT_OPEN", "NO_LIVE_INSTANCE"}:
        return Outcome.NEUTRAL  # nobody was called
    if isinstance(exc, errors.DeadlineExceeded) and cut_by_caller:
        return Outcome.NEUTRAL  # the caller's short deadline, not the department's slowness
    return Outcome.FAILURE


def adapter_timeout(department: str) -> errors.BrokerError:
    """DEADLINE_EXCEEDED ``ADAPTER_TIMEOUT``: ``department`` did not answer in time."""
    return errors.DeadlineExceeded(
        "ADAPTER_TIMEOUT", f"department {department} did not answer in time", department=department
    )


#: Builds the source of a catalogue-declared record type for its department (or None: no route).
DeclaredSources = Callable[[str, str], "RecordSource | None"]


class Router:
    """Record type → source: the configured routes, built once from the configuration, and the
    catalogue-declared record types' sources, built on their first lookup by ``declared``
    (record type, department) and kept per (record type, department), so a policy reload that
    declares a type routes it without a restart."""

    def __init__(
        self,
        sources: Mapping[str, RecordSource],
        *,
        channels: AdapterChannels | None = None,
        declared: DeclaredSources | None = None,
    ) -> None:
        self._sources = dict(sources)
        self._channels = channels
        self._declared = declared
        self._declared_sources: dict[tuple[str, str], RecordSource] = {}

    def source(self, record_type: str, department: str = "") -> RecordSource:
        """The source of ``record_type``; ``department`` (the policy's, for the call) routes a
        catalogue-declared type. UNAVAILABLE ``NO_ROUTE`` when there is none."""
        found = self._sources.get(record_type)
        if found is None and self._declared is not None and department:
            key = (record_type, department)
            found = self._declared_sources.get(key)
            if found is None:
                found = self._declared(record_type, department)
                if found is not None:
                    self._declared_sources[key] = found
        if found is None:
            raise errors.Unavailable(
                "NO_ROUTE", f"no department adapter is configured for {record_type}"
            )
        return found

    async def aclose(self) -> None:
        for source in [*self._sources.values(), *self._declared_sources.values()]:
            await source.aclose()
        if self._channels is not None:
            await self._channels.aclose()


class LiveEndpoints(Protocol):
    """What registry routing needs of :class:`certbroker.routing.registry.store.RegistryStore`."""

    def live_endpoints(self, department: str, record_type: str) -> list[str]: ...

    def endpoints(self) -> set[str]: ...


#: Whether (department, endpoint) may be dialled under the policy in force.
EndpointFilter = Callable[[str, str], bool]


def _live(
    registry: LiveEndpoints, department: str, allowed: EndpointFilter | None
) -> Callable[[str], Sequence[str]]:
    if allowed is None:
        return lambda record_type: registry.live_endpoints(department, record_type)
    # Registered under an older policy (or before endpoints were checked), no longer allowed:
    # never dialled, whatever the store still holds.
    return lambda record_type: [
        e for e in registry.live_endpoints(department, record_type) if allowed(department, e)
    ]


def build_router(
    routes: Mapping[str, AdapterRoute],
    departments: Mapping[str, str],
    dataset_dir: Path,
    *,
    registry: LiveEndpoints | None = None,
    signer: DecisionSigner | None = None,
    breakers: BreakerBoard | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    timeout_s: float = 0.0,
    endpoint_allowed: EndpointFilter | None = None,
) -> Router:
    """Build sources: ``departments`` maps record type → department id (from the policy set).

    Remote routes get ``signer``'s decision tokens, ``breakers``' per-department breaker and
    ``credentials`` (TLS) for their channels; "registry" routes need ``registry``, and dial
    only the registered endpoints ``endpoint_allowed(department, endpoint)`` accepts.
    ``timeout_s`` is the configured adapter timeout (see :class:`RemoteSource`).

    Catalogue-declared record types (no route of their own: the configuration names contract
    types only) are routed on their first lookup (:func:`declared_source`).
    """
    sources: dict[str, RecordSource] = {}
    datasets_ready = False
    # One pool for every registry route (declared types included); channels to deregistered
    # endpoints are closed.
    shared = AdapterChannels(credentials, keep=registry.endpoints) if registry else None

    def declared(record_type: str, department: str) -> RecordSource | None:
        return declared_source(
            record_type,
            department,
            dataset_dir,
            registry=registry,
            channels=shared,
            signer=signer,
            breaker=breakers.breaker(department) if breakers else None,
            timeout_s=timeout_s,
            endpoint_allowed=endpoint_allowed,
        )

    for record_type, route in routes.items():
        department = departments.get(record_type, record_type)
        breaker = breakers.breaker(department) if breakers else None
        if route.mode == "grpc":
            sources[record_type] = GrpcSource(
                route.endpoint,
                department,
                signer=signer,
                breaker=breaker,
                credentials=credentials,
                full_budget_s=timeout_s,
            )
            continue
        if route.mode == "registry":
            if registry is None:
                raise ValueError(f"{record_type}: mode 'registry' needs the registry")
            assert shared is not None  # made above whenever there is a registry
            sources[record_type] = RemoteSource(
                department,
                _live(registry, department, endpoint_allowed),
                shared,
                signer=signer,
                breaker=breaker,
                full_budget_s=timeout_s,
            )
            continue
        from certbroker.adapters import demo  # only the embedded default needs the demo datasets

        if not datasets_ready:
            demo.ensure_datasets(dataset_dir)
            datasets_ready = True
        # Only the routed record types: an adapter opened here is closed by its source.
        sources[record_type] = InProcessSource(
            demo.open_adapter(record_type, dataset_dir), department
        )
    return Router(sources, channels=shared, declared=declared)


def declared_source(
    record_type: str,
    department: str,
    dataset_dir: Path,
    *,
    registry: LiveEndpoints | None,
    channels: AdapterChannels | None,
    signer: DecisionSigner | None,
    breaker: CircuitBreaker | None,
    timeout_s: float,
    endpoint_allowed: EndpointFilter | None,
) -> RecordSource | None:
    """The source of a catalogue-declared record type: the SQL adapter configured by
    ``<dataset_dir>/<record_type>.toml`` in process when that file exists (the embedded demo
    path: ``certbroker.adapters.demo.ensure_datasets`` writes the shipped declared types' data
    and configurations there), else the instances ``department`` registered with the Registry.
    None without either (the lookup is UNAVAILABLE ``NO_ROUTE``)."""
    config = dataset_dir / f"{record_type}.toml"
    if config.is_file():
        # Only the embedded path needs the SQL adapter.
        from certbroker.adapters.sql.adapter import SqlAdapter
        from certbroker.adapters.sql.config import ConfigError

        try:
            adapter = SqlAdapter.from_file(config)
        except (ConfigError, OSError) as exc:
            log.error("%s: cannot serve %s in process: %s", config, record_type, exc)
            return None
        if adapter.record_type != record_type or adapter.department != department:
            log.error(
                "%s: serves %s of %s, not %s of %s",
                config,
                adapter.record_type,
                adapter.department,
                record_type,
                department,
            )
            adapter.close()
            return None
        return InProcessSource(adapter, department)
    if registry is None or channels is None:
        return None
    return RemoteSource(
        department,
        _live(registry, department, endpoint_allowed),
        channels,
        signer=signer,
        breaker=breaker,
        full_budget_s=timeout_s,
    )
