"""The console's ASGI application: sign-in, sessions, CSRF, security headers, refusal pages.

:func:`create_app` builds a Starlette app from :class:`Settings`; the pages themselves are in
:mod:`certbroker.console.pages`. Every response carries a strict Content-Security-Policy (scripts
and styles from the console's own origin only, no inline script, no framing); every POST must
carry the session's CSRF token; every value is escaped by Jinja2's autoescaping.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from certbroker.auth.dev_idp import DevIdentityProvider
from certbroker.config import Config
from certbroker.console import pages
from certbroker.console.broker import BrokerClient, BrokerRefusal
from certbroker.console.sessions import (
    PENDING_S,
    SESSION_COOKIE,
    SIGNIN_COOKIE,
)
from certbroker.console.signin import (
    CONSOLE_ROLES,
    DEMO_USERS,
    DevProvider,
    IdentityProvider,
    OidcProvider,
    SignInError,
    signed_in_user,
)
from certbroker.console.web import Console, CsrfRefused, NotSignedIn, Refused, Settings

PACKAGE = resources.files("certbroker.console")
#: Strict: own-origin scripts and styles only (no inline), nothing framed, forms post home.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # The OIDC code travels in a URL: never in a Referer.
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}


def settings_from(cfg: Config) -> Settings:
    """The console's settings from the broker's configuration ([console], [auth], state dir)."""
    provider: IdentityProvider
    if cfg.console_oidc_issuer:
        secret = ""
        if cfg.console_oidc_client_secret_file is not None:
            secret = cfg.console_oidc_client_secret_file.read_text().strip()
        provider = OidcProvider(
            cfg.console_oidc_issuer,
            cfg.console_oidc_authorize_url,
            cfg.console_oidc_token_url,
            cfg.console_oidc_client_id,
            secret,
        )
    elif cfg.dev_idp:
        ttl = int(min(cfg.console_session_s, cfg.dev_idp_max_token_lifetime_s))
        provider = DevProvider(DevIdentityProvider(cfg.state_dir), cfg.console_oidc_client_id, ttl)
    else:
        raise ValueError(
            "the console needs [console] oidc_issuer (or [auth] dev_idp for the demo users)"
        )
    return Settings(cfg.console_target, provider, cfg.checkpoint_public_key, cfg.console_session_s)


class SecurityHeaders:
    """ASGI middleware: the security headers on every response (static files included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                if not scope["path"].startswith("/static/"):
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def _cookie_secure(request: Request) -> bool:
    return request.url.scheme == "https"


async def signin(request: Request) -> Response:
    """Start a sign-in: a pending entry, then the IdP's authorization endpoint."""
    console: Console = request.app.state.console
    pending = console.sessions.begin()
    redirect_uri = str(request.url_for("callback"))
    response = RedirectResponse(
        console.settings.provider.authorize_url(pending, redirect_uri), status_code=302
    )
    # Lax, not Strict: the IdP's redirect back is a cross-site navigation that must carry it.
    response.set_cookie(
        SIGNIN_COOKIE,
        pending.id,
        max_age=int(PENDING_S),
        httponly=True,
        samesite="lax",
        secure=_cookie_secure(request),
    )
    return response


def _dev(console: Console) -> DevProvider:
    provider = console.settings.provider
    if not isinstance(provider, DevProvider):
        raise HTTPException(404)
    return provider


async def dev_authorize(request: Request) -> Response:
    """The development IdP's authorization endpoint: pick a demo user (GET), get a code (POST)."""
    console: Console = request.app.state.console
    provider = _dev(console)
    pending = console.sessions.pending(request.cookies.get(SIGNIN_COOKIE))
    if pending is None:
        return RedirectResponse("/signin", status_code=303)
    params = request.query_params
    if request.method == "GET":
        return console.render(
            request,
            "signin.html",
            {"users": DEMO_USERS, "params": dict(params), "csrf": pending.csrf},
        )
    form = await request.form(max_files=0, max_fields=20)
    csrf = form.get("csrf")
    if not isinstance(csrf, str) or not secrets.compare_digest(csrf, pending.csrf):
        raise CsrfRefused
    user = next((u for u in DEMO_USERS if u.key == form.get("user")), None)
    redirect_uri = str(form.get("redirect_uri", ""))
    if (
        user is None
        or form.get("client_id") != provider.client_id
        or redirect_uri != str(request.url_for("callback"))
        or form.get("code_challenge_method") != "S256"
    ):
        raise HTTPException(400, "bad authorization request")
    code = provider.grant(
        user, str(form.get("nonce", "")), str(form.get("code_challenge", "")), redirect_uri
    )
    state = str(form.get("state", ""))
    return RedirectResponse(f"{redirect_uri}?code={code}&state={state}", status_code=303)


async def callback(request: Request) -> Response:
    """The IdP's redirect back: check state, redeem the code, open the session."""
    console: Console = request.app.state.console
    provider = console.settings.provider
    pending = console.sessions.finish(request.cookies.get(SIGNIN_COOKIE))
    code, state = request.query_params.get("code"), request.query_params.get("state")
    try:
        if pending is None or not state or state != pending.state:
            raise SignInError("登录请求已失效或不属于此浏览器，请重新登录。")
        if not code:
            raise SignInError(f"身份认证服务未登录：{request.query_params.get('error', '')}")
        tokens = await provider.exchange(code, pending.verifier, str(request.url_for("callback")))
        user = signed_in_user(pending, provider, tokens)
    except SignInError as exc:
        response = console.render(
            request, "message.html", {"title": "登录失败", "text": str(exc)}, status_code=400
        )
        response.delete_cookie(SIGNIN_COOKIE)
        return response
    if not set(CONSOLE_ROLES) & set(user.roles):
        response = console.render(
            request,
            "refused.html",
            {
                "page": "审计控制台",
                "user": user,
                "detail": "审计控制台仅供审计员、大厅主管和安全管理员使用。",
            },
            status_code=403,
        )
        response.delete_cookie(SIGNIN_COOKIE)
        return response
    expires = time.time() + console.settings.session_s
    if tokens.expires:
        expires = min(expires, tokens.expires)
    session = console.sessions.open(user, tokens.access_token, expires)
    # A page, not a redirect: the session cookie is SameSite=Strict, and a redirect chain that
    # began at another site (the IdP) would not send it; the page's own navigation does.
    response = console.render(request, "callback.html", {"user": user})
    response.set_cookie(
        SESSION_COOKIE,
        session.id,
        max_age=int(expires - time.time()),
        httponly=True,
        samesite="strict",
        secure=_cookie_secure(request),
    )
    response.delete_cookie(SIGNIN_COOKIE)
    return response


async def signout(request: Request) -> Response:
    """Forget the session (POST, with its CSRF token)."""
    console: Console = request.app.state.console
    session = console.session(request)
    if session is not None:
        await console.form(request, session)
        console.sessions.close(session.id)
    response = console.render(
        request, "message.html", {"title": "已退出", "text": "您已安全退出。"}
    )
    response.delete_cookie(SESSION_COOKIE)
    return response


async def _not_signed_in(request: Request, exc: Exception) -> Response:
    return RedirectResponse("/signin", status_code=303)


async def _refused(request: Request, exc: Exception) -> Response:
    console: Console = request.app.state.console
    assert isinstance(exc, Refused)
    session = console.session(request)
    return console.render(
        request,
        "refused.html",
        {"page": exc.page, "user": session.user if session else None, "detail": exc.detail},
        status_code=403,
        session=session,
    )


async def _csrf(request: Request, exc: Exception) -> Response:
    console: Console = request.app.state.console
    return console.render(
        request,
        "message.html",
        {
            "title": "表单已失效",
            "text": "表单缺少有效的安全令牌（CSRF），请求已拒绝。请返回页面后重试。",
        },
        status_code=403,
        session=console.session(request),
    )


async def _broker_refusal(request: Request, exc: Exception) -> Response:
    """What the broker said, as a page: a refusal, a sign-in again, or a message."""
    console: Console = request.app.state.console
    assert isinstance(exc, BrokerRefusal)
    session = console.session(request)
    if exc.code == "UNAUTHENTICATED":  # expired or revoked: sign in again
        console.sessions.close(session.id if session else None)
        return RedirectResponse("/signin", status_code=303)
    if exc.code == "PERMISSION_DENIED":
        return console.render(
            request,
            "refused.html",
            {
                "page": request.url.path,
                "user": session.user if session else None,
                "detail": f"服务端拒绝了此请求（{exc.reason}）。",
            },
            status_code=403,
            session=session,
        )
    status = 400 if exc.code == "INVALID_ARGUMENT" else 503
    title = "请求有误" if status == 400 else "服务暂不可用"
    return console.render(
        request,
        "message.html",
        {"title": title, "text": f"{exc.reason or exc.code}：{exc.message}"},
        status_code=status,
        session=session,
    )


def create_app(settings: Settings, *, broker: BrokerClient | None = None) -> Starlette:
    """The console as an ASGI app; ``broker`` defaults to a client of ``settings.broker_target``
    (opened and closed with the app's lifespan)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = broker or BrokerClient(settings.broker_target)
        app.state.console = Console(settings, client)
        try:
            yield
        finally:
            if broker is None:
                await client.close()

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        NotSignedIn: _not_signed_in,
        Refused: _refused,
        CsrfRefused: _csrf,
        BrokerRefusal: _broker_refusal,
    }
    static = StaticFiles(directory=str(PACKAGE / "static"))
    routes = [
        Route("/signin", signin),
        Route(DevProvider.AUTHORIZE_PATH, dev_authorize, methods=["GET", "POST"]),
        Route("/auth/callback", callback, name="callback"),
        Route("/signout", signout, methods=["POST"]),
        *pages.routes(),
        Mount("/static", static, name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.add_middleware(SecurityHeaders)
    return app
