"""Record types routed to department adapters running as their own gRPC processes."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from certbroker import audit, config
from certbroker.adapters.demo import synthetic
from certbroker.auth.authenticator import DevIdentityProvider, jwk_thumbprint
from certbroker.cli import client
from certbroker.config import AdapterRoute, ConfigError
from certbroker.routing.decision_token import DecisionSigner
from certbroker.server import app as server
from certbroker.v1 import broker_pb2_grpc
from tests import tls
from tests.cache_support import uncached_policies
from tests.helpers import AdapterProcess, BrokerThread, FakeClock, make_config, start_adapter

CASE = "GZ20261121-000555"


@pytest.fixture
def marriage_adapter(dataset_dir: Path, tmp_path: Path) -> Iterator[AdapterProcess]:
    started = start_adapter("marriage", dataset_dir, tmp_path / "marriage.log")
    yield started
    if started.process.poll() is None:
        os.kill(started.process.pid, signal.SIGCONT)  # in case a test stopped it
    started.stop()


@pytest.fixture
def broker(
    tmp_path: Path, dataset_dir: Path, marriage_adapter: AdapterProcess
) -> Iterator[BrokerThread]:
    routes = {rt: AdapterRoute() for rt in synthetic.DATASETS}
    routes["marriage"] = AdapterRoute("grpc", marriage_adapter.target)
    cfg = make_config(tmp_path, dataset_dir, adapters=routes, adapter_timeout_s=1.0)
    thread = BrokerThread(cfg)
    yield thread
    thread.stop()


def call(broker: BrokerThread, subject: str, fields: tuple[str, ...] = ()) -> object:
    from certbroker.auth.authenticator import DevIdentityProvider

    token = DevIdentityProvider(broker.config.state_dir).issue(
        "clerk-9", ["window_clerk"], "gz-haizhu-24h-01"
    )
    with grpc.insecure_channel(broker.target) as channel:
        stub = broker_pb2_grpc.CertificateBrokerStub(channel)
        return stub.Lookup(
            client.lookup_request("marriage", subject, "BDC-ZY-001", CASE, fields=fields),
            metadata=client.bearer(token),
            timeout=30,
        )


def error(broker: BrokerThread, subject: str) -> client.CallError:
    with pytest.raises(grpc.RpcError) as info:
        call(broker, subject)
    return client.call_error(info.value)


def test_lookup_through_an_adapter_process(broker: BrokerThread, dataset_dir: Path) -> None:
    husband, wife = synthetic.sample_couple(dataset_dir)
    response = call(broker, husband)
    m = response.record.marriage  # type: ignore[attr-defined]
    assert m.marital_status == "已婚"
    assert m.spouse_resident_id == "*" * 14 + wife[-4:]  # masked by the broker
    assert not m.HasField("certificate_number")  # the decision did not ask for it
    assert response.department == "civil_affairs"  # type: ignore[attr-defined]
    subset = call(broker, husband, ("marital_status",))
    assert not subset.record.marriage.HasField("spouse_name")  # type: ignore[attr-defined]


def test_unknown_citizen_over_grpc_is_not_found(broker: BrokerThread, dataset_dir: Path) -> None:
    err = error(broker, "11010519491231002X")
    assert (err.code, err.reason) == ("NOT_FOUND", "SUBJECT_NOT_FOUND")
    assert err.metadata["department"] == "civil_affairs"


def test_dead_adapter_is_unavailable_naming_the_department(
    broker: BrokerThread, marriage_adapter: AdapterProcess, dataset_dir: Path
) -> None:
    husband, _ = synthetic.sample_couple(dataset_dir)
    marriage_adapter.stop()
    err = error(broker, husband)
    assert (err.code, err.reason) == ("UNAVAILABLE", "ADAPTER_UNAVAILABLE")
    assert err.metadata["department"] == "civil_affairs"
    (entry,) = audit.query(broker.config.audit_file, audit.QueryFilter())
    assert (entry.event.decision, entry.event.outcome) == ("allow", "ADAPTER_UNAVAILABLE")


def test_hung_adapter_is_deadline_exceeded(
    broker: BrokerThread, marriage_adapter: AdapterProcess, dataset_dir: Path
) -> None:
    husband, _ = synthetic.sample_couple(dataset_dir)
    os.kill(marriage_adapter.process.pid, signal.SIGSTOP)  # alive, but answers nothing
    try:
        err = error(broker, husband)
    finally:
        os.kill(marriage_adapter.process.pid, signal.SIGCONT)
    assert (err.code, err.reason) == ("DEADLINE_EXCEEDED", "ADAPTER_TIMEOUT")
    assert err.metadata["department"] == "civil_affairs"


# --- registry routing: round robin and failover -------------------------------------------------


def registry_broker(tmp_path: Path, dataset_dir: Path, **overrides: object) -> BrokerThread:
    routes = {rt: AdapterRoute() for rt in synthetic.DATASETS}
    routes["marriage"] = AdapterRoute("registry")
    overrides.setdefault("policy_dir", uncached_policies(tmp_path))  # each lookup: an instance
    return BrokerThread(make_config(tmp_path, dataset_dir, adapters=routes, **overrides))


def registered(
    broker: BrokerThread, dataset_dir: Path, tmp_path: Path, name: str
) -> AdapterProcess:
    """A marriage adapter process registering itself, verifying the broker's tokens."""
    credential = tmp_path / f"{name}.jwt"
    idp = DevIdentityProvider(broker.config.state_dir)
    credential.write_text(idp.issue_department("civil_affairs"))
    return start_adapter(
        "marriage",
        dataset_dir,
        tmp_path / f"{name}.log",
        "--register",
        broker.target,
        "--credential-file",
        str(credential),
        "--broker-public-key",
        str(DecisionSigner(broker.config.state_dir).public_key_path),
    )


