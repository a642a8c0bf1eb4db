"""A complete 户籍 (household) adapter: one class and one call to ``sdk.main``.

python -m certbroker.adapters.examples.hukou_minimal --db household.sqlite --broker-public-key
broker.pem
    [--register BROKER:PORT --credential-file dept.jwt] [--tls-cert ... --tls-key ...]
"""

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from certbroker.adapters import sdk

QUERY = "SELECT name, gender, birth_date, ethnicity FROM residents WHERE resident_id = ?"


class Hukou:
    department = "public_security"
    record_type = "household"

    def __init__(self, db: Path) -> None:
        self.db = sdk.SqliteSource(db)  # read-only

    def fetch(self, subject_id: str, fields: Sequence[str]) -> Mapping[str, Any]:
        row = self.db.row(QUERY, (subject_id,))
        if row is None:
            raise sdk.RecordNotFound()
        return dict(row)  # the SDK keeps only the fields the broker's decision allows


def main(argv: Sequence[str] | None = None) -> int:
    def args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--db", type=Path, required=True)

    return sdk.main(lambda a: [Hukou(a.db)], argv=argv, add_adapter_arguments=args)


if __name__ == "__main__":
    sys.exit(main())
