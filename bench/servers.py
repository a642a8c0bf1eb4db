"""The servers the fast-path benchmark drives, each configured for one row of its table.

A :class:`Lab` holds what every row shares (a temporary directory, synthetic datasets, one
citizen who has all four records, two policy directories) and starts, as child processes, the
bare echo server and brokers in the configurations the rows need:

* the shipped ``policies/`` (household records: ``cache_ttl_s`` 600), so repeating one
  citizen's household lookup is a record-cache hit after the first call;
* a copy of them with every ``cache_ttl_s`` set to 0, so the same lookup is a cache miss every
  time (chosen over "a different citizen each call" so that hit and miss rows send the very
  same request and get the very same answer: the cache is the only difference);
* in-process demo adapters, or the household adapter as its own process over gRPC (verifying
  the broker's decision token, as departments are configured by default);
* metrics on or off (``CERTBROKER_METRICS_ENABLED``), one process or ``--workers N``.

Features other engineers may not have wired yet are probed, not assumed: :func:`features`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from adapters import synthetic
from bench.harness import ROOT, BenchError, Child, Processes
from bench.load import Call
from broker import client, config, metrics, policy
from broker.auth import DevIdentityProvider
from broker.decision_token import DecisionSigner
from certbroker.v1 import broker_pb2, broker_pb2_grpc

#: Citizens in the synthetic datasets: lookups are indexed, so size hardly matters.
CITIZENS = 300
RECORD_TYPE = "household"  # the shipped policy caches it (cache_ttl_s: 600)
MATTER = "BDC-ZY-001"  # the property transfer: needs household, marriage and property
CASE = "GZ20261121-009999"
OFFICE = "gz-haizhu-24h-01"  # a 24-hour hall: the policy allows it at any hour
LOOKUP = "/certbroker.v1.CertificateBroker/Lookup"
LOOKUP_MATTER = "/certbroker.v1.CertificateBroker/LookupMatter"


@dataclass(frozen=True)
class BrokerSpec:
    """One broker configuration. ``name`` names its state directory and log file."""

    name: str
    cached: bool = True  # shipped policies (household cached) or the cache_ttl_s: 0 copy
    adapter_over_grpc: bool = False  # household adapter as its own process
    metrics: bool = True
    workers: int = 1


@dataclass(frozen=True)
class Features:
    """What the broker in this checkout can do (see :func:`features`)."""

    metrics_knob: bool  # config.metrics_enabled reaches Metrics(enabled=...)
    workers: bool  # `certbroker serve --workers N`


def features() -> Features:
    """Probe the code, not a version number: parts of the fast path land separately."""
    has_field = "metrics_enabled" in {f.name for f in dataclasses.fields(config.Config)}
    accepts = "enabled" in inspect.signature(metrics.Metrics).parameters
    wired = "metrics_enabled" in (ROOT / "broker" / "server.py").read_text(encoding="utf-8")
    serve_help = subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    return Features(metrics_knob=has_field and accepts and wired, workers="--workers" in serve_help)


@dataclass(frozen=True)
class RunningBroker:
    """A started broker: its process (for CPU and RSS), port and a clerk token it accepts."""

    child: Child
    token: str

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.child.port}"

    @property
    def pid(self) -> int:
        return self.child.process.pid

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(client.bearer(self.token))


class Lab:
    """The shared setup under ``base`` (a temporary directory the caller owns)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.datasets = base / "datasets"
        synthetic.generate(self.datasets, citizens=CITIZENS)
        self.subject = synthetic.sample_couple(self.datasets)[0]
        self.uncached_policies = _uncached_copy(config.DEFAULT_POLICY_DIR, base / "policies-ttl0")

    def lookup_request(self) -> broker_pb2.LookupRequest:
        return client.lookup_request(RECORD_TYPE, self.subject, MATTER, CASE)

    def bundle_request(self) -> broker_pb2.LookupMatterRequest:
        return client.lookup_matter_request(MATTER, CASE, [(self.subject, "seller")])

    def lookup_call(self, broker: RunningBroker) -> Call:
        request = self.lookup_request().SerializeToString()
        return Call(broker.target, LOOKUP, request, broker.metadata())

    def bundle_call(self, broker: RunningBroker) -> Call:
        request = self.bundle_request().SerializeToString()
        return Call(broker.target, LOOKUP_MATTER, request, broker.metadata())

    @contextlib.contextmanager
    def echo(self, size: int) -> Iterator[Child]:
        """The bare echo server, answering ``size`` bytes."""
        with Processes(self.base) as processes:
            args = ["-m", "bench.echo", "--size", str(size)]
            yield processes.start({"echo": args})["echo"]

    @contextlib.contextmanager
    def broker(self, spec: BrokerSpec) -> Iterator[RunningBroker]:
        """``certbroker serve`` as ``spec`` says (with its adapter process, if any)."""
        state = self.base / spec.name
        state.mkdir()
        toml = ""
        with Processes(self.base) as processes:
            if spec.adapter_over_grpc:
                signer = DecisionSigner(state)  # the key the broker will sign with
                args = ["-m", "adapters", "--record-type", RECORD_TYPE, "--port", "0"]
                args += ["--dataset-dir", str(self.datasets)]
                args += ["--broker-public-key", str(signer.public_key_path)]
                adapter = processes.start({f"{spec.name}-adapter": args})[f"{spec.name}-adapter"]
                toml = (
                    f'[adapters.{RECORD_TYPE}]\nmode = "grpc"\n'
                    f'endpoint = "127.0.0.1:{adapter.port}"\n'
                )
            config_file = state / "broker.toml"
            config_file.write_text(toml, encoding="utf-8")
            serve = ["-m", "broker.cli", "serve", "--config", str(config_file)]
            serve += ["--port", "0", "--metrics-port", "0", "--state-dir", str(state)]
            if spec.workers != 1:
                serve += ["--workers", str(spec.workers)]
            env = {
                "CERTBROKER_DATASET_DIR": str(self.datasets),
                "CERTBROKER_POLICY_DIR": str(
                    config.DEFAULT_POLICY_DIR if spec.cached else self.uncached_policies
                ),
                "CERTBROKER_METRICS_ENABLED": "true" if spec.metrics else "false",
            }
            child = processes.start({spec.name: serve}, env=env)[spec.name]
            token = DevIdentityProvider(state).issue("bench-clerk", ["window_clerk"], OFFICE)
            yield RunningBroker(child, token)


