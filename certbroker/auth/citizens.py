"""Citizens as callers: tokens of the citizen issuer (the provincial app's identity provider).

A citizen token is verified against its own issuer and audience, never the clerks' (a clerk's
token is refused with ``TOKEN_NOT_CITIZEN``, and a citizen's token is unknown to the clerks'
authenticator), must carry the role ``citizen`` and the resident ID in the configured claim
(default ``resident_id``), a valid one (length, birth date, check digit). Every refusal is
:class:`certbroker.errors.UnknownCaller` (UNAUTHENTICATED) with a reason:

``TOKEN_NOT_CITIZEN``       the token is a clerk's, or lacks the role ``citizen``
``TOKEN_MISSING_CLAIM``     no resident ID claim (metadata ``claim``)
``TOKEN_BAD_CLAIM``         the claim is not a valid resident ID (metadata ``claim``)
plus every reason of the JWT checks (:mod:`certbroker.auth.authenticator`).

The resident ID comes from the verified token only: a citizen can never name another subject.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from certbroker.auth.authenticator import SAFE_CLAIM, Authenticator
from certbroker.auth.issuers import TrustedIssuer
from certbroker.contract import resident_id
from certbroker.errors import UnknownCaller

__all__ = ["CITIZEN_ROLE", "Citizen", "CitizenAuthenticator"]

CITIZEN_ROLE = "citizen"
_REQUIRED = ("exp", "iat", "iss", "aud", "sub", "roles")


@dataclass(frozen=True)
class Citizen:
    """An authenticated citizen: the token's ``sub`` (the app account), the resident ID."""

    sub: str
    resident_id: str
    issuer: str = ""


class CitizenAuthenticator:
    """Verifies citizen tokens (module docstring).

    ``issuers`` are the citizen issuers (or a function loading them); ``is_clerk_issuer``
    tells a clerk's issuer apart, for the precise refusal.
    """

    def __init__(
        self,
        issuers: Sequence[TrustedIssuer] | Callable[[], Sequence[TrustedIssuer]],
        *,
        is_clerk_issuer: Callable[[str], bool] = lambda _: False,
        id_claim: str = "resident_id",
        leeway_s: int = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # No token cache: citizens call rarely, and each call is verified in full.
        self._auth = Authenticator(issuers, leeway_s=leeway_s, clock=clock, token_max_age_s=0)
        self._is_clerk_issuer = is_clerk_issuer
        self.id_claim = id_claim

    def reload_keys(self) -> bool:
        """Re-read the issuers' keys (SIGHUP), as the clerks' authenticator does."""
        return self._auth.reload_keys()

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Citizen:
        """The citizen of the call's ``authorization: Bearer`` token, or ``UnknownCaller``."""
        try:
            claims, issuer = self._auth.verified_claims(metadata, _REQUIRED)
        except UnknownCaller as exc:
            if exc.reason == "TOKEN_UNKNOWN_ISSUER" and self._is_clerk_issuer(_issuer(metadata)):
                raise UnknownCaller(
                    "TOKEN_NOT_CITIZEN", "a clerk's token cannot call the Citizen service"
                ) from None
            raise
        roles = claims.get("roles")
        if not isinstance(roles, list) or CITIZEN_ROLE not in roles:
            raise UnknownCaller("TOKEN_NOT_CITIZEN", "the token lacks the role citizen")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not SAFE_CLAIM.fullmatch(sub):
            raise UnknownCaller("TOKEN_BAD_CLAIM", "token claim sub is not usable", claim="sub")
        if self.id_claim not in claims:
            raise UnknownCaller(
                "TOKEN_MISSING_CLAIM",
                f"token lacks claim {self.id_claim}",
                claim=self.id_claim,
            )
        value = claims[self.id_claim]
        if not isinstance(value, str) or resident_id.problem(value) is not None:
            raise UnknownCaller(
                "TOKEN_BAD_CLAIM",
                f"token claim {self.id_claim} is not a valid resident ID",
                claim=self.id_claim,
            )
        return Citizen(sub, value, issuer)


def _issuer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The unverified ``iss`` of the bearer token ("" if unreadable): only to word a refusal."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            token = text.split()[-1] if text.split() else ""
            try:
                unverified: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
            except jwt.PyJWTError:
                return ""
            iss = unverified.get("iss")
            return iss if isinstance(iss, str) else ""
    return ""
