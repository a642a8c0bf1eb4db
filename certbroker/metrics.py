"""Prometheus metrics, each broker with its own registry (so several can share a process).

Labels are low-cardinality by construction: record types, departments, matters, decisions and
status code names come from the policy catalogue or gRPC, never from callers. No subject IDs,
no clerks, no tokens. No label value is empty: "" (no decision reached, no department known)
is exported as ``none``. Counters and histograms have no ``_created`` series (a timestamp
per series that only doubles what is stored; :func:`prometheus_client.disable_created_metrics`).

The instruments every lookup touches (lookups, their latency, policy evaluation, the audit
append wait, record and token cache counts, adapter latency) are written by the event loop's
thread only and kept without locks (``_LoopFamily``): about a dozen updates per lookup, at a
fraction of ``prometheus_client``'s cost. The rest are ``prometheus_client``'s own.

``Metrics(enabled=False)`` records nothing: every instrument is a shared no-op and the registry
stays empty. The benchmark uses it to measure what the metrics cost.

Instruments (names as scraped; counters gain ``_total``):

=========================================== ==================================================
``certbroker_lookups``                      items by record type, decision, department, status
``certbroker_lookup_latency_seconds``       end to end, by ``method`` (Lookup, LookupMatter)
                                            and ``status`` (gRPC status code name)
``certbroker_policy_evaluation_seconds``    one policy decision (check and decide)
``certbroker_adapter_call_seconds``         one broker → adapter fetch, by record type, status
``certbroker_adapter_errors``               failed fetches by department and status
``certbroker_audit_append_seconds``         a request's wait for its audit entry to be durable
``certbroker_audit_commit_seconds``         one audit transaction (group commit)
``certbroker_audit_commit_batch_size``      entries per audit transaction
``certbroker_audit_lock_wait_seconds``      a batch's wait for the log's write lock (the other
                                            worker processes' writers)
``certbroker_record_cache_hits``            lookups answered from the record cache
``certbroker_record_cache_misses``          cacheable lookups that called the department
``certbroker_record_cache_coalesced``       lookups that joined an identical fetch in flight
``certbroker_token_cache_hits`` / ``_misses`` tokens answered from / missing in the token cache
``certbroker_bundle_latency_seconds``       LookupMatter by matter
``certbroker_bundle_items``                 items per answered LookupMatter
``certbroker_policy_reloads``               policy reload attempts by result
=========================================== ==================================================

Read when scraped (:meth:`Metrics.watch`, callbacks of the running broker):

=========================================== ==================================================
``certbroker_policy_info``                  1, with the policy version in force as ``version``
``certbroker_circuit_breaker_state``        per department: 0 closed, 1 half-open, 2 open
``certbroker_registry_live_instances``      per department: registered adapter instances whose
                                            lease has not lapsed
``certbroker_audit_tree_size``              entries in the audit log's Merkle tree
``certbroker_audit_last_checkpoint``        when the newest signed checkpoint was signed
``_timestamp_seconds``                      (epoch seconds; absent before the first one)
``certbroker_rpcs_in_flight``               calls of the broker's services being served

The audit readings query the log (a read-only connection per scrape, SQLite or PostgreSQL):
the log is shared by workers and other brokers, and the checkpoints may be signed by any of
them or by ``certbroker audit checkpoint``, so only the log itself is current.
``process_*``                               the process: ``process_resident_memory_bytes``,
                                            ``process_cpu_seconds_total``, ``process_open_fds``
                                            and the rest of prometheus_client's ProcessCollector
=========================================== ==================================================
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Protocol, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

# Process-wide in prometheus_client (it has no per-registry switch); every registry here is
# the broker's, and ``_created`` only repeats what the server's own start time already says.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: What an empty label value is exported as: Prometheus treats an empty value as the label
#: being absent, which silently merges series.
EMPTY_LABEL: Final = "none"
#: ``certbroker_circuit_breaker_state`` values by breaker state name.
BREAKER_STATES: Final = {"closed": 0.0, "half_open": 1.0, "open": 2.0}

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Policy decisions are pure computation: microseconds, not milliseconds.
_FAST_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01)
# A bundle has at most 8 subjects x 4 record types.
_BUNDLE_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
# Group commit batches: one caller alone up to a busy hall's burst (max_batch is in the hundreds).
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class CounterLike(Protocol):
    """What the broker uses of a Prometheus counter (so a no-op can stand in)."""

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> CounterLike: ...

    def inc(self, amount: float = 1) -> None: ...


class HistogramLike(Protocol):
    """What the broker uses of a Prometheus histogram (so a no-op can stand in)."""

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> HistogramLike: ...

    def observe(self, amount: float) -> None: ...


class _Noop:
    """Stands in for every instrument of a disabled :class:`Metrics`."""

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> _Noop:
        return self

    def inc(self, amount: float = 1) -> None:
        return None

    def observe(self, amount: float) -> None:
        return None


_NOOP = _Noop()

_Child = TypeVar("_Child", CounterLike, HistogramLike)


class _Children(Generic[_Child]):
    """A labelled instrument whose children are looked up once per label values.

    ``prometheus_client``'s ``labels()`` validates and joins the values and takes a lock on
    every call; on the lookup path that is several calls per request for a handful of label
    combinations (labels are low-cardinality by construction, see the module docstring), so
    the children are kept in a dict. Everything else is the wrapped instrument's.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: _Child) -> None:
        self._metric: _Child = metric
        self._children: dict[tuple[Any, ...], _Child] = {}

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> _Child:
        if labelkwargs:  # rare: the keyword form is not memoised
            child: _Child = self._metric.labels(
                *map(_label, labelvalues), **{k: _label(v) for k, v in labelkwargs.items()}
            )
            return child
        found = self._children.get(labelvalues)
        if found is None:
            found = self._children[labelvalues] = self._metric.labels(*map(_label, labelvalues))
        return found

    def inc(self, amount: float = 1) -> None:
        raise ValueError("a labelled counter is incremented through labels()")

    def observe(self, amount: float) -> None:
        raise ValueError("a labelled histogram is observed through labels()")


