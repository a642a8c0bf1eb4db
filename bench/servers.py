"""The servers the fast-path benchmark drives, each configured for one row of its table.

A :class:`Lab` holds what every row shares (a temporary directory, synthetic datasets, one
citizen who has all four records, two policy directories) and starts, as child processes, the
bare echo server and brokers in the configurations the rows need:

* the shipped ``policies/`` without their quotas (household records: ``cache_ttl_s`` 600), so
  repeating one citizen's household lookup is a record-cache hit after the first call; and the
  same with quotas that count every call but never refuse (:mod:`bench.policies`);
* a copy of them with every ``cache_ttl_s`` set to 0 (:func:`bench.policies.uncached_policies`),
  so the same lookup is a cache miss every time (chosen over "a different citizen each call" so
  that hit and miss rows send the very same request and get the very same answer: the cache is
  the only difference);
* in-process demo adapters, or the household adapter as its own process over gRPC (verifying
  the broker's decision token, as departments are configured by default);
* metrics on or off (``[server] metrics_enabled``), one process or ``--workers N``.

Each broker gets its own state directory and TOML file; the children inherit no
``CERTBROKER_*`` variable from the shell (:class:`bench.harness.Processes`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.harness import BenchError, Child, Processes
from bench.load import Call
from bench.policies import counting_policies, uncached_policies, unlimited_policies
from certbroker.adapters.demo import synthetic
from certbroker.auth.authenticator import DevIdentityProvider
from certbroker.cli import client
from certbroker.routing.decision_token import DecisionSigner
from certbroker.server import eventloop
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
    quotas: bool = False  # the shipped quotas, counting every call (limits never reached)
    loop: str = ""  # "asyncio" forces asyncio's event loop; "" = as the broker chooses
    batch_wait_ms: float = 0.0  # [audit] batch_wait_ms: how long a batch is held open
    metrics_port: int = 0  # 0 = any free port (the first worker's; worker i adds i)


@dataclass(frozen=True)
class RunningBroker:
    """A started broker: its spec, process (for CPU and RSS), port and a clerk token."""

    spec: BrokerSpec
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
        self.cached_policies = unlimited_policies(base / "policies")
        self.uncached_policies = uncached_policies(base / "policies-ttl0")
        self.quota_policies = counting_policies(base / "policies-quotas")

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
    def echo(self, size: int, loop: str = "") -> Iterator[Child]:
        """The bare echo server, answering ``size`` bytes, on ``loop`` ("": as the broker
        would choose; "asyncio" or "uvloop")."""
        name = f"echo-{loop}" if loop else "echo"
        with Processes(self.base) as processes:
            args = ["-m", "bench.echo", "--size", str(size)]
            if loop:
                args += ["--loop", loop]
            yield processes.start({name: args})[name]

    @contextlib.contextmanager
    def brokers(self, *specs: BrokerSpec) -> Iterator[list[RunningBroker]]:
        """``certbroker serve`` for every spec, all started at once (adapter processes first),
        in the order given; all stopped on exit."""
        with Processes(self.base) as processes:
            adapters = processes.start(
                {
                    f"{spec.name}-adapter": self._adapter_args(spec)
                    for spec in specs
                    if spec.adapter_over_grpc
                }
            )
            by_name = {spec.name: spec for spec in specs}
            serve = {
                spec.name: self._serve_args(spec, adapters.get(f"{spec.name}-adapter"))
                for spec in specs
            }
            env = {"CERTBROKER_DATASET_DIR": str(self.datasets)}
            children = processes.start(
                {name: args for name, args in serve.items() if not by_name[name].loop}, env=env
            )
            for spec in specs:  # a broker on another loop: one more start, with its variable
                if spec.loop:
                    loop_env = {**env, eventloop.ENV: spec.loop}
                    children |= processes.start({spec.name: serve[spec.name]}, env=loop_env)
            yield [RunningBroker(spec, children[spec.name], self._token(spec)) for spec in specs]

    def _state(self, spec: BrokerSpec) -> Path:
        state = self.base / spec.name
        state.mkdir(exist_ok=True)
        return state

    def _adapter_args(self, spec: BrokerSpec) -> list[str]:
        """The household adapter as its own process, trusting ``spec``'s broker key."""
        signer = DecisionSigner(self._state(spec))  # the key the broker will sign with
        args = ["-m", "certbroker.adapters", "--record-type", RECORD_TYPE, "--port", "0"]
        args += ["--dataset-dir", str(self.datasets)]
        return [*args, "--broker-public-key", str(signer.public_key_path)]

    def _serve_args(self, spec: BrokerSpec, adapter: Child | None) -> list[str]:
        """Writes ``spec``'s configuration file; the ``certbroker serve`` arguments."""
        state = self._state(spec)
        policies = self.cached_policies if spec.cached else self.uncached_policies
        if spec.quotas:
            policies = self.quota_policies
        toml = [
            "[server]",
            f"metrics_enabled = {'true' if spec.metrics else 'false'}",
            "[policy]",
            f"dir = {json.dumps(str(policies))}",  # a JSON string is a TOML basic string
            "[audit]",
            f"batch_wait_ms = {spec.batch_wait_ms!r}",
        ]
        if adapter is not None:
            toml += [
                f"[adapters.{RECORD_TYPE}]",
                'mode = "grpc"',
                f'endpoint = "127.0.0.1:{adapter.port}"',
            ]
        config_file = state / "broker.toml"
        config_file.write_text("\n".join(toml) + "\n", encoding="utf-8")
        serve = ["-m", "certbroker", "serve", "--config", str(config_file)]
        serve += ["--port", "0", "--metrics-port", str(spec.metrics_port)]
        serve += ["--state-dir", str(state)]
        return [*serve, "--workers", str(spec.workers)]  # the flag the row is named after

    def _token(self, spec: BrokerSpec) -> str:
        idp = DevIdentityProvider(self.base / spec.name)
        return idp.issue("bench-clerk", ["window_clerk"], OFFICE)


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
