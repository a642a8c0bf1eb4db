"""The console's state shared by its routes: settings, sessions, templates, the page
navigation (who sees which page), and the exceptions the app turns into pages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from certbroker.console import labels
from certbroker.console.broker import BrokerClient
from certbroker.console.sessions import SESSION_COOKIE, Session, SessionStore
from certbroker.console.signin import AUDITOR, HALL_SUPERVISOR, SECURITY_OFFICER, IdentityProvider


@dataclass(frozen=True)
class Settings:
    """What the console needs: the broker, how users sign in, the checkpoint public key."""

    broker_target: str
    provider: IdentityProvider
    public_key: Path
    session_s: float = 8 * 3600.0


class NotSignedIn(Exception):
    """No live session: the browser goes to the sign-in page."""


class Refused(Exception):
    """The user's role may not see this page (or the broker refused the view)."""

    def __init__(self, page: str, detail: str = "") -> None:
        super().__init__(page)
        self.page = page
        self.detail = detail


class CsrfRefused(Exception):
    """A form without this session's CSRF token."""


@dataclass(frozen=True)
class NavItem:
    """A page in the navigation, and the roles that may see it."""

    path: str
    title: str
    roles: tuple[str, ...]


NAV = (
    NavItem("/overview", "总览", (AUDITOR, HALL_SUPERVISOR)),
    NavItem("/log", "访问日志", (AUDITOR,)),
    NavItem("/report", "公民查询报告", (AUDITOR,)),
    NavItem("/anomalies", "异常", (AUDITOR,)),
    NavItem("/verify", "验证", (AUDITOR,)),
    NavItem("/controls", "访问控制", (SECURITY_OFFICER,)),
)


class Console:
    """The console's state: sessions, the broker client, templates, settings."""

    def __init__(self, settings: Settings, broker: BrokerClient) -> None:
        self.settings = settings
        self.broker = broker
        self.sessions = SessionStore()
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("certbroker.console", "templates"),
            autoescape=True,  # every value from the log is text, never markup
            undefined=jinja2.StrictUndefined,
        )
        env.filters.update(
            when=labels.when,
            when_s=labels.when_seconds,
            age=labels.age,
            number=labels.number,
            role=lambda r: labels.ROLE_NAMES.get(r, r),
            decision=lambda d: labels.DECISIONS.get(d, d),
            breaker=lambda b: labels.BREAKERS.get(b, b),
            rule=lambda r: labels.RULES.get(r, r),
            control_kind=lambda k: labels.CONTROL_KINDS.get(k, k),
        )
        self.templates = Jinja2Templates(env=env)

    def render(
        self,
        request: Request,
        name: str,
        context: Mapping[str, Any] | None = None,
        *,
        status_code: int = 200,
        session: Session | None = None,
    ) -> Response:
        """A page, with the navigation the signed-in user's roles allow."""
        roles = set(session.user.roles) if session else set()
        values: dict[str, Any] = {
            "session": session,
            "nav": [item for item in NAV if roles & set(item.roles)],
            "path": request.url.path,
        }
        values.update(context or {})
        return self.templates.TemplateResponse(request, name, values, status_code=status_code)

    def session(self, request: Request) -> Session | None:
        """The request's live session, if any."""
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def require(self, request: Request, page: str, roles: tuple[str, ...]) -> Session:
        """The session of a user allowed on ``page``; NotSignedIn or Refused otherwise."""
        session = self.session(request)
        if session is None:
            raise NotSignedIn
        if not set(roles) & set(session.user.roles):
            allowed = "、".join(labels.ROLE_NAMES.get(r, r) for r in roles)
            raise Refused(page, f"此页面仅限{allowed}使用。")
        return session

    async def form(self, request: Request, session: Session) -> FormData:
        """The POSTed form, once its CSRF token is the session's."""
        form = await request.form(max_files=2, max_fields=50)
        if not session.check_csrf(form.get("csrf")):
            raise CsrfRefused
        return form