def _label(value: Any) -> Any:
    return EMPTY_LABEL if value == "" else value


class _LoopCount:
    """One series of an event-loop counter: a plain float, no lock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> _LoopCount:
        raise ValueError("this counter has no labels")

    def observe(self, amount: float) -> None:
        raise ValueError("a counter is incremented, not observed")


class _LoopBuckets:
    """One series of an event-loop histogram: per-bucket counts (found by bisection) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= amount.
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.sum += amount

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> _LoopBuckets:
        raise ValueError("this histogram has no labels")

    def inc(self, amount: float = 1) -> None:
        raise ValueError("a histogram is observed, not incremented")


_Series = TypeVar("_Series", _LoopCount, _LoopBuckets)


class _LoopFamily(Generic[_Series]):
    """An instrument written by the event loop's thread only (the per-call ones).

    ``prometheus_client`` takes a lock per increment and walks the buckets in Python per
    observation; a lookup makes about a dozen of them, measurable in the server's CPU per call
    (docs/benchmarks.md). Here a series is a plain float or list updated without a lock, which
    is safe because one thread writes it; the scrape (another thread) reads a snapshot and may
    see an observation's bucket a moment before its sum, nothing worse.
    """

    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: list[str],
        make: Callable[[], _Series],
    ) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self._make: Callable[[], _Series] = make
        self._series: dict[tuple[Any, ...], _Series] = {}  # by exported label values
        self._given: dict[tuple[Any, ...], _Series] = {}  # by the values callers pass
        self._plain: _Series | None = None if labelnames else self._child(())

    def _child(self, values: tuple[Any, ...]) -> _Series:
        found = self._series.get(values)
        if found is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}")
            found = self._series[values] = self._make()
        return found

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> _Series:
        if labelkwargs:
            labelvalues = tuple(labelkwargs[name] for name in self.labelnames)
        # The values as given first (one dict read on the hot path), exported normalized.
        found = self._given.get(labelvalues)
        if found is None:
            found = self._given[labelvalues] = self._child(
                tuple(_label(str(v)) for v in labelvalues)
            )
        return found

    def inc(self, amount: float = 1) -> None:
        if self._plain is None:
            raise ValueError("a labelled counter is incremented through labels()")
        self._plain.inc(amount)

    def observe(self, amount: float) -> None:
        if self._plain is None:
            raise ValueError("a labelled histogram is observed through labels()")
        self._plain.observe(amount)

    def snapshot(self) -> list[tuple[tuple[Any, ...], _Series]]:
        """The series as (label values, series); safe to call from another thread."""
        return list(self._series.items())  # one C call: atomic under the GIL


