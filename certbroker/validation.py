"""Input validation for caller-supplied strings: presence, length, characters, resident IDs.

Every failure is an ``InvalidArgument`` with a machine-readable reason and the argument's name,
never the offending value (it may be garbage or personal data).
"""

from __future__ import annotations

import threading
import unicodedata
from collections.abc import Sequence

from certbroker.contract import resident_id
from certbroker.errors import InvalidArgument

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
    """Whether ``value`` holds a character of :data:`CONTROL_CATEGORIES`."""
    # Fast path: str.isprintable() is False for every character in categories C* and Z*
    # except the ASCII space, so a printable string has none of ours. Only the rare string
    # that is not printable (a tab, a private-use character...) is checked character by
    # character.
    if value.isprintable():
        return False
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


#: Resident IDs already found valid (the same citizens come back all day: a bundle names each
#: subject several times, and the counter repeats a lookup). Only valid ones are kept: a valid
#: ID stays valid (its birth date only gets further in the past), while an invalid one may
#: become valid at midnight. Bounded; emptied when full.
_VALID_IDS: dict[str, None] = {}
_VALID_IDS_MAX = 8192
_valid_lock = threading.Lock()


def subject_id(value: str) -> str:
    """A resident ID: length, birth date and ISO 7064 MOD 11-2 check digit."""
    if value in _VALID_IDS:
        return value
    text("subject_id", value, required=True)
    problem = resident_id.problem(value)
    if problem is not None:
        raise InvalidArgument(
            "BAD_SUBJECT_ID",
            f"subject_id is not a valid resident ID: {problem}",
            argument="subject_id",
        )
    with _valid_lock:
        if len(_VALID_IDS) >= _VALID_IDS_MAX:
            _VALID_IDS.clear()
        _VALID_IDS[value] = None
    return value


def field_names(values: Sequence[str]) -> tuple[str, ...]:
    """Requested field paths: each a short clean string, no duplicates."""
    for value in values:
        text("field", value, required=True)
    if len(set(values)) != len(values):
        raise InvalidArgument("DUPLICATE_FIELD", "fields lists a field twice", argument="fields")
    return tuple(values)
