"""Per-department circuit breakers: unit behaviour on a fake clock, then through real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from certbroker import audit, errors
from certbroker.adapters.demo import synthetic
from certbroker.auth.authenticator import DevIdentityProvider
from certbroker.cli import client
from certbroker.config import AdapterRoute
from certbroker.routing.breaker import BreakerBoard, CircuitBreaker, Outcome, State
from certbroker.routing.decision_token import DecisionSigner
from certbroker.v1 import broker_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.cache_support import uncached_policies
from tests.helpers import AdapterProcess, BrokerThread, FakeClock, make_config, start_adapter

CASE = "GZ20261121-000999"


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.record(breaker.admit(), Outcome.FAILURE)


def refused(breaker: CircuitBreaker) -> errors.BrokerError:
    with pytest.raises(errors.Unavailable) as info:
        breaker.admit()
    return info.value


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(0.0)


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker("civil_affairs", failures=3, reset_s=10, clock=clock)


def test_opens_after_consecutive_failures_and_fails_fast(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    assert breaker.state is State.CLOSED
    fail(breaker)
    assert breaker.state is State.OPEN
    err = refused(breaker)
    assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "CIRCUIT_OPEN")
    assert err.metadata == {"department": "civil_affairs"}
    assert "civil_affairs" in err.message


def test_a_success_resets_the_count(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    breaker.record(breaker.admit(), Outcome.SUCCESS)
    fail(breaker, 2)
    assert breaker.state is State.CLOSED


def test_neutral_outcomes_neither_count_nor_reset(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    for _ in range(5):
        breaker.record(breaker.admit(), Outcome.NEUTRAL)
    assert breaker.state is State.CLOSED
    fail(breaker)
    assert breaker.state is State.OPEN


def test_half_open_after_reset_admits_one_probe(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, 3)
    clock.advance(9.999)
    assert breaker.state is State.OPEN
    refused(breaker)
    clock.advance(0.001)
    assert breaker.state is State.HALF_OPEN
    probe = breaker.admit()
    assert probe.probe
    assert refused(breaker).reason == "CIRCUIT_OPEN"  # one probe at a time
    breaker.record(probe, Outcome.SUCCESS)
    assert breaker.state is State.CLOSED
    breaker.record(breaker.admit(), Outcome.SUCCESS)


def test_a_failed_probe_opens_again_for_another_reset_period(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    fail(breaker, 3)
    clock.advance(10)
    breaker.record(breaker.admit(), Outcome.FAILURE)  # one failure suffices when half-open
    assert breaker.state is State.OPEN
    clock.advance(9)
    refused(breaker)
    clock.advance(1)
    assert breaker.state is State.HALF_OPEN


def test_a_neutral_probe_frees_the_probe_slot(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, 3)
    clock.advance(10)
    breaker.record(breaker.admit(), Outcome.NEUTRAL)  # e.g. the caller went away
    assert breaker.state is State.HALF_OPEN
    breaker.record(breaker.admit(), Outcome.SUCCESS)
    assert breaker.state is State.CLOSED


def test_late_results_of_calls_admitted_earlier_are_ignored(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    slow = breaker.admit()  # admitted while closed, answers after the breaker opened
    fail(breaker, 3)
    breaker.record(slow, Outcome.SUCCESS)  # stale news cannot close it
    assert breaker.state is State.OPEN
    clock.advance(10)
    probe = breaker.admit()
    breaker.record(slow, Outcome.FAILURE)  # nor reopen it
    assert breaker.state is State.HALF_OPEN
    breaker.record(probe, Outcome.SUCCESS)
    assert breaker.state is State.CLOSED


def test_board_keeps_one_breaker_per_department(clock: FakeClock) -> None:
    board = BreakerBoard(failures=1, reset_s=5, clock=clock)
    assert board.state("civil_affairs") is State.CLOSED  # never called
    fail(board.breaker("civil_affairs"))
    assert board.breaker("civil_affairs") is board.breaker("civil_affairs")
    assert board.states() == {"civil_affairs": State.OPEN}
    board.breaker("public_security").admit()
    assert board.state("public_security") is State.CLOSED
    assert str(board.state("civil_affairs")) == "open"


@pytest.mark.parametrize(("failures", "reset_s"), [(0, 10.0), (3, 0.0), (3, float("nan"))])
def test_bad_settings_are_refused(failures: int, reset_s: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("d", failures=failures, reset_s=reset_s)
    with pytest.raises(ValueError):
        BreakerBoard(failures=failures, reset_s=reset_s)


# --- through the broker, with real adapter processes -------------------------------------------


class Env:
    def __init__(self, tmp_path: Path, dataset_dir: Path) -> None:
        self.tmp_path, self.dataset_dir = tmp_path, dataset_dir
        self.clock = FakeClock(0.0)
        routes = {rt: AdapterRoute() for rt in synthetic.DATASETS}
        routes["marriage"] = AdapterRoute("registry")
        cfg = make_config(
            tmp_path,
            dataset_dir,
            adapters=routes,
            breaker_failures=3,
            breaker_reset_s=10,
            policy_dir=uncached_policies(tmp_path),  # every lookup reaches the department
        )
        self.broker = BrokerThread(cfg, breaker_clock=self.clock)
        self.idp = DevIdentityProvider(cfg.state_dir)
        self.husband, _ = synthetic.sample_couple(dataset_dir)
        self.adapters: list[AdapterProcess] = []

    def adapter(self, name: str, public_key: Path) -> AdapterProcess:
        credential = self.tmp_path / f"{name}.jwt"
        credential.write_text(self.idp.issue_department("civil_affairs"))
        started = start_adapter(
            "marriage",
            self.dataset_dir,
            self.tmp_path / f"{name}.log",
            "--register",
            self.broker.target,
            "--credential-file",
            str(credential),
            "--broker-public-key",
            str(public_key),
        )
        self.adapters.append(started)
        return started

    def lookup(self) -> Any:
        token = self.idp.issue("clerk-9", ["window_clerk"], "gz-haizhu-24h-01")
        with grpc.insecure_channel(self.broker.target) as channel:
            return broker_pb2_grpc.CertificateBrokerStub(channel).Lookup(
                client.lookup_request("marriage", self.husband, "BDC-ZY-001", CASE),
                metadata=client.bearer(token),
                timeout=30,
            )

    def lookup_error(self) -> client.CallError:
        with pytest.raises(grpc.RpcError) as info:
            self.lookup()
        return client.call_error(info.value)

    def breaker_states(self) -> list[str]:
        token = self.idp.issue_operator("ops-1")
        with grpc.insecure_channel(self.broker.target) as channel:
            reply = registry_pb2_grpc.RegistryStub(channel).ListAdapters(
                registry_pb2.ListAdaptersRequest(), metadata=client.bearer(token), timeout=10
            )
        return [a.breaker_state for a in reply.adapters]


@pytest.fixture
def env(tmp_path: Path, dataset_dir: Path) -> Iterator[Env]:
    made = Env(tmp_path, dataset_dir)
    yield made
    for adapter in made.adapters:
        adapter.stop()
    made.broker.stop()


def fetches(adapter: AdapterProcess) -> int:
    """Fetch calls the adapter process has logged (one line each, before it answers)."""
    return adapter.log.read_text().count("fetch decision_id=")


def test_breaker_opens_fails_fast_probes_and_closes(env: Env) -> None:
    # An adapter that trusts another broker's key rejects every call: a failing department.
    stranger = DecisionSigner(env.tmp_path / "another-broker")
    bad = env.adapter("bad", stranger.public_key_path)
    for _ in range(3):
        err = env.lookup_error()
        assert (err.code, err.reason) == ("UNAVAILABLE", "ADAPTER_UNAVAILABLE")
        assert err.metadata["adapter_reason"] == "DECISION_TOKEN_INVALID"
    assert fetches(bad) == 3
    assert env.breaker_states() == ["open"]

    err = env.lookup_error()  # fails fast: the adapter is not called
    assert (err.code, err.reason) == ("UNAVAILABLE", "CIRCUIT_OPEN")
    assert err.metadata["department"] == "civil_affairs"
    assert fetches(bad) == 3
    entries = audit.query(env.broker.config.audit_file, audit.QueryFilter())
    assert entries[-1].event.outcome == "CIRCUIT_OPEN"
    assert entries[-1].event.department == "civil_affairs"

    env.clock.advance(10)
    assert env.breaker_states() == ["half_open"]
    assert env.lookup_error().reason == "ADAPTER_UNAVAILABLE"  # the probe, still failing
    assert fetches(bad) == 4
    assert env.lookup_error().reason == "CIRCUIT_OPEN"  # open again
    assert fetches(bad) == 4

    # The department fixes its adapter: the broken one goes, a good one registers.
    bad.stop()
    signer = env.broker.broker.signer  # type: ignore[union-attr]
    good = env.adapter("good", signer.public_key_path)
    assert env.lookup_error().reason == "CIRCUIT_OPEN"  # still open until the reset time
    assert fetches(good) == 0
    env.clock.advance(10)
    assert env.lookup().record.marriage.marital_status == "已婚"  # the probe succeeds
    assert env.breaker_states() == ["closed"]
    assert env.lookup().record.marriage.marital_status == "已婚"
    assert fetches(good) == 2
