"""Tests for certbroker.auth.authenticator: clerk JWT verification, issuer loading and the
development IdP.

Time is fixed through the injected clock; no test sleeps. Every rejection also checks that the
token never shows up in the exception or in the log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from certbroker.auth.authenticator import (
    REQUIRED_CLAIMS,
    Authenticator,
    Clerk,
    DepartmentPrincipal,
    DevIdentityProvider,
    TrustedIssuer,
    VerifyingKey,
    jwk_thumbprint,
    load_issuer,
)
from certbroker.errors import PermissionDenied, Unauthenticated

NOW = 1_760_000_000.0
ISS = "https://idp.example.gov.cn/realms/halls"
AUD = "certbroker"
ALGS = ("ES256", "RS256", "EdDSA")
DROP = object()  # marks a claim to leave out


def new_private_key(alg: str) -> Any:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    """One issuer key per algorithm (RSA generation is slow enough to share)."""
    return {alg: new_private_key(alg) for alg in ALGS}


@pytest.fixture(scope="module")
def other_keys() -> dict[str, Any]:
    """Keys of the same types the issuer does not own."""
    return {alg: new_private_key(alg) for alg in ALGS}


def public_pem(private: Any) -> bytes:
    pem: bytes = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: object) -> str:
    return b64u(json.dumps(obj).encode())


def claims_with(**overrides: object) -> dict[str, object]:
    claims: dict[str, object] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "clerk-0042",
        "roles": ["clerk", "hall-supervisor"],
        "office": "hall-3",
        "name": "Li Wei",
        "iat": int(NOW) - 10,
        "exp": int(NOW) + 600,
    }
    for claim, value in overrides.items():
        if value is DROP:
            del claims[claim]
        else:
            claims[claim] = value
    return claims


def sign(private: Any, alg: str, claims: dict[str, object], kid: str | None) -> str:
    # Signs the JSON as is: jwt.encode would refuse some of the bad claims tests need (iss=42).
    headers = {"typ": "JWT"} | ({"kid": kid} if kid is not None else {})
    return jwt.PyJWS().encode(json.dumps(claims).encode(), private, alg, headers)


@dataclass
class Env:
    """An issuer with one PEM key for ``alg`` and an authenticator trusting it at time NOW."""

    alg: str
    private: Any
    pem_path: Path
    kid: str
    auth: Authenticator

    def token(self, **overrides: object) -> str:
        return sign(self.private, self.alg, claims_with(**overrides), self.kid)

    def authenticator(self, leeway_s: int = 30, now: float = NOW) -> Authenticator:
        issuer = load_issuer(ISS, AUD, pem_files=[self.pem_path])
        return Authenticator([issuer], leeway_s=leeway_s, clock=lambda: now)


@pytest.fixture(params=ALGS)
def env(request: pytest.FixtureRequest, keys: dict[str, Any], tmp_path: Path) -> Env:
    alg = request.param
    pem_path = tmp_path / f"{alg}.pem"
    pem_path.write_bytes(public_pem(keys[alg]))
    issuer = load_issuer(ISS, AUD, pem_files=[pem_path])
    (kid,) = issuer.keys
    auth = Authenticator([issuer], clock=lambda: NOW)
    return Env(alg, keys[alg], pem_path, kid, auth)


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="certbroker.auth.authenticator")


def assert_no_leak(secret: str, err: Unauthenticated, caplog: pytest.LogCaptureFixture) -> None:
    """Neither the token nor any 16-character stretch of it appears in the error or the log."""
    shown = " ".join([str(err), repr(err), err.message, *err.metadata.values(), caplog.text])
    width = min(16, len(secret))
    for start in range(len(secret) - width + 1 if secret else 0):
        assert secret[start : start + width] not in shown


def assert_rejected(
    check: Callable[[], object],
    secret: str,
    reason: str,
    caplog: pytest.LogCaptureFixture,
    **metadata: str,
) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as info:
        check()
    err = info.value
    assert err.reason == reason
    assert err.metadata == metadata
    assert reason in caplog.text  # rejections are logged (by reason), so the leak check is real
    assert_no_leak(secret, err, caplog)
    return err


def reject(env: Env, token: str, reason: str, caplog: Any, **metadata: str) -> None:
    assert_rejected(lambda: env.auth.verify(token), token, reason, caplog, **metadata)


# --- acceptance -------------------------------------------------------------------------------


EXPECTED = Clerk("clerk-0042", ("clerk", "hall-supervisor"), "hall-3", issuer=ISS, name="Li Wei")


def test_accepts_pem_key(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    token = env.token()
    assert env.auth.verify(token) == EXPECTED
    assert token not in caplog.text


def test_pem_kid_is_the_rfc7638_thumbprint(env: Env) -> None:
    assert env.kid == jwk_thumbprint(env.private.public_key())
    issuer = load_issuer(ISS, AUD, pem_files=[env.pem_path])
    assert issuer.keys[env.kid].alg == env.alg


def test_accepts_token_without_kid_when_issuer_has_one_key(env: Env) -> None:
    assert env.auth.verify(sign(env.private, env.alg, claims_with(), None)) == EXPECTED


@pytest.mark.parametrize("aud", [AUD, ["other-service", AUD]])
def test_accepts_audience_string_or_list(env: Env, aud: object) -> None:
    assert env.auth.verify(env.token(aud=aud)) == EXPECTED


def test_optional_name_defaults_to_empty(env: Env) -> None:
    assert env.auth.verify(env.token(name=DROP)).name == ""


def test_empty_roles_list_is_accepted(env: Env) -> None:
    # Authentication only; whether a clerk without roles may do anything is policy's call.
    assert env.auth.verify(env.token(roles=[])).roles == ()


@pytest.mark.parametrize("explicit", [True, False], ids=["kid+alg", "fallbacks"])
def test_accepts_jwks_key(env: Env, tmp_path: Path, explicit: bool) -> None:
    jwk = jwt.get_algorithm_by_name(env.alg).to_jwk(env.private.public_key(), as_dict=True)
    if explicit:
        jwk |= {"kid": "2025-key-1", "alg": env.alg, "use": "sig"}
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    issuer = load_issuer(ISS, AUD, jwks_file=jwks)
    kid = "2025-key-1" if explicit else env.kid  # fallback kid is the thumbprint
    assert list(issuer.keys) == [kid]
    assert issuer.keys[kid].alg == env.alg
    auth = Authenticator([issuer], clock=lambda: NOW)
    assert auth.verify(sign(env.private, env.alg, claims_with(), kid)) == EXPECTED


def test_jwks_with_several_keys_picks_by_kid(
    keys: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entries = []
    for alg in ALGS:
        jwk = jwt.get_algorithm_by_name(alg).to_jwk(keys[alg].public_key(), as_dict=True)
        entries.append(jwk | {"kid": f"kid-{alg}"})
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": entries}))
    auth = Authenticator([load_issuer(ISS, AUD, jwks_file=jwks)], clock=lambda: NOW)
    for alg in ALGS:
        assert auth.verify(sign(keys[alg], alg, claims_with(), f"kid-{alg}")) == EXPECTED
    # Without a kid it is ambiguous which of the three keys is meant.
    token = sign(keys["ES256"], "ES256", claims_with(), None)
    assert_rejected(lambda: auth.verify(token), token, "TOKEN_UNKNOWN_KID", caplog)


def test_several_issuers_are_told_apart_by_iss(env: Env, other_keys: dict[str, Any]) -> None:
    other = other_keys["EdDSA"]
    second = TrustedIssuer(
        "https://other.idp", AUD, {"k": VerifyingKey(other.public_key(), "EdDSA")}
    )
    auth = Authenticator(
        [load_issuer(ISS, AUD, pem_files=[env.pem_path]), second], clock=lambda: NOW
    )
    assert auth.verify(env.token()).issuer == ISS
    token = sign(other, "EdDSA", claims_with(iss="https://other.idp"), "k")
    assert auth.verify(token).issuer == "https://other.idp"


def test_jwk_thumbprint_matches_rfc_examples() -> None:
    # RFC 7638 §3.1 (RSA) and RFC 8037 appendix A.3 (Ed25519).
    rsa_jwk = {
        "kty": "RSA",
        "e": "AQAB",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc"
            "_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0"
            "_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhA"
            "I4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
        ),
    }
    ed_jwk = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert jwk_thumbprint(jwt.PyJWK(rsa_jwk).key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    assert jwk_thumbprint(jwt.PyJWK(ed_jwk).key) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


# --- configuration errors ---------------------------------------------------------------------


def write_jwks(tmp_path: Path, *jwks: dict[str, object]) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": list(jwks)}))
    return path


def test_jwks_rejects_symmetric_keys(tmp_path: Path) -> None:
    path = write_jwks(tmp_path, {"kty": "oct", "k": b64u(b"s" * 32), "alg": "HS256"})
    with pytest.raises(ValueError, match="oct"):
        load_issuer(ISS, AUD, jwks_file=path)


def test_jwks_rejects_private_keys(keys: dict[str, Any], tmp_path: Path) -> None:
    path = write_jwks(
        tmp_path, jwt.get_algorithm_by_name("ES256").to_jwk(keys["ES256"], as_dict=True)
    )
    with pytest.raises(ValueError, match="private"):
        load_issuer(ISS, AUD, jwks_file=path)


@pytest.mark.parametrize(
    ("key_alg", "claimed"),
    [
        ("ES256", "RS256"),
        ("RS256", "EdDSA"),
        ("EdDSA", "ES256"),
        ("RS256", "RS512"),
        ("ES256", ""),
        ("ES256", ["ES256"]),
    ],
)
def test_jwks_rejects_alg_not_fitting_or_not_allowed(
    keys: dict[str, Any], tmp_path: Path, key_alg: str, claimed: object
) -> None:
    jwk = jwt.get_algorithm_by_name(key_alg).to_jwk(keys[key_alg].public_key(), as_dict=True)
    with pytest.raises(ValueError):
        load_issuer(ISS, AUD, jwks_file=write_jwks(tmp_path, jwk | {"alg": claimed}))


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: ec.generate_private_key(ec.SECP384R1()),
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
        ed25519.Ed25519PrivateKey.generate,  # written as a private key PEM, not a public one
    ],
    ids=["p384", "rsa1024", "private-key-pem"],
)
def test_pem_rejects_unusable_keys(tmp_path: Path, make_key: Callable[[], Any]) -> None:
    private = make_key()
    path = tmp_path / "key.pem"
    if isinstance(private, ed25519.Ed25519PrivateKey):
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    else:
        pem = public_pem(private)
    path.write_bytes(pem)
    with pytest.raises(ValueError):
        load_issuer(ISS, AUD, pem_files=[path])


def test_duplicate_kid_and_empty_issuer_are_rejected(env: Env) -> None:
    with pytest.raises(ValueError, match="duplicate kid"):
        load_issuer(ISS, AUD, pem_files=[env.pem_path, env.pem_path])
    with pytest.raises(ValueError):
        load_issuer(ISS, AUD)


def test_verifying_key_binds_alg_to_key_type(keys: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        VerifyingKey(keys["ES256"].public_key(), "RS256")
    with pytest.raises(ValueError):
        VerifyingKey(keys["RS256"].public_key(), "HS256")


@pytest.mark.parametrize("leeway_s", [61, 3600, -1])
def test_leeway_out_of_range_is_rejected(env: Env, leeway_s: int) -> None:
    with pytest.raises(ValueError):
        env.authenticator(leeway_s=leeway_s)


def test_leeway_of_60_is_allowed(env: Env) -> None:
    env.authenticator(leeway_s=60)


def test_authenticator_needs_distinct_issuers(env: Env) -> None:
    issuer = load_issuer(ISS, AUD, pem_files=[env.pem_path])
    with pytest.raises(ValueError):
        Authenticator([])
    with pytest.raises(ValueError):
        Authenticator([issuer, issuer])


# --- rejections -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-jwt",
        "a.b",
        "!!!.e30.sig",
        b64json([1, 2]) + "." + b64json({}) + ".",  # header is not an object
        b64json({"alg": "ES256"}) + ".bm90IGpzb24." + b64u(b"sig"),  # payload is not JSON
        b64json({"alg": "ES256", "kid": 7}) + "." + b64json(claims_with()) + ".c2ln",
        "eyJhbGciOiJFUzI1NiJ9." + "A" * 10_000 + ".c2ln",  # oversized
    ],
    ids=["empty", "one-part", "two-parts", "bad-base64", "header-array", "payload", "kid", "huge"],
)
def test_rejects_malformed(env: Env, token: str, caplog: pytest.LogCaptureFixture) -> None:
    reject(env, token, "TOKEN_MALFORMED", caplog)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "", None, ["ES256"]])
def test_rejects_unsigned_alg_none(env: Env, alg: object, caplog: pytest.LogCaptureFixture) -> None:
    header = {"typ": "JWT", "kid": env.kid} | ({} if alg is None else {"alg": alg})
    token = f"{b64json(header)}.{b64json(claims_with())}."
    reject(env, token, "TOKEN_ALG_NOT_ALLOWED", caplog)


@pytest.mark.parametrize("with_kid", [True, False])
def test_rejects_hs256_signed_with_public_key_pem(
    env: Env, with_kid: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # The classic algorithm-confusion attack: the public key file used as an HMAC secret.
    # PyJWT refuses to produce this token, so it is built by hand.
    header = {"alg": "HS256", "typ": "JWT"} | ({"kid": env.kid} if with_kid else {})
    signing_input = f"{b64json(header)}.{b64json(claims_with())}"
    mac = hmac.new(env.pem_path.read_bytes(), signing_input.encode(), hashlib.sha256)
    token = f"{signing_input}.{b64u(mac.digest())}"
    reject(env, token, "TOKEN_ALG_NOT_ALLOWED", caplog)


@pytest.mark.parametrize("alg", ["RS512", "PS256"])
def test_rejects_algs_off_the_list_even_with_a_valid_signature(
    keys: dict[str, Any], tmp_path: Path, alg: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rsa.pem"
    path.write_bytes(public_pem(keys["RS256"]))
    issuer = load_issuer(ISS, AUD, pem_files=[path])
    (kid,) = issuer.keys
    auth = Authenticator([issuer], clock=lambda: NOW)
    token = sign(keys["RS256"], alg, claims_with(), kid)
    assert_rejected(lambda: auth.verify(token), token, "TOKEN_ALG_NOT_ALLOWED", caplog)


def test_rejects_allowed_alg_that_does_not_fit_the_key(
    env: Env, other_keys: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    for alg in ALGS:
        if alg != env.alg:
            token = sign(other_keys[alg], alg, claims_with(), env.kid)
            reject(env, token, "TOKEN_ALG_NOT_ALLOWED", caplog)


def test_rejects_unknown_issuer(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    reject(env, env.token(iss="https://evil.example/idp"), "TOKEN_UNKNOWN_ISSUER", caplog)


@pytest.mark.parametrize("aud", ["other-service", ["a", "b"], 42])
def test_rejects_wrong_audience(env: Env, aud: object, caplog: pytest.LogCaptureFixture) -> None:
    reject(env, env.token(aud=aud), "TOKEN_WRONG_AUDIENCE", caplog)


@pytest.mark.parametrize("exp_offset", [-3600, -31, -30])
def test_rejects_expired(env: Env, exp_offset: int, caplog: pytest.LogCaptureFixture) -> None:
    token = env.token(iat=int(NOW) - 7200, exp=int(NOW) + exp_offset)
    reject(env, token, "TOKEN_EXPIRED", caplog)


def test_leeway_is_honoured_for_exp(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    token = env.token(iat=int(NOW) - 600, exp=int(NOW) - 20)
    assert env.authenticator(leeway_s=30).verify(token) == EXPECTED
    strict = env.authenticator(leeway_s=10)
    assert_rejected(lambda: strict.verify(token), token, "TOKEN_EXPIRED", caplog)


def test_clock_drives_expiry(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    token = env.token(iat=int(NOW), exp=int(NOW) + 60)
    assert env.authenticator(now=NOW + 89).verify(token) == EXPECTED
    later = env.authenticator(now=NOW + 90)
    assert_rejected(lambda: later.verify(token), token, "TOKEN_EXPIRED", caplog)


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_rejects_not_yet_valid(env: Env, claim: str, caplog: pytest.LogCaptureFixture) -> None:
    token = env.token(**{claim: int(NOW) + 31})
    reject(env, token, "TOKEN_NOT_YET_VALID", caplog)
    # Within leeway (30 s) the same kind of skew is tolerated.
    assert env.auth.verify(env.token(**{claim: int(NOW) + 29})) == EXPECTED


def test_rejects_unknown_kid(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    token = sign(env.private, env.alg, claims_with(), "no-such-kid")
    reject(env, token, "TOKEN_UNKNOWN_KID", caplog)


def test_rejects_signature_by_another_key_with_the_same_kid(
    env: Env, other_keys: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    token = sign(other_keys[env.alg], env.alg, claims_with(), env.kid)
    reject(env, token, "TOKEN_BAD_SIGNATURE", caplog)


def test_rejects_tampered_claims(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    header, _, signature = env.token().split(".")
    forged = claims_with(roles=["clerk", "admin"])
    reject(env, f"{header}.{b64json(forged)}.{signature}", "TOKEN_BAD_SIGNATURE", caplog)


@pytest.mark.parametrize("claim", REQUIRED_CLAIMS)
def test_rejects_missing_claim(env: Env, claim: str, caplog: pytest.LogCaptureFixture) -> None:
    reject(env, env.token(**{claim: DROP}), "TOKEN_MISSING_CLAIM", caplog, claim=claim)


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("roles", "clerk"),
        ("roles", {"clerk": True}),
        ("roles", ["clerk", ""]),
        ("roles", ["clerk", 7]),
        ("office", ""),
        ("office", ["hall-3"]),
        ("sub", ""),
        ("sub", 42),
        ("name", 42),
        ("iss", 42),
        ("exp", "tomorrow"),
        ("exp", True),
        ("exp", float("nan")),
        ("iat", "yesterday"),
        ("nbf", "now"),
    ],
)
def test_rejects_bad_claim(
    env: Env, claim: str, value: object, caplog: pytest.LogCaptureFixture
) -> None:
    reject(env, env.token(**{claim: value}), "TOKEN_BAD_CLAIM", caplog, claim=claim)


# --- gRPC metadata ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        [],
        [("user-agent", "grpc-python")],
        [("authorization", "")],
        [("authorization", "Bearer")],
        [("authorization", "Bearer   ")],
        [("authorization", "Basic Y2xlcms6aHVudGVyMg==")],
        [("authorization", "Token Y2xlcms6aHVudGVyMg==")],
        [("authorization", "Bearer a"), ("authorization", "Bearer b")],
    ],
    ids=["none", "empty", "other", "blank", "scheme-only", "spaces", "basic", "token", "two"],
)
def test_metadata_without_bearer_token(
    env: Env, metadata: Any, caplog: pytest.LogCaptureFixture
) -> None:
    assert_rejected(
        lambda: env.auth.authenticate(metadata), "Y2xlcms6aHVudGVyMg==", "TOKEN_MISSING", caplog
    )


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
@pytest.mark.parametrize("as_bytes", [False, True])
def test_metadata_with_bearer_token(env: Env, scheme: str, as_bytes: bool) -> None:
    value = f"{scheme} {env.token()}"
    metadata = [
        ("user-agent", "counter/1.0"),
        ("authorization", value.encode() if as_bytes else value),
    ]
    assert env.auth.authenticate(metadata) == EXPECTED


def test_metadata_token_errors_keep_their_reason(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    token = env.token(exp=int(NOW) - 3600, iat=int(NOW) - 7200)
    metadata = [("authorization", f"Bearer {token}")]
    assert_rejected(lambda: env.auth.authenticate(metadata), token, "TOKEN_EXPIRED", caplog)


# --- development IdP --------------------------------------------------------------------------


def test_dev_idp_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    idp = DevIdentityProvider(tmp_path)
    token = idp.issue("clerk-7", ["clerk"], "hall-1", name="Wang Fang", now=NOW)
    auth = Authenticator([idp.trusted_issuer()], clock=lambda: NOW)
    clerk = auth.verify(token)
    assert clerk == Clerk("clerk-7", ("clerk",), "hall-1", DevIdentityProvider.ISSUER, "Wang Fang")
    assert token not in caplog.text
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == DevIdentityProvider.AUDIENCE
    assert claims["exp"] - claims["iat"] == 8 * 3600
    assert "name" not in jwt.decode(
        idp.issue("c", ["r"], "o", now=NOW), options={"verify_signature": False}
    )


def test_dev_idp_key_files(tmp_path: Path) -> None:
    DevIdentityProvider(tmp_path)
    signing = tmp_path / "idp" / "signing-key.pem"
    assert stat.S_IMODE(signing.stat().st_mode) == 0o600
    assert (tmp_path / "idp" / "public-key.pem").is_file()


def test_dev_idp_reuses_its_key(tmp_path: Path) -> None:
    first = DevIdentityProvider(tmp_path)
    key_before = (tmp_path / "idp" / "signing-key.pem").read_bytes()
    token = first.issue("clerk-7", ["clerk"], "hall-1", now=NOW)
    second = DevIdentityProvider(tmp_path)
    assert (tmp_path / "idp" / "signing-key.pem").read_bytes() == key_before
    auth = Authenticator([second.trusted_issuer()], clock=lambda: NOW)
    assert auth.verify(token).sub == "clerk-7"


def test_dev_idp_public_key_file_works_with_load_issuer(tmp_path: Path) -> None:
    idp = DevIdentityProvider(tmp_path)
    issuer = load_issuer(idp.ISSUER, idp.AUDIENCE, pem_files=[tmp_path / "idp" / "public-key.pem"])
    assert issuer.keys.keys() == idp.trusted_issuer().keys.keys()
    auth = Authenticator([issuer], clock=lambda: NOW)
    assert auth.verify(idp.issue("clerk-7", ["clerk"], "hall-1", now=NOW)).office == "hall-1"


def test_dev_idp_ttl_and_extra_claims(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    idp = DevIdentityProvider(tmp_path)
    auth = Authenticator([idp.trusted_issuer()], clock=lambda: NOW)
    token = idp.issue("clerk-7", ["clerk"], "hall-1", ttl_s=60, now=NOW - 120)
    assert_rejected(lambda: auth.verify(token), token, "TOKEN_EXPIRED", caplog)
    bad = idp.issue("clerk-7", ["clerk"], "hall-1", now=NOW, extra_claims={"roles": "clerk"})
    assert_rejected(lambda: auth.verify(bad), bad, "TOKEN_BAD_CLAIM", caplog, claim="roles")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sub": "", "roles": ["clerk"], "office": "hall-1"},
        {"sub": "c", "roles": "clerk", "office": "hall-1"},
        {"sub": "c", "roles": ["clerk"], "office": ""},
        {"sub": "c", "roles": ["clerk"], "office": "hall-1", "ttl_s": 0},
    ],
)
def test_dev_idp_refuses_bad_input(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        DevIdentityProvider(tmp_path).issue(**kwargs)


# --- department and operator credentials (Registry callers) ------------------------------------


def bearer_md(token: str) -> list[tuple[str, str | bytes]]:
    return [("authorization", f"Bearer {token}")]


def test_department_credential_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    idp = DevIdentityProvider(tmp_path)
    token = idp.issue_department("civil_affairs", now=NOW)
    auth = Authenticator([idp.trusted_issuer()], clock=lambda: NOW)
    principal = auth.verify_department(bearer_md(token))
    assert principal == DepartmentPrincipal(
        "adapter:civil_affairs", ("department",), "civil_affairs", DevIdentityProvider.ISSUER
    )
    assert principal.is_department
    assert not principal.is_operator
    assert principal.may_act_for("civil_affairs")
    assert not principal.may_act_for("public_security")
    assert not principal.may_act_for("")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert "office" not in claims  # a department credential names no office
    assert claims["exp"] - claims["iat"] == 12 * 3600  # the default lifetime cap
    assert token not in caplog.text
    named = idp.issue_department("civil_affairs", sub="marriage-adapter-2", now=NOW)
    assert auth.verify_department(bearer_md(named)).sub == "marriage-adapter-2"


def test_operator_token_acts_for_every_department(tmp_path: Path) -> None:
    idp = DevIdentityProvider(tmp_path)
    auth = Authenticator([idp.trusted_issuer()], clock=lambda: NOW)
    principal = auth.verify_department(bearer_md(idp.issue_operator("ops-1", now=NOW)))
    assert (principal.sub, principal.roles, principal.department) == ("ops-1", ("operator",), "")
    assert principal.is_operator
    assert principal.may_act_for("civil_affairs")
    assert principal.may_act_for("public_security")


def test_a_department_credential_is_no_clerk_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    idp = DevIdentityProvider(tmp_path)
    auth = Authenticator([idp.trusted_issuer()], clock=lambda: NOW)
    token = idp.issue_department("civil_affairs", now=NOW)
    assert_rejected(
        lambda: auth.authenticate(bearer_md(token)),
        token,
        "TOKEN_MISSING_CLAIM",
        caplog,
        claim="office",
    )


def test_a_clerk_token_is_no_registry_credential(tmp_path: Path) -> None:
    idp = DevIdentityProvider(tmp_path)
    auth = Authenticator([idp.trusted_issuer()], clock=lambda: NOW)
    clerk = bearer_md(idp.issue("clerk-7", ["window_clerk"], "hall-1", now=NOW))
    with pytest.raises(PermissionDenied) as info:
        auth.verify_department(clerk)
    assert info.value.reason == "ROLE_NOT_ALLOWED"
    # registry_principal verifies without the role check, so the refusal can name the caller.
    principal = auth.registry_principal(clerk)
    assert (principal.sub, principal.is_department, principal.is_operator) == (
        "clerk-7",
        False,
        False,
    )


@pytest.mark.parametrize(
    ("extra", "reason", "claim"),
    [
        ({}, "TOKEN_MISSING_CLAIM", "dept"),
        ({"dept": ""}, "TOKEN_BAD_CLAIM", "dept"),
        ({"dept": ["civil_affairs"]}, "TOKEN_BAD_CLAIM", "dept"),
        ({"dept": "Civil Affairs"}, "TOKEN_BAD_CLAIM", "dept"),
        ({"dept": "civil_affairs\n"}, "TOKEN_BAD_CLAIM", "dept"),
        ({"roles": "department", "dept": "civil_affairs"}, "TOKEN_BAD_CLAIM", "roles"),
    ],
)
def test_department_credentials_need_a_clean_dept_claim(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    extra: dict[str, object],
    reason: str,
    claim: str,
) -> None:
    idp = DevIdentityProvider(tmp_path)
    auth = Authenticator([idp.trusted_issuer()], clock=lambda: NOW)
    token = idp.issue("adapter-1", ["department"], "unused", now=NOW, extra_claims=extra)
    assert_rejected(
        lambda: auth.verify_department(bearer_md(token)), token, reason, caplog, claim=claim
    )


def test_department_credentials_are_verified_like_any_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    idp = DevIdentityProvider(tmp_path)
    auth = Authenticator([idp.trusted_issuer()], clock=lambda: NOW)
    expired = idp.issue_department("civil_affairs", ttl_s=60, now=NOW - 120)
    assert_rejected(
        lambda: auth.verify_department(bearer_md(expired)), expired, "TOKEN_EXPIRED", caplog
    )
    stranger = DevIdentityProvider(tmp_path / "elsewhere").issue_department("civil_affairs")
    assert_rejected(
        lambda: auth.verify_department(bearer_md(stranger)), stranger, "TOKEN_UNKNOWN_KID", caplog
    )
    with pytest.raises(Unauthenticated) as info:
        auth.verify_department([])
    assert info.value.reason == "TOKEN_MISSING"


@pytest.mark.parametrize(
    "issue",
    [
        lambda idp: idp.issue_department(""),
        lambda idp: idp.issue_department("civil_affairs", ttl_s=0),
        lambda idp: idp.issue_operator(""),
        lambda idp: idp.issue_operator("ops", ttl_s=-1),
    ],
)
def test_dev_idp_refuses_bad_principal_input(tmp_path: Path, issue: Any) -> None:
    with pytest.raises(ValueError):
        issue(DevIdentityProvider(tmp_path))
