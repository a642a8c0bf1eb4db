"""Who a verified token says the caller is: a clerk, or a department / operator principal.

Built by :class:`certbroker.auth.authenticator.Authenticator` from verified claims only (and
re-exported there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["DEPARTMENT_ID", "DEPARTMENT_ROLE", "OPERATOR_ROLE", "Clerk", "DepartmentPrincipal"]


@dataclass(frozen=True)
class Clerk:
    """An authenticated caller, from verified JWT claims."""

    sub: str
    roles: tuple[str, ...]
    office: str
    issuer: str = ""
    name: str = ""
    #: The token's ``jti`` ("" when the issuer sets none) and ``iat``: what revocation matches.
    #: Not compared: two tokens of one clerk name the same caller.
    jti: str = field(default="", compare=False)
    issued_at: float = field(default=0.0, compare=False)


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
