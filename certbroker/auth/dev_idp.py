"""The development identity provider behind ``certbroker token issue`` (re-exported by
:mod:`certbroker.auth.authenticator`)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jwt

from certbroker.auth.issuers import (
    DEFAULT_MAX_LIFETIME_S,
    TrustedIssuer,
    VerifyingKey,
    jwk_thumbprint,
)
from certbroker.auth.keyfiles import KeyFiles, ed25519_key_files
from certbroker.auth.principals import DEPARTMENT_ROLE, OPERATOR_ROLE
from certbroker.ids import new_id

__all__ = ["DevIdentityProvider"]


class DevIdentityProvider:
    """`certbroker token issue`: a development IdP keeping an Ed25519 key pair in a state dir.

    ``state_dir/idp/signing-key.pem`` (0600) is created on first use and reused afterwards
    (:func:`certbroker.auth.keyfiles.ed25519_key_files`); ``public-key.pem`` beside it can be given
    to
    :func:`load_issuer` like any issuer's key.
    """

    ISSUER = "https://idp.certbroker.local/dev"
    AUDIENCE = "certbroker"
    #: The citizens' side (the provincial app's IdP, for demos and tests): its own issuer,
    #: audience and key pair (``state_dir/idp-citizen``), so no clerk token is a citizen's.
    CITIZEN_ISSUER = "https://idp.certbroker.local/dev-citizen"
    CITIZEN_AUDIENCE = "certbroker-citizen"

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir
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
        self, dept: str, *, sub: str = "", ttl_s: int = 12 * 3600, now: float | None = None
    ) -> str:
        """Sign a department credential (role "department", claim ``dept``) for the Registry.

        ``sub`` names the adapter deployment; it defaults to ``adapter:<dept>``. The default
        lifetime is the broker's default cap (12 h): adapters re-read their credential file on
        every call, so a fresh one can be put in place before the old one expires.
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

    def issue_citizen(
        self,
        resident_id: str,
        *,
        sub: str = "",
        id_claim: str = "resident_id",
        ttl_s: int = 3600,
        now: float | None = None,
        extra_claims: Mapping[str, object] | None = None,
    ) -> str:
        """Sign a citizen token of the dev citizen issuer: role "citizen", the resident ID in
        ``id_claim``. ``extra_claims`` go in last (tests forge and drop claims with them; a
        value of ``None`` removes the claim)."""
        if ttl_s <= 0:
            raise ValueError("need ttl_s > 0")
        claims = self._base_claims(sub or f"app:{new_id()[:12]}", ["citizen"], ttl_s, now)
        claims |= {"iss": self.CITIZEN_ISSUER, "aud": self.CITIZEN_AUDIENCE, id_claim: resident_id}
        for name, value in (extra_claims or {}).items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        key, kid = self._citizen_key()
        return jwt.encode(claims, key.private_key, algorithm="EdDSA", headers={"kid": kid})

    def citizen_trusted_issuer(
        self, max_lifetime_s: float = DEFAULT_MAX_LIFETIME_S
    ) -> TrustedIssuer:
        """The issuer entry that makes the citizen authenticator accept :meth:`issue_citizen`."""
        files, kid = self._citizen_key()
        vkey = VerifyingKey(files.public_key, "EdDSA")
        return TrustedIssuer(
            self.CITIZEN_ISSUER, self.CITIZEN_AUDIENCE, {kid: vkey}, max_lifetime_s
        )

    def _citizen_key(self) -> tuple[KeyFiles, str]:
        files = ed25519_key_files(self._state_dir / "idp-citizen")
        return files, jwk_thumbprint(files.public_key)

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
            # A unique id per token, so a security officer can revoke this one token.
            "jti": new_id(),
        }

    def _sign(self, claims: Mapping[str, object]) -> str:
        return jwt.encode(dict(claims), self._key, algorithm="EdDSA", headers={"kid": self._kid})

    def trusted_issuer(self, max_lifetime_s: float = DEFAULT_MAX_LIFETIME_S) -> TrustedIssuer:
        """The issuer entry that makes an :class:`Authenticator` accept this IdP's tokens (those
        living at most ``max_lifetime_s``)."""
        return TrustedIssuer(self.ISSUER, self.AUDIENCE, {self._kid: self._vkey}, max_lifetime_s)
