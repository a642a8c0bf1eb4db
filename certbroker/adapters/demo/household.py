"""Household registration (户籍): public security's adapter over its own dataset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from certbroker.adapters.sdk import RecordNotFound, SqliteSource

_PERSON = """
    SELECT r.name, r.gender, r.birth_date, r.ethnicity, h.registered_address, r.household_number,
           head.name AS head_of_household, r.relation_to_head, h.registration_authority
    FROM residents r
    JOIN households h ON h.household_number = r.household_number
    JOIN residents head ON head.resident_id = h.head_resident_id
    WHERE r.resident_id = ?
"""
_MEMBERS = """
    SELECT name, resident_id, relation_to_head FROM residents
    WHERE household_number = ? AND resident_id != ? ORDER BY position
"""


class HouseholdAdapter:
    """户籍 records: the person's registration and the other members of the household."""

    department = "public_security"
    record_type = "household"

    def __init__(self, dataset: Path) -> None:
        self._db = SqliteSource(dataset)

    def fetch(self, subject_id: str, fields: Sequence[str]) -> Mapping[str, Any]:
        """The household record of a registered resident."""
        row = self._db.row(_PERSON, (subject_id,))
        if row is None:
            raise RecordNotFound()
        record: dict[str, Any] = dict(row)
        if "members" in fields:  # the only look-up worth skipping when not asked
            members = self._db.rows(_MEMBERS, (row["household_number"], subject_id))
            record["members"] = [dict(m) for m in members]
        return record

    def close(self) -> None:
        """Close the dataset."""
        self._db.close()
