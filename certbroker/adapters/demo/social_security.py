"""Social security (社保): human resources and social security's adapter over its own dataset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from certbroker.adapters.sdk import RecordNotFound, SqliteSource

# The dataset's columns are named after the record's fields.
_ACCOUNT = """
    SELECT name, social_security_number, insured_status, employer, insured_since,
           contribution_months, pension_status, monthly_pension_fen, insured_city
    FROM insured WHERE resident_id = ?
"""


class SocialSecurityAdapter:
    """社保 records: insurance status, contributions and pension of an insured person."""

    department = "human_resources_social_security"
    record_type = "social_security"

    def __init__(self, dataset: Path) -> None:
        self._db = SqliteSource(dataset)

    def fetch(self, subject_id: str, fields: Sequence[str]) -> Mapping[str, Any]:
        """The account of an insured person; someone never insured is not found."""
        row = self._db.row(_ACCOUNT, (subject_id,))
        if row is None:
            raise RecordNotFound()
        # monthly_pension_fen is NULL before retirement: None, i.e. "no value".
        return dict(row)

    def close(self) -> None:
        """Close the dataset."""
        self._db.close()
