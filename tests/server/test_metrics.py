"""certbroker.metrics: the instruments, a disabled Metrics, and the counters of a real broker
moving as lookups go through it (read from its registry and scraped over HTTP)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest

from certbroker.adapters.demo import synthetic
from certbroker.cli import client
from certbroker.metrics import Metrics
from tests.cache_support import sample, spy
from tests.helpers import Env

TRANSFER, CASE = "BDC-ZY-001", "GZ20261121-000777"


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
