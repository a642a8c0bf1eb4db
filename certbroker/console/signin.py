"""Sign-in: the OpenID Connect authorization-code flow (with PKCE), against a configured IdP or
the embedded development IdP.

Both are an :class:`IdentityProvider`: the console sends the browser to its authorization
endpoint with ``state``, ``nonce`` and a PKCE challenge, takes the ``code`` back at
``/auth/callback``, exchanges it, checks ``state`` and the ID token's ``iss``, ``aud``,
``nonce`` and ``exp``, and keeps the access token -- a JWT the broker trusts (``[[auth.issuers]]``)
-- as the session's token for every gRPC call. The ID token comes straight from the token
endpoint over TLS, which OIDC Core 3.1.3.7 accepts in place of checking its signature; the
access token's claims (roles, office) are read for display only: the broker verifies the token
on every call, so a forged claim gets nothing but a refusal.

:class:`DevProvider` is the development IdP of the broker's state dir (``certbroker token issue``)
with an authorization endpoint of its own (``/dev-idp/authorize``): a page listing the demo
users. It mints the same tokens ``token issue`` prints, so it is exactly as trusted as that.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import jwt

from certbroker.auth.dev_idp import DevIdentityProvider
from certbroker.console.sessions import Pending, User, pkce_challenge

AUDITOR = "auditor"
HALL_SUPERVISOR = "hall_supervisor"
SECURITY_OFFICER = "security_officer"
#: The roles the console serves; anyone else is refused at sign-in.
CONSOLE_ROLES = (AUDITOR, HALL_SUPERVISOR, SECURITY_OFFICER)
#: A code must be redeemed this soon after it was issued (development IdP).
CODE_TTL_S = 60.0


class SignInError(Exception):
    """The sign-in failed (a mismatched state or nonce, a refused code...): the message says
    why, in terms safe to show (never a token)."""


@dataclass(frozen=True)
class Tokens:
    """What a code was exchanged for: the ID token's claims and the broker token."""

    id_claims: Mapping[str, Any]
    access_token: str
    expires: float


class IdentityProvider(Protocol):
    """Where the console signs users in (OIDC authorization-code flow)."""

    issuer: str
    client_id: str

    def authorize_url(self, pending: Pending, redirect_uri: str) -> str:
        """Where to send the browser to sign in."""
        ...

    async def exchange(self, code: str, verifier: str, redirect_uri: str) -> Tokens:
        """Redeem an authorization code (with its PKCE verifier); raise SignInError."""
        ...


def authorize_query(client_id: str, pending: Pending, redirect_uri: str) -> str:
    """The query string of an authorization request (code flow, PKCE S256)."""
    return urllib.parse.urlencode(
        {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "scope": "openid profile",
            "state": pending.state,
            "nonce": pending.nonce,
            "code_challenge": pending.challenge,
            "code_challenge_method": "S256",
        }
    )


class OidcProvider:
    """A real OpenID Connect provider: its authorization and token endpoints."""

    def __init__(
        self,
        issuer: str,
        authorize_url: str,
        token_url: str,
        client_id: str,
        client_secret: str = "",
        timeout_s: float = 10.0,
    ) -> None:
        self.issuer = issuer
        self.client_id = client_id
        self._authorize = authorize_url
        self._token = token_url
        self._secret = client_secret
        self._timeout = timeout_s

    def authorize_url(self, pending: Pending, redirect_uri: str) -> str:
        """The IdP's authorization endpoint with this sign-in's parameters."""
        joiner = "&" if "?" in self._authorize else "?"
        return self._authorize + joiner + authorize_query(self.client_id, pending, redirect_uri)

    async def exchange(self, code: str, verifier: str, redirect_uri: str) -> Tokens:
        """POST the code to the token endpoint; the answer must hold both tokens."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "client_id": self.client_id,
            "code_verifier": verifier,
        }
        reply = await asyncio.to_thread(self._post, urllib.parse.urlencode(form).encode())
        id_token, access = reply.get("id_token"), reply.get("access_token")
        if not isinstance(id_token, str) or not isinstance(access, str):
            raise SignInError("the identity provider's answer has no ID token or access token")
        try:
            claims = jwt.decode(id_token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise SignInError("the identity provider's ID token is malformed") from None
        expires_in = reply.get("expires_in")
        expires = time.time() + float(expires_in) if isinstance(expires_in, int | float) else 0.0
        return Tokens(claims, access, expires)

    def _post(self, body: bytes) -> dict[str, Any]:
        request = urllib.request.Request(self._token, data=body, method="POST")  # noqa: S310
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
        request.add_header("Accept", "application/json")
        if self._secret:  # client_secret_basic (RFC 6749 2.3.1)
            pair = f"{urllib.parse.quote(self.client_id)}:{urllib.parse.quote(self._secret)}"
            request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as answer:  # noqa: S310
                data = json.loads(answer.read(1 << 20))
        except (OSError, ValueError) as exc:
            raise SignInError(f"the identity provider's token endpoint refused: {exc}") from None
        if not isinstance(data, dict):
            raise SignInError("the identity provider's token endpoint answered no JSON object")
        return data


@dataclass(frozen=True)
class DemoUser:
    """A user the development IdP's sign-in page offers."""

    key: str
    sub: str
    name: str
    title: str
    roles: tuple[str, ...]
    office: str


