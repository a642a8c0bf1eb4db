"""Server-side sessions and CSRF tokens of the console.

The browser holds only a random session id, in an HttpOnly, SameSite=Strict cookie (Secure
under TLS); the user's token stays in this process, so no script and no other site ever sees
it. Every session has its own CSRF token, which every form carries and every POST must
return (:meth:`Session.check_csrf`). A sign-in in progress (OIDC ``state``, ``nonce``, PKCE
verifier) is a :class:`Pending` entry behind its own short-lived cookie.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from base64 import urlsafe_b64encode
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

SESSION_COOKIE = "cb_session"
SIGNIN_COOKIE = "cb_signin"
#: How long a sign-in may take between the sign-in page and the IdP's redirect back.
PENDING_S = 600.0
#: Sessions and pending sign-ins kept at most (oldest dropped first): memory stays bounded.
MAX_ENTRIES = 10_000
_T = TypeVar("_T")


@dataclass(frozen=True)
class User:
    """Who is signed in, as their token says (the broker checks the token on every call)."""

    sub: str
    name: str
    roles: tuple[str, ...]
    office: str


@dataclass
class Session:
    """One signed-in browser."""

    id: str
    user: User
    token: str = field(repr=False)
    expires: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)

    def check_csrf(self, value: object) -> bool:
        """Whether a form's ``csrf`` field is this session's token."""
        return isinstance(value, str) and secrets.compare_digest(value, self.csrf)


@dataclass
class Pending:
    """A sign-in in progress: what the IdP's redirect back must match."""

    id: str
    state: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    nonce: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    verifier: str = field(default_factory=lambda: secrets.token_urlsafe(48), repr=False)
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    expires: float = 0.0

    @property
    def challenge(self) -> str:
        """The PKCE S256 code challenge of :attr:`verifier`."""
        return pkce_challenge(self.verifier)


def pkce_challenge(verifier: str) -> str:
    """The S256 code challenge of a PKCE verifier (RFC 7636 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class SessionStore:
    """Sessions and pending sign-ins by id, in memory (one console process)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._pending: dict[str, Pending] = {}

    def open(self, user: User, token: str, expires: float) -> Session:
        """A new session for ``user`` (a fresh id: no fixation of an id set before sign-in)."""
        session = Session(secrets.token_urlsafe(32), user, token, expires)
        with self._lock:
            _bounded(self._sessions)[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session of this id, if any (an expired one is dropped)."""
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires <= self._clock():
                del self._sessions[session_id]
                return None
            return session

    def close(self, session_id: str | None) -> None:
        """Sign out: forget the session (and with it the token)."""
        with self._lock:
            self._sessions.pop(session_id or "", None)

    def begin(self) -> Pending:
        """A new sign-in in progress."""
        pending = Pending(secrets.token_urlsafe(24), expires=self._clock() + PENDING_S)
        with self._lock:
            _bounded(self._pending)[pending.id] = pending
        return pending

    def pending(self, pending_id: str | None) -> Pending | None:
        """The sign-in in progress of this id, if still live (not removed)."""
        with self._lock:
            found = self._pending.get(pending_id or "")
        return found if found is not None and found.expires > self._clock() else None

    def finish(self, pending_id: str | None) -> Pending | None:
        """Remove and return the sign-in in progress: each one completes at most once."""
        with self._lock:
            found = self._pending.pop(pending_id or "", None)
        return found if found is not None and found.expires > self._clock() else None


def _bounded(entries: dict[str, _T]) -> dict[str, _T]:
    """``entries`` with room for one more (dicts keep insertion order: oldest first)."""
    while len(entries) >= MAX_ENTRIES:
        del entries[next(iter(entries))]
    return entries
