"""Clerk authentication: JWT verification against trusted issuers, and a development IdP.

Clerks send ``authorization: Bearer <JWT>``. The unverified header and claims are read only to
pick the issuer and key; PyJWT then verifies signature, audience, issuer and required claims, and
we check the times against an injected clock. Every failure is ``Unauthenticated`` with a reason
code; no message or log line ever contains the token.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeAlias, cast

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.exceptions import InvalidJTIError, InvalidSubjectError
from jwt.types import Options
from jwt.utils import base64url_encode

from broker.errors import Unauthenticated

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Clerk:
    """An authenticated caller, from verified JWT claims."""

    sub: str
    roles: tuple[str, ...]
    office: str
    issuer: str = ""
    name: str = ""


# Asymmetric only: the broker holds public keys, so nothing it stores can mint a token.
# A tuple, not a set: `x in tuple` is safe for unhashable JSON values like lists.
ALLOWED_ALGS = ("ES256", "RS256", "EdDSA")
REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub", "roles", "office")
MAX_LEEWAY_S = 60
# Far above any real clerk token; stops a caller from making us parse megabytes of JSON.
MAX_TOKEN_CHARS = 8192

PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


def _natural_alg(key: object) -> str | None:
    """The one allowed algorithm a public key may verify, or None if we do not accept the key."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ES256" if isinstance(key.curve, ec.SECP256R1) else None
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256" if key.key_size >= 2048 else None  # PyJWT's minimum too
    return "EdDSA" if isinstance(key, ed25519.Ed25519PublicKey) else None


@dataclass(frozen=True)
class VerifyingKey:
    """A trusted public key bound to exactly one algorithm.

    The algorithm comes from configuration, never from the token: that is what defeats algorithm
    confusion (e.g. an HS256 token "signed" with our public key as HMAC secret).
    """

    key: PublicKey
    alg: str

    def __post_init__(self) -> None:
        if _natural_alg(self.key) != self.alg:
            raise ValueError(f"{type(self.key).__name__} cannot verify {self.alg}")

    @classmethod
    def from_public_key(cls, key: object) -> VerifyingKey:
        """Wrap EC P-256 (ES256), RSA >= 2048 bits (RS256) or Ed25519 (EdDSA); else ValueError."""
        alg = _natural_alg(key)
        if alg is None:
            raise ValueError(f"unsupported key {type(key).__name__}: need P-256, RSA or Ed25519")
        return cls(cast(PublicKey, key), alg)


def jwk_thumbprint(key: PublicKey) -> str:
    """RFC 7638 JWK thumbprint (base64url SHA-256), the kid of a key loaded from PEM."""
    alg = VerifyingKey.from_public_key(key).alg
    jwk = jwt.get_algorithm_by_name(alg).to_jwk(key, as_dict=True)
    # RFC 7638 §3.2: only the required members (these six cover EC, RSA and OKP), sorted, compact.
    members = {k: v for k, v in jwk.items() if k in {"crv", "e", "kty", "n", "x", "y"}}
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return base64url_encode(hashlib.sha256(canonical).digest()).decode()


@dataclass(frozen=True)
class TrustedIssuer:
    """An identity provider whose clerk tokens we accept, with its keys by kid."""

    issuer: str
    audience: str
    keys: Mapping[str, VerifyingKey] = field(hash=False)

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience or not self.keys:
            raise ValueError("a trusted issuer needs an issuer, an audience and at least one key")
        # A read-only copy: a caller mutating its dict later must not change whom we trust.
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))