def _go_float(bound: float) -> str:
    """A bucket bound as prometheus_client writes it (``+Inf``, ``0.005``, ``1.0``)."""
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return text


class _LoopCollector(Collector):
    """Exports the :class:`_LoopFamily` instruments in the usual text format."""

    def __init__(self) -> None:
        self.counters: list[_LoopFamily[_LoopCount]] = []
        self.histograms: list[_LoopFamily[_LoopBuckets]] = []

    def collect(self) -> Iterable[Metric]:
        for counter in self.counters:
            family = CounterMetricFamily(counter.name, counter.doc, labels=counter.labelnames)
            for values, count in counter.snapshot():
                family.add_metric(list(values), count.value)
            yield family
        for histogram in self.histograms:
            hfamily = HistogramMetricFamily(
                histogram.name, histogram.doc, labels=histogram.labelnames
            )
            for values, series in histogram.snapshot():
                counts, total, running = list(series.counts), series.sum, 0
                buckets = []
                for bound, seen in zip((*series.bounds, float("inf")), counts, strict=True):
                    running += seen
                    buckets.append((_go_float(bound), float(running)))
                hfamily.add_metric(list(values), buckets, total)
            yield hfamily


@dataclass(frozen=True)
class BrokerState:
    """Callbacks that read a running broker's state when ``/metrics`` is scraped (on the
    metrics server's thread: each must be thread-safe, and may block briefly, e.g. to read
    the audit log). A callback that raises leaves its series out of that scrape (logged)."""

    policy_version: Callable[[], str]
    #: department -> breaker state name (a key of :data:`BREAKER_STATES`)
    breaker_states: Callable[[], Mapping[str, str]]
    #: department -> registered instances whose lease is live
    live_instances: Callable[[], Mapping[str, int]]
    audit_tree_size: Callable[[], int]
    #: epoch seconds of the newest signed checkpoint, None before the first
    last_checkpoint: Callable[[], float | None]
    rpcs_in_flight: Callable[[], int]


class _StateCollector(Collector):
    """The :class:`BrokerState` gauges, computed at scrape time."""

    def __init__(self, state: BrokerState) -> None:
        self._state = state

    def collect(self) -> Iterable[Metric]:
        state = self._state
        yield from _read("policy version", lambda: _policy(state.policy_version()))
        yield from _read("breaker states", lambda: _breakers(state.breaker_states()))
        yield from _read("registry", lambda: _instances(state.live_instances()))
        yield from _read(
            "audit tree size",
            lambda: GaugeMetricFamily(
                "certbroker_audit_tree_size",
                "Entries in the audit log's Merkle tree.",
                value=state.audit_tree_size(),
            ),
        )
        yield from _read("last checkpoint", lambda: _checkpoint(state.last_checkpoint()))
        yield from _read(
            "calls in flight",
            lambda: GaugeMetricFamily(
                "certbroker_rpcs_in_flight",
                "Calls of the broker's services being served now.",
                value=state.rpcs_in_flight(),
            ),
        )


