"""Quotas declared in the policy: how much one clerk may look up, per role, in a sliding window.

A policy file's ``quotas:`` section (read by :mod:`certbroker.policy.schema`, checked by
:mod:`certbroker.policy.loader`)::

    quotas:
      - id: window-clerk-citizens        # stable: audit entries name it (rule_id) on a refusal
        description: optional text
        roles: [window_clerk]            # applies to every clerk holding one of these roles
        distinct_subjects: 60            # at most 60 distinct citizens ...
        per: 1h                          # ... within any hour (30s, 15m, 1h, 1d; at most 1d)
      - id: window-clerk-rate
        roles: [window_clerk]
        lookups: 30                      # at most 30 lookups (records) ...
        per: 1m                          # ... within any minute

Semantics (the broker's :mod:`certbroker.policy.counters` and ``certbroker policy test`` run the
same code):

* A quota counts per clerk (the token's ``sub``), over a sliding window of ``per`` seconds
  ending now. Every quota naming one of the clerk's roles applies; all must admit a lookup.
* What counts is an *admitted* lookup: one the policy allowed and every quota admitted. A
  denied lookup (by policy, a frozen citizen, a control, or a quota itself) releases nothing and
  counts toward nothing, so a clerk past a quota is admitted again as the window slides.
* ``distinct_subjects``: a lookup of a citizen the clerk already looked up within the window
  never exceeds it (it adds no new citizen); the (N+1)th new citizen does.
* ``lookups``: each admitted record counts one; each item of a ``LookupMatter`` is one record
  (a package's record shared by several member matters counts once per member item), each
  admitted in item order, so a bundle may be served in part.
* A lookup counts when it is admitted, before the department answers: a fetch that then fails
  still counted (the check and the count are one step, which is what keeps them exact).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from certbroker.contract.reasons import QUOTA_EXCEEDED as QUOTA_EXCEEDED  # noqa: PLC0414

# QUOTA_EXCEEDED: the reason (PERMISSION_DENIED) and the decision condition past a quota.
#: What a quota limits: distinct citizens, or lookups (records).
KINDS = ("distinct_subjects", "lookups")
#: The longest window: counters keep a day of history and no more.
MAX_PER_S = 86400
#: A window as written: 30s, 15m, 1h, 1d (or an integer number of seconds).
_DURATION = re.compile(r"([1-9]\d{0,5})([smhd]?)", re.ASCII)
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Quota:
    """One quota (see the module docstring): at most ``limit`` of ``kind`` per ``per_s``."""

    id: str
    roles: tuple[str, ...]
    kind: str  # one of KINDS
    limit: int
    per_s: int
    description: str = ""
    source: str = ""  # path:line where it is declared

    def applies_to(self, roles: tuple[str, ...]) -> bool:
        """Whether a clerk holding ``roles`` is bound by this quota."""
        return any(role in self.roles for role in roles)

    def describe(self) -> str:
        """For humans: "at most 60 distinct citizens per 1h"."""
        what = "distinct citizens" if self.kind == "distinct_subjects" else "lookups"
        return f"at most {self.limit} {what} per {duration_text(self.per_s)}"


def parse_duration(text: str) -> int | None:
    """Seconds of a window written ``30s``, ``15m``, ``1h``, ``1d`` or ``90``; None if it is
    not one, or not within 1 s .. 1 d."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        return None
    seconds = int(match[1]) * _UNIT_S[match[2]]
    return seconds if 1 <= seconds <= MAX_PER_S else None


def duration_text(seconds: int) -> str:
    """The shortest exact spelling of a window: 3600 → ``1h``, 90 → ``90s``."""
    for unit in ("d", "h", "m"):
        size = _UNIT_S[unit]
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
