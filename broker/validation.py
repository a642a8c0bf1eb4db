"""Input validation for caller-supplied strings: presence, length, characters, resident IDs.

Every failure is an ``InvalidArgument`` with a machine-readable reason and the argument's name,
never the offending value (it may be garbage or personal data).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from broker.errors import InvalidArgument
from certbroker import resident_id

#: Longest accepted value per argument (characters).
LIMITS = {
    "record_type": 32,
    "subject_id": 18,
    "matter_code": 64,
    "case_number": 64,
    "consent.reference": 128,
    "field": 64,
}


#: Unicode categories refused in identifiers and escaped in tables: control, format (bidi
#: overrides) and line/paragraph separators.
CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def has_control_characters(value: str) -> bool:
    return any(unicodedata.category(c) in CONTROL_CATEGORIES for c in value)


def text(name: str, value: str, *, required: bool, limit: int | None = None) -> str:
    """Check one string argument and return it unchanged.

    ``limit`` defaults to the argument's entry in :data:`LIMITS` (or the ``field`` limit).
    """
    if not value:
        if required:
            raise InvalidArgument("MISSING_ARGUMENT", f"{name} is required", argument=name)
        return value
    if limit is None:
        limit = LIMITS.get(name, LIMITS["field"])
    if len(value) > limit:
        raise InvalidArgument(
            "ARGUMENT_TOO_LONG", f"{name} is longer than {limit} characters", argument=name
        )
    # Cc/Cf/Zl/Zp: control, format (bidi overrides) and line separators have no place in an
    # identifier and would let a caller forge lines in logs and tables.
    if has_control_characters(value):
        raise InvalidArgument(
            "CONTROL_CHARACTERS", f"{name} contains control characters", argument=name
        )
    return value


def subject_id(value: str) -> str:
    """A resident ID: length, birth date and ISO 7064 MOD 11-2 check digit."""
    text("subject_id", value, required=True)
    problem = resident_id.problem(value)
    if problem is not None:
        raise InvalidArgument(
            "BAD_SUBJECT_ID",
            f"subject_id is not a valid resident ID: {problem}",
            argument="subject_id",
        )
    return value


def field_names(values: Sequence[str]) -> tuple[str, ...]:
    """Requested field paths: each a short clean string, no duplicates."""
    for value in values:
        text("field", value, required=True)
    if len(set(values)) != len(values):
        raise InvalidArgument("DUPLICATE_FIELD", "fields lists a field twice", argument="fields")
    return tuple(values)
