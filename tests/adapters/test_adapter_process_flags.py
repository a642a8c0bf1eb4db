"""``python -m certbroker.adapters`` flags, on real processes: decision tokens, registration, TLS,
metrics,
added latency, and the refusals at start."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from certbroker.adapters.demo import synthetic
from certbroker.v1 import adapter_pb2, adapter_pb2_grpc
from tests import tls
from tests.adapters.fake_registry import FakeRegistry
from tests.adapters.tokens import BrokerKey
from tests.helpers import ROOT, start_adapter

DEPT = "public_security"


@pytest.fixture(scope="module")
def key() -> BrokerKey:
    return BrokerKey()


@pytest.fixture(scope="module")
def key_file(key: BrokerKey, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return key.write_public(tmp_path_factory.mktemp("keys") / "broker-public.pem")


@pytest.fixture
def registry() -> Iterator[FakeRegistry]:
    fake = FakeRegistry()
    yield fake
    fake.stop()


@pytest.fixture
def credential(tmp_path: Path) -> Path:
    path = tmp_path / "public_security.jwt"
    path.write_text("dept.credential.jwt\n")
    return path


def reason_of(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info.reason


def fetch(
    channel: grpc.Channel, subject: str, fields: list[str], token: str | None = None
) -> adapter_pb2.FetchResponse:
    request = adapter_pb2.FetchRequest(
        record_type="household", subject_id=subject, fields=fields, decision_id="dec-flags-1"
    )
    metadata = (("x-certbroker-decision", token),) if token else ()
    reply: adapter_pb2.FetchResponse = adapter_pb2_grpc.DepartmentAdapterStub(channel).Fetch(
        request, metadata=metadata, timeout=10
    )
    return reply


def mint(key: BrokerKey, subject: str, fields: list[str]) -> str:
    return key.mint(
        department=DEPT,
        subject_id=subject,
        record_type="household",
        fields=fields,
        decision_id="dec-flags-1",
    )


def run_adapter(dataset_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m certbroker.adapters`` expecting it to exit on its own (a refusal at
    start)."""
    argv = [sys.executable, "-m", "certbroker.adapters", "--record-type", "household"]
    argv += ["--dataset-dir", str(dataset_dir), *args]
    return subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "--broker-public-key is required"),
        (("--no-decision-token", "--broker-public-key", "k.pem"), "contradict"),
        (("--no-decision-token", "--register", "127.0.0.1:1"), "--credential-file"),
        (("--no-decision-token", "--credential-file", "c.jwt"), "only makes sense with --register"),
        (("--no-decision-token", "--tls-cert", "c.pem"), "--tls-cert and --tls-key go together"),
        (("--no-decision-token", "--delay-ms", "-1"), "--delay-ms must not be negative"),
        (("--broker-public-key", "absent.pem"), "absent.pem: cannot load"),
        (
            (
                "--no-decision-token",
                "--tls-cert",
                "pyproject.toml",
                "--tls-key",
                "pyproject.toml",
            ),
            "pyproject.toml: not a PEM certificate chain",
        ),
    ],
)
def test_refuses_to_start_on_bad_flags(
    dataset_dir: Path, args: tuple[str, ...], message: str
) -> None:
    done = run_adapter(dataset_dir, *args)
    assert done.returncode == 2
    assert done.stdout == ""  # no READY line
    assert message in done.stderr


