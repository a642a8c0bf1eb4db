"""The ``certbroker.v1.Registry`` servicer: departments register their adapter instances.

Callers authenticate with a department credential (role "department", ``dept`` claim) or an
operator token (role "operator"), see
:meth:`certbroker.auth.authenticator.Authenticator.registry_principal`.
A department acts only for itself; operators act for every department (so
``certbroker adapters register|deregister`` can manage a department's instances).

What a department may register comes from the policy set in force: only the record types
``policies/`` says it serves, only at the endpoints its catalogue entry declares and never at one
of the broker's own ports (:mod:`certbroker.routing.registry.endpoints`, PERMISSION_DENIED
``ENDPOINT_NOT_ALLOWED``). Every refusal of that kind -- and every PERMISSION_DENIED here --
is audited, as is every successful Register and Deregister. Heartbeats and listings are not
(they change nothing, and heartbeats would flood the log), nor are malformed requests of a
known caller; calls refused before the caller is known (no or bad token) are counted in their
peer's summary (:mod:`certbroker.audit.refusals`).

Audit entries have ``kind = "registry"`` and reuse the lookup entry's fields::

    clerk, roles     the caller's ``sub`` and roles (office is "")
    rule_id          the action: "registry.register" | "registry.deregister" |
                     "registry.heartbeat" | "registry.list"
    department       the department acted for (validated), or ""
    record_type      the record types asked for, comma-separated (validated names only)
    subject_id       the instance endpoint (host:port; validated) -- what the action is about
    decision_id      the instance id
    decision         "allow" | "deny";  outcome / status: "OK" or the reason / gRPC code

Store writes run in a worker thread; a change whose audit entry cannot be written is undone
and the caller gets UNAVAILABLE (no audit, no change). A change and its entry run to the end
together even if the caller cancels.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2

from certbroker import errors
from certbroker.audit.events import AuditEvent, AuditLog
from certbroker.audit.guard import AuditedCall, Result, invocation_metadata
from certbroker.audit.refusals import RefusalLedger
from certbroker.auth.authenticator import Authenticator, DepartmentPrincipal
from certbroker.policy import PolicySet, PolicySource
from certbroker.routing.breaker import BreakerBoard
from certbroker.routing.registry import validation as check
from certbroker.routing.registry.endpoints import EndpointGuard
from certbroker.routing.registry.store import Instance, RegistryStore
from certbroker.v1 import registry_pb2, registry_pb2_grpc

_Context = grpc.aio.ServicerContext[Any, Any]


#: The actions that change the registry: audited when they succeed, as well as when refused.
_CHANGES = frozenset({"register", "deregister"})


@dataclass
class _Trace:
    """What the audit entry says about one registry call, filled in as it proceeds."""

    action: str
    principal: DepartmentPrincipal | None = None
    department: str = ""
    record_types: tuple[str, ...] = ()
    endpoint: str = ""
    instance_id: str = ""


class RegistryService(registry_pb2_grpc.RegistryServicer):
    """Register / Heartbeat / Deregister / ListAdapters over a :class:`RegistryStore`.

    Every method runs inside :class:`~certbroker.audit.guard.AuditedCall`; errors are raised as
    ``BrokerError`` and mapped to a status by the server (:func:`certbroker.server.calls.guarded`).
    ``endpoints`` decides where a department's instances may be (by default: the catalogue's
    endpoints over ``policies``, with no broker port known to refuse).
    ``refusals`` counts calls refused before the caller is known.
    """

    def __init__(
        self,
        auth: Authenticator,
        policies: PolicySource,
        store: RegistryStore,
        breakers: BreakerBoard,
        audit: AuditLog,
        *,
        endpoints: EndpointGuard | None = None,
        refusals: RefusalLedger | None = None,
    ) -> None:
        self._auth = auth
        self._refusals = refusals
        self._policies = policies
        self._store = store
        self._breakers = breakers
        self._audit = audit
        self._endpoints = endpoints or EndpointGuard(policies)

    async def Register(
        self, request: registry_pb2.RegisterRequest, context: _Context
    ) -> registry_pb2.RegisterResponse:
        trace = _Trace("register")

        async def register() -> str:
            async with self._audited(trace, context) as call:
                principal = self._principal(context, trace)
                department = trace.department = check.department(request.department)
                trace.record_types = check.record_types(request.record_types)
                trace.endpoint = check.endpoint(request.endpoint)
                schema_version = check.schema_version(request.schema_version)
                policy = self._policies.current
                if any(rt not in policy.record_types for rt in trace.record_types):
                    raise errors.InvalidArgument(
                        "UNKNOWN_RECORD_TYPE",
                        "record_types names a record type the policy set does not know",
                        argument="record_types",
                    )
                self._authorize(principal, department)
                served = self._served(policy, department)
                for record_type in trace.record_types:
                    if record_type not in served:
                        raise errors.PermissionDenied(
                            "RECORD_TYPE_NOT_SERVED",
                            f"department {department} does not serve {record_type} (policies/)",
                            department=department,
                            record_type=record_type,
                        )
                self._endpoints.check(department, trace.endpoint, policy)
                instance, previous = await asyncio.to_thread(
                    self._store.register,
                    department,
                    trace.record_types,
                    trace.endpoint,
                    schema_version,
                )
                trace.instance_id = instance.instance_id
                call.undo_unless_audited(
                    lambda: asyncio.to_thread(self._store.undo, instance, previous)
                )
            return instance.instance_id

        instance_id = await _together(register())
        return registry_pb2.RegisterResponse(
            instance_id=instance_id, lease_seconds=self._store.lease_s
        )

    async def Heartbeat(
        self, request: registry_pb2.HeartbeatRequest, context: _Context
    ) -> registry_pb2.HeartbeatResponse:
        trace = _Trace("heartbeat")
        async with self._audited(trace, context):
            principal = self._principal(context, trace)
            self._owned(principal, request.instance_id, trace)
            renewed = await asyncio.to_thread(self._store.heartbeat, trace.instance_id)
            if renewed is None:  # deregistered meanwhile
                raise _not_found()
        return registry_pb2.HeartbeatResponse(lease_seconds=self._store.lease_s)

    async def Deregister(
        self, request: registry_pb2.DeregisterRequest, context: _Context
    ) -> registry_pb2.DeregisterResponse:
        trace = _Trace("deregister")

        async def deregister() -> None:
            async with self._audited(trace, context) as call:
                principal = self._principal(context, trace)
                self._owned(principal, request.instance_id, trace)
                removed = await asyncio.to_thread(self._store.remove, trace.instance_id)
                if removed is None:  # deregistered meanwhile
                    raise _not_found()
                call.undo_unless_audited(
                    lambda: asyncio.to_thread(self._store.undo, removed, removed)
                )

        await _together(deregister())
        return registry_pb2.DeregisterResponse()

    async def ListAdapters(
        self, request: registry_pb2.ListAdaptersRequest, context: _Context
    ) -> registry_pb2.ListAdaptersResponse:
        trace = _Trace("list")
        async with self._audited(trace, context):
            principal = self._principal(context, trace)
            wanted = check.department(request.department, required=False)
            if not principal.is_operator:
                wanted = wanted or principal.department
                trace.department = wanted
                self._authorize(principal, wanted)
            now = self._store.now()
            reply = registry_pb2.ListAdaptersResponse()
            for instance in self._store.instances(wanted):
                reply.adapters.append(self._view(instance, now))
        return reply

    # --- helpers ---------------------------------------------------------------------------

    def _principal(self, context: _Context, trace: _Trace) -> DepartmentPrincipal:
        principal = trace.principal = self._auth.registry_principal(invocation_metadata(context))
        if not (principal.is_operator or principal.is_department):
            raise errors.PermissionDenied(
                "ROLE_NOT_ALLOWED", "the registry needs a department or operator credential"
            )
        return principal

    def _authorize(self, principal: DepartmentPrincipal, department: str) -> None:
        if not principal.may_act_for(department):
            raise errors.PermissionDenied(
                "DEPARTMENT_MISMATCH",
                "a department credential acts only for its own department",
                department=department,
            )

    def _served(self, policy: PolicySet, department: str) -> tuple[str, ...]:
        known = policy.departments.get(department)
        if known is None:
            raise errors.PermissionDenied(
                "UNKNOWN_DEPARTMENT",
                f"department {department} is not in the policy set",
                department=department,
            )
        return known.record_types

    def _owned(self, principal: DepartmentPrincipal, instance_id: str, trace: _Trace) -> Instance:
        trace.instance_id = check.instance_id(instance_id)
        instance = self._store.get(trace.instance_id)
        if instance is None:
            raise _not_found()
        trace.department, trace.endpoint = instance.department, instance.endpoint
        trace.record_types = instance.record_types
        self._authorize(principal, instance.department)
        return instance

    def _view(self, instance: Instance, now: float) -> registry_pb2.AdapterInstance:
        return registry_pb2.AdapterInstance(
            instance_id=instance.instance_id,
            department=instance.department,
            record_types=instance.record_types,
            endpoint=instance.endpoint,
            schema_version=instance.schema_version,
            registered_at=_timestamp(instance.registered_at),
            lease_expires_at=_timestamp(instance.lease_expires_at),
            live=instance.live(now),
            breaker_state=str(self._breakers.state(instance.department)),
        )

    def _audited(self, trace: _Trace, context: _Context) -> AuditedCall:
        return AuditedCall(
            self._audit,
            lambda result: self._entry(trace, result),
            refusals=self._refusals,
            context=context,
        )

    def _entry(self, trace: _Trace, result: Result) -> AuditEvent | None:
        """The call's entry: every PERMISSION_DENIED and every successful change; nothing for
        other refusals (no verified caller, malformed input) or for heartbeats and listings."""
        if result.failure is None and trace.action not in _CHANGES:
            return None
        decision = result.decision
        if not decision:
            return None
        principal = trace.principal
        return AuditEvent(
            kind="registry",
            clerk=principal.sub if principal else "",
            office="",
            roles=principal.roles if principal else (),
            subject_id=trace.endpoint,
            matter_code="",
            case_number="",
            consent_method="",
            record_type=",".join(trace.record_types),
            decision=decision,
            rule_id=f"registry.{trace.action}",
            withheld_fields=(),
            outcome=result.outcome,
            status=result.status,
            policy_version=self._policies.current.version,
            department=trace.department,
            latency_ms=round(result.latency_ms, 3),
            decision_id=trace.instance_id,
        )


_T = TypeVar("_T")
_changes: set[asyncio.Task[Any]] = set()  # strong references while shielded changes run


async def _together(change: Coroutine[Any, Any, _T]) -> _T:
    """Run a store change and its audit entry to the end even if the caller goes away: a
    cancelled RPC must not leave a registration without its entry (or undo one whose entry
    the audit log still writes)."""
    task = asyncio.ensure_future(change)
    _changes.add(task)
    task.add_done_callback(_changes.discard)
    return await asyncio.shield(task)


def _not_found() -> errors.NotFound:
    return errors.NotFound(
        "INSTANCE_NOT_FOUND", "no such adapter instance (register again)", argument="instance_id"
    )


def _timestamp(epoch: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(epoch * 1e9))
    return stamp