#: The demo users: one per console role, and a window clerk, whom the console refuses.
DEMO_USERS: tuple[DemoUser, ...] = (
    DemoUser("auditor", "aud-01", "王芳", "审计员", (AUDITOR,), "audit-office"),
    DemoUser("supervisor", "sup-01", "陈刚", "大厅主管", (HALL_SUPERVISOR,), "gz-haizhu-24h-01"),
    DemoUser("security", "sec-01", "赵敏", "安全管理员", (SECURITY_OFFICER,), "security-office"),
    DemoUser("clerk", "clerk-0417", "李敏", "综合受理窗口", ("window_clerk",), "gz-haizhu-24h-01"),
)


@dataclass(frozen=True)
class _Grant:
    user: DemoUser
    nonce: str
    challenge: str
    redirect_uri: str
    expires: float


class DevProvider:
    """The development IdP as an OIDC provider (module docstring). Its authorization endpoint
    is the console's ``/dev-idp/authorize`` page; codes are single-use and short-lived."""

    AUTHORIZE_PATH = "/dev-idp/authorize"

    def __init__(self, idp: DevIdentityProvider, client_id: str, token_ttl_s: int) -> None:
        self.issuer = idp.ISSUER
        self.client_id = client_id
        self._idp = idp
        self._ttl = token_ttl_s
        self._lock = threading.Lock()
        self._grants: dict[str, _Grant] = {}

    def authorize_url(self, pending: Pending, redirect_uri: str) -> str:
        """The demo users' page, with this sign-in's parameters."""
        return f"{self.AUTHORIZE_PATH}?" + authorize_query(self.client_id, pending, redirect_uri)

    def grant(self, user: DemoUser, nonce: str, challenge: str, redirect_uri: str) -> str:
        """A code for ``user`` (the demo page's choice)."""
        code = secrets.token_urlsafe(32)
        with self._lock:
            now = time.time()
            self._grants = {k: g for k, g in self._grants.items() if g.expires > now}
            self._grants[code] = _Grant(user, nonce, challenge, redirect_uri, now + CODE_TTL_S)
        return code

    async def exchange(self, code: str, verifier: str, redirect_uri: str) -> Tokens:
        """Redeem a code of :meth:`grant`: a token ``certbroker token issue`` would print."""
        with self._lock:
            grant = self._grants.pop(code, None)
        if grant is None or grant.expires <= time.time():
            raise SignInError("the sign-in code is unknown, used or expired")
        if not secrets.compare_digest(pkce_challenge(verifier), grant.challenge):
            raise SignInError("the sign-in code was issued for another browser (PKCE)")
        if redirect_uri != grant.redirect_uri:
            raise SignInError("the sign-in code was issued for another redirect address")
        user = grant.user
        now = time.time()
        token = self._idp.issue(user.sub, user.roles, user.office, name=user.name, ttl_s=self._ttl)
        claims = {
            "iss": self.issuer,
            "aud": self.client_id,
            "sub": user.sub,
            "name": user.name,
            "nonce": grant.nonce,
            "iat": int(now),
            "exp": int(now) + self._ttl,
        }
        return Tokens(claims, token, now + self._ttl)


def signed_in_user(pending: Pending, provider: IdentityProvider, tokens: Tokens) -> User:
    """The user of a redeemed code, once the ID token is this sign-in's; raise SignInError."""
    claims = tokens.id_claims
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    if claims.get("iss") != provider.issuer:
        raise SignInError("the ID token is from another issuer")
    if provider.client_id not in audiences:
        raise SignInError("the ID token is for another client")
    if not isinstance(claims.get("nonce"), str) or not secrets.compare_digest(
        str(claims["nonce"]), pending.nonce
    ):
        raise SignInError("the ID token is not this sign-in's (nonce)")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or exp <= time.time():
        raise SignInError("the ID token has expired")
    try:  # for display and page choice only: the broker verifies the token on every call
        access = jwt.decode(tokens.access_token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise SignInError("the access token is not a JWT the broker could accept") from None
    roles = access.get("roles")
    return User(
        sub=str(claims.get("sub") or access.get("sub") or ""),
        name=str(claims.get("name") or access.get("name") or ""),
        roles=tuple(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else (),
        office=str(access.get("office") or ""),
    )
