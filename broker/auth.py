"""Authentication: JWT verification against trusted issuers, and a development IdP.

Clerks (CertificateBroker) and departments or operators (Registry) send
``authorization: Bearer <JWT>``; the issuers and their keys live in :mod:`broker.issuers`. The
unverified header and claims are read only to pick the issuer and key; PyJWT then verifies
signature, audience, issuer and required claims, and we check the times against an injected
clock. Every failure is ``Unauthenticated`` with a reason code; no message or log line ever
contains the token.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jwt
from jwt.exceptions import InvalidJTIError, InvalidSubjectError
from jwt.types import Options

from broker.errors import PermissionDenied, Unauthenticated
from broker.issuers import (
    ALLOWED_ALGS,
    PublicKey,
    TrustedIssuer,
    VerifyingKey,
    jwk_thumbprint,
    load_issuer,
)
from broker.keyfiles import ed25519_key_files

__all__ = [
    "ALLOWED_ALGS",
    "DEPARTMENT_ROLE",
    "OPERATOR_ROLE",
    "REQUIRED_CLAIMS",
    "Authenticator",
    "Clerk",
    "DepartmentPrincipal",
    "DevIdentityProvider",
    "PublicKey",
    "TrustedIssuer",
    "VerifyingKey",
    "jwk_thumbprint",
    "load_issuer",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Clerk:
    """An authenticated caller, from verified JWT claims."""

    sub: str
    roles: tuple[str, ...]
    office: str
    issuer: str = ""
    name: str = ""


DEPARTMENT_ROLE = "department"
OPERATOR_ROLE = "operator"
#: Department ids as the policy catalogue spells them (``civil_affairs``).
DEPARTMENT_ID = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass(frozen=True)
class DepartmentPrincipal:
    """An authenticated Registry caller: a department's adapter deployment or an operator.

    ``department`` is the token's ``dept`` claim: always set for the "department" role, ""
    for an operator token without one.
    """

    sub: str
    roles: tuple[str, ...]
    department: str
    issuer: str = ""

    @property
    def is_operator(self) -> bool:
        return OPERATOR_ROLE in self.roles

    @property
    def is_department(self) -> bool:
        return DEPARTMENT_ROLE in self.roles and bool(self.department)

    def may_act_for(self, department: str) -> bool:
        """Operators act for every department; a department only for itself."""
        return self.is_operator or (self.is_department and self.department == department)


_P = TypeVar("_P", Clerk, DepartmentPrincipal)

REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub", "roles", "office")
#: A department or operator credential names no office.
PRINCIPAL_CLAIMS = ("exp", "iat", "iss", "aud", "sub", "roles")
MAX_LEEWAY_S = 60
# Far above any real clerk token; stops a caller from making us parse megabytes of JSON.
MAX_TOKEN_CHARS = 8192

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

    def verify_department(
        self, metadata: Sequence[tuple[str, str | bytes]] | None
    ) -> DepartmentPrincipal:
        """Verify a Registry caller's bearer token: a department credential (role "department"
        and a ``dept`` claim) or an operator token (role "operator").

        ``Unauthenticated`` for a token that does not verify or lacks a usable ``dept``;
        ``PermissionDenied("ROLE_NOT_ALLOWED")`` for a valid token with neither role (a clerk's).
        """
        principal = self.registry_principal(metadata)
        if not (principal.is_operator or principal.is_department):
            raise PermissionDenied(
                "ROLE_NOT_ALLOWED", "the registry needs a department or operator credential"
            )
        return principal

    def registry_principal(
        self, metadata: Sequence[tuple[str, str | bytes]] | None
    ) -> DepartmentPrincipal:
        """Like :meth:`verify_department` but without the role check, so that the Registry
        can audit a refused caller under its verified ``sub``."""
        return self._logged(lambda: self._verify_principal(_bearer_token(metadata)))

    def _logged(self, check: Callable[[], _P]) -> _P:
        try:
            principal = check()
        except Unauthenticated as exc:
            # Reason and claim name only: no part of the token ever reaches the log.
            log.info("token rejected: %s %s", exc.reason, exc.metadata or "")
            raise
        log.debug("authenticated: sub=%s iss=%s", principal.sub, principal.issuer)
        return principal

    def _verify(self, token: str) -> Clerk:
        claims, trusted = self._claims(token, REQUIRED_CLAIMS)
        if not isinstance(name := claims.get("name", ""), str):
            raise _bad_claim("name")
        sub, office = _text(claims, "sub"), _text(claims, "office")
        return Clerk(sub, _roles(claims), office, issuer=trusted.issuer, name=name)

    def _verify_principal(self, token: str) -> DepartmentPrincipal:
        claims, trusted = self._claims(token, PRINCIPAL_CLAIMS)
        roles = _roles(claims)
        dept = claims.get("dept")
        if dept is None and DEPARTMENT_ROLE in roles:
            raise Unauthenticated("TOKEN_MISSING_CLAIM", "token lacks claim dept", claim="dept")
        if dept is not None and not (isinstance(dept, str) and DEPARTMENT_ID.fullmatch(dept)):
            raise _bad_claim("dept")
        return DepartmentPrincipal(_text(claims, "sub"), roles, dept or "", trusted.issuer)

    def _claims(self, token: str, required: Sequence[str]) -> tuple[dict[str, Any], TrustedIssuer]:
        """Verified claims (signature, alg, iss, aud, ``required``, times) and their issuer."""
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
        options: Options = {**_DECODE_OPTIONS, "require": list(required)}
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                vkey.key,
                algorithms=[vkey.alg],
                audience=trusted.audience,
                issuer=trusted.issuer,
                options=options,
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
        return claims, trusted

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        # The same comparisons PyJWT makes, against the injected clock.
        now, leeway = self._clock(), self._leeway
        if _number(claims, "exp") <= now - leeway:
            raise Unauthenticated("TOKEN_EXPIRED", "token has expired")
        nbf = _number(claims, "nbf") if "nbf" in claims else None
        if _number(claims, "iat") > now + leeway or (nbf is not None and nbf > now + leeway):
            raise Unauthenticated("TOKEN_NOT_YET_VALID", "token is not valid yet")


def _roles(claims: Mapping[str, Any]) -> tuple[str, ...]:
    roles = claims["roles"]
    if not isinstance(roles, list) or not all(isinstance(r, str) and r.strip() for r in roles):
        raise _bad_claim("roles")
    return tuple(roles)


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

    ``state_dir/idp/signing-key.pem`` (0600) is created on first use and reused afterwards
    (:func:`broker.keyfiles.ed25519_key_files`); ``public-key.pem`` beside it can be given to
    :func:`load_issuer` like any issuer's key.
    """

    ISSUER = "https://idp.certbroker.local/dev"
    AUDIENCE = "certbroker"

    def __init__(self, state_dir: Path) -> None:
        files = ed25519_key_files(state_dir / "idp")
        self.signing_key_path = files.signing_key_path
        self.public_key_path = files.public_key_path
        self._key = files.private_key
        self._vkey = VerifyingKey(files.public_key, "EdDSA")
        self._kid = jwk_thumbprint(self._vkey.key)

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
        claims = self._base_claims(sub, list(roles), ttl_s, now) | {"office": office}
        if name:
            claims["name"] = name
        claims.update(extra_claims or {})
        return self._sign(claims)

    def issue_department(
        self, dept: str, *, sub: str = "", ttl_s: int = 24 * 3600, now: float | None = None
    ) -> str:
        """Sign a department credential (role "department", claim ``dept``) for the Registry.

        ``sub`` names the adapter deployment; it defaults to ``adapter:<dept>``.
        """
        if not dept or ttl_s <= 0:
            raise ValueError("need a department id and ttl_s > 0")
        return self._sign(
            self._base_claims(sub or f"adapter:{dept}", [DEPARTMENT_ROLE], ttl_s, now)
            | {"dept": dept}
        )

    def issue_operator(self, sub: str, *, ttl_s: int = 8 * 3600, now: float | None = None) -> str:
        """Sign an operator token (role "operator"): manages the Registry of every department."""
        if not sub or ttl_s <= 0:
            raise ValueError("need sub and ttl_s > 0")
        return self._sign(self._base_claims(sub, [OPERATOR_ROLE], ttl_s, now))

    def _base_claims(
        self, sub: str, roles: list[str], ttl_s: int, now: float | None
    ) -> dict[str, object]:
        iat = int(time.time() if now is None else now)
        return {
            "iss": self.ISSUER,
            "aud": self.AUDIENCE,
            "sub": sub,
            "roles": roles,
            "iat": iat,
            "exp": iat + ttl_s,
        }

    def _sign(self, claims: Mapping[str, object]) -> str:
        return jwt.encode(dict(claims), self._key, algorithm="EdDSA", headers={"kid": self._kid})

    def trusted_issuer(self) -> TrustedIssuer:
        """The issuer entry that makes an :class:`Authenticator` accept this IdP's tokens."""
        return TrustedIssuer(self.ISSUER, self.AUDIENCE, {self._kid: self._vkey})
