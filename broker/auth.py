"""Clerk authentication: JWT verification against trusted issuers, and a development IdP."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Clerk:
    """An authenticated caller, from verified JWT claims."""

    sub: str
    roles: tuple[str, ...]
    office: str
    issuer: str = ""
    name: str = ""
