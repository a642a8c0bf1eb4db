"""Marriage registration (婚姻): civil affairs' adapter over its own dataset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from certbroker.adapters.sdk import RecordNotFound, SqliteSource

_LATEST = """
    SELECT * FROM registrations WHERE kind = ? AND (husband_id = ? OR wife_id = ?)
    ORDER BY registered_on DESC LIMIT 1
"""


class MarriageAdapter:
    """婚姻 records: marital status and the registration behind it.

    已婚: the current marriage and spouse. 离婚: the divorce registration (no spouse). 丧偶: the
    marriage that ended (no spouse). 未婚: the status alone.
    """

    department = "civil_affairs"
    record_type = "marriage"

    def __init__(self, dataset: Path) -> None:
        self._db = SqliteSource(dataset)

    def fetch(self, subject_id: str, fields: Sequence[str]) -> Mapping[str, Any]:
        """The marriage record of an adult; minors are not in the registry."""
        person = self._db.row(
            "SELECT marital_status FROM persons WHERE resident_id = ?", (subject_id,)
        )
        if person is None:
            raise RecordNotFound()
        status = person["marital_status"]
        record: dict[str, Any] = {"marital_status": status}
        kind = "离婚" if status == "离婚" else "结婚"
        reg = self._db.row(_LATEST, (kind, subject_id, subject_id)) if status != "未婚" else None
        if reg is not None:
            record["registered_on"] = reg["registered_on"]
            record["registration_office"] = reg["registration_office"]
            record["certificate_number"] = reg["certificate_number"]
            if status == "已婚":
                spouse = "wife" if reg["husband_id"] == subject_id else "husband"
                record["spouse_name"] = reg[f"{spouse}_name"]
                record["spouse_resident_id"] = reg[f"{spouse}_id"]
        return record

    def close(self) -> None:
        """Close the dataset."""
        self._db.close()