def _uncached_copy(source: Path, target: Path) -> Path:
    """A copy of the policy directory with every ``cache_ttl_s`` set to 0 (checked)."""
    shutil.copytree(source, target)
    for path in target.glob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        path.write_text(re.sub(r"(cache_ttl_s:\s*)\d+", r"\g<1>0", text), encoding="utf-8")
    cached = [rt.name for rt in policy.load(target).record_types.values() if rt.cache_ttl_s]
    if cached:
        raise BenchError(f"could not turn the cache off for {cached} in {target}")
    return target


def probe_lookup(lab: Lab, broker: RunningBroker) -> tuple[int, bool]:
    """Two identical lookups: (size of the serialized reply, whether the second was cached)."""
    with grpc.insecure_channel(broker.target) as channel:
        stub = broker_pb2_grpc.CertificateBrokerStub(channel)
        try:
            stub.Lookup(lab.lookup_request(), metadata=broker.metadata(), timeout=30)
            reply = stub.Lookup(lab.lookup_request(), metadata=broker.metadata(), timeout=30)
        except grpc.RpcError as exc:
            raise BenchError(f"Lookup: {client.call_error(exc)}") from None
    return len(reply.SerializeToString()), reply.from_cache


def probe_bundle(lab: Lab, broker: RunningBroker) -> int:
    """One bundle, every item answered: the number of records in it."""
    with grpc.insecure_channel(broker.target) as channel:
        stub = broker_pb2_grpc.CertificateBrokerStub(channel)
        try:
            reply = stub.LookupMatter(lab.bundle_request(), metadata=broker.metadata(), timeout=30)
        except grpc.RpcError as exc:
            raise BenchError(f"LookupMatter: {client.call_error(exc)}") from None
    failed = [str(i.error) for i in reply.items if i.WhichOneof("result") != "response"]
    if failed:
        raise BenchError(f"bundle items failed: {failed}")
    return len(reply.items)