def fetches(adapter: AdapterProcess) -> int:
    """Fetch calls the adapter process logged (one line per call, written before it answers)."""
    return adapter.log.read_text().count("fetch decision_id=")


def test_two_instances_share_load_and_survive_one_being_killed(
    tmp_path: Path, dataset_dir: Path
) -> None:
    husband, _ = synthetic.sample_couple(dataset_dir)
    broker = registry_broker(tmp_path, dataset_dir)
    first = registered(broker, dataset_dir, tmp_path, "first")
    second = registered(broker, dataset_dir, tmp_path, "second")
    try:
        for _ in range(6):
            assert call(broker, husband).record.marriage.marital_status == "已婚"  # type: ignore[attr-defined]
        assert (fetches(first), fetches(second)) == (3, 3)  # round robin

        first.process.kill()  # no deregistration: its lease still says "live"
        first.process.wait()
        for _ in range(6):  # every call that picks the dead one is retried on the other
            assert call(broker, husband).record.marriage.marital_status == "已婚"  # type: ignore[attr-defined]
        assert fetches(second) == 9
        entries = audit.query(broker.config.audit_file, audit.QueryFilter())
        assert [e.event.outcome for e in entries if e.event.kind == "lookup"] == ["OK"] * 12
    finally:
        first.stop()
        second.stop()
        broker.stop()


def test_no_retry_without_another_instance(tmp_path: Path, dataset_dir: Path) -> None:
    husband, _ = synthetic.sample_couple(dataset_dir)
    broker = registry_broker(tmp_path, dataset_dir)
    only = registered(broker, dataset_dir, tmp_path, "only")
    try:
        only.process.kill()
        only.process.wait()
        err = error(broker, husband)
        assert (err.code, err.reason) == ("UNAVAILABLE", "ADAPTER_UNAVAILABLE")
        assert err.metadata["adapter_status"] == "UNAVAILABLE"
    finally:
        only.stop()
        broker.stop()


# --- decision tokens ----------------------------------------------------------------------------


