"""Quotas on a real broker: past a quota a Lookup is PERMISSION_DENIED QUOTA_EXCEEDED, audited as
a denial naming the quota, and an anomaly for auditors; a bundle's items are admitted in order;
denied lookups count toward nothing; the window slides on the decision clock."""

from __future__ import annotations

import datetime as dt
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from certbroker import audit, config
from certbroker.adapters.demo import synthetic
from certbroker.cli import client
from certbroker.v1 import audit_pb2, audit_pb2_grpc, broker_pb2
from tests.helpers import Env, make_config, running_env

MATTER = "BDC-ZY-001"  # needs household, marriage and property
CASE = "GZ20260302-000001"
TIGHT = """\
quotas:
  - {id: test-citizens, roles: [window_clerk], distinct_subjects: 3, per: 1h}
  - {id: test-lookups, roles: [window_clerk], lookups: 5, per: 1m}
"""


class DecisionClock:
    """The broker's decision clock, moved by the test (quota windows and opening hours)."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 3, 4, 10, 0, tzinfo=dt.UTC)
        self._lock = threading.Lock()

    def __call__(self) -> dt.datetime:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += dt.timedelta(seconds=seconds)


def tight_policies(target: Path, quotas: str = TIGHT) -> Path:
    """The shipped policy set with its quotas replaced by ``quotas``."""
    shutil.copytree(config.DEFAULT_POLICY_DIR, target)
    (target / "quotas.yaml").write_text(quotas, "utf-8")
    return target


@pytest.fixture
def clock() -> DecisionClock:
    return DecisionClock()


@pytest.fixture
def qenv(tmp_path: Path, dataset_dir: Path, clock: DecisionClock) -> Iterator[Env]:
    cfg = make_config(tmp_path, dataset_dir, policy_dir=tight_policies(tmp_path / "policies"))
    with running_env(cfg, dataset_dir, decision_clock=clock) as env:
        yield env


def lookup(env: Env, token: str, subject: str, record_type: str = "household") -> object:
    request = client.lookup_request(record_type, subject, MATTER, CASE)
    return env.stub.Lookup(request, metadata=env.md(token), timeout=30)


def refusal(env: Env, token: str, subject: str, record_type: str = "household") -> client.CallError:
    with pytest.raises(grpc.RpcError) as info:
        lookup(env, token, subject, record_type)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    return client.call_error(info.value)


def entries(env: Env) -> list[audit.AuditEntry]:
    return audit.query(env.state_dir / "audit.sqlite", audit.QueryFilter(limit=100_000))


def test_the_fourth_citizen_is_refused_audited_and_an_anomaly(
    qenv: Env, dataset_dir: Path, clock: DecisionClock
) -> None:
    a, b, c, d = synthetic.sample_citizens(dataset_dir, 4)
    token = qenv.token()
    # A policy denial (the matter does not need social security) releases nothing: not counted.
    assert refusal(qenv, token, d, "social_security").reason == "POLICY_DENIED"
    for subject in (a, b, c):
        lookup(qenv, token, subject)
    error = refusal(qenv, token, d)
    assert error.reason == "QUOTA_EXCEEDED"
    assert error.metadata["rule"] == "test-citizens"
    assert error.metadata["condition"] == "QUOTA_EXCEEDED"
    assert "at most 3 distinct citizens per 1h" in error.message
    entry = entries(qenv)[-1]
    assert entry.entry_id == error.metadata["audit_entry_id"]
    event = entry.event
    assert (event.kind, event.clerk, event.subject_id) == ("lookup", "clerk-001", d)
    assert (event.decision, event.rule_id, event.outcome, event.status) == (
        "deny",
        "test-citizens",
        "QUOTA_EXCEEDED",
        "PERMISSION_DENIED",
    )
    assert event.decision_id == ""  # nothing was fetched under it
    assert "name" in event.withheld_fields
    lookup(qenv, token, a, "marriage")  # a citizen already looked up this hour: served
    assert refusal(qenv, qenv.token(sub="clerk-001"), d).reason == "QUOTA_EXCEEDED"  # any token
    lookup(qenv, qenv.token(sub="clerk-002"), d)  # per clerk
    # The auditor sees it.
    auditor = qenv.md(qenv.token(roles=("auditor",), sub="aud-1", office="audit-office"))
    found = audit_pb2_grpc.AuditStub(qenv.channel).Anomalies(
        audit_pb2.AnomaliesRequest(), metadata=auditor, timeout=30
    )
    quota = [f for f in found.findings if f.rule == "QUOTA_EXCEEDED"]
    assert [(f.clerk, len(f.sequences)) for f in quota] == [("clerk-001", 2)]
    assert "test-citizens" in quota[0].description
    # An hour after the first three, the window has slid past them.
    clock.advance(3600)
    lookup(qenv, token, d)


def test_a_bundle_is_admitted_item_by_item(qenv: Env, dataset_dir: Path) -> None:
    seller, buyer = synthetic.sample_couple(dataset_dir)
    request = client.lookup_matter_request(MATTER, CASE, [(seller, "seller"), (buyer, "buyer")])
    reply = qenv.stub.LookupMatter(request, metadata=qenv.md(qenv.token()), timeout=30)
    # Six items (two citizens x three records), five lookups a minute: the last is refused.
    reasons = [i.error.reason or "OK" for i in reply.items]
    assert reasons == ["OK", "OK", "OK", "OK", "OK", "QUOTA_EXCEEDED"]
    last = reply.items[-1]
    assert (last.subject_id, last.record_type) == (buyer, "property")
    assert last.error.code == "PERMISSION_DENIED"
    assert last.error.metadata["rule"] == "test-lookups"
    events = [e.event for e in entries(qenv)]
    assert events[-1].kind == "bundle"
    assert events[-1].outcome_counts == {"OK": 5, "QUOTA_EXCEEDED": 1}
    assert (events[-2].decision, events[-2].rule_id) == ("deny", "test-lookups")
    # The next single lookup is refused too, even of a citizen of the bundle.
    with pytest.raises(grpc.RpcError) as info:
        lookup(qenv, qenv.token(), seller)
    assert client.call_error(info.value).reason == "QUOTA_EXCEEDED"


def test_without_quotas_nothing_is_counted(tmp_path: Path, dataset_dir: Path) -> None:
    policies = tight_policies(tmp_path / "policies", "quotas: []\n")
    with running_env(make_config(tmp_path, dataset_dir, policy_dir=policies), dataset_dir) as env:
        for subject in synthetic.sample_citizens(dataset_dir, 8):
            reply = lookup(env, env.token(), subject)
            assert isinstance(reply, broker_pb2.LookupResponse)
    # One broker process counts in memory: no quota file (serve --workers N has one).
    assert not (tmp_path / "state" / "quotas.sqlite").exists()
