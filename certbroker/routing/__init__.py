"""From a decision to a department: which adapter answers, over what channel, and is it trusted.

- :mod:`~certbroker.routing.router`: the :class:`Router` and its record sources (in-process demo
  adapters, a fixed gRPC endpoint, or instances from the registry), with per-department
  timeouts;
- :mod:`~certbroker.routing.replies`: every adapter reply is checked (subject echo, limits,
  unknown fields dropped) before anything in it is cached or released;
- :mod:`~certbroker.routing.breaker`: one circuit breaker per department;
- :mod:`~certbroker.routing.channels`: pooled gRPC channels (TLS, mutual TLS);
- :mod:`~certbroker.routing.decision_token`: the signed decision each adapter call carries;
- :mod:`certbroker.routing.registry`: departments register their adapter instances.

Modules inside this package import the defining modules, never this one.
"""

from certbroker.routing.breaker import BreakerBoard as BreakerBoard
from certbroker.routing.breaker import CircuitBreaker as CircuitBreaker
from certbroker.routing.decision_token import DecisionSigner as DecisionSigner
from certbroker.routing.router import Fetched as Fetched
from certbroker.routing.router import RecordSource as RecordSource
from certbroker.routing.router import Router as Router
from certbroker.routing.router import build_router as build_router

__all__ = [
    "BreakerBoard",
    "CircuitBreaker",
    "DecisionSigner",
    "Fetched",
    "RecordSource",
    "Router",
    "build_router",
]
