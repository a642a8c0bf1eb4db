"""Authentication: JWT verification against trusted issuers, with a cache of verified tokens.

Clerks (CertificateBroker) and departments or operators (Registry) send
``authorization: Bearer <JWT>``; the issuers and their keys live in
:mod:`certbroker.auth.issuers`. The unverified header and claims are read only to pick the
issuer and key; PyJWT then verifies signature, audience, issuer and required claims, and we
check the times against an injected clock. Every failure is
:class:`certbroker.errors.UnknownCaller` (UNAUTHENTICATED: no principal is known) with a reason
code; no message or log line ever contains the token.

What a verified token says is checked too, since it ends up in audit entries, logs and
auditors' terminals: ``sub``, ``office`` and each role are at most 64 characters of
:data:`SAFE_CLAIM` (ASCII letters, digits and ``_ . : @ / + | -``), at most
:data:`MAX_ROLES` roles; ``name`` is at most 64 printable characters (no control, format --
bidi overrides, zero-width --, surrogate, private-use or unassigned character, no line
separator). Any other value is ``TOKEN_BAD_CLAIM``. A token lives at most its issuer's
``max_lifetime_s`` (``exp - iat``, default 12 h), else ``TOKEN_LIFETIME_TOO_LONG``; ``iat`` is
a required claim, since without it the lifetime cannot be known (a token without it is
``TOKEN_MISSING_CLAIM``, claim ``iat``), and ``exp`` must come after it (``TOKEN_BAD_CLAIM``).

The principals it yields live in :mod:`certbroker.auth.principals`, the development IdP in
:mod:`certbroker.auth.dev_idp`; both are re-exported here.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jwt
from jwt.exceptions import InvalidJTIError, InvalidSubjectError
from jwt.types import Options

from certbroker.auth.controls import Controls
from certbroker.auth.dev_idp import DevIdentityProvider
from certbroker.auth.issuers import (
    ALLOWED_ALGS,
    DEFAULT_MAX_LIFETIME_S,
    PublicKey,
    TrustedIssuer,
    VerifyingKey,
    jwk_thumbprint,
    load_issuer,
)
from certbroker.auth.principals import (
    DEPARTMENT_ID,
    DEPARTMENT_ROLE,
    OPERATOR_ROLE,
    Clerk,
    DepartmentPrincipal,
)
from certbroker.cache import TokenCache
from certbroker.errors import PermissionDenied, UnknownCaller
from certbroker.metrics import Metrics

__all__ = [
    "ALLOWED_ALGS",
    "DEFAULT_MAX_LIFETIME_S",
    "DEPARTMENT_ID",
    "DEPARTMENT_ROLE",
    "MAX_CLAIM_CHARS",
    "OPERATOR_ROLE",
    "REQUIRED_CLAIMS",
    "SAFE_CLAIM",
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


_P = TypeVar("_P", Clerk, DepartmentPrincipal)

REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub", "roles", "office")
#: A department or operator credential names no office.
PRINCIPAL_CLAIMS = ("exp", "iat", "iss", "aud", "sub", "roles")
MAX_LEEWAY_S = 60
#: Verified tokens are re-verified at least this often (a config knob for the lead to add).
TOKEN_CACHE_MAX_AGE_S = 300.0
TOKEN_CACHE_MAX_ENTRIES = 10_000
# Far above any real clerk token; stops a caller from making us parse megabytes of JSON.
MAX_TOKEN_CHARS = 8192
#: Longest ``sub``, ``office``, role or ``name`` accepted (characters).
MAX_CLAIM_CHARS = 64
#: Most roles one token may carry.
MAX_ROLES = 32
#: ``sub``, ``office`` and roles: identifiers, ASCII only (explicit classes, so no other
#: script's letters or digits), nothing that could break a table, a log line or a
#: ``key=value;...`` summary (no space, quote, ``;``, ``,`` or ``=``).
SAFE_CLAIM = re.compile(rf"[A-Za-z0-9_.:@/+|-]{{1,{MAX_CLAIM_CHARS}}}")

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


def _bad_claim(claim: str) -> UnknownCaller:
    return UnknownCaller("TOKEN_BAD_CLAIM", f"token claim {claim} is invalid", claim=claim)


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


def _identifier(claims: Mapping[str, Any], claim: str) -> str:
    """``sub`` or ``office``: a short ASCII identifier (:data:`SAFE_CLAIM`)."""
    value = claims[claim]
    if not isinstance(value, str) or not SAFE_CLAIM.fullmatch(value):
        raise _bad_claim(claim)
    return value


def _display_name(claims: Mapping[str, Any]) -> str:
    """The optional ``name``: at most :data:`MAX_CLAIM_CHARS` printable characters."""
    value = claims.get("name", "")
    # str.isprintable() is False for every character of Unicode categories C* (control,
    # format -- bidi overrides, zero-width --, surrogate, private use, unassigned) and Z*
    # except the ASCII space (line and paragraph separators included): what a name needs
    # to show as it is, everywhere it is shown.
    if not isinstance(value, str) or len(value) > MAX_CLAIM_CHARS or not value.isprintable():
        raise _bad_claim("name")
    return value


class Authenticator:
    """Verifies clerk JWTs from the trusted issuers and turns them into :class:`Clerk` objects.

    ``clock`` drives every time check (exp, nbf, iat); ``leeway_s`` (0..60) absorbs clock skew.

    ``issuers`` is the trusted issuers, or a function loading them (from key files): then
    :meth:`reload_keys` can re-read them. Verified tokens are cached by SHA-256 (never the
    token itself) until the earlier of their ``exp`` and ``token_max_age_s`` after
    verification, so a hit answers exactly what a full verification would: a token is never
    served from the cache at or after its ``exp`` (with leeway it then gets the full check, as
    without the cache). :meth:`reload_keys` empties the cache, so a key that is gone refuses
    its tokens on the next call. ``token_max_age_s`` = 0 turns the cache off.
    """

    def __init__(
        self,
        issuers: Sequence[TrustedIssuer] | Callable[[], Sequence[TrustedIssuer]],
        *,
        leeway_s: int = 30,
        clock: Callable[[], float] = time.time,
        token_max_age_s: float = TOKEN_CACHE_MAX_AGE_S,
        token_max_entries: int = TOKEN_CACHE_MAX_ENTRIES,
        metrics: Metrics | None = None,
    ) -> None:
        if not 0 <= leeway_s <= MAX_LEEWAY_S:
            raise ValueError(f"leeway_s must be within 0..{MAX_LEEWAY_S}, got {leeway_s}")
        if token_max_age_s < 0 or token_max_entries < 1:
            raise ValueError("token_max_age_s must be >= 0 and token_max_entries >= 1")
        self._loader = issuers if callable(issuers) else None
        self._issuers = _index(issuers() if callable(issuers) else issuers)
        self._leeway = leeway_s
        self._clock = clock
        self._metrics = metrics or Metrics(enabled=False)
        self._cache_on = token_max_age_s > 0
        # One cache per kind of principal: a token verified as a clerk says nothing about it
        # as a Registry credential (other required claims), and the reverse.
        self._clerks: TokenCache[Clerk] = TokenCache(token_max_entries, token_max_age_s, clock)
        self._principals: TokenCache[DepartmentPrincipal] = TokenCache(
            token_max_entries, token_max_age_s, clock
        )
        #: The security officers' controls, enforced by :meth:`enforce`; set by the server
        #: once the store is open (``None``: none in force).
        self.controls: Controls | None = None

    def reload_keys(self) -> bool:
        """Re-read the issuers' keys (when built from a loader) and empty the token cache.

        Every token is checked in full on its next call, against the keys now on disk: one
        whose key was removed is refused. If the files cannot be loaded the previous keys stay
        in force (as a rejected policy reload keeps the old policy) and False is returned; the
        cache is emptied either way.
        """
        self._clerks.clear()
        self._principals.clear()
        if self._loader is None:
            return True
        try:
            fresh = _index(self._loader())
        except (OSError, ValueError) as exc:
            log.error("issuer key reload rejected, keeping the previous keys: %s", exc)
            return False
        self._issuers = fresh
        log.info("issuer keys reloaded: %d issuer(s)", len(fresh))
        return True

    def enforce(self, clerk: Clerk) -> None:
        """Refuse ``clerk`` if a security officer's control stops it (disabled clerk or office,
        revoked token; :mod:`certbroker.auth.controls`). Called by every servicer right after
        :meth:`authenticate`, once the clerk is known, so the refusal is audited under it."""
        if self.controls is not None:
            self.controls.check_clerk(clerk)

    def enforce_subject(self, clerk: Clerk, subject_id: str) -> None:
        """Refuse a lookup of a frozen citizen's records (``SUBJECT_FROZEN``)."""
        if self.controls is not None:
            self.controls.check_subject(clerk, subject_id)

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Clerk:
        """Verify the ``authorization: Bearer <JWT>`` entry of gRPC invocation metadata."""
        # What _logged does, inline: every lookup starts here, so no closure per call.
        try:
            clerk = self._verify(_bearer_token(metadata))
        except UnknownCaller as exc:
            _log_rejected(exc)
            raise
        log.debug("authenticated: sub=%s iss=%s", clerk.sub, clerk.issuer)
        return clerk

    def verify(self, token: str) -> Clerk:
        """Verify a compact-JWS clerk token, or raise :class:`UnknownCaller` with a reason."""
        return self._logged(lambda: self._verify(token))

    def verify_department(
        self, metadata: Sequence[tuple[str, str | bytes]] | None
    ) -> DepartmentPrincipal:
        """Verify a Registry caller's bearer token: a department credential (role "department"
        and a ``dept`` claim) or an operator token (role "operator").

        ``UnknownCaller`` for a token that does not verify or lacks a usable ``dept``;
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

    def verified_claims(
        self, metadata: Sequence[tuple[str, str | bytes]] | None, required: Sequence[str]
    ) -> tuple[dict[str, Any], str]:
        """The verified claims of the call's bearer token (signature, alg, iss, aud, times and
        ``required``) and its issuer, uncached, for callers that are not clerks (citizens:
        :mod:`certbroker.auth.citizens`); ``UnknownCaller`` with a reason otherwise."""
        try:
            claims, trusted = self._claims(_bearer_token(metadata), required)
        except UnknownCaller as exc:
            _log_rejected(exc)
            raise
        return claims, trusted.issuer

    def trusts(self, issuer: str) -> bool:
        """Whether tokens of ``issuer`` are accepted here."""
        return issuer in self._issuers

    def _logged(self, check: Callable[[], _P]) -> _P:
        try:
            principal = check()
        except UnknownCaller as exc:
            _log_rejected(exc)
            raise
        log.debug("authenticated: sub=%s iss=%s", principal.sub, principal.issuer)
        return principal

    def _cached(self, cache: TokenCache[_P], token: str) -> _P | None:
        if not self._cache_on:
            return None
        principal = cache.get(token)  # None at or after the entry's end (<= the token's exp)
        self._metrics.observe_token_cache(principal is not None)
        return principal

    def _verify(self, token: str) -> Clerk:
        if (cached := self._cached(self._clerks, token)) is not None:
            return cached
        claims, trusted = self._claims(token, REQUIRED_CLAIMS)
        sub, office = _identifier(claims, "sub"), _identifier(claims, "office")
        name = _display_name(claims)
        jti = claims.get("jti")  # PyJWT has checked it is a string if present
        clerk = Clerk(
            sub,
            _roles(claims),
            office,
            issuer=trusted.issuer,
            name=name,
            jti=jti if isinstance(jti, str) else "",
            issued_at=_number(claims, "iat"),
        )
        if self._cache_on:
            self._clerks.put(token, clerk, _number(claims, "exp"))
        return clerk

    def _verify_principal(self, token: str) -> DepartmentPrincipal:
        if (cached := self._cached(self._principals, token)) is not None:
            return cached
        principal, exp = self._check_principal(token)
        if self._cache_on:
            self._principals.put(token, principal, exp)
        return principal

    def _check_principal(self, token: str) -> tuple[DepartmentPrincipal, float]:
        claims, trusted = self._claims(token, PRINCIPAL_CLAIMS)
        roles = _roles(claims)
        dept = claims.get("dept")
        if dept is None and DEPARTMENT_ROLE in roles:
            raise UnknownCaller("TOKEN_MISSING_CLAIM", "token lacks claim dept", claim="dept")
        if dept is not None and not (isinstance(dept, str) and DEPARTMENT_ID.fullmatch(dept)):
            raise _bad_claim("dept")
        principal = DepartmentPrincipal(
            _identifier(claims, "sub"), roles, dept or "", trusted.issuer
        )
        return principal, _number(claims, "exp")

    def _claims(self, token: str, required: Sequence[str]) -> tuple[dict[str, Any], TrustedIssuer]:
        """Verified claims (signature, alg, iss, aud, ``required``, times) and their issuer."""
        # `from None` below: a chained PyJWT exception could carry token bytes into a traceback.
        if len(token) > MAX_TOKEN_CHARS:
            raise UnknownCaller("TOKEN_MALFORMED", "token is too large")
        try:  # Unverified reads only pick the issuer and key; nothing in them is trusted yet.
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise UnknownCaller("TOKEN_MALFORMED", "token is not a well-formed JWS") from None
        alg = header.get("alg")
        if alg not in ALLOWED_ALGS:
            raise UnknownCaller("TOKEN_ALG_NOT_ALLOWED", "token algorithm is not allowed")
        if unverified.get("iss") is None:
            raise UnknownCaller("TOKEN_MISSING_CLAIM", "token lacks claim iss", claim="iss")
        trusted = self._issuers.get(_text(unverified, "iss"))
        if trusted is None:
            raise UnknownCaller("TOKEN_UNKNOWN_ISSUER", "token issuer is not trusted")
        kid = header.get("kid")  # PyJWT has checked it is a string if present
        if kid is None and len(trusted.keys) == 1:  # only then is it clear which key is meant
            kid = next(iter(trusted.keys))
        vkey = trusted.keys.get(kid) if isinstance(kid, str) else None
        if vkey is None:
            raise UnknownCaller("TOKEN_UNKNOWN_KID", "token key id is not known for its issuer")
        if alg != vkey.alg:
            raise UnknownCaller("TOKEN_ALG_NOT_ALLOWED", "token algorithm does not fit its key")
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
            raise UnknownCaller(
                "TOKEN_MISSING_CLAIM", f"token lacks claim {missing}", claim=missing
            ) from None
        except (InvalidSubjectError, InvalidJTIError) as exc:
            raise _bad_claim("sub" if isinstance(exc, InvalidSubjectError) else "jti") from None
        except jwt.PyJWTError as exc:
            reason, message = next((r, m) for t, r, m in _PYJWT_ERRORS if isinstance(exc, t))
            raise UnknownCaller(reason, message) from None
        self._check_times(claims, trusted.max_lifetime_s)
        return claims, trusted

    def _check_times(self, claims: Mapping[str, Any], max_lifetime_s: float) -> None:
        # The same comparisons PyJWT makes, against the injected clock.
        now, leeway = self._clock(), self._leeway
        exp, iat = _number(claims, "exp"), _number(claims, "iat")
        if exp <= now - leeway:
            raise UnknownCaller("TOKEN_EXPIRED", "token has expired")
        nbf = _number(claims, "nbf") if "nbf" in claims else None
        if iat > now + leeway or (nbf is not None and nbf > now + leeway):
            raise UnknownCaller("TOKEN_NOT_YET_VALID", "token is not valid yet")
        if exp <= iat:
            raise _bad_claim("exp")
        # A stolen token is good until it expires: the issuer's cap bounds how long that is,
        # whatever lifetime the token claims for itself.
        if exp - iat > max_lifetime_s:
            raise UnknownCaller(
                "TOKEN_LIFETIME_TOO_LONG",
                f"token lives longer than its issuer's maximum of {max_lifetime_s:g} s",
            )


def _log_rejected(exc: UnknownCaller) -> None:
    # Reason and claim name only: no part of the token ever reaches the log.
    log.info("token rejected: %s %s", exc.reason, exc.metadata or "")


def _index(issuers: Sequence[TrustedIssuer]) -> dict[str, TrustedIssuer]:
    indexed = {trusted.issuer: trusted for trusted in issuers}
    if not indexed or len(indexed) != len(issuers):
        raise ValueError("need at least one trusted issuer, each configured once")
    return indexed


def _roles(claims: Mapping[str, Any]) -> tuple[str, ...]:
    roles = claims["roles"]
    if (
        not isinstance(roles, list)
        or len(roles) > MAX_ROLES
        or not all(isinstance(r, str) and SAFE_CLAIM.fullmatch(r) for r in roles)
    ):
        raise _bad_claim("roles")
    return tuple(roles)


def _bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    values = [value for key, value in metadata or () if key.lower() == "authorization"]
    if len(values) != 1:
        raise UnknownCaller("TOKEN_MISSING", "need exactly one authorization metadata entry")
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    parts = value.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":  # RFC 7235: scheme is case-insensitive
        raise UnknownCaller("TOKEN_MISSING", "authorization metadata is not a Bearer token")
    return parts[1]