def _read(what: str, family: Callable[[], Metric | None]) -> Iterable[Metric]:
    try:
        found = family()
    except Exception:  # a scrape shows what it can; the failure is in the log
        log.exception("metrics: reading the %s failed", what)
        return
    if found is not None:
        yield found


def _policy(version: str) -> Metric:
    info = InfoMetricFamily("certbroker_policy", "The policy set in force.")
    info.add_metric([], {"version": _label(version)})
    return info


def _breakers(states: Mapping[str, str]) -> Metric:
    gauge = GaugeMetricFamily(
        "certbroker_circuit_breaker_state",
        "Circuit breaker of each department: 0 closed, 1 half-open, 2 open.",
        labels=["department"],
    )
    for department, state in sorted(states.items()):
        gauge.add_metric([_label(department)], BREAKER_STATES[state])
    return gauge


def _instances(counts: Mapping[str, int]) -> Metric:
    gauge = GaugeMetricFamily(
        "certbroker_registry_live_instances",
        "Registered adapter instances of each department whose lease is live.",
        labels=["department"],
    )
    for department, count in sorted(counts.items()):
        gauge.add_metric([_label(department)], count)
    return gauge


def _checkpoint(signed_at: float | None) -> Metric | None:
    if signed_at is None:
        return None
    return GaugeMetricFamily(
        "certbroker_audit_last_checkpoint_timestamp_seconds",
        "When the newest signed audit checkpoint was signed (epoch seconds).",
        value=signed_at,
    )


