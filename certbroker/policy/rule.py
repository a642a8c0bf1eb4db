"""One allow rule of a policy and the request it is checked against (see
:mod:`certbroker.policy.model`).

:meth:`Rule.failure` checks a rule's conditions in a fixed order (office, hours, consent, case
number) and says which failed and how far the request got, so that a denial can name the
candidate rule that came closest.

Office patterns: an office code is segments separated by ``-`` (``gz-haizhu-hall-01``); a
pattern is the same, where a segment ``*`` matches exactly one non-empty segment of the code
and any other segment matches itself, case-sensitively (``gz-*-hall-*`` matches
``gz-haizhu-hall-01``, not ``gz--hall-`` nor ``gz-x-24h-01-hall-9``). No other wildcard
exists. Every pattern here matches ASCII only: office segments are explicit ASCII classes, and
case-number patterns are compiled with ``re.ASCII`` (``\\d`` is ``[0-9]``, not full-width or
other scripts' digits) unless the policy says ``unicode: true``
(:mod:`certbroker.policy.schema`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from certbroker.auth.authenticator import Clerk
from certbroker.policy.hours import Hours

#: Machine codes for ``Decision.condition`` (empty for allow, matter-scope and default-deny).
OFFICE_NOT_ALLOWED = "OFFICE_NOT_ALLOWED"
OUTSIDE_HOURS = "OUTSIDE_HOURS"
CONSENT_REQUIRED = "CONSENT_REQUIRED"
CASE_NUMBER_REQUIRED = "CASE_NUMBER_REQUIRED"


class Catalogued(Protocol):
    """What :meth:`Rule.release` needs of a record type: its name and its fields in catalogue
    order (a :class:`certbroker.policy.model.RecordType`, which builds on this module)."""

    @property
    def name(self) -> str: ...

    @property
    def fields(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class Conditions:
    """What must hold for a rule to allow; an empty condition does not restrict."""

    offices: tuple[str, ...] = ()  # office patterns (module docstring); any may match
    hours: tuple[Hours, ...] = ()  # any window may match
    consent: tuple[str, ...] = ()  # accepted consent methods
    case_number_required: bool = False
    case_number_pattern: re.Pattern[str] | None = None  # full match; implies required

    def __post_init__(self) -> None:
        for pattern in self.offices:
            problem = office_pattern_problem(pattern)
            if problem is not None:
                raise ValueError(f"office pattern {pattern!r}: {problem}")

    @property
    def needs_case_number(self) -> bool:
        return self.case_number_required or self.case_number_pattern is not None


@dataclass(frozen=True)
class Failure:
    """The first condition a rule fails for a request."""

    stage: int  # position in the condition order; higher = the rule got further
    code: str
    detail: str


@dataclass(frozen=True)
class Rule:
    """One allow rule. ``fields``/``masks`` are keyed by record type; an unlisted record type
    has no field restriction and no masks."""

    id: str
    roles: tuple[str, ...]
    matters: tuple[str, ...]
    record_types: tuple[str, ...] = ()  # empty: every record type the matter needs
    fields: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    masks: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    conditions: Conditions = Conditions()
    description: str = ""
    source: str = ""  # "path:line" of its definition

    def covers(self, roles: Sequence[str], matter_code: str, record_type: str) -> bool:
        """Whether the rule is a candidate for these clerk roles, matter and record type."""
        return (
            not set(self.roles).isdisjoint(roles)
            and matter_code in self.matters
            and (not self.record_types or record_type in self.record_types)
        )

    def office_allows(self, office: str) -> bool:
        globs = self.conditions.offices
        return not globs or office_matcher(globs)(office) is not None

    def failure(self, request: Request) -> Failure | None:
        """The first condition the request fails, or None when all pass."""
        cond = self.conditions
        if not self.office_allows(request.clerk.office):
            allowed = ", ".join(cond.offices)
            return Failure(
                0,
                OFFICE_NOT_ALLOWED,
                f"office {clip(request.clerk.office)!r} is "
                f"not among the offices it allows ({allowed})",
            )
        if cond.hours and not any(h.contains(request.now) for h in cond.hours):
            windows = "; ".join(h.describe() for h in cond.hours)
            return Failure(1, OUTSIDE_HOURS, f"outside its opening hours ({windows})")
        if cond.consent and request.consent_method not in cond.consent:
            return Failure(
                2,
                CONSENT_REQUIRED,
                "it requires the citizen's consent by one of: " + ", ".join(cond.consent),
            )
        if cond.needs_case_number:
            if not request.case_number:
                return Failure(3, CASE_NUMBER_REQUIRED, "it requires a case number (办件号)")
            pattern = cond.case_number_pattern
            if pattern is not None and not pattern.fullmatch(request.case_number):
                # The case number is not echoed: it is caller input of unbounded size.
                return Failure(
                    3,
                    CASE_NUMBER_REQUIRED,
                    f"the case number (办件号) does not have the required format {pattern.pattern}",
                )
        return None

    def release(
        self, record_type: Catalogued, needed: Sequence[str], requested: Sequence[str]
    ) -> tuple[str, ...]:
        """Fields released: needed ∩ rule restriction ∩ requested (if any), catalogue order."""
        keep = set(needed)
        restriction = self.fields.get(record_type.name)
        if restriction is not None:
            keep &= set(restriction)
        if requested:
            keep &= set(requested)
        return tuple(f for f in record_type.fields if f in keep)


@dataclass(frozen=True)
class Request:
    """One lookup to decide. ``fields`` empty = all the matter needs; ``now`` must be aware."""

    clerk: Clerk
    record_type: str
    matter_code: str
    case_number: str
    consent_method: str  # "" when the citizen's consent was not recorded
    fields: tuple[str, ...]
    now: datetime


#: One segment of an office code: the characters a token's office may hold
#: (:data:`certbroker.auth.authenticator.SAFE_CLAIM`) but the separator; explicit ASCII.
_SEGMENT = r"[A-Za-z0-9_.:@/+|]+"
_LITERAL_SEGMENT = re.compile(_SEGMENT)
#: The segment that matches any one segment.
WILDCARD = "*"


def office_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not an office pattern (module docstring), or None if it is one."""
    for segment in pattern.split("-"):
        if segment != WILDCARD and not _LITERAL_SEGMENT.fullmatch(segment):
            return (
                "segments (separated by '-') must each be '*' or non-empty ASCII letters, "
                "digits or _ . : @ / + |"
            )
    return None


@functools.lru_cache(maxsize=256)
def office_matcher(patterns: tuple[str, ...]) -> Callable[[str], re.Match[str] | None]:
    """One compiled regex for "any of these office patterns matches the whole office"."""
    alternatives = (
        "-".join(_SEGMENT if s == WILDCARD else re.escape(s) for s in p.split("-"))
        for p in patterns
    )
    return re.compile("(?:" + "|".join(alternatives) + ")", re.ASCII).fullmatch


def clip(text: str, limit: int = 64) -> str:
    """``text`` cut to ``limit`` characters (and an ellipsis)."""
    # Caller-supplied names end up in messages and logs; keep them short.
    return text if len(text) <= limit else text[:limit] + "…"
