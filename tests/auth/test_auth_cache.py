"""The verified-token cache of certbroker.auth.authenticator.Authenticator, and reloading issuer
keys.

Time is a FakeClock moved by hand; key files are real files in tmp dirs. The property under
test throughout: the cache never answers differently from a full verification at the same
instant, except that it answers faster.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from certbroker.auth.authenticator import (
    Authenticator,
    Clerk,
    DevIdentityProvider,
    TrustedIssuer,
    load_issuer,
)
from certbroker.errors import Unauthenticated
from certbroker.metrics import Metrics
from tests.helpers import FakeClock

ISS = "https://idp.example.gov.cn/realms/halls"
AUD = "certbroker"
NOW = 1_760_000_000.0


class Issuer:
    """An IdP with Ed25519 keys by kid, publishing them as a JWKS file."""

    def __init__(self, jwks: Path) -> None:
        self.jwks = jwks
        self.keys: dict[str, ed25519.Ed25519PrivateKey] = {}

    def add_key(self, kid: str) -> None:
        self.keys[kid] = ed25519.Ed25519PrivateKey.generate()
        self.publish()

    def remove_key(self, kid: str) -> None:
        del self.keys[kid]
        self.publish()

    def publish(self) -> None:
        okp = jwt.get_algorithm_by_name("EdDSA")
        docs = []
        for kid, key in self.keys.items():
            jwk = okp.to_jwk(key.public_key(), as_dict=True)
            docs.append(jwk | {"kid": kid, "alg": "EdDSA", "use": "sig"})
        self.jwks.write_text(json.dumps({"keys": docs}), encoding="utf-8")

    def token(self, kid: str, *, exp: float, sub: str = "clerk-7") -> str:
        claims = {
            "iss": ISS,
            "aud": AUD,
            "sub": sub,
            "roles": ["window_clerk"],
            "office": "gz-haizhu-24h-01",
            "iat": int(NOW) - 5,
            "exp": int(exp),
        }
        return jwt.encode(claims, self.keys[kid], algorithm="EdDSA", headers={"kid": kid})

    def loader(self) -> Callable[[], list[TrustedIssuer]]:
        return lambda: [load_issuer(ISS, AUD, jwks_file=self.jwks)]


@pytest.fixture
def idp(tmp_path: Path) -> Issuer:
    issuer = Issuer(tmp_path / "idp.jwks.json")
    issuer.add_key("k1")
    issuer.add_key("k2")
    return issuer


def counts(metrics: Metrics) -> tuple[float, float]:
    """(hits, misses) of the token cache."""
    get = metrics.registry.get_sample_value
    return (
        get("certbroker_token_cache_hits_total") or 0.0,
        get("certbroker_token_cache_misses_total") or 0.0,
    )


def outcome(auth: Authenticator, token: str) -> str:
    try:
        auth.verify(token)
    except Unauthenticated as exc:
        return exc.reason
    return "OK"


def test_a_cached_token_is_refused_from_its_exp_on(idp: Issuer) -> None:
    clock, metrics = FakeClock(NOW), Metrics()
    auth = Authenticator(idp.loader(), leeway_s=0, clock=clock, metrics=metrics)
    token = idp.token("k1", exp=NOW + 60)
    assert auth.verify(token).sub == "clerk-7"
    assert auth.verify(token).sub == "clerk-7"
    assert counts(metrics) == (1.0, 1.0)  # the second call was a cache hit
    clock.advance(59)
    assert outcome(auth, token) == "OK"
    clock.advance(1)  # exp reached: refused on the next call, cached or not
    assert outcome(auth, token) == "TOKEN_EXPIRED"
    assert outcome(auth, token) == "TOKEN_EXPIRED"


@pytest.mark.parametrize("leeway_s", [0, 30])
def test_the_cache_answers_as_a_full_verification_would_at_every_instant(
    idp: Issuer, leeway_s: int
) -> None:
    clock = FakeClock(NOW)
    cached = Authenticator(idp.loader(), leeway_s=leeway_s, clock=clock)
    uncached = Authenticator(idp.loader(), leeway_s=leeway_s, clock=clock, token_max_age_s=0)
    token = idp.token("k1", exp=NOW + 60)
    cached.verify(token)  # warm
    seen = []
    for step in (30, 29, 1, 15, 14, 1, 60):  # to 30, 59, 60, 75, 89, 90, 150 s
        clock.advance(step)
        seen.append(outcome(cached, token))
        assert seen[-1] == outcome(uncached, token)
    assert {"OK", "TOKEN_EXPIRED"} <= set(seen)  # the walk crossed the expiry


def test_max_age_bounds_how_long_a_verification_is_reused(idp: Issuer) -> None:
    clock, metrics = FakeClock(NOW), Metrics()
    auth = Authenticator(idp.loader(), clock=clock, metrics=metrics, token_max_age_s=300)
    token = idp.token("k1", exp=NOW + 8 * 3600)
    auth.verify(token)
    clock.advance(299)
    auth.verify(token)
    assert counts(metrics) == (1.0, 1.0)
    clock.advance(1)
    auth.verify(token)  # verified in full again
    assert counts(metrics) == (1.0, 2.0)


def test_a_removed_issuer_key_refuses_its_tokens_after_reload_keys(idp: Issuer) -> None:
    auth = Authenticator(idp.loader(), clock=FakeClock(NOW))
    old, other = idp.token("k1", exp=NOW + 600), idp.token("k2", exp=NOW + 600)
    assert (outcome(auth, old), outcome(auth, other)) == ("OK", "OK")  # both cached
    idp.remove_key("k1")  # k1 compromised: the IdP withdraws it
    assert outcome(auth, old) == "OK"  # not re-read yet: the broker still trusts it
    assert auth.reload_keys() is True
    assert outcome(auth, old) == "TOKEN_UNKNOWN_KID"  # the very next call
    assert outcome(auth, other) == "OK"
    idp.add_key("k3")
    fresh = idp.token("k3", exp=NOW + 600)
    assert outcome(auth, fresh) == "TOKEN_UNKNOWN_KID"
    auth.reload_keys()
    assert outcome(auth, fresh) == "OK"


def test_a_key_file_that_cannot_be_loaded_keeps_the_previous_keys(
    idp: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    auth = Authenticator(idp.loader(), clock=FakeClock(NOW), metrics=metrics)
    token = idp.token("k1", exp=NOW + 600)
    auth.verify(token)
    idp.jwks.write_text("{not json", encoding="utf-8")
    assert auth.reload_keys() is False
    assert "issuer key reload rejected" in caplog.text
    assert token not in caplog.text
    assert auth.verify(token).sub == "clerk-7"  # old keys still in force ...
    assert counts(metrics) == (0.0, 2.0)  # ... checked in full: the cache was emptied anyway
    idp.jwks.unlink()
    assert auth.reload_keys() is False


def test_reload_keys_empties_the_cache_of_fixed_issuers_too(tmp_path: Path) -> None:
    dev = DevIdentityProvider(tmp_path)
    metrics = Metrics()
    auth = Authenticator([dev.trusted_issuer()], metrics=metrics)
    token = dev.issue("clerk-1", ["window_clerk"], "gz-haizhu-24h-01")
    auth.verify(token)
    auth.verify(token)
    assert auth.reload_keys() is True
    auth.verify(token)
    assert counts(metrics) == (1.0, 2.0)


def test_clerk_and_registry_verifications_are_cached_apart(tmp_path: Path) -> None:
    """A department credential verified for the Registry is no clerk token (it has no office),
    however recently it was verified."""
    dev = DevIdentityProvider(tmp_path)
    auth = Authenticator([dev.trusted_issuer()])
    credential = dev.issue_department("civil_affairs")
    metadata = [("authorization", f"Bearer {credential}")]
    assert auth.verify_department(metadata).department == "civil_affairs"
    assert auth.verify_department(metadata).department == "civil_affairs"
    with pytest.raises(Unauthenticated) as info:
        auth.verify(credential)
    assert (info.value.reason, info.value.metadata) == ("TOKEN_MISSING_CLAIM", {"claim": "office"})
    clerk_token = dev.issue("clerk-1", ["window_clerk"], "gz-haizhu-24h-01")
    assert auth.verify(clerk_token) == Clerk(
        "clerk-1", ("window_clerk",), "gz-haizhu-24h-01", issuer=DevIdentityProvider.ISSUER
    )
    assert not auth.registry_principal([("authorization", f"Bearer {clerk_token}")]).is_department


def test_max_age_zero_turns_the_cache_off(idp: Issuer) -> None:
    metrics = Metrics()
    auth = Authenticator(idp.loader(), clock=FakeClock(NOW), metrics=metrics, token_max_age_s=0)
    token = idp.token("k1", exp=NOW + 600)
    for _ in range(3):
        auth.verify(token)
    assert counts(metrics) == (0.0, 0.0)


@pytest.mark.parametrize(
    "kwargs", [{"token_max_age_s": -1}, {"token_max_entries": 0}, {"leeway_s": 61}]
)
def test_bad_cache_settings_are_refused(idp: Issuer, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Authenticator(idp.loader(), **kwargs)
