"""certbroker.metrics: the instruments, a disabled Metrics, the counters of a real broker
moving as lookups go through it (read from its registry and scraped over HTTP), and the state
a running ``certbroker serve`` exports."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from certbroker import config
from certbroker.adapters.demo import synthetic
from certbroker.auth.authenticator import DevIdentityProvider
from certbroker.cli import client
from certbroker.metrics import Metrics
from certbroker.server.policy_holder import PolicyHolder
from certbroker.v1 import broker_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.cache_support import sample, spy
from tests.helpers import Env
from tests.server import serving

TRANSFER, CASE = "BDC-ZY-001", "GZ20261121-000777"
OFFICE = "gz-haizhu-24h-01"
CHECKPOINT = "certbroker_audit_last_checkpoint_timestamp_seconds"


def exercise(metrics: Metrics) -> None:
    """One call of everything the broker records."""
    metrics.observe_lookup("Lookup", "OK", 0.01)
    metrics.observe_adapter_call("marriage", "OK", 0.005)
    metrics.observe_audit_commit(3, 0.002)
    for served in ("hit", "miss", "coalesced", "uncached"):
        metrics.observe_record_cache("marriage", served)
    metrics.observe_token_cache(True)
    metrics.observe_token_cache(False)
    metrics.policy_evaluation.observe(0.00001)
    metrics.lookups.labels("marriage", "allow", "civil_affairs", "OK").inc()
    metrics.adapter_errors.labels("civil_affairs", "UNAVAILABLE").inc()
    metrics.audit_append.observe(0.001)
    metrics.bundle_latency.labels(TRANSFER).observe(0.02)
    metrics.bundle_items.observe(6)
    metrics.policy_reloads.labels("ok").inc()


def test_disabled_metrics_record_nothing() -> None:
    disabled = Metrics(enabled=False)
    exercise(disabled)
    assert list(disabled.registry.collect()) == []

    enabled = Metrics()
    exercise(enabled)
    get = enabled.registry.get_sample_value
    assert get("certbroker_lookup_latency_seconds_count", {"method": "Lookup", "status": "OK"})
    assert get("certbroker_audit_commit_batch_size_sum") == 3.0
    assert get("certbroker_audit_commit_seconds_count") == 1.0
    for name in ("hits", "misses", "coalesced"):
        assert get(f"certbroker_record_cache_{name}_total", {"record_type": "marriage"}) == 1.0
    assert get("certbroker_token_cache_hits_total") == 1.0
    assert get("certbroker_token_cache_misses_total") == 1.0


def test_uncached_record_types_are_not_counted_as_cache_misses() -> None:
    metrics = Metrics()
    metrics.observe_record_cache("property", "uncached")
    names = {s.name for family in metrics.registry.collect() for s in family.samples}
    assert not any(name.startswith("certbroker_record_cache_") for name in names)


def test_two_brokers_in_one_process_do_not_share_instruments() -> None:
    one, two = Metrics(), Metrics()
    one.observe_token_cache(True)
    assert two.registry.get_sample_value("certbroker_token_cache_hits_total") == 0.0


def lookup(env: Env, token: str, record_type: str, subject: str) -> None:
    request = client.lookup_request(record_type, subject, TRANSFER, CASE)
    env.stub.Lookup(request, metadata=env.md(token), timeout=30)


def test_a_brokers_counters_follow_its_lookups(env: Env, dataset_dir: Path) -> None:
    husband, wife = synthetic.sample_couple(dataset_dir)
    marriage = spy(env.broker, "marriage")
    token = env.token()
    for subject in (husband, husband, husband, wife):  # a miss, two hits, another miss
        lookup(env, token, "marriage", subject)
    for _ in range(2):  # property is never cached (cache_ttl_s: 0)
        lookup(env, token, "property", husband)
    with pytest.raises(grpc.RpcError):  # a transfer does not need social security: denied
        lookup(env, token, "social_security", husband)
    env.stub.LookupMatter(
        client.lookup_matter_request(TRANSFER, CASE, [(wife, "seller")]),
        metadata=env.md(token),
        timeout=30,
    )  # household: miss; marriage and property as above

    def value(name: str, **labels: str) -> float:
        return sample(env.broker, name, **labels)

    assert value("certbroker_record_cache_misses_total", record_type="marriage") == 2
    assert value("certbroker_record_cache_hits_total", record_type="marriage") == 3
    assert value("certbroker_record_cache_misses_total", record_type="household") == 1
    assert value("certbroker_record_cache_coalesced_total", record_type="marriage") == 0
    for name in ("hits", "misses", "coalesced"):
        assert value(f"certbroker_record_cache_{name}_total", record_type="property") == 0
    assert len(marriage.calls) == 2
    adapter = "certbroker_adapter_call_seconds_count"
    assert value(adapter, record_type="marriage", status="OK") == len(marriage.calls)
    assert value(adapter, record_type="property", status="OK") == 3
    assert value("certbroker_policy_evaluation_seconds_count") == 7 + 3
    latency = "certbroker_lookup_latency_seconds_count"
    assert value(latency, method="Lookup", status="OK") == 6
    assert value(latency, method="Lookup", status="PERMISSION_DENIED") == 1
    assert value(latency, method="LookupMatter", status="OK") == 1

    assert env.broker.broker is not None
    url = f"http://127.0.0.1:{env.broker.broker.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'certbroker_record_cache_hits_total{record_type="marriage"} 3.0' in text
    assert 'certbroker_lookup_latency_seconds_count{method="LookupMatter",status="OK"} 1.0' in text
    assert "certbroker_audit_commit_seconds" in text
    for private in (husband, wife, "clerk-001"):  # no subjects, no clerks in any label
        assert private not in text


def test_labelled_children_are_looked_up_once() -> None:
    metrics = Metrics()
    child = metrics.lookups.labels("marriage", "allow", "civil_affairs", "OK")
    assert metrics.lookups.labels("marriage", "allow", "civil_affairs", "OK") is child
    child.inc()
    metrics.lookups.labels(
        record_type="marriage", decision="allow", department="civil_affairs", status="OK"
    ).inc()  # the keyword form reaches the same series
    labels = {
        "record_type": "marriage",
        "decision": "allow",
        "department": "civil_affairs",
        "status": "OK",
    }
    assert metrics.registry.get_sample_value("certbroker_lookups_total", labels) == 2.0


def test_empty_label_values_are_exported_as_none() -> None:
    metrics = Metrics()
    metrics.lookups.labels("invalid", "", "", "UNAUTHENTICATED").inc()  # no decision, no dept
    metrics.lookups.labels(record_type="x", decision="", department="", status="OK").inc()
    values = {
        value
        for family in metrics.registry.collect()
        for s in family.samples
        for value in s.labels.values()
    }
    assert "" not in values
    assert "none" in values


def test_a_running_broker_exports_its_state(tmp_path: Path, dataset_dir: Path) -> None:
    """Scraped from a real ``certbroker serve``: the policy in force, the breakers, the
    registered adapters, the audit tree and its checkpoints, the process; no ``_created``
    series and no empty label value."""
    with socket.socket() as probe:  # a port nothing listens on: the marriage adapter is down
        probe.bind(("127.0.0.1", 0))
        down = probe.getsockname()[1]
    toml = tmp_path / "broker.toml"
    toml.write_text("[audit]\ncheckpoint_interval_s = 0.2\n")
    env = {"CERTBROKER_ADAPTER_MARRIAGE": f"grpc://127.0.0.1:{down}"}
    env["CERTBROKER_BREAKER_FAILURES"] = "1"
    s = serving.serve(
        tmp_path,
        dataset_dir,
        *("--config", str(toml), "--port", "0", "--metrics-port", "0"),
        env=env,
    )
    try:
        idp = DevIdentityProvider(s.state_dir)
        subject, _ = synthetic.sample_couple(dataset_dir)
        with grpc.insecure_channel(s.target) as channel:
            with pytest.raises(grpc.RpcError) as failed:  # one failure opens civil affairs'
                broker_pb2_grpc.CertificateBrokerStub(channel).Lookup(
                    client.lookup_request("marriage", subject, TRANSFER, CASE),
                    metadata=client.bearer(idp.issue("clerk-m", ["window_clerk"], OFFICE)),
                    timeout=30,
                )
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            registry_pb2_grpc.RegistryStub(channel).Register(
                registry_pb2.RegisterRequest(
                    department="public_security",
                    record_types=["household"],
                    endpoint="127.0.0.1:7001",
                    schema_version="certbroker.v1",
                ),
                metadata=client.bearer(idp.issue_department("public_security")),
                timeout=30,
            )

        def checkpointed() -> bool:
            return bool(serving.scrape(s.metrics_port).get(CHECKPOINT))

        serving.wait_until("a signed checkpoint", checkpointed)
        samples = serving.scrape(s.metrics_port)
    finally:
        assert s.stop() == 0

    def one(name: str, **labels: str) -> float:
        (value,) = [v for found, v in samples[name] if found == labels]
        return value

    version = PolicyHolder(config.DEFAULT_POLICY_DIR, Metrics(enabled=False)).current.version
    assert one("certbroker_policy_info", version=version) == 1
    departments = {"civil_affairs", "public_security", "natural_resources"}
    states = {labels["department"]: v for labels, v in samples["certbroker_circuit_breaker_state"]}
    assert departments <= states.keys()
    assert states["civil_affairs"] == 2  # open
    assert states["public_security"] == 0  # closed
    live = {labels["department"]: v for labels, v in samples["certbroker_registry_live_instances"]}
    assert live["public_security"] == 1
    assert live["civil_affairs"] == 0
    assert one("certbroker_audit_tree_size") == 2  # the failed lookup and the registration
    assert time.time() - 120 < one(CHECKPOINT) <= time.time() + 1
    assert one("certbroker_rpcs_in_flight") == 0
    assert one("process_resident_memory_bytes") > 1_000_000
    assert one("process_cpu_seconds_total") > 0
    assert one("process_open_fds") > 0
    assert not [name for name in samples if name.endswith("_created")]
    empty = [
        (name, labels)
        for name, found in samples.items()
        for labels, _ in found
        if "" in labels.values()
    ]
    assert empty == []


def test_per_lookup_instruments_export_what_prometheus_client_would() -> None:
    # The lock-free kind (certbroker.metrics._LoopFamily) against prometheus_client's own
    # Histogram fed the same observations, bounds included (a bucket is "less or equal").
    from prometheus_client import CollectorRegistry, Histogram

    metrics = Metrics()
    reference = Histogram(
        "certbroker_lookup_latency_seconds",
        "reference",
        ["method", "status"],
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        registry=CollectorRegistry(),
    )
    for seconds in (0.0001, 0.0005, 0.0007, 0.001, 0.003, 0.2, 2.5, 7.0):
        metrics.observe_lookup("Lookup", "OK", seconds)
        reference.labels("Lookup", "OK").observe(seconds)

    def samples(families: object) -> dict[tuple[str, str], float]:
        return {
            (s.name, s.labels.get("le", "")): s.value
            for family in families  # type: ignore[attr-defined]
            if family.name == "certbroker_lookup_latency_seconds"
            for s in family.samples
        }

    assert samples(metrics.registry.collect()) == samples(reference.collect())
    with pytest.raises(ValueError, match="labels"):
        metrics.lookup_latency.observe(1.0)  # labelled: through labels() only
    with pytest.raises(ValueError, match="only go up"):
        metrics.token_cache_hits.inc(-1)