@dataclass
class Metrics:
    """The broker's instruments, registered in ``registry`` (nothing when not ``enabled``)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    enabled: bool = True

    def __post_init__(self) -> None:
        self._loop = _LoopCollector()
        if self.enabled:
            self.registry.register(self._loop)
        # The instruments every lookup touches are written on the event loop only: the
        # lock-free kind (_LoopFamily). The others stay prometheus_client's (thread-safe).
        self.lookups = self._counter(
            "certbroker_lookups",
            "Lookups by record type, decision, department and status.",
            ["record_type", "decision", "department", "status"],
            loop=True,
        )
        self.lookup_latency = self._histogram(
            "certbroker_lookup_latency_seconds",
            "End-to-end latency of Lookup and LookupMatter calls, by gRPC status.",
            ["method", "status"],
            loop=True,
        )
        self.policy_evaluation = self._histogram(
            "certbroker_policy_evaluation_seconds",
            "Time to decide one lookup item by policy.",
            buckets=_FAST_BUCKETS,
            loop=True,
        )
        self.adapter_latency = self._histogram(
            "certbroker_adapter_call_seconds",
            "Broker to adapter fetch latency, by record type and gRPC status.",
            ["record_type", "status"],
            loop=True,
        )
        self.adapter_errors = self._counter(
            "certbroker_adapter_errors",
            "Adapter calls that failed, by department and status.",
            ["department", "status"],
        )
        self.audit_append = self._histogram(
            "certbroker_audit_append_seconds",
            "Time a request waits for its audit entries.",
            loop=True,
        )
        self.audit_commit = self._histogram(
            "certbroker_audit_commit_seconds", "Time to commit one audit transaction durably."
        )
        self.audit_lock_wait = self._histogram(
            "certbroker_audit_lock_wait_seconds",
            "Time an audit batch waited for the log's write lock (other worker processes).",
        )
        self.audit_batch = self._histogram(
            "certbroker_audit_commit_batch_size",
            "Audit entries per committed transaction (group commit).",
            buckets=_BATCH_SIZE_BUCKETS,
        )
        self.cache_hits = self._counter(
            "certbroker_record_cache_hits",
            "Lookup items answered from the record cache.",
            ["record_type"],
            loop=True,
        )
        self.cache_misses = self._counter(
            "certbroker_record_cache_misses",
            "Cacheable lookup items that called the department.",
            ["record_type"],
            loop=True,
        )
        self.cache_coalesced = self._counter(
            "certbroker_record_cache_coalesced",
            "Lookup items that shared an identical department call already in flight.",
            ["record_type"],
            loop=True,
        )
        self.token_cache_hits = self._counter(
            "certbroker_token_cache_hits",
            "Bearer tokens found verified in the token cache.",
            loop=True,
        )
        self.token_cache_misses = self._counter(
            "certbroker_token_cache_misses",
            "Bearer tokens verified in full (not cached).",
            loop=True,
        )
        self.bundle_latency = self._histogram(
            "certbroker_bundle_latency_seconds",
            "End-to-end LookupMatter latency, by matter.",
            ["matter"],
        )
        self.bundle_items = self._histogram(
            "certbroker_bundle_items",
            "Items (subject x record type) per answered LookupMatter.",
            buckets=_BUNDLE_SIZE_BUCKETS,
        )
        self.policy_reloads = self._counter(
            "certbroker_policy_reloads", "Policy reload attempts by result.", ["result"]
        )

    def _counter(
        self, name: str, doc: str, labels: list[str] | None = None, *, loop: bool = False
    ) -> CounterLike:
        """A counter; ``loop``: written on the event loop only (:class:`_LoopFamily`)."""
        if not self.enabled:
            return _NOOP
        if loop:
            family = _LoopFamily(name, doc, labels or [], _LoopCount)
            self._loop.counters.append(family)
            return family
        counter: CounterLike = Counter(name, doc, labels or [], registry=self.registry)
        return _Children(counter) if labels else counter

    def _histogram(
        self,
        name: str,
        doc: str,
        labels: list[str] | None = None,
        buckets: tuple[float, ...] = _LATENCY_BUCKETS,
        *,
        loop: bool = False,
    ) -> HistogramLike:
        """A histogram; ``loop``: written on the event loop only (:class:`_LoopFamily`)."""
        if not self.enabled:
            return _NOOP
        if loop:
            series = _LoopFamily(name, doc, labels or [], lambda: _LoopBuckets(buckets))
            self._loop.histograms.append(series)
            return series
        histogram: HistogramLike = Histogram(
            name, doc, labels or [], buckets=buckets, registry=self.registry
        )
        return _Children(histogram) if labels else histogram

    def observe_lookup(self, method: str, status: str, seconds: float) -> None:
        """One finished ``Lookup``/``LookupMatter`` call; ``status`` is a gRPC code name."""
        self.lookup_latency.labels(method, status).observe(seconds)

    def observe_adapter_call(self, record_type: str, status: str, seconds: float) -> None:
        """One broker → adapter fetch (cache misses only: hits call no adapter)."""
        self.adapter_latency.labels(record_type, status).observe(seconds)

    def observe_audit_commit(self, batch_size: int, seconds: float) -> None:
        """One committed audit transaction of ``batch_size`` entries (the group-commit hook)."""
        self.audit_commit.observe(seconds)
        self.audit_batch.observe(batch_size)

    def observe_record_cache(self, record_type: str, served: str) -> None:
        """How the record cache served one item: "hit", "miss", "coalesced" or "uncached"
        (a record type with ``cache_ttl_s: 0``, which is not counted)."""
        if served == "hit":
            self.cache_hits.labels(record_type).inc()
        elif served == "miss":
            self.cache_misses.labels(record_type).inc()
        elif served == "coalesced":
            self.cache_coalesced.labels(record_type).inc()

    def observe_token_cache(self, hit: bool) -> None:
        """One bearer token looked up in the token cache."""
        (self.token_cache_hits if hit else self.token_cache_misses).inc()

    def watch(self, state: BrokerState) -> None:
        """Export the running broker's ``state`` and the process's own metrics (RSS, CPU,
        open files: ``process_*``) from now on; nothing when not ``enabled``."""
        if not self.enabled:
            return
        ProcessCollector(registry=self.registry)
        self.registry.register(_StateCollector(state))

    def serve(self, host: str, port: int) -> tuple[WSGIServer, int]:
        """Expose /metrics over HTTP; returns the server and its bound port (port 0 = any)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, int(server.server_port)