def _jwks_keys(path: Path) -> list[tuple[str, VerifyingKey]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError(f"{path}: expected a JWKS object with a 'keys' list")
    out = []
    for i, jwk in enumerate(doc["keys"]):
        where = f"{path} key #{i}"
        # A shared secret in a trust file lets whoever reads it mint tokens; a private key here
        # means the wrong file was exported. Neither belongs in a verifier's configuration.
        if not isinstance(jwk, dict) or jwk.get("kty") == "oct" or "d" in jwk:
            raise ValueError(f"{where}: only public EC/RSA/OKP keys (no oct, no private keys)")
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", "ES256") not in ALLOWED_ALGS:
            raise ValueError(f"{where}: not a signature key for one of {ALLOWED_ALGS}")
        try:
            vkey = VerifyingKey.from_public_key(jwt.PyJWK(jwk).key)
        except jwt.PyJWTError as exc:
            raise ValueError(f"{where}: unusable key") from exc
        if jwk.get("alg", vkey.alg) != vkey.alg:
            raise ValueError(f"{where}: alg {jwk['alg']} does not fit the key ({vkey.alg})")
        kid = jwk.get("kid", jwk_thumbprint(vkey.key))
        if not isinstance(kid, str) or not kid:
            raise ValueError(f"{where}: kid must be a non-empty string")
        out.append((kid, vkey))
    return out


def load_issuer(
    issuer: str,
    audience: str,
    *,
    pem_files: Sequence[Path] = (),
    jwks_file: Path | None = None,
) -> TrustedIssuer:
    """Build a :class:`TrustedIssuer` from PEM public keys and/or a JWKS file.

    PEM keys get their RFC 7638 thumbprint as kid; JWKS keys use their ``kid`` (else the
    thumbprint) and ``alg`` (else inferred from kty/crv). ValueError on any key we would not use
    (symmetric, private, other algorithms or curves, RSA < 2048 bits) and on duplicate kids.
    """
    pairs: list[tuple[str, VerifyingKey]] = []
    for path in pem_files:
        try:
            vkey = VerifyingKey.from_public_key(
                serialization.load_pem_public_key(path.read_bytes())
            )
        except ValueError as exc:
            raise ValueError(f"{path}: not a usable PEM public key: {exc}") from exc
        pairs.append((jwk_thumbprint(vkey.key), vkey))
    if jwks_file is not None:
        pairs.extend(_jwks_keys(jwks_file))
    keys: dict[str, VerifyingKey] = {}
    for kid, vkey in pairs:
        if keys.setdefault(kid, vkey) is not vkey:
            raise ValueError(f"issuer {issuer}: duplicate kid {kid!r}")
    return TrustedIssuer(issuer, audience, keys)


# PyJWT exception -> (reason, message), first match wins: InvalidSignatureError is a DecodeError.
_PYJWT_ERRORS: tuple[tuple[type[Exception], str, str], ...] = (
    (jwt.InvalidSignatureError, "TOKEN_BAD_SIGNATURE", "token signature does not verify"),
    (jwt.InvalidAlgorithmError, "TOKEN_ALG_NOT_ALLOWED", "token algorithm is not allowed"),
    (jwt.InvalidAudienceError, "TOKEN_WRONG_AUDIENCE", "token is not meant for this broker"),
    (jwt.InvalidIssuerError, "TOKEN_UNKNOWN_ISSUER", "token issuer is not trusted"),
    (jwt.PyJWTError, "TOKEN_MALFORMED", "token is not a well-formed JWS"),
)
# PyJWT's own time checks read the wall clock, so they are off; _check_times uses ours instead.
_DECODE_OPTIONS: Options = {
    "require": list(REQUIRED_CLAIMS),
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "enforce_minimum_key_length": True,
}


def _bad_claim(claim: str) -> Unauthenticated:
    return Unauthenticated("TOKEN_BAD_CLAIM", f"token claim {claim} is invalid", claim=claim)


def _number(claims: Mapping[str, Any], claim: str) -> float:
    value = claims[claim]
    # bool is an int in Python, and NaN compares False with everything, so it would never expire.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad_claim(claim)
    return float(value)


def _text(claims: Mapping[str, Any], claim: str) -> str:
    value = claims[claim]
    if not isinstance(value, str) or not value.strip():
        raise _bad_claim(claim)
    return value


class Authenticator:
    """Verifies clerk JWTs from the trusted issuers and turns them into :class:`Clerk` objects.

    ``clock`` drives every time check (exp, nbf, iat); ``leeway_s`` (0..60) absorbs clock skew.
    """

    def __init__(
        self,
        issuers: Sequence[TrustedIssuer],
        *,
        leeway_s: int = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 <= leeway_s <= MAX_LEEWAY_S:
            raise ValueError(f"leeway_s must be within 0..{MAX_LEEWAY_S}, got {leeway_s}")
        self._issuers = {trusted.issuer: trusted for trusted in issuers}
        if not self._issuers or len(self._issuers) != len(issuers):
            raise ValueError("need at least one trusted issuer, each configured once")
        self._leeway = leeway_s
        self._clock = clock

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Clerk:
        """Verify the ``authorization: Bearer <JWT>`` entry of gRPC invocation metadata."""
        return self._logged(lambda: self._verify(_bearer_token(metadata)))

    def verify(self, token: str) -> Clerk:
        """Verify a compact-JWS clerk token, or raise :class:`Unauthenticated` with a reason."""
        return self._logged(lambda: self._verify(token))

    def _logged(self, check: Callable[[], Clerk]) -> Clerk:
        try:
            clerk = check()
        except Unauthenticated as exc:
            # Reason and claim name only: no part of the token ever reaches the log.
            log.info("clerk token rejected: %s %s", exc.reason, exc.metadata or "")
            raise
        log.debug("clerk authenticated: sub=%s iss=%s", clerk.sub, clerk.issuer)
        return clerk

    def _verify(self, token: str) -> Clerk:
        # `from None` below: a chained PyJWT exception could carry token bytes into a traceback.
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated("TOKEN_MALFORMED", "token is too large")
        try:  # Unverified reads only pick the issuer and key; nothing in them is trusted yet.
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthenticated("TOKEN_MALFORMED", "token is not a well-formed JWS") from None
        alg = header.get("alg")
        if alg not in ALLOWED_ALGS:
            raise Unauthenticated("TOKEN_ALG_NOT_ALLOWED", "token algorithm is not allowed")
        if unverified.get("iss") is None:
            raise Unauthenticated("TOKEN_MISSING_CLAIM", "token lacks claim iss", claim="iss")
        trusted = self._issuers.get(_text(unverified, "iss"))
        if trusted is None:
            raise Unauthenticated("TOKEN_UNKNOWN_ISSUER", "token issuer is not trusted")
        kid = header.get("kid")  # PyJWT has checked it is a string if present
        if kid is None and len(trusted.keys) == 1:  # only then is it clear which key is meant
            kid = next(iter(trusted.keys))
        vkey = trusted.keys.get(kid) if isinstance(kid, str) else None
        if vkey is None:
            raise Unauthenticated("TOKEN_UNKNOWN_KID", "token key id is not known for its issuer")
        if alg != vkey.alg:
            raise Unauthenticated("TOKEN_ALG_NOT_ALLOWED", "token algorithm does not fit its key")
        try:
            claims = jwt.decode(
                token,
                vkey.key,
                algorithms=[vkey.alg],
                audience=trusted.audience,
                issuer=trusted.issuer,
                options=_DECODE_OPTIONS,
            )
        except jwt.MissingRequiredClaimError as exc:
            missing = exc.claim
            raise Unauthenticated(
                "TOKEN_MISSING_CLAIM", f"token lacks claim {missing}", claim=missing
            ) from None
        except (InvalidSubjectError, InvalidJTIError) as exc:
            raise _bad_claim("sub" if isinstance(exc, InvalidSubjectError) else "jti") from None
        except jwt.PyJWTError as exc:
            reason, message = next((r, m) for t, r, m in _PYJWT_ERRORS if isinstance(exc, t))
            raise Unauthenticated(reason, message) from None
        self._check_times(claims)
        roles = claims["roles"]
        if not isinstance(roles, list) or not all(isinstance(r, str) and r.strip() for r in roles):
            raise _bad_claim("roles")
        if not isinstance(name := claims.get("name", ""), str):
            raise _bad_claim("name")
        sub, office = _text(claims, "sub"), _text(claims, "office")
        return Clerk(sub, tuple(roles), office, issuer=trusted.issuer, name=name)

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        # The same comparisons PyJWT makes, against the injected clock.
        now, leeway = self._clock(), self._leeway
        if _number(claims, "exp") <= now - leeway:
            raise Unauthenticated("TOKEN_EXPIRED", "token has expired")
        nbf = _number(claims, "nbf") if "nbf" in claims else None
        if _number(claims, "iat") > now + leeway or (nbf is not None and nbf > now + leeway):
            raise Unauthenticated("TOKEN_NOT_YET_VALID", "token is not valid yet")


def _bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    values = [value for key, value in metadata or () if key.lower() == "authorization"]
    if len(values) != 1:
        raise Unauthenticated("TOKEN_MISSING", "need exactly one authorization metadata entry")
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    parts = value.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":  # RFC 7235: scheme is case-insensitive
        raise Unauthenticated("TOKEN_MISSING", "authorization metadata is not a Bearer token")
    return parts[1]


class DevIdentityProvider:
    """`certbroker token issue`: a development IdP keeping an Ed25519 key pair in a state dir.

    ``state_dir/idp/signing-key.pem`` (0600) is created on first use and reused afterwards;
    ``public-key.pem`` beside it can be given to :func:`load_issuer` like any issuer's key.
    """

    ISSUER = "https://idp.certbroker.local/dev"
    AUDIENCE = "certbroker"

    def __init__(self, state_dir: Path) -> None:
        idp_dir = state_dir / "idp"
        idp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.signing_key_path = idp_dir / "signing-key.pem"
        self.public_key_path = idp_dir / "public-key.pem"
        if not self.signing_key_path.exists():
            pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            # Created 0600 (never readable by others, even briefly); O_EXCL never clobbers a key.
            with contextlib.suppress(FileExistsError):
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
                with os.fdopen(os.open(self.signing_key_path, flags, 0o600), "wb") as f:
                    f.write(pem)
        key = serialization.load_pem_private_key(self.signing_key_path.read_bytes(), None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"{self.signing_key_path}: not an Ed25519 private key")
        self._key = key
        self._vkey = VerifyingKey(key.public_key(), "EdDSA")
        self._kid = jwk_thumbprint(self._vkey.key)
        # Derived data: rewrite it whenever it does not match the signing key.
        public_pem = self._vkey.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if not self.public_key_path.exists() or self.public_key_path.read_bytes() != public_pem:
            self.public_key_path.write_bytes(public_pem)

    def issue(
        self,
        sub: str,
        roles: Sequence[str],
        office: str,
        *,
        name: str = "",
        ttl_s: int = 8 * 3600,
        now: float | None = None,
        extra_claims: Mapping[str, object] | None = None,
    ) -> str:
        """Sign a clerk token. ``extra_claims`` go in last, so they may override any claim."""
        if isinstance(roles, str) or not sub or not office or ttl_s <= 0:
            raise ValueError("need sub, office, a sequence of roles (not a str) and ttl_s > 0")
        iat = int(time.time() if now is None else now)
        claims: dict[str, object] = {"iss": self.ISSUER, "aud": self.AUDIENCE, "sub": sub}
        claims |= {"roles": list(roles), "office": office, "iat": iat, "exp": iat + ttl_s}
        if name:
            claims["name"] = name
        claims.update(extra_claims or {})
        return jwt.encode(claims, self._key, algorithm="EdDSA", headers={"kid": self._kid})

    def trusted_issuer(self) -> TrustedIssuer:
        """The issuer entry that makes an :class:`Authenticator` accept this IdP's tokens."""
        return TrustedIssuer(self.ISSUER, self.AUDIENCE, {self._kid: self._vkey})