def test_a_taken_port_is_an_error_not_a_traceback(dataset_dir: Path, tmp_path: Path) -> None:
    first = start_adapter("household", dataset_dir, tmp_path / "first.log")
    try:
        done = run_adapter(dataset_dir, "--no-decision-token", "--port", str(first.port))
    finally:
        first.stop()
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{first.port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_verifies_the_decision_token(
    dataset_dir: Path, tmp_path: Path, key: BrokerKey, key_file: Path
) -> None:
    started = start_adapter(
        "household", dataset_dir, tmp_path / "a.log", "--broker-public-key", str(key_file)
    )
    try:
        subject = synthetic.sample_citizens(dataset_dir, 1)[0]
        with grpc.insecure_channel(started.target) as channel:
            reply = fetch(channel, subject, ["name"], mint(key, subject, ["name", "gender"]))
            assert [f.name for f, _ in reply.record.household.ListFields()] == ["name"]
            with pytest.raises(grpc.RpcError) as missing:
                fetch(channel, subject, ["name"])
            assert reason_of(missing.value) == "DECISION_TOKEN_MISSING"
            with pytest.raises(grpc.RpcError) as forged:
                fetch(channel, subject, ["name"], mint(BrokerKey(), subject, ["name"]))
            assert reason_of(forged.value) == "DECISION_TOKEN_INVALID"
            with pytest.raises(grpc.RpcError) as wider:
                fetch(channel, subject, ["name", "members"], mint(key, subject, ["name"]))
            assert reason_of(wider.value) == "DECISION_TOKEN_MISMATCH"
    finally:
        assert started.stop() == 0
    log = started.log.read_text()
    assert "decision_id='dec-flags-1'" in log
    assert subject not in log


def test_registers_heartbeats_and_deregisters_on_sigterm(
    dataset_dir: Path, tmp_path: Path, registry: FakeRegistry, credential: Path
) -> None:
    started = start_adapter(
        "household",
        dataset_dir,
        tmp_path / "a.log",
        *("--register", registry.target, "--credential-file", str(credential)),
        *("--heartbeat-s", "0.1"),
    )
    try:
        # READY comes after the first registration attempt.
        register = registry.calls[0]
        assert register.method == "Register"
        assert register.request.endpoint == f"127.0.0.1:{started.port}"
        assert list(register.request.record_types) == ["household"]
        assert register.request.department == DEPT
        assert register.authorization == "Bearer dept.credential.jwt"
        registry.wait_for(lambda calls: sum(c.method == "Heartbeat" for c in calls) >= 2)
    finally:
        assert started.stop() == 0
    assert registry.methods()[-1] == "Deregister"
    assert registry.instances == {}


def test_advertises_the_given_endpoint(
    dataset_dir: Path, tmp_path: Path, registry: FakeRegistry, credential: Path
) -> None:
    started = start_adapter(
        "household",
        dataset_dir,
        tmp_path / "a.log",
        *("--register", registry.target, "--credential-file", str(credential)),
        *("--advertise", "adapter-7.dept.internal"),
    )
    started.stop()
    assert registry.calls[0].request.endpoint == f"adapter-7.dept.internal:{started.port}"


def test_exits_when_the_broker_refuses_the_registration(
    dataset_dir: Path, registry: FakeRegistry, credential: Path
) -> None:
    registry.refuse = grpc.StatusCode.PERMISSION_DENIED
    done = run_adapter(
        dataset_dir,
        "--no-decision-token",
        *("--register", registry.target, "--credential-file", str(credential)),
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert "refused the registration: PERMISSION_DENIED" in done.stderr


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tls.TlsFiles:
    return tls.generate(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("mutual", [False, True])
def test_serves_tls_and_mutual_tls(
    dataset_dir: Path, tmp_path: Path, certs: tls.TlsFiles, mutual: bool
) -> None:
    args = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
    if mutual:
        args += ["--tls-client-ca", str(certs.ca_cert)]
    started = start_adapter("household", dataset_dir, tmp_path / "a.log", *args)
    subject = synthetic.sample_citizens(dataset_dir, 1)[0]
    try:
        with grpc.secure_channel(
            started.target, certs.channel_credentials(client_cert=mutual)
        ) as channel:
            assert fetch(channel, subject, ["name"]).record.household.name
        with grpc.insecure_channel(started.target) as plain, pytest.raises(grpc.RpcError):
            fetch(plain, subject, ["name"])
        if mutual:  # a TLS client without a certificate is turned away
            no_cert = certs.channel_credentials(client_cert=False)
            with grpc.secure_channel(started.target, no_cert) as channel:
                with pytest.raises(grpc.RpcError) as caught:
                    fetch(channel, subject, ["name"])
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        # A CA that did not sign the server certificate does not trust it.
        other = tls.generate(tmp_path / "other")
        with (
            grpc.secure_channel(
                started.target, other.channel_credentials(client_cert=mutual)
            ) as channel,
            pytest.raises(grpc.RpcError),
        ):
            fetch(channel, subject, ["name"])
    finally:
        assert started.stop() == 0


def test_metrics_and_added_latency(dataset_dir: Path, tmp_path: Path) -> None:
    started = start_adapter(
        "household", dataset_dir, tmp_path / "a.log", "--metrics-port", "0", "--delay-ms", "150"
    )
    try:
        subject = synthetic.sample_citizens(dataset_dir, 1)[0]
        with grpc.insecure_channel(started.target) as channel:
            fetch(channel, subject, ["name"])  # warm the channel up
            began = time.perf_counter()
            fetch(channel, subject, ["name"])
            assert time.perf_counter() - began >= 0.15
        found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", started.log.read_text())
        assert found, started.log.read_text()
        url = f"http://127.0.0.1:{found.group(1)}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    finally:
        assert started.stop() == 0
    assert 'certbroker_adapter_fetches_total{outcome="OK",record_type="household"} 2.0' in text
    assert 'certbroker_adapter_fetch_seconds_count{record_type="household"} 2.0' in text
    assert started.more_output == ""  # READY stays the one line on stdout
