"""Trusted token issuers: their public keys, each bound to one algorithm, from PEM or JWKS.

Re-exported by :mod:`certbroker.auth.authenticator`, which verifies tokens against them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TypeAlias, cast

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.utils import base64url_encode

# Asymmetric only: the broker holds public keys, so nothing it stores can mint a token.
# A tuple, not a set: `x in tuple` is safe for unhashable JSON values like lists.
ALLOWED_ALGS = ("ES256", "RS256", "EdDSA")
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
#: Longest lifetime (``exp - iat``) a token of an issuer may have unless configured otherwise:
#: a working day and then some, so a clerk's token cannot outlive the shift by much.
DEFAULT_MAX_LIFETIME_S = 12 * 3600.0


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
    """An identity provider whose clerk tokens we accept, with its keys by kid.

    ``max_lifetime_s`` caps ``exp - iat`` of its tokens (longer-lived ones are refused with
    ``TOKEN_LIFETIME_TOO_LONG``).
    """

    issuer: str
    audience: str
    keys: Mapping[str, VerifyingKey] = field(hash=False)
    max_lifetime_s: float = DEFAULT_MAX_LIFETIME_S

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience or not self.keys:
            raise ValueError("a trusted issuer needs an issuer, an audience and at least one key")
        if not 0 < self.max_lifetime_s < float("inf"):  # also refuses NaN
            raise ValueError("a trusted issuer's max_lifetime_s must be > 0 and finite")
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
    max_lifetime_s: float = DEFAULT_MAX_LIFETIME_S,
) -> TrustedIssuer:
    """Build a :class:`TrustedIssuer` from PEM public keys and/or a JWKS file.

    PEM keys get their RFC 7638 thumbprint as kid; JWKS keys use their ``kid`` (else the
    thumbprint) and ``alg`` (else inferred from kty/crv). ValueError on any key we would not use
    (symmetric, private, other algorithms or curves, RSA < 2048 bits) and on duplicate kids.
    ``max_lifetime_s`` caps its tokens' lifetime (:class:`TrustedIssuer`).
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
    return TrustedIssuer(issuer, audience, keys, max_lifetime_s)