def test_every_fetch_carries_a_decision_token_the_adapter_verifies(
    tmp_path: Path, dataset_dir: Path
) -> None:
    husband, wife = synthetic.sample_couple(dataset_dir)
    state = tmp_path / "state"
    key = DecisionSigner(state).public_key_path  # the broker's key, before the broker starts
    adapter = start_adapter(
        "marriage", dataset_dir, tmp_path / "a.log", "--broker-public-key", str(key)
    )
    routes = {rt: AdapterRoute() for rt in synthetic.DATASETS}
    routes["marriage"] = AdapterRoute("grpc", adapter.target)
    broker = BrokerThread(make_config(tmp_path, dataset_dir, adapters=routes))
    try:
        response = call(broker, husband)
        assert response.record.marriage.spouse_resident_id.endswith(wife[-4:])  # type: ignore[attr-defined]
        assert f"decision_id='{response.decision_id}'" in adapter.log.read_text()  # type: ignore[attr-defined]
    finally:
        broker.stop()
        adapter.stop()


def test_an_adapter_trusting_another_key_refuses_the_broker(
    tmp_path: Path, dataset_dir: Path
) -> None:
    husband, _ = synthetic.sample_couple(dataset_dir)
    other = DecisionSigner(tmp_path / "other-broker").public_key_path
    adapter = start_adapter(
        "marriage", dataset_dir, tmp_path / "a.log", "--broker-public-key", str(other)
    )
    routes = {rt: AdapterRoute() for rt in synthetic.DATASETS}
    routes["marriage"] = AdapterRoute("grpc", adapter.target)
    broker = BrokerThread(make_config(tmp_path, dataset_dir, adapters=routes))
    try:
        err = error(broker, husband)
        assert (err.code, err.reason) == ("UNAVAILABLE", "ADAPTER_UNAVAILABLE")
        assert err.metadata["adapter_status"] == "UNAUTHENTICATED"
        assert err.metadata["adapter_reason"] == "DECISION_TOKEN_INVALID"
    finally:
        broker.stop()
        adapter.stop()


