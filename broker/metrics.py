"""Prometheus metrics, each broker with its own registry (so several can share a process).

Labels are low-cardinality by construction: record types, departments, decisions and status
code names come from the policy catalogue or gRPC, never from callers. No subject IDs, no clerks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# A bundle has at most 8 subjects x 4 record types.
_BUNDLE_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


@dataclass
class Metrics:
    """The broker's instruments, registered in ``registry``."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.lookups = Counter(
            "certbroker_lookups",
            "Lookups by record type, decision, department and status.",
            ["record_type", "decision", "department", "status"],
            registry=r,
        )
        self.lookup_latency = Histogram(
            "certbroker_lookup_latency_seconds",
            "End-to-end lookup latency.",
            ["record_type"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_latency = Histogram(
            "certbroker_adapter_call_seconds",
            "Broker to adapter call latency.",
            ["department"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_errors = Counter(
            "certbroker_adapter_errors",
            "Adapter calls that failed, by department and status.",
            ["department", "status"],
            registry=r,
        )
        self.audit_append = Histogram(
            "certbroker_audit_append_seconds",
            "Time to append an audit entry durably.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.bundle_latency = Histogram(
            "certbroker_bundle_latency_seconds",
            "End-to-end LookupMatter latency, by matter.",
            ["matter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.bundle_items = Histogram(
            "certbroker_bundle_items",
            "Items (subject x record type) per answered LookupMatter.",
            buckets=_BUNDLE_SIZE_BUCKETS,
            registry=r,
        )
        self.policy_reloads = Counter(
            "certbroker_policy_reloads", "Policy reload attempts by result.", ["result"], registry=r
        )

    def serve(self, host: str, port: int) -> tuple[WSGIServer, int]:
        """Expose /metrics over HTTP; returns the server and its bound port (port 0 = any)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, int(server.server_port)
