"""PRC resident identity numbers (GB 11643-1999), part of the contract both sides validate.

18 characters: 6-digit administrative area code, 8-digit birth date (YYYYMMDD), 3-digit
sequence (odd for men, even for women), and an ISO 7064 MOD 11-2 check character (0-9 or X).
"""

from __future__ import annotations

import datetime as dt

_WEIGHTS = tuple(pow(2, 17 - i, 11) for i in range(17))
_CHECK = "10X98765432"


def check_character(first17: str) -> str:
    """The ISO 7064 MOD 11-2 check character for the first 17 digits."""
    total = sum(int(c) * w for c, w in zip(first17, _WEIGHTS, strict=True))
    return _CHECK[total % 11]


def problem(value: str) -> str | None:
    """Why ``value`` is not a valid resident ID, or None when it is."""
    if len(value) != 18:
        return "must be 18 characters"
    if not value[:17].isascii() or not value[:17].isdigit():
        return "first 17 characters must be digits"
    if value[17] not in "0123456789X":
        return "last character must be a digit or X"
    try:
        born = dt.date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    except ValueError:
        return "birth date is not a real date"
    if not dt.date(1900, 1, 1) <= born <= dt.date.today():
        return "birth date is out of range"
    if check_character(value[:17]) != value[17]:
        return "check digit does not match"
    return None


def make(area: str, born: dt.date, sequence: int) -> str:
    """Build a valid resident ID (used for synthetic citizens)."""
    first17 = f"{area}{born:%Y%m%d}{sequence:03d}"
    return first17 + check_character(first17)


def birth_date(value: str) -> dt.date:
    """The birth date encoded in a valid resident ID."""
    return dt.date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