def test_decision_token_format(tmp_path: Path) -> None:
    clock = FakeClock(1_800_000_000.5)
    signer = DecisionSigner(tmp_path, clock=clock)
    token = signer.mint(
        department="civil_affairs",
        subject_id="110105194912310021",
        record_type="marriage",
        fields=["marital_status", "spouse_name"],
        decision_id="d" * 32,
    )
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "typ": "JWT", "kid": jwk_thumbprint(signer.public_key)}
    public = serialization.load_pem_public_key(signer.public_key_path.read_bytes())
    claims = jwt.decode(
        token,
        public,  # type: ignore[arg-type]
        algorithms=["EdDSA"],
        audience="civil_affairs",
        issuer="certbroker",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims == {
        "iss": "certbroker",
        "aud": "civil_affairs",
        "sub": "110105194912310021",
        "rt": "marriage",
        "fields": ["marital_status", "spouse_name"],
        "did": "d" * 32,
        "iat": 1_800_000_000,
        "exp": 1_800_000_030,
    }
    assert stat.S_IMODE(signer.signing_key_path.stat().st_mode) == 0o600
    assert DecisionSigner(tmp_path).kid == signer.kid  # the key is kept, not regenerated
    with pytest.raises(ValueError):
        DecisionSigner(tmp_path, ttl_s=31)


# --- deadlines ----------------------------------------------------------------------------------


def test_the_callers_deadline_bounds_the_adapter_call_and_spares_the_breaker(
    tmp_path: Path, dataset_dir: Path, marriage_adapter: AdapterProcess
) -> None:
    husband, _ = synthetic.sample_couple(dataset_dir)
    routes = {rt: AdapterRoute() for rt in synthetic.DATASETS}
    routes["marriage"] = AdapterRoute("grpc", marriage_adapter.target)
    cfg = make_config(
        tmp_path, dataset_dir, adapters=routes, adapter_timeout_s=60.0, breaker_failures=1
    )
    broker = BrokerThread(cfg)
    token = DevIdentityProvider(cfg.state_dir).issue("c", ["window_clerk"], "gz-haizhu-24h-01")
    os.kill(marriage_adapter.process.pid, signal.SIGSTOP)
    try:
        with grpc.insecure_channel(broker.target) as channel:
            stub = broker_pb2_grpc.CertificateBrokerStub(channel)
            for _ in range(2):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Lookup(
                        client.lookup_request("marriage", husband, "BDC-ZY-001", CASE),
                        metadata=client.bearer(token),
                        timeout=2.0,  # far below the 60 s adapter timeout
                    )
                err = client.call_error(info.value)
                assert err.code == "DEADLINE_EXCEEDED"
                # The broker answers (with its reason) a reserve ahead of the caller's deadline;
                # on a loaded machine the answer can still arrive after the caller's own timer
                # fired, so the reason is checked when it arrived and the audit log is checked
                # below, where the broker's own decision is recorded either way.
                assert err.reason in ("ADAPTER_TIMEOUT", "")
        # The broker gave up on the department within the caller's 2 s, not the adapter's 60 s:
        # both timeouts are audited well before the adapter timeout could have fired.
        give_up = time.monotonic() + 15.0
        outcomes: list[str] = []
        while time.monotonic() < give_up:
            found = audit.query(broker.config.audit_file, audit.QueryFilter())
            outcomes = [entry.event.outcome for entry in found]
            if len(outcomes) >= 2:
                break
            time.sleep(0.05)
        assert outcomes == ["ADAPTER_TIMEOUT", "ADAPTER_TIMEOUT"]
        # A caller's short deadline says nothing about the department: the breaker stays shut.
        assert str(broker.broker.breakers.state("civil_affairs")) == "closed"  # type: ignore[union-attr]
    finally:
        os.kill(marriage_adapter.process.pid, signal.SIGCONT)
        broker.stop()


# --- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[tls.TlsFiles, tls.TlsFiles]:
    """Test certificates, and an unrelated CA's (the broker must not trust its adapters)."""
    return tls.generate(tmp_path_factory.mktemp("tls")), tls.generate(
        tmp_path_factory.mktemp("other-tls")
    )


def tls_broker(
    tmp_path: Path, dataset_dir: Path, adapter: AdapterProcess, **tls_config: object
) -> BrokerThread:
    routes = {rt: AdapterRoute() for rt in synthetic.DATASETS}
    routes["marriage"] = AdapterRoute("grpc", adapter.target)
    return BrokerThread(make_config(tmp_path, dataset_dir, adapters=routes, **tls_config))


def outcome(
    tmp_path: Path, dataset_dir: Path, adapter: AdapterProcess, **tls_config: object
) -> str:
    """A marriage lookup through a fresh broker with ``tls_config``: "OK" or the error."""
    husband, _ = synthetic.sample_couple(dataset_dir)
    tmp_path.mkdir()
    broker = tls_broker(tmp_path, dataset_dir, adapter, **tls_config)
    try:
        call(broker, husband)
        return "OK"
    except grpc.RpcError as exc:
        err = client.call_error(exc)
        return f"{err.code} {err.reason}"
    finally:
        broker.stop()


def test_tls_to_the_adapter(
    tmp_path: Path, dataset_dir: Path, certs: tuple[tls.TlsFiles, tls.TlsFiles]
) -> None:
    ours, theirs = certs
    adapter = start_adapter(
        "marriage",
        dataset_dir,
        tmp_path / "a.log",
        "--tls-cert",
        str(ours.server_cert),
        "--tls-key",
        str(ours.server_key),
    )
    try:
        assert outcome(tmp_path / "b1", dataset_dir, adapter, tls_ca=ours.ca_cert) == "OK"
        # A client certificate the server does not ask for does no harm.
        assert (
            outcome(
                tmp_path / "b2",
                dataset_dir,
                adapter,
                tls_ca=ours.ca_cert,
                tls_cert=ours.client_cert,
                tls_key=ours.client_key,
            )
            == "OK"
        )
        unavailable = "UNAVAILABLE ADAPTER_UNAVAILABLE"
        assert outcome(tmp_path / "b3", dataset_dir, adapter) == unavailable  # plaintext
        assert outcome(tmp_path / "b4", dataset_dir, adapter, tls_ca=theirs.ca_cert) == unavailable
    finally:
        adapter.stop()


def test_mutual_tls_to_the_adapter(
    tmp_path: Path, dataset_dir: Path, certs: tuple[tls.TlsFiles, tls.TlsFiles]
) -> None:
    ours, theirs = certs
    adapter = start_adapter(
        "marriage",
        dataset_dir,
        tmp_path / "a.log",
        "--tls-cert",
        str(ours.server_cert),
        "--tls-key",
        str(ours.server_key),
        "--tls-client-ca",
        str(ours.ca_cert),
    )
    mutual = {"tls_ca": ours.ca_cert, "tls_cert": ours.client_cert, "tls_key": ours.client_key}
    try:
        assert outcome(tmp_path / "b1", dataset_dir, adapter, **mutual) == "OK"
        unavailable = "UNAVAILABLE ADAPTER_UNAVAILABLE"
        # No client certificate, or one from a CA the adapter does not trust: refused.
        assert outcome(tmp_path / "b2", dataset_dir, adapter, tls_ca=ours.ca_cert) == unavailable
        stranger = {
            "tls_ca": ours.ca_cert,
            "tls_cert": theirs.client_cert,
            "tls_key": theirs.client_key,
        }
        assert outcome(tmp_path / "b3", dataset_dir, adapter, **stranger) == unavailable
    finally:
        adapter.stop()


# --- configuration ------------------------------------------------------------------------------


def test_routing_settings_from_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        "[routing]\ntimeout_s = 2.5\nlease_s = 30\nbreaker_failures = 2\nbreaker_reset_s = 4\n"
        'tls_ca = "tls/ca.pem"\ntls_cert = "tls/broker.pem"\ntls_key = "tls/broker.key"\n'
        '[adapters.marriage]\nmode = "registry"\n'
    )
    cfg = config.load(path, env={"CERTBROKER_ADAPTER_HOUSEHOLD": "registry"})
    assert (cfg.adapter_timeout_s, cfg.lease_s) == (2.5, 30)
    assert (cfg.breaker_failures, cfg.breaker_reset_s) == (2, 4.0)
    assert (cfg.tls_ca, cfg.tls_cert, cfg.tls_key) == (
        tmp_path / "tls/ca.pem",
        tmp_path / "tls/broker.pem",
        tmp_path / "tls/broker.key",
    )
    assert cfg.adapters["marriage"] == AdapterRoute("registry")
    assert cfg.adapters["household"] == AdapterRoute("registry")
    env = {
        "CERTBROKER_TLS_CA": "/etc/cb/ca.pem",
        "CERTBROKER_LEASE_S": "5",
        "CERTBROKER_BREAKER_FAILURES": "9",
        "CERTBROKER_BREAKER_RESET_S": "1.5",
        "CERTBROKER_ADAPTER_TIMEOUT_S": "3",
    }
    cfg = config.load(None, env=env)
    assert (cfg.tls_ca, cfg.tls_cert, cfg.lease_s) == (Path("/etc/cb/ca.pem"), None, 5)
    assert (cfg.breaker_failures, cfg.breaker_reset_s, cfg.adapter_timeout_s) == (9, 1.5, 3.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[routing]\ntls_cert = "a.pem"\ntls_key = "a.key"\n', "needs routing.tls_ca"),
        ('[routing]\ntls_ca = "ca.pem"\ntls_cert = "a.pem"\n', "go together"),
        ("[routing]\nlease_s = 0\n", "lease_s"),
        ("[routing]\nbreaker_failures = 0\n", "breaker_failures"),
        ("[routing]\nbreaker_reset_s = 0\n", "breaker_reset_s"),
        ("[routing]\ntimeout_s = -1\n", "timeout_s"),
        ('[routing]\ntls_sni = "x"\n', "unknown key"),
        (
            '[adapters.marriage]\nmode = "registry"\nendpoint = "127.0.0.1:1"\n',
            "only for mode",
        ),
        ('[adapters.marriage]\nmode = "dns"\n', "must be one of"),
    ],
)
def test_bad_routing_settings_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load(path, env={})


def test_unreadable_tls_files_stop_the_broker_at_start(tmp_path: Path, dataset_dir: Path) -> None:
    cfg = make_config(tmp_path, dataset_dir, tls_ca=tmp_path / "missing-ca.pem")
    with pytest.raises(ConfigError, match=r"missing-ca\.pem"):
        asyncio.run(server.start(cfg))
