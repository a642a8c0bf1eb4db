"""Where a department's adapter instances may be: the Registry's endpoint rule.

The broker dials a registered endpoint with a decision token, so registering one is asking the
broker to connect somewhere. A department may register only endpoints its catalogue entry
declares (``departments[].endpoints`` in ``policies/``: hosts as addresses, CIDR ranges or DNS
name globs, and port ranges; see :class:`certbroker.policy.EndpointRule`), and never one of the
broker's own ports (its gRPC and metrics ports, on any host: a DNS name or another address of
this machine could lead back to the broker). Anything else is PERMISSION_DENIED
``ENDPOINT_NOT_ALLOWED``, which the Registry audits.

The same rule filters routing (:func:`certbroker.routing.router.build_router`), against the
policy in force at each call: an instance registered under an older, wider policy is not
dialled once the policy no longer allows it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from certbroker import errors
from certbroker.config import Config
from certbroker.policy import PolicySet, PolicySource
from certbroker.policy.model import IPAddress
from certbroker.routing.registry.validation import parse_endpoint

__all__ = ["EndpointGuard", "broker_ports"]


@functools.lru_cache(maxsize=1024)
def _parsed(endpoint: str) -> tuple[IPAddress | str, int] | None:
    # Routing checks every live endpoint on every call: parse each one once.
    try:
        return parse_endpoint(endpoint)
    except errors.InvalidArgument:
        return None


class EndpointGuard:
    """The endpoint rule over the policy set in force and the broker's own ports.

    ``own_ports`` can grow after construction (:meth:`refuse_ports`): a port the broker binds
    as it starts (``port = 0``) is known only then.
    """

    def __init__(self, policies: PolicySource, own_ports: Iterable[int] = ()) -> None:
        self._policies = policies
        self._own_ports = frozenset(p for p in own_ports if p)

    @property
    def own_ports(self) -> frozenset[int]:
        """The ports refused on every host."""
        return self._own_ports

    def refuse_ports(self, ports: Iterable[int]) -> None:
        """Refuse ``ports`` too, on every host (0, "any port", is ignored)."""
        self._own_ports = self._own_ports | {p for p in ports if p}

    def problem(
        self, department: str, endpoint: str, policy: PolicySet | None = None
    ) -> str | None:
        """Why ``department`` may not have an adapter at ``endpoint`` under ``policy`` (default:
        the set in force); None when it may."""
        parsed = _parsed(endpoint)
        if parsed is None:
            return "endpoint is not host:port"
        host, port = parsed
        if port in self._own_ports:
            return "endpoint names one of the broker's own ports"
        known = (policy or self._policies.current).departments.get(department)
        if known is None or not known.allows_endpoint(host, port):
            return f"endpoint is not among department {department}'s endpoints (policies/)"
        return None

    def allows(self, department: str, endpoint: str) -> bool:
        """Whether ``department`` may have an adapter at ``endpoint`` (routing's filter)."""
        return self.problem(department, endpoint) is None

    def check(self, department: str, endpoint: str, policy: PolicySet | None = None) -> None:
        """Raise PERMISSION_DENIED ``ENDPOINT_NOT_ALLOWED`` unless ``endpoint`` is allowed (see
        :meth:`problem`)."""
        problem = self.problem(department, endpoint, policy)
        if problem is not None:
            raise errors.PermissionDenied(
                "ENDPOINT_NOT_ALLOWED", problem, department=department, argument="endpoint"
            )


def broker_ports(config: Config, *bound: int) -> set[int]:
    """The broker's own ports: configured and ``bound`` (gRPC and metrics). With ``workers``
    processes, worker *i* serves metrics on ``metrics_port + i`` and each is given its own
    port as ``metrics_port``: every port a sibling may have is in the window around it."""
    ports = {config.port, config.metrics_port, *bound}
    if config.metrics_port and config.workers > 1:
        span = config.workers - 1
        ports.update(range(config.metrics_port - span, config.metrics_port + span + 1))
    return {p for p in ports if 0 < p <= 65535}
