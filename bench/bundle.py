"""Scenario "Matter bundles": is a bundle of three records as fast as its slowest single lookup?

Three department adapters run as their own processes (household, marriage, property), each
adding ``DELAY_MS`` to every fetch, and a broker process (``certbroker serve``) is routed to them
over gRPC. One clerk then repeats, in rounds, a single ``Lookup`` of each record type and one
``LookupMatter`` of the property transfer for one citizen (the same three records). The order
rotates every round so no call always runs on a warmer or colder broker.

The broker runs the shipped policies with the record cache off
(:func:`bench.policies.uncached_policies`): the shipped catalogue caches household and marriage
records, so from the second round on they would come from the cache and the scenario would time
one fetch against a cache hit. Every reply is checked: one marked ``from_cache`` fails the run.

Target (issue 3): the bundle's median latency is at most ``TARGET`` × the median of the
slowest single lookup — the fan-out is parallel, so a bundle costs one department round trip
plus its extra audit entry, not three round trips.
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from bench.harness import BenchError, Options, Processes, Result, percentile
from bench.policies import POLICY_DIR_ENV, uncached_policies
from certbroker.adapters.demo import synthetic
from certbroker.auth.authenticator import DevIdentityProvider
from certbroker.cli import client
from certbroker.v1 import broker_pb2, broker_pb2_grpc

SECTION = "Matter bundles"
DELAY_MS = 20
RECORD_TYPES = ("household", "marriage", "property")
MATTER = "BDC-ZY-001"  # the property transfer needs exactly these three record types
CASE = "GZ20261121-009999"
OFFICE = "gz-haizhu-24h-01"  # a 24-hour hall: the policy allows it at any hour
TARGET = 1.15
#: Citizens in the synthetic datasets: lookups are indexed, so size hardly matters.
CITIZENS = 300


def run(options: Options) -> Result:
    """Start the processes, measure, and report (see the module docstring)."""
    rounds = options.count(full=200, smoke=3)
    warmup = 1 if options.smoke else 10  # channels, connections and caches settle first
    with tempfile.TemporaryDirectory(prefix="certbroker-bench-") as tmp:
        base = Path(tmp)
        datasets = base / "datasets"
        synthetic.generate(datasets, citizens=CITIZENS)
        subject = synthetic.sample_couple(datasets)[0]
        policies = uncached_policies(base / "policies-ttl0")
        with Processes(base) as processes:
            adapters = processes.start({rt: _adapter_args(rt, datasets) for rt in RECORD_TYPES})
            config = base / "broker.toml"
            config.write_text(
                "".join(
                    f'[adapters.{rt}]\nmode = "grpc"\nendpoint = "127.0.0.1:{child.port}"\n'
                    for rt, child in adapters.items()
                )
            )
            state = base / "state"
            serve = ["-m", "certbroker", "serve", "--config", str(config)]
            serve += ["--port", "0", "--metrics-port", "0", "--state-dir", str(state)]
            env = {"CERTBROKER_DATASET_DIR": str(datasets), POLICY_DIR_ENV: str(policies)}
            broker = processes.start({"broker": serve}, env=env)["broker"]
            token = DevIdentityProvider(state).issue("bench-clerk", ["window_clerk"], OFFICE)
            samples = _measure(f"127.0.0.1:{broker.port}", token, subject, rounds, warmup)
    return _result(samples, rounds)


def _adapter_args(record_type: str, datasets: Path) -> list[str]:
    return [
        "-m",
        "certbroker.adapters",
        "--record-type",
        record_type,
        "--dataset-dir",
        str(datasets),
        "--port",
        "0",
        "--delay-ms",
        str(DELAY_MS),
        "--no-decision-token",  # the adapter's own check is not what is measured here
    ]


def _calls(
    stub: broker_pb2_grpc.CertificateBrokerStub, token: str, subject: str
) -> dict[str, Callable[[], object]]:
    metadata = client.bearer(token)

    def lookup(record_type: str) -> None:
        request = client.lookup_request(record_type, subject, MATTER, CASE)
        _fetched(stub.Lookup(request, metadata=metadata, timeout=10))

    calls: dict[str, Callable[[], object]] = {
        f"Lookup {rt}": functools.partial(lookup, rt) for rt in RECORD_TYPES
    }
    bundle_request = client.lookup_matter_request(MATTER, CASE, [(subject, "seller")])

    def bundle() -> None:
        reply = stub.LookupMatter(bundle_request, metadata=metadata, timeout=10)
        failed = [i for i in reply.items if i.WhichOneof("result") != "response"]
        if failed or len(reply.items) != len(RECORD_TYPES):
            raise BenchError(f"bundle items failed: {[str(i.error) for i in failed]}")
        for item in reply.items:
            _fetched(item.response)

    calls[f"LookupMatter ({len(RECORD_TYPES)} records)"] = bundle
    return calls


def _fetched(reply: broker_pb2.LookupResponse) -> None:
    """The scenario times department round trips: a cached answer would void it."""
    if reply.from_cache:
        raise BenchError(f"a {reply.department} record came from the cache with cache_ttl_s 0")


def _measure(
    target: str, token: str, subject: str, rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Milliseconds per call name, from ``rounds`` rounds after ``warmup`` unmeasured ones."""
    with grpc.insecure_channel(target) as channel:
        calls = _calls(broker_pb2_grpc.CertificateBrokerStub(channel), token, subject)
        return rotating_rounds(calls, rounds, warmup)


def rotating_rounds(
    calls: dict[str, Callable[[], object]], rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Milliseconds per call name: every call once per round, the order rotating every round
    so no call always runs on a warmer or colder broker; ``warmup`` rounds are not measured."""
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for n in range(warmup + rounds):
        shift = n % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            try:
                calls[name]()
            except grpc.RpcError as exc:
                raise BenchError(f"{name}: {client.call_error(exc)}") from None
            if n >= warmup:
                samples[name].append((time.perf_counter() - started) * 1000)
    return samples


def _result(samples: dict[str, list[float]], rounds: int) -> Result:
    p50 = {name: percentile(values, 50) for name, values in samples.items()}
    singles = [name for name in samples if name.startswith("Lookup ")]
    slowest = max(singles, key=lambda name: p50[name])
    (bundle,) = [name for name in samples if name not in singles]
    ratio = p50[bundle] / p50[slowest]
    rows = [
        (name, f"{p50[name]:.1f}", f"{percentile(values, 90):.1f}", str(len(values)))
        for name, values in samples.items()
    ]
    met = "met" if ratio <= TARGET else "NOT met"
    return Result(
        section=SECTION,
        setup=(
            f"{len(RECORD_TYPES)} adapter processes ({', '.join(RECORD_TYPES)}), each adding "
            f"{DELAY_MS} ms per fetch, behind a `certbroker serve` process routed over gRPC "
            "(SQLite audit log: an entry per record; a bundle's entries and its bundle entry "
            "share one transaction; record cache off, so every record is fetched); "
            f"{rounds} rounds, one call of each kind per round in rotating order."
        ),
        header=("call", "p50 ms", "p90 ms", "calls"),
        rows=rows,
        verdict=(
            f"bundle / slowest single ({slowest}) p50: {ratio:.2f} (target ≤ {TARGET:.2f}: {met})"
        ),
    )
