"""Issuer key rotation on a running broker: SIGHUP re-reads the key files and empties the token
cache, so a token of a withdrawn key is refused on the very next call, cached or not."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certbroker import config
from certbroker.adapters.demo import synthetic
from certbroker.cli import client
from certbroker.config import IssuerConfig
from certbroker.v1 import broker_pb2_grpc
from tests.helpers import DEFAULT_OFFICE, BrokerThread, make_config

ISS, AUD = "https://idp.gz.example", "certbroker"


def _token(key: ec.EllipticCurvePrivateKey) -> str:
    now = int(time.time())
    claims = {
        "iss": ISS,
        "aud": AUD,
        "sub": "clerk-007",
        "roles": ["window_clerk"],
        "office": DEFAULT_OFFICE,
        "iat": now,
        "exp": now + 600,
    }
    return jwt.encode(claims, key, algorithm="ES256")


def _write_public(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def test_sighup_rotates_issuer_keys_and_empties_the_token_cache(
    tmp_path: Path, dataset_dir: Path
) -> None:
    old_key, new_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    pem = tmp_path / "idp.pem"
    _write_public(pem, old_key)
    cfg = make_config(
        tmp_path,
        dataset_dir,
        dev_idp=False,
        issuers=(IssuerConfig(ISS, AUD, public_keys=(pem,)),),
    )
    broker = BrokerThread(cfg)
    channel = grpc.insecure_channel(broker.target)
    stub = broker_pb2_grpc.CertificateBrokerStub(channel)
    subject, _ = synthetic.sample_couple(dataset_dir)
    request = client.lookup_request("marriage", subject, "BDC-ZY-001", "GZ20261121-000123")

    def call(token: str) -> grpc.StatusCode:
        try:
            stub.Lookup(request, metadata=(("authorization", f"Bearer {token}"),), timeout=30)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    try:
        old_token, new_token = _token(old_key), _token(new_key)
        assert call(old_token) == grpc.StatusCode.OK
        assert call(old_token) == grpc.StatusCode.OK  # now served from the token cache
        assert call(new_token) == grpc.StatusCode.UNAUTHENTICATED  # key not yet published

        _write_public(pem, new_key)  # the IdP rotates: the old key is withdrawn
        assert broker.broker is not None
        broker.loop.call_soon_threadsafe(broker.broker.reload)  # what SIGHUP runs
        deadline = time.monotonic() + 30
        while call(new_token) != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "the new key was never loaded"
            time.sleep(0.05)
        # The old token was cached and still unexpired: it must be refused all the same.
        assert call(old_token) == grpc.StatusCode.UNAUTHENTICATED

        pem.write_text("not a key")  # a broken file keeps the keys in force
        broker.loop.call_soon_threadsafe(broker.broker.reload)
        broker.call(_settle())
        assert call(new_token) == grpc.StatusCode.OK
        assert call(old_token) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        channel.close()
        broker.stop()


async def _settle() -> None:
    """Runs after the reload callback on the broker's loop (call_soon is FIFO)."""


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[auth]\ntoken_cache_max_age_s = -1\n", "token_cache_max_age_s"),
        ("[cache]\nmax_entries = 0\n", "max_entries"),
        ("[cache]\nmax_entries = 10\nmax_bytes = 5\n", "max_entries"),
    ],
)
def test_cache_settings_are_checked(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "certbroker.toml"
    path.write_text(toml)
    with pytest.raises(config.ConfigError, match=message):
        config.load(path, env={})


def test_cache_settings_reach_the_broker(tmp_path: Path) -> None:
    path = tmp_path / "certbroker.toml"
    path.write_text(
        "[auth]\ntoken_cache_max_age_s = 0\n[cache]\nmax_entries = 7\nmax_bytes = 70000\n"
    )
    cfg = config.load(path, env={"CERTBROKER_RECORD_CACHE_MAX_BYTES": "80000"})
    assert cfg.token_cache_max_age_s == 0
    assert (cfg.record_cache_max_entries, cfg.record_cache_max_bytes) == (7, 80000)
