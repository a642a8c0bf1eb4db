"""Real property (不动产): natural resources' adapter over its own registry dataset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from certbroker.adapters.sdk import RecordNotFound, SqliteSource

_HOLDINGS = """
    SELECT h.certificate_number, h.address, h.usage, h.area_sqm, h.ownership, h.registered_on,
           h.mortgaged, h.seized
    FROM holdings h JOIN owners o ON o.certificate_number = h.certificate_number
    WHERE o.resident_id = ? ORDER BY h.registered_on, h.certificate_number
"""
_CO_OWNERS = """
    SELECT certificate_number, name FROM owners
    WHERE certificate_number IN (SELECT certificate_number FROM owners WHERE resident_id = ?)
      AND resident_id != ? ORDER BY rowid
"""


class PropertyAdapter:
    """不动产 records: every holding a person is a registered owner of, with co-owners."""

    department = "natural_resources"
    record_type = "property"

    def __init__(self, dataset: Path) -> None:
        self._db = SqliteSource(dataset)

    def fetch(self, subject_id: str, fields: Sequence[str]) -> Mapping[str, Any]:
        """The person's holdings; a known person without any has an empty list (无房)."""
        if self._db.row("SELECT 1 FROM persons WHERE resident_id = ?", (subject_id,)) is None:
            raise RecordNotFound()
        co_owners: dict[str, list[str]] = {}
        for row in self._db.rows(_CO_OWNERS, (subject_id, subject_id)):
            co_owners.setdefault(row["certificate_number"], []).append(row["name"])
        holdings = []
        for row in self._db.rows(_HOLDINGS, (subject_id,)):
            holding = dict(row)
            holding["mortgaged"], holding["seized"] = bool(row["mortgaged"]), bool(row["seized"])
            holding["co_owner_names"] = co_owners.get(row["certificate_number"], [])
            holdings.append(holding)
        return {"holdings": holdings}

    def close(self) -> None:
        """Close the dataset."""
        self._db.close()
