"""Prometheus metrics of an adapter, in its own registry (several adapters can share a process).

Labels are low-cardinality by construction: the record types served here, outcome reasons from
the contract, registry call names. A record type a caller made up is counted as ``unknown``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class AdapterMetrics:
    """An adapter's instruments, registered in ``registry``."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.fetches = Counter(
            "certbroker_adapter_fetches",
            "Fetch calls by record type and outcome (OK or the error reason).",
            ["record_type", "outcome"],
            registry=r,
        )
        self.fetch_latency = Histogram(
            "certbroker_adapter_fetch_seconds",
            "Fetch call latency as served, whatever the outcome.",
            ["record_type"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.registry_calls = Counter(
            "certbroker_adapter_registry_calls",
            "Calls to the broker's Registry by method and gRPC status.",
            ["method", "status"],
            registry=r,
        )
        self.registered = Gauge(
            "certbroker_adapter_registered",
            "1 while the broker holds a live registration of this instance, else 0.",
            registry=r,
        )

    def serve(self, host: str, port: int) -> tuple[WSGIServer, int]:
        """Expose /metrics over HTTP; the server and its bound port (port 0 = any free one).

        Stop it with ``server.shutdown(); server.server_close()``.
        """
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, int(server.server_port)
